//! Raw protocol connections for the load generator: a line reader and a
//! writer over TCP (TCP_NODELAY, as a chat client would) or one QUIC
//! bidirectional stream, so a member can send and receive from two tasks;
//! and the logins of each protocol (chatmesh `newidentity`, IRC registration,
//! NATS `CONNECT`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::lines::LineReader;

/// Longest line a bench client accepts from a server.
const MAX_LINE: usize = 1024 * 1024;

/// Bytes one read of a bench TCP socket may take.
const READ_BUFFER: usize = 64 * 1024;

/// How long a bench client waits for any one answer while setting up.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// The reading half.
pub type Reader = LineReader<Box<dyn AsyncRead + Unpin + Send>>;

/// Whether the bench's TCP sockets ask the kernel to acknowledge every read
/// at once (`TCP_QUICKACK` after each read). A bench member both sends and
/// receives all the time, which puts its socket in Linux's "ping-pong"
/// mode: it then delays its ACKs by up to 40 ms hoping to piggyback them on
/// its next message. Against a server that writes with Nagle's algorithm
/// (ngircd does not set TCP_NODELAY), that delayed ACK holds the server's
/// next write for the same 40 ms, and with a closed-loop window the stall
/// spreads to the whole room: the bench then measured its own ACK timing,
/// not the server. A real chat client mostly reads, is not in ping-pong
/// mode and acknowledges a drained read at once; quick ACKs give the bench
/// that behaviour. `CHATMESH_BENCH_NO_QUICKACK=1` turns it off, to show the
/// difference.
pub fn quickack_enabled() -> bool {
    std::env::var_os("CHATMESH_BENCH_NO_QUICKACK").is_none()
}

/// A TCP read half that re-arms `TCP_QUICKACK` after each read that
/// returned bytes (the kernel clears it on its own after a while).
struct QuickAck<R> {
    inner: R,
    fd: std::os::fd::RawFd,
}

impl<R: AsyncRead + Unpin> AsyncRead for QuickAck<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            set_quickack(self.fd);
        }
        polled
    }
}

/// Best effort: a failure only costs the bench the delayed-ACK stalls.
fn set_quickack(fd: std::os::fd::RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: `fd` is the socket of a TcpStream whose read half is alive
    // (QuickAck owns it), and setsockopt only reads the int we pass.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

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
    Quic(QuicClient),
}

/// A QUIC client config and where its connections come from.
#[derive(Clone)]
pub struct QuicClient {
    config: quinn::ClientConfig,
    /// Endpoints shared round-robin by every connection, or None: one
    /// endpoint (one UDP socket) per connection, as separate clients have.
    shared: Option<Arc<(Vec<quinn::Endpoint>, AtomicUsize)>>,
}

impl Transport {
    /// QUIC trusting the CA certificate at `ca`, as the bundled client does;
    /// each connection on its own endpoint.
    pub fn quic(ca: &Path) -> Result<Transport> {
        // Rare pings: 10,000 idle clients must stay idle (the server drops
        // connections silent for 30 s).
        let config = crate::tls::quic_chat_client_config(ca, Duration::from_secs(10), None)?;
        Ok(Transport::Quic(QuicClient {
            config,
            shared: None,
        }))
    }

    /// QUIC as [`Transport::quic`], every connection on one of `endpoints`
    /// shared endpoints: thousands of clients without thousands of sockets.
    pub fn quic_shared(ca: &Path, endpoints: usize) -> Result<Transport> {
        let Transport::Quic(mut client) = Transport::quic(ca)? else {
            unreachable!("Transport::quic makes a QUIC transport");
        };
        let mut opened = Vec::new();
        for _ in 0..endpoints.max(1) {
            opened.push(new_endpoint(&client.config)?);
        }
        client.shared = Some(Arc::new((opened, AtomicUsize::new(0))));
        Ok(Transport::Quic(client))
    }

    /// "tcp" or "quic".
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Quic(_) => "quic",
        }
    }
}

fn new_endpoint(config: &quinn::ClientConfig) -> Result<quinn::Endpoint> {
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("cannot open a QUIC endpoint")?;
    endpoint.set_default_client_config(config.clone());
    Ok(endpoint)
}

