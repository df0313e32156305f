//! The client-facing listeners: TCP (the classic protocol's transport) and QUIC
//! on the same port number. Both hand their byte streams to the one session
//! logic, [`run_session`].
//!
//! What a client may cost is bounded here: at most [`ClientSlots`]
//! connections at once (the next one is told why and closed), and on TCP a
//! capped kernel send buffer, keepalive probes that find a vanished peer,
//! and a reset, not a graceful close, for a session dropped with output stuck
//! in its connection (see [`ClientSocket`]).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::chat::{ChatServer, SessionEnd, run_session};
use crate::client_proto::ServerMessage;
use crate::config::Limits;

/// Open files kept for everything but client connections when the client
/// limit comes from the open-files limit: the mesh and client listening
/// sockets, the admin endpoint and its connections, the runtimes' epoll and
/// wake-up descriptors, stdio, certificate and config files, name lookups.
/// An idle node uses about 20; the rest is headroom.
pub const FD_RESERVE: u64 = 64;

/// The client connections a server takes at once (TCP, QUIC and web port,
/// identified or not), shared by the listeners. A connection holds its slot
/// until its session ends (a web port connection: until it closes).
#[derive(Clone)]
pub struct ClientSlots {
    free: Arc<Semaphore>,
    max: usize,
}

impl ClientSlots {
    /// Room for `max` clients at once (at most a semaphore's worth, some
    /// 2^61: more than any process could hold).
    pub fn new(max: usize) -> Self {
        let max = max.min(Semaphore::MAX_PERMITS);
        ClientSlots {
            free: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// The client limit for `limits` in a process that may open `open_files`
    /// files (its soft `RLIMIT_NOFILE`, if known): `max_clients` if set, but
    /// never so many that clients could take the descriptors the mesh and the
    /// admin endpoint need ([`FD_RESERVE`]). Logs the outcome.
    pub fn for_limits(limits: &Limits, open_files: Option<u64>) -> Self {
        let room = open_files.map(|files| files.saturating_sub(FD_RESERVE).max(1));
        let room = room.map(|r| usize::try_from(r).unwrap_or(usize::MAX));
        let max = match (limits.max_clients, room) {
            (Some(configured), Some(room)) if configured > room => {
                warn!(
                    max_clients = configured,
                    open_files,
                    reserve = FD_RESERVE,
                    lowered_to = room,
                    "limits.max_clients is more than the open-files limit allows; lowered"
                );
                room
            }
            (Some(configured), _) => configured,
            (None, Some(room)) => room,
            // No limit known (getrlimit failed): the usual default soft limit's worth.
            (None, None) => 1024 - FD_RESERVE as usize,
        };
        info!(
            max_clients = max,
            open_files,
            reserve = FD_RESERVE,
            "client connections limited"
        );
        ClientSlots::new(max)
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Client connections open now.
    pub fn in_use(&self) -> usize {
        self.max - self.free.available_permits()
    }

    /// A slot for a new client, if one is free.
    pub(crate) fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.free.clone().try_acquire_owned().ok()
    }

    /// What a client over the limit is told.
    pub(crate) fn refusal(&self) -> String {
        format!(
            "server full: max_clients ({}) client connections are open; try again later or another server",
            self.max
        )
    }
}

/// A refusal is logged at most this often (a flood of them would flood the log).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Counts refusals and logs them now and then.
struct RefusalLog {
    transport: &'static str,
    since_logged: u64,
    logged_at: Option<Instant>,
}

impl RefusalLog {
    fn new(transport: &'static str) -> Self {
        RefusalLog {
            transport,
            since_logged: 0,
            logged_at: None,
        }
    }

    fn refused(&mut self, slots: &ClientSlots, peer: SocketAddr) {
        self.since_logged += 1;
        let due = self
            .logged_at
            .is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL);
        if due {
            warn!(
                transport = self.transport,
                %peer,
                max_clients = slots.max(),
                refused = self.since_logged,
                "client refused: max_clients reached"
            );
            self.since_logged = 0;
            self.logged_at = Some(Instant::now());
        }
    }
}

/// TCP keepalive on client sockets: probes after 30 s of silence, then every
/// 10 s, and 3 unanswered probes end the connection, so a client whose host
/// vanished (power cut, cable pulled, NAT forgot it) is gone, and its name
/// free, within about a minute. A healthy idle client answers every probe in
/// its kernel, with no work for it or the server beyond one small packet
/// each 30 s, so it may stay idle for hours: chatmesh has no idle timeout
/// after login, on purpose. 30 s also keeps NAT mappings of quiet clients
/// alive.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Between two unanswered keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered keepalive probes before the connection is dropped.
pub const KEEPALIVE_PROBES: u32 = 3;
/// How long sent data may stay unacknowledged before the connection is
/// dropped (`TCP_USER_TIMEOUT`): keepalive probes only a silent connection,
/// so this bounds the other half-open case, a vanished client with output
/// in flight (else about 15 minutes of retransmissions). The same minute as
/// keepalive, as tcp(7) advises. A client that is alive but not reading
/// acknowledges the kernel's window probes, so this never drops it; its full
/// outbox does.
pub const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Socket options of an accepted TCP client connection.
pub struct ClientSocket;

impl ClientSocket {
    /// Sets no-delay, keepalive, the user timeout and the send buffer cap
    /// (see the constants above and [`Limits::send_buffer_bytes`]) on a
    /// socket: a client port's, before it listens (see
    /// [`listen_for_clients`]).
    fn configure(socket: &impl AsRawFd, limits: &Limits) -> std::io::Result<()> {
        let fd = socket.as_raw_fd();
        // Chat lines are small and latency matters more than packet count;
        // the outbox already batches writes.
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
        let secs = |d: Duration| i32::try_from(d.as_secs()).unwrap_or(i32::MAX);
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPIDLE,
            secs(KEEPALIVE_IDLE),
        )?;
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            secs(KEEPALIVE_INTERVAL),
        )?;
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPCNT,
            i32::try_from(KEEPALIVE_PROBES).unwrap_or(i32::MAX),
        )?;
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            i32::try_from(USER_TIMEOUT.as_millis()).unwrap_or(i32::MAX),
        )?;
        // Also turns off the kernel's growing of the buffer (to 4 MiB by
        // default) for this socket.
        setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            i32::try_from(limits.send_buffer_bytes).unwrap_or(i32::MAX),
        )?;
        Ok(())
    }
}

