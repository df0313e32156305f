//! The node's one HTTP stack: the web port ([`crate::web`]) and the admin
//! endpoint ([`crate::admin`]) are both axum routers (hyper, HTTP/1 only),
//! served by [`serve`] on a [`Listener`] until the node shuts down.
//!
//! axum's own `serve` takes any listener; this one bounds what a connection
//! may hold, as each endpoint needs: a slot (the web port shares the client
//! slots with TCP and QUIC, so web connections can never take the descriptors
//! the mesh needs; the admin endpoint has a small cap of its own), a time
//! until its first byte (a silent connection cannot hold a slot), a time to
//! be upgraded to a WebSocket (a client dribbling headers, or idle between
//! requests, cannot hold one either), and a lifetime (an admin connection
//! carries one request). The web port's connections have the client port's
//! socket options (keepalive, user timeout, capped send buffer) from their
//! listener ([`crate::listener::listen_for_clients`]).
//!
//! A handler reaches its connection through [`Peer`] (axum's `ConnectInfo`):
//! it marks it upgraded, or asks for a reset when it is closed.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::listener::ClientSlots;

/// A TCP listener for [`serve`], with the limits its connections live under.
pub struct Listener {
    inner: TcpListener,
    /// What it serves, for logs ("web port", "admin endpoint").
    what: &'static str,
    /// A slot each connection holds while it is open, and what a connection
    /// over the limit is told; none: no limit.
    slots: Option<(ClientSlots, String)>,
    /// Refusals for want of a slot are logged at most once a second.
    refused_at: Option<Instant>,
    /// A connection that sends nothing for this long is closed.
    first_byte_within: Option<Duration>,
    /// A connection is closed this long after it was accepted, whatever it
    /// is doing (reading or writing then fails).
    lifetime: Option<Duration>,
    /// A connection not upgraded (to a WebSocket) this long after it was
    /// accepted is closed.
    upgrade_within: Option<Duration>,
}

impl Listener {
    /// `inner` with no limits yet.
    pub fn new(inner: TcpListener, what: &'static str) -> Self {
        Listener {
            inner,
            what,
            slots: None,
            refused_at: None,
            first_byte_within: None,
            lifetime: None,
            upgrade_within: None,
        }
    }

    /// Every connection holds one of `slots` until it is closed; one over
    /// the limit is answered `503` with the slots' reason, and closed.
    pub fn slots(self, slots: ClientSlots) -> Self {
        let refusal = slots.refusal();
        self.slots_telling(slots, refusal)
    }

    /// As [`Listener::slots`], but one over the limit is told `refusal`.
    pub fn slots_telling(mut self, slots: ClientSlots, refusal: String) -> Self {
        self.slots = Some((slots, refusal));
        self
    }

    /// Connections that send nothing within `within` are closed.
    pub fn first_byte_within(mut self, within: Duration) -> Self {
        self.first_byte_within = Some(within);
        self
    }

    /// Connections are closed `lifetime` after they were accepted.
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = Some(lifetime);
        self
    }

    /// Connections not upgraded within `within` of their accept (their
    /// handler calls [`Peer::upgraded`]) are closed; upgraded ones live on.
    pub fn upgrade_within(mut self, within: Duration) -> Self {
        self.upgrade_within = Some(within);
        self
    }

    /// Answers a connection over the slot limit and closes it.
    fn refuse(&mut self, stream: TcpStream, peer: SocketAddr, max: usize, reason: &str) {
        if self
            .refused_at
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            warn!(%peer, max, what = self.what, "HTTP connection refused: connection limit reached");
            self.refused_at = Some(Instant::now());
        }
        let response = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reason}",
            reason.len()
        );
        // Never waits: a new socket's send buffer is empty. A FIN after it
        // (as for TCP clients over the limit).
        let _ = stream.try_write(response.as_bytes());
        if let Ok(stream) = stream.into_std() {
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
    }
}