/// Connects to 127.0.0.1:`port`, as a member of a busy room that reads all
/// the time (for a client that waits for one answer, see [`connect_plain`]).
pub async fn connect(transport: &Transport, port: u16) -> Result<(Reader, Writer)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    match transport {
        Transport::Tcp => {
            let stream = tcp_connect(addr).await?;
            // One read takes up to 64 KiB, whatever the line reader asks
            // for (4 KiB): a read that leaves bytes queued does not make
            // the kernel acknowledge them, and under load the 4 KiB reads
            // of a busy member let delayed-ACK timers fire and the peer's
            // tail-loss probes and RTOs retransmit (seen as
            // TcpExtTCPTimeouts and DSACKs in nstat against 3 linked ngircd).
            let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
            let (read, write) = stream.into_split();
            let read: Box<dyn AsyncRead + Unpin + Send> = if quickack_enabled() {
                set_quickack(fd);
                Box::new(tokio::io::BufReader::with_capacity(
                    READ_BUFFER,
                    QuickAck { inner: read, fd },
                ))
            } else {
                Box::new(tokio::io::BufReader::with_capacity(READ_BUFFER, read))
            };
            Ok(tcp_halves(read, write))
        }
        Transport::Quic(client) => {
            let endpoint = match &client.shared {
                Some(shared) => {
                    let (endpoints, next) = &**shared;
                    endpoints[next.fetch_add(1, Ordering::Relaxed) % endpoints.len()].clone()
                }
                None => new_endpoint(&client.config)?,
            };
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

/// Connects to chatmesh on 127.0.0.1:`port` over TCP as a client that
/// sends a request and waits for its answer (claims, failover probes): the
/// line reader reads the socket directly. A fresh connection per claim
/// with [`connect`]'s 64 KiB read buffer (zeroed when made) and a
/// `TCP_QUICKACK` per read cost the generator about a third of its CPU
/// in `bench claims`; a client waiting for one answer has no delayed-ACK
/// stall to avoid.
pub async fn connect_plain(port: u16) -> Result<(Reader, Writer)> {
    let stream = tcp_connect(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let (read, write) = stream.into_split();
    Ok(tcp_halves(Box::new(read), write))
}

/// A TCP connection with `TCP_NODELAY`, as a chat client sets it.
async fn tcp_connect(addr: SocketAddr) -> Result<tokio::net::TcpStream> {
    let stream = tokio::time::timeout(ANSWER_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .with_context(|| format!("TCP connect to {addr} timed out"))?
        .with_context(|| format!("cannot connect to {addr} over TCP"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn tcp_halves(
    read: Box<dyn AsyncRead + Unpin + Send>,
    write: tokio::net::tcp::OwnedWriteHalf,
) -> (Reader, Writer) {
    (
        LineReader::new(read, MAX_LINE),
        Writer {
            inner: Box::new(write),
            _quic: None,
        },
    )
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

/// A chatmesh request line `{"type":kind,"field":value}` (values the bench
/// makes need no escaping).
pub fn chat_request(kind: &str, field: &str, value: &str) -> Vec<u8> {
    format!("{{\"type\":\"{kind}\",\"{field}\":\"{value}\"}}\n").into_bytes()
}

/// Reads chatmesh lines until one of type `kind` (skipping events such as
/// `roomchange`) and returns it parsed.
///
/// A line that does not even contain `"kind"` cannot be of that type and is
/// skipped unparsed: in `bench claims` most lines a client reads are the
/// `roomchange`s of the others passing through the main hall, and parsing
/// each into a JSON value was 40% of the load generator's CPU.
pub async fn chat_reply(reader: &mut Reader, kind: &str, what: &str) -> Result<serde_json::Value> {
    let quoted = format!("\"{kind}\"");
    let finder = memchr::memmem::Finder::new(quoted.as_bytes());
    // One timer for the whole answer, not one per line skipped.
    let reply = tokio::time::timeout(ANSWER_TIMEOUT, async {
        loop {
            let line = match reader.next_line().await {
                Err(e) => return Err(e).with_context(|| format!("cannot read while {what}")),
                Ok(None) => bail!("the server closed the connection while {what}"),
                Ok(Some(line)) => line,
            };
            if finder.find(line).is_none() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(line).with_context(|| {
                format!(
                    "not JSON from chatmesh: {:?}",
                    String::from_utf8_lossy(line)
                )
            })?;
            if v["type"] == kind {
                return Ok(v);
            }
        }
    });
    match reply.await {
        Ok(reply) => reply,
        Err(_) => bail!("no answer within {ANSWER_TIMEOUT:?} while {what}"),
    }
}

/// Creates (when `create`) or joins chatmesh room `room` as `identity`;
/// returns once the server has moved the client into it.
pub async fn chat_enter_room(
    reader: &mut Reader,
    writer: &mut Writer,
    identity: &str,
    room: &str,
    create: bool,
) -> Result<()> {
    let kind = if create { "createroom" } else { "joinroom" };
    writer.send(&chat_request(kind, "roomid", room)).await?;
    loop {
        let line = next_line(reader, "entering a room").await?;
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("not JSON from chatmesh: {line:?}"))?;
        if v["type"] == "createroom" && !approved(&v) {
            bail!("room {room} refused: {line}");
        }
        if v["type"] == "roomchange" && v["identity"] == identity {
            if v["roomid"] == room && v["former"] != room {
                return Ok(());
            }
            if v["roomid"] == v["former"] {
                bail!("{identity} could not join {room}: {line}");
            }
        }
    }
}

/// Sends the chatmesh claim `{"type":kind,field:name}` (`newidentity`,
/// `createroom`) and returns whether it was approved.
pub async fn chat_claim(
    reader: &mut Reader,
    writer: &mut Writer,
    kind: &str,
    field: &str,
    name: &str,
) -> Result<bool> {
    writer.send(&chat_request(kind, field, name)).await?;
    let reply = chat_reply(
        reader,
        kind,
        &format!("waiting for the answer to {kind} {name}"),
    )
    .await?;
    Ok(approved(&reply))
}

/// Whether a chatmesh reply says `"approved":"true"`.
pub fn approved(reply: &serde_json::Value) -> bool {
    reply["approved"] == "true"
}

/// The protocol a system speaks.
#[derive(Clone)]
pub enum Proto {
    /// chatmesh JSON lines.
    Chat(Transport),
    /// IRC.
    Irc,
    /// NATS.
    Nats,
}

impl Proto {
    /// Connects to `port` and logs in as `name`: a chatmesh identity approved,
    /// an IRC registration welcomed (001), or a NATS `CONNECT` (with a
    /// subscription to each of `nats_subjects`) answered by `PONG`.
    pub async fn login(
        &self,
        port: u16,
        name: &str,
        nats_subjects: &[String],
    ) -> Result<(Reader, Writer)> {
        let transport = match self {
            Proto::Chat(t) => t.clone(),
            _ => Transport::Tcp,
        };
        let (mut reader, mut writer) = connect(&transport, port).await?;
        match self {
            Proto::Chat(_) => {
                if !chat_claim(&mut reader, &mut writer, "newidentity", "identity", name).await? {
                    bail!("identity {name} refused");
                }
            }
            Proto::Irc => {
                writer
                    .send(format!("NICK {name}\r\nUSER {name} 0 * :{name}\r\n").as_bytes())
                    .await?;
                loop {
                    let line = next_line(&mut reader, "registering with IRC").await?;
                    if let Some(pong) = self.pong(line.as_bytes()) {
                        writer.send(&pong).await?;
                    } else if line.split(' ').nth(1) == Some("001") {
                        break;
                    } else if line.starts_with("ERROR") || line.split(' ').nth(1) == Some("433") {
                        bail!("IRC refused {name}: {line}");
                    }
                }
            }
            Proto::Nats => {
                let info = next_line(&mut reader, "waiting for INFO").await?;
                if !info.starts_with("INFO") {
                    bail!("nats-server did not start with INFO: {info:?}");
                }
                let mut hello = format!(
                    "CONNECT {{\"verbose\":false,\"pedantic\":false,\"echo\":false,\"name\":\"{name}\"}}\r\n"
                );
                for (sid, subject) in nats_subjects.iter().enumerate() {
                    hello += &format!("SUB {subject} {}\r\n", sid + 1);
                }
                hello += "PING\r\n";
                writer.send(hello.as_bytes()).await?;
                loop {
                    let line = next_line(&mut reader, "connecting to NATS").await?;
                    if line == "PONG" {
                        break;
                    }
                    if line.starts_with("-ERR") {
                        bail!("nats-server refused: {line}");
                    }
                }
            }
        }
        Ok((reader, writer))
    }

    /// The answer to a server's keep-alive `line`, if it is one (IRC and
    /// NATS servers drop clients that do not answer their PINGs).
    pub fn pong(&self, line: &[u8]) -> Option<Vec<u8>> {
        match self {
            Proto::Chat(_) => None,
            Proto::Irc => line.strip_prefix(b"PING").map(|rest| {
                let mut pong = b"PONG".to_vec();
                pong.extend_from_slice(rest);
                pong.extend_from_slice(b"\r\n");
                pong
            }),
            Proto::Nats => (line == b"PING").then(|| b"PONG\r\n".to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reply_is_found_among_events_and_events_are_skipped() {
        let lines: &'static [u8] = b"{\"type\":\"roomchange\",\"identity\":\"bob\",\"former\":\"\",\"roomid\":\"MainHall-s1\"}\n\
{\"type\":\"roomchange\",\"identity\":\"newidentity\",\"former\":\"\",\"roomid\":\"x\"}\n\
{\"type\":\"newidentity\",\"approved\":\"true\"}\n";
        let mut reader: Reader = LineReader::new(Box::new(lines), MAX_LINE);
        let reply = chat_reply(&mut reader, "newidentity", "testing")
            .await
            .expect("the reply is in there");
        assert_eq!(reply["type"], "newidentity");
        assert!(approved(&reply));
        // Nothing of that type left: the end of the stream is an error, not a hang.
        assert!(
            chat_reply(&mut reader, "newidentity", "testing")
                .await
                .is_err()
        );
    }
}
