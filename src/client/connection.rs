//! One connection of the client to a server, over TCP or a QUIC stream, as a
//! stream of parsed server lines.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client_proto::{Request, ServerMessage};
use crate::lines::LineReader;

/// Longest server line the client accepts (a roomlist of a big cluster is long).
const MAX_SERVER_LINE: usize = 4 * 1024 * 1024;

/// How to reach servers.
#[derive(Clone)]
pub enum Transport {
    /// Plain TCP, the classic protocol's transport.
    Tcp,
    /// QUIC with server certificates checked against the cluster CA.
    Quic(quinn::ClientConfig),
}

/// How often a quiet QUIC client pings its server.
const KEEP_ALIVE: Duration = Duration::from_millis(500);
/// How long a QUIC client waits for any packet before it takes its server for dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);

impl Transport {
    /// QUIC, trusting the CA certificate at `ca`.
    pub fn quic(ca: &Path) -> Result<Transport> {
        // A server killed outright sends nothing: without a short idle timeout
        // the client would learn of it only after the server's 30 s. Pings
        // every 500 ms, and 2 s without an answer ends the connection (the
        // client then moves to another server).
        let config = crate::tls::quic_chat_client_config(ca, KEEP_ALIVE, Some(IDLE_TIMEOUT))?;
        Ok(Transport::Quic(config))
    }
}

/// An open session transport.
pub struct Connection {
    transport: Transport,
    reader: LineReader<Box<dyn AsyncRead + Unpin + Send>>,
    writer: Box<dyn AsyncWrite + Unpin + Send>,
    quic: Option<(quinn::Endpoint, quinn::Connection)>,
}

impl Connection {
    /// Connects to `server` (`host:port`).
    pub async fn open(transport: &Transport, server: &str) -> Result<Connection> {
        let (host, port) = split_host_port(server)?;
        let addr = crate::config::resolve_host(host, port)
            .with_context(|| format!("cannot resolve {server}"))?;
        match transport {
            Transport::Tcp => {
                let stream = TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("cannot connect to {server} over TCP"))?;
                stream.set_nodelay(true)?;
                let (reader, writer) = stream.into_split();
                Ok(Connection {
                    transport: transport.clone(),
                    reader: LineReader::new(Box::new(reader), MAX_SERVER_LINE),
                    writer: Box::new(writer),
                    quic: None,
                })
            }
            Transport::Quic(config) => {
                let bind: SocketAddr = if addr.is_ipv4() {
                    "0.0.0.0:0".parse()?
                } else {
                    "[::]:0".parse()?
                };
                let mut endpoint = quinn::Endpoint::client(bind)?;
                endpoint.set_default_client_config(config.clone());
                let connection = endpoint
                    .connect(addr, host)
                    .with_context(|| format!("cannot connect to {server} over QUIC"))?
                    .await
                    .with_context(|| {
                        format!("cannot connect to {server} over QUIC (is the server up, and is its certificate from this CA?)")
                    })?;
                let (send, recv) = connection.open_bi().await?;
                Ok(Connection {
                    transport: transport.clone(),
                    reader: LineReader::new(Box::new(recv), MAX_SERVER_LINE),
                    writer: Box::new(send),
                    quic: Some((endpoint, connection)),
                })
            }
        }
    }

    /// The transport this connection uses (for following a route).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// "TCP" or "QUIC".
    pub fn transport_name(&self) -> &'static str {
        match self.transport {
            Transport::Tcp => "TCP",
            Transport::Quic(_) => "QUIC",
        }
    }

    /// Sends one request line.
    pub async fn send(&mut self, request: &Request) -> Result<()> {
        self.writer
            .write_all(&request.encode())
            .await
            .context("cannot send to the server")?;
        self.writer
            .flush()
            .await
            .context("cannot send to the server")
    }

    /// The next server line we understand; `None` when the server closed.
    /// Cancel-safe.
    pub async fn recv(&mut self) -> Result<Option<ServerMessage>> {
        loop {
            let line = match self.reader.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(None),
                Err(crate::lines::LineError::Io(e)) if is_closed(&e) => return Ok(None),
                Err(e) => return Err(e).context("cannot read from the server"),
            };
            match ServerMessage::parse(line) {
                Ok(message) => return Ok(Some(message)),
                Err(e) => {
                    tracing::debug!(error = %e, "ignoring a server line we do not understand")
                }
            }
        }
    }

    /// [`Connection::recv`] with a deadline.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<ServerMessage>> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| anyhow!("no answer from the server within {} s", timeout.as_secs()))?
    }

    /// Closes the connection politely.
    pub async fn close(&mut self) {
        let _ = self.writer.shutdown().await;
        if let Some((endpoint, connection)) = self.quic.take() {
            connection.close(0u32.into(), b"bye");
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }
}

fn is_closed(e: &std::io::Error) -> bool {
    // A QUIC connection closed by the server surfaces as an error, not EOF.
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::NotConnected
            | std::io::ErrorKind::BrokenPipe
    ) || e.to_string().contains("closed")
}

fn split_host_port(server: &str) -> Result<(&str, u16)> {
    let (host, port) = server
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("server {server:?} must be HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port
        .parse()
        .map_err(|_| anyhow!("server {server:?}: {port:?} is not a port number"))?;
    Ok((host, port))
}