impl axum::serve::Listener for Listener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            let (stream, peer) = match self.inner.accept().await {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!(error = %e, what = self.what, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let slot = match &self.slots {
                None => None,
                Some((slots, refusal)) => match slots.take() {
                    Some(slot) => Some(slot),
                    None => {
                        let (max, refusal) = (slots.max(), refusal.clone());
                        self.refuse(stream, peer, max, &refusal);
                        continue;
                    }
                },
            };
            // The web port's listener has all the client socket options
            // (`listener::listen_for_clients`), which its connections
            // inherit; this is for the admin endpoint's.
            let _ = stream.set_nodelay(true);
            let timer = |d: Duration| Box::pin(tokio::time::sleep(d));
            return (
                Conn {
                    stream,
                    _slot: slot,
                    silence: self.first_byte_within.map(timer),
                    deadline: self.lifetime.map(timer),
                    upgrade_by: self.upgrade_within.map(timer),
                    handler: Arc::default(),
                },
                peer,
            );
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Serves `app` on `listener` until `shutdown`, then lets the requests under
/// way finish (bounded by the listener's limits) before returning.
///
/// hyper's HTTP/1 server is driven here rather than through `axum::serve`
/// for one setting: `half_close`. Without it, a client that half-closes after
/// its request (`printf 'GET /status ...' | nc -N`) gets no answer: hyper
/// takes the end of input for the client leaving.
pub async fn serve(mut listener: Listener, app: Router, shutdown: CancellationToken) {
    use axum::serve::Listener as _;
    let what = listener.what;
    // Every connection task holds a receiver; `closed()` is when all are gone.
    let (open_tx, open_rx) = tokio::sync::watch::channel(());
    loop {
        let (conn, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let peer = Peer {
            addr,
            says: conn.handler.clone(),
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer.clone()));
            tower::ServiceExt::oneshot(app.clone(), request)
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            // A request's head (hyper's default takes about 400 KB of it)
            // is held to what a client may hold on the client port.
            .max_buf_size(MAX_REQUEST_HEAD)
            .serve_connection(hyper_util::rt::TokioIo::new(conn), service)
            .with_upgrades();
        let (shutdown, open) = (shutdown.clone(), open_rx.clone());
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = shutdown.cancelled() => {
                    // The request under way is answered, then the connection closes.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                debug!(error = %e, what, "HTTP connection ended with an error");
            }
            drop(open);
        });
    }
    drop(open_rx);
    open_tx.closed().await;
}

/// What a connection's handler tells the connection.
#[derive(Default)]
struct HandlerSays {
    /// The connection is (being) upgraded: the upgrade deadline is off.
    upgraded: AtomicBool,
    /// Close the connection with a reset, not a graceful close.
    reset: AtomicBool,
}

/// A connection as its handlers see it (`ConnectInfo<Peer>`): the client's
/// address, and a way to tell the connection how it is used.
#[derive(Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    says: Arc<HandlerSays>,
}

impl Peer {
    /// The connection is being upgraded (to a WebSocket): it may live on
    /// past the listener's upgrade deadline.
    pub fn upgraded(&self) {
        self.says.upgraded.store(true, Ordering::Relaxed);
    }

    /// When the connection is closed, reset it (a zero linger): the kernel
    /// then discards what is still queued for the client at once, instead of
    /// keeping the socket and its send buffer for as long as a client that
    /// does not read keeps acknowledging window probes.
    pub fn reset_on_close(&self) {
        self.says.reset.store(true, Ordering::Relaxed);
    }
}

/// A connection of a [`Listener`]: the stream, the slot it holds until it is
/// dropped, and its timers. An upgraded connection (a WebSocket) is owned by
/// its upgraded stream, so it is dropped after the handler is done with it.
pub struct Conn {
    stream: TcpStream,
    _slot: Option<OwnedSemaphorePermit>,
    /// Until the first byte comes: when it fires, reading fails, which
    /// closes the connection.
    silence: Option<Pin<Box<Sleep>>>,
    /// The end of the connection's lifetime: from then on reading and
    /// writing fail.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Until the connection is upgraded: when it fires first, reading and
    /// writing fail.
    upgrade_by: Option<Pin<Box<Sleep>>>,
    /// Shared with the connection's [`Peer`].
    handler: Arc<HandlerSays>,
}

impl Conn {
    /// Why the connection may no longer be used, if it may not: its lifetime
    /// is over, or it was not upgraded in time (if neither, the task is
    /// woken when one happens).
    fn over(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self
            .deadline
            .as_mut()
            .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready())
        {
            return Some(timed_out(EXPIRED));
        }
        if self.upgrade_by.is_some() && self.handler.upgraded.load(Ordering::Relaxed) {
            self.upgrade_by = None;
        }
        if self
            .upgrade_by
            .as_mut()
            .is_some_and(|by| by.as_mut().poll(cx).is_ready())
        {
            return Some(timed_out(NOT_UPGRADED));
        }
        None
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.handler.reset.load(Ordering::Relaxed)
            && let Err(e) = self.stream.set_zero_linger()
        {
            debug!(error = %e, "cannot set a zero linger");
        }
    }
}

fn timed_out(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, why)
}

/// The most of a request's head (request line and headers) read before it
/// is refused with `431`: 64 KiB, the default `max_line_bytes`.
const MAX_REQUEST_HEAD: usize = 64 * 1024;

const EXPIRED: &str = "the connection outlived its time limit";

const NOT_UPGRADED: &str = "the connection was not upgraded within its time limit";

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.over(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        let Some(silence) = self.silence.as_mut() else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.silence = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match silence.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    Poll::Ready(Err(timed_out("no request within the handshake timeout")))
                }
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.over(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.over(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.over(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