/// Listens on `addr` for clients (the TCP client port, the web port). The
/// client socket options ([`ClientSocket`]) are set before the socket
/// listens: Linux copies a listening socket's options to each connection it
/// accepts, from the first one on. That is seven system calls per port, not
/// per client: they were a fifth of a server's system calls in `bench
/// claims`, where each claim is a fresh connection. `tests/limits.rs` reads
/// them back from accepted sockets.
pub fn listen_for_clients(addr: SocketAddr, limits: &Limits) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As std's and tokio's `bind` do: a restarted node gets its port back
    // while the last run's connections are in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    if let Err(e) = ClientSocket::configure(&socket, limits) {
        // Clients can still be served, only less well guarded.
        warn!(error = %e, %addr, "cannot set client socket options");
    }
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Connections a client port queues before they are accepted (Linux caps it
/// at `net.core.somaxconn`, 4096 by default).
const LISTEN_BACKLOG: u32 = 4096;

/// Sets an integer socket option.
fn setsockopt(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: `fd` is an open socket owned by the caller's stream for the
    // duration of the call, and the option value is a valid c_int of the
    // length given.
    let result = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Binds TCP on `addr` ([`listen_for_clients`]), then UDP on the port TCP
/// got (so port 0 picks one number free for both). Retries a few times if
/// that UDP port is taken.
pub fn bind_client_ports(
    addr: SocketAddr,
    limits: &Limits,
    server_crypto: rustls::ServerConfig,
) -> Result<(TcpListener, quinn::Endpoint)> {
    let quic_config = quic_server_config(server_crypto)?;
    let attempts = if addr.port() == 0 { 20 } else { 1 };
    let mut last_error = None;
    for _ in 0..attempts {
        let tcp = listen_for_clients(addr, limits)
            .with_context(|| format!("cannot listen on TCP {addr}"))?;
        let bound = tcp.local_addr()?;
        match quinn::Endpoint::server(quic_config.clone(), bound) {
            Ok(endpoint) => return Ok((tcp, endpoint)),
            Err(e) => last_error = Some(e),
        }
    }
    let e = last_error.expect("at least one attempt");
    Err(e).with_context(|| format!("cannot listen on UDP {addr} for QUIC clients"))
}

fn quic_server_config(crypto: rustls::ServerConfig) -> Result<quinn::ServerConfig> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
        .context("TLS config unusable for QUIC")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // One bidirectional stream per client session; no unidirectional streams.
    transport.max_concurrent_bidi_streams(1u8.into());
    transport.max_concurrent_uni_streams(0u8.into());
    // Clients do not use datagrams: do not buffer any.
    transport.datagram_receive_buffer_size(None);
    // A client line is at most 64 KiB by default; a 256 KiB stream window
    // keeps a few in flight without letting one idle client pin megabytes
    // (the default is 1.25 MB per stream).
    transport.stream_receive_window(quinn::VarInt::from_u32(256 * 1024));
    transport.receive_window(quinn::VarInt::from_u32(512 * 1024));
    transport.send_window(1024 * 1024);
    // Clients keep the connection alive (bundled client: every 10 s); a client
    // silent for 30 s is gone.
    transport.max_idle_timeout(Some(
        Duration::from_secs(30)
            .try_into()
            .expect("30 s is a valid idle timeout"),
    ));
    transport.keep_alive_interval(None);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Accepts TCP clients until `shutdown`, each while a slot is free; a client
/// over the limit gets an `error` line naming it, then the connection closes.
pub async fn serve_tcp(
    listener: TcpListener,
    chat: Arc<ChatServer>,
    slots: ClientSlots,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let mut refusals = RefusalLog::new("tcp");
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = slots.take() else {
            refusals.refused(&slots, peer);
            refuse_tcp(stream, &slots.refusal());
            continue;
        };
        tasks.spawn(
            tcp_session(stream, peer, chat.clone(), slot, shutdown.clone())
                .instrument(info_span!("client", transport = "tcp", %peer)),
        );
    }
}

/// Tells a client over the limit why, and closes. Never waits: a new
/// socket's send buffer is empty, so the short line goes at once (or not at
/// all, if the client is already gone).
fn refuse_tcp(stream: TcpStream, reason: &str) {
    let line = ServerMessage::error(reason).encode();
    let _ = stream.try_write(&line);
    // A FIN after the line; a client that already sent its first line gets
    // a reset instead (unread input), which still leaves the line readable.
    if let Ok(stream) = stream.into_std() {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
}

async fn tcp_session(
    stream: TcpStream,
    peer: SocketAddr,
    chat: Arc<ChatServer>,
    slot: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    debug!("connected");
    let (mut reader, writer) = stream.into_split();
    let end = run_session(chat, &mut reader, writer, peer.ip(), shutdown).await;
    if end == SessionEnd::Abort {
        // The writer half is gone; the socket closes as the reader half
        // drops below. With a zero linger that close is a reset that also
        // discards the kernel's send buffer at once; a plain close would
        // leave the socket (and its buffer) to the kernel for as long as the
        // client keeps acknowledging window probes without reading.
        if let Err(e) = reader.as_ref().set_zero_linger() {
            debug!(error = %e, "cannot set a zero linger");
        }
        // Said at warn by the session if the client was too slow; else a
        // write failed (the client went away): nothing to log per client.
        debug!("connection reset: output not taken");
    }
    drop(reader);
    drop(slot);
    debug!("closed");
}

/// Concurrent QUIC handshakes made only to tell a client over the limit why
/// (beyond this, refusals are a bare QUIC refusal, which costs nothing).
const QUIC_REFUSALS_AT_ONCE: usize = 64;

/// Accepts QUIC clients until `shutdown`, each while a slot is free and
/// once a Retry has validated its address; a client over the limit sees
/// the connection closed with a reason naming it. Then closes the endpoint.
pub async fn serve_quic(
    endpoint: quinn::Endpoint,
    chat: Arc<ChatServer>,
    slots: ClientSlots,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let mut refusals = RefusalLog::new("quic");
    let refusing = Arc::new(Semaphore::new(QUIC_REFUSALS_AT_ONCE));
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        // A slot only for a client that has shown it receives at its source
        // address. Else a client Initial, one datagram whose source address
        // anyone can forge, held a slot for the handshake timeout, and one
        // per slot every timeout kept every new client out, TCP ones too
        // (TCP has no such hole: the kernel accepts after its handshake).
        // The Retry costs a fresh client one round trip; quinn's client
        // answers it by itself, and a spoofer never sees it.
        if !incoming.remote_address_validated() {
            if let Err(e) = incoming.retry() {
                // Cannot happen (an unvalidated Initial may always be
                // retried), but if it did: no answer, no slot.
                e.into_incoming().ignore();
            }
            continue;
        }
        let peer = incoming.remote_address();
        let Some(slot) = slots.take() else {
            refusals.refused(&slots, peer);
            match refusing.clone().try_acquire_owned() {
                Ok(turn) => {
                    let reason = slots.refusal();
                    let handshake = chat.limits().handshake_timeout;
                    tasks.spawn(async move {
                        if let Ok(Ok(connection)) = tokio::time::timeout(handshake, incoming).await
                        {
                            connection.close(QUIC_SERVER_FULL, reason.as_bytes());
                        }
                        drop(turn);
                    });
                }
                Err(_) => incoming.refuse(),
            }
            continue;
        };
        tasks.spawn(
            quic_session(incoming, peer, chat.clone(), slot, shutdown.clone())
                .instrument(info_span!("client", transport = "quic", %peer)),
        );
    }
    endpoint.close(0u32.into(), b"server shutting down");
    // Let the endpoint send the close frames before the process exits, so
    // clients learn at once instead of by idle timeout.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// The application error code of a QUIC client refused for max_clients.
pub const QUIC_SERVER_FULL: quinn::VarInt = quinn::VarInt::from_u32(1);

async fn quic_session(
    incoming: quinn::Incoming,
    peer: SocketAddr,
    chat: Arc<ChatServer>,
    _slot: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let handshake = chat.limits().handshake_timeout;
    let opened = async {
        let connection = incoming.await?;
        let (send, recv) = connection.accept_bi().await?;
        Ok::<_, quinn::ConnectionError>((connection, send, recv))
    };
    let (connection, send, recv) = match tokio::time::timeout(handshake, opened).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => {
            debug!(error = %e, "QUIC client did not open a stream");
            return;
        }
        Err(_) => {
            // Nothing to answer on: a QUIC stream exists for the server only once
            // the client writes to it. The connection closes as it drops.
            chat.connection_lines.log(|left_out| {
                info!(
                    left_out,
                    "QUIC client opened no stream within the handshake timeout; closing"
                );
            });
            return;
        }
    };
    debug!("connected");
    let end = run_session(chat, recv, send, peer.ip(), shutdown).await;
    if end == SessionEnd::Abort {
        // Output is stuck (the client does not read): close now, which
        // frees what the connection still buffers.
        connection.close(QUIC_DROPPED, b"dropped: output not read");
        debug!("connection closed: output not taken");
        return;
    }
    // Closing at once would discard stream data not yet acknowledged (the last
    // replies); give the client a moment to read them and close first.
    let _ = tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
    connection.close(0u32.into(), b"bye");
    debug!("closed");
}

/// The application error code of a QUIC client dropped for not reading.
pub const QUIC_DROPPED: quinn::VarInt = quinn::VarInt::from_u32(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_limit_keeps_descriptors_for_everything_else() {
        let auto = Limits::default();
        assert_eq!(ClientSlots::for_limits(&auto, Some(1024)).max(), 960);
        assert_eq!(ClientSlots::for_limits(&auto, None).max(), 960);
        let configured = Limits {
            max_clients: Some(100),
            ..Limits::default()
        };
        assert_eq!(ClientSlots::for_limits(&configured, Some(1024)).max(), 100);
        let too_many = Limits {
            max_clients: Some(5000),
            ..Limits::default()
        };
        assert_eq!(ClientSlots::for_limits(&too_many, Some(1024)).max(), 960);
        // Absurd values neither panic nor wrap.
        assert_eq!(ClientSlots::for_limits(&auto, Some(10)).max(), 1);
        let huge = ClientSlots::for_limits(&auto, Some(u64::MAX));
        assert_eq!(huge.max(), Semaphore::MAX_PERMITS);
        assert_eq!(huge.in_use(), 0);
        let slots = ClientSlots::new(2);
        let first = slots.take().expect("a free slot");
        let _second = slots.take().expect("a free slot");
        assert!(slots.take().is_none(), "full");
        assert_eq!(slots.in_use(), 2);
        drop(first);
        assert!(slots.take().is_some(), "a slot given back is free again");
    }
}
