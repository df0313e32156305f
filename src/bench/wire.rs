//! Raw protocol connections for the load generator: a line reader and a
//! writer over TCP (TCP_NODELAY, as a chat client would) or one QUIC
//! bidirectional stream, so a member can send and receive from two tasks.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::lines::LineReader;

/// Longest line a bench client accepts from a server.
const MAX_LINE: usize = 1024 * 1024;

/// How long a bench client waits for any one answer while setting up.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// The reading half.
pub type Reader = LineReader<Box<dyn AsyncRead + Unpin + Send>>;

/// The writing half; keeps the QUIC connection (if any) open.
pub struct Writer {
    inner: Box<dyn AsyncWrite + Unpin + Send>,
    _quic: Option<(quinn::Endpoint, quinn::Connection)>,
}

impl Writer {
    /// Writes and flushes `bytes`.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.inner
            .write_all(bytes)
            .await
            .context("cannot send to the server")?;
        self.inner
            .flush()
            .await
            .context("cannot send to the server")
    }
}

/// How the bench reaches chatmesh (the peers are TCP only).
#[derive(Clone)]
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// QUIC, checking the server against the cluster CA.
    Quic(quinn::ClientConfig),
}

impl Transport {
    /// QUIC trusting the CA certificate at `ca`, as the bundled client does.
    pub fn quic(ca: &Path) -> Result<Transport> {
        let crypto = crate::tls::chat_client_config(ca)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
            .context("TLS config unusable for QUIC")?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        // The server drops connections idle for 30 s; ping well within that.
        transport.keep_alive_interval(Some(Duration::from_secs(10)));
        config.transport_config(Arc::new(transport));
        Ok(Transport::Quic(config))
    }

    /// "tcp" or "quic".
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Quic(_) => "quic",
        }
    }
}

/// Connects to 127.0.0.1:`port`.
pub async fn connect(transport: &Transport, port: u16) -> Result<(Reader, Writer)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    match transport {
        Transport::Tcp => {
            let stream = tokio::time::timeout(ANSWER_TIMEOUT, tokio::net::TcpStream::connect(addr))
                .await
                .with_context(|| format!("TCP connect to {addr} timed out"))?
                .with_context(|| format!("cannot connect to {addr} over TCP"))?;
            stream.set_nodelay(true)?;
            let (read, write) = stream.into_split();
            Ok((
                LineReader::new(Box::new(read), MAX_LINE),
                Writer {
                    inner: Box::new(write),
                    _quic: None,
                },
            ))
        }
        Transport::Quic(config) => {
            let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))
                .context("cannot open a QUIC endpoint")?;
            endpoint.set_default_client_config(config.clone());
            let connecting = endpoint
                .connect(addr, "localhost")
                .with_context(|| format!("cannot connect to {addr} over QUIC"))?;
            let connection = tokio::time::timeout(ANSWER_TIMEOUT, connecting)
                .await
                .with_context(|| format!("QUIC handshake with {addr} timed out"))?
                .with_context(|| format!("QUIC handshake with {addr} failed"))?;
            let (send, recv) = connection
                .open_bi()
                .await
                .context("cannot open a QUIC stream")?;
            Ok((
                LineReader::new(Box::new(recv), MAX_LINE),
                Writer {
                    inner: Box::new(send),
                    _quic: Some((endpoint, connection)),
                },
            ))
        }
    }
}

/// The next line, as text; an error when the server closed or stayed silent.
pub async fn next_line(reader: &mut Reader, what: &str) -> Result<String> {
    match tokio::time::timeout(ANSWER_TIMEOUT, reader.next_line()).await {
        Err(_) => bail!("no answer within {ANSWER_TIMEOUT:?} while {what}"),
        Ok(Err(e)) => Err(e).with_context(|| format!("cannot read while {what}")),
        Ok(Ok(None)) => bail!("the server closed the connection while {what}"),
        Ok(Ok(Some(line))) => Ok(String::from_utf8_lossy(line).into_owned()),
    }
}
