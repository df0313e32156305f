//! The server mesh: one QUIC endpoint per server (ALPN `chatmesh-mesh/1`,
//! mutual TLS with the cluster CA), exactly one connection per pair of
//! servers, heartbeats as unreliable datagrams and peer messages as frames on
//! one unidirectional stream per direction.
//!
//! Who dials: both sides dial a peer they have no link to, with backoff; the
//! higher-priority server of a pair first gives the lower one a head start
//! ([`HIGHER_DIAL_GRACE`]), so that normally only one connection is made. When
//! both dial at once anyway, the connection dialed by the lower-priority
//! server of the pair wins on both sides. A connection from a peer that arrives while an
//! older link looks alive replaces it: the peer dials only when it has lost
//! the link (it restarted, timed the old one out, or found it silent).
//!
//! No connection becomes a link before its `Hello` (the first frame of the
//! peer's stream: wire version, and the id its certificate names) has been
//! checked: the dialer sends its `Hello` as soon as the handshake ends; the
//! accepting side checks it, installs the link, and only then sends its own
//! (the answer); the dialer installs the link once that has arrived and
//! checked. So a connection with a valid certificate that sends no `Hello`,
//! or a wrong one, never replaces a live link (it is closed after
//! `HELLO_TIMEOUT`, with a log line saying why).
//!
//! The accepting side installs first, so the two ends switch to a new link
//! in a known order, and neither closes a connection the other may still
//! count as its link: the dialer closes the old connection when it installs
//! (the answer proves the peer switched); the accepting side keeps its old
//! one open (not used) until the peer's first heartbeat on the new link, or
//! until `HELLO_TIMEOUT`. Closing it at once would reach the dialer before
//! the answer, and it would see its link lost (a false down), then the new
//! link as up rather than replacing one: a replacement seen at one end only.
//! Likewise the dialer that loses the tie-break on a connection the peer
//! has answered (installed) closes it only once the peer heartbeats on the
//! winner.
//!
//! Nor does either end go silent on a connection the other may still count
//! as its link: while such a connection is kept open, heartbeats go out on
//! it as well as on the new link, and those arriving on it are read. Under
//! heavy loss the answer can take longer than the failure timeout to reach
//! the dialer, which until then reads only the old connection: heartbeats on
//! the new link alone were a false down there.
//!
//! The accepting side's install is provisional until the peer heartbeats on
//! the new link: if the dialer gives the new connection up first (its wait
//! for the answer timed out, so it never installed it), the old link, still
//! open, is the link again ([`MeshEvent::LinkReplaced`], not a down), and
//! the old connection is never closed on a timer while the peer's heartbeats
//! still arrive on it.
//!
//! Liveness of a link does not wait for QUIC: a link that has carried nothing
//! (no heartbeat, no frame) for longer than the failure timeout gets a
//! replacement dialed at once, with the old one kept until the new one is up
//! (a handshake that completes is the proof that the peer lives and the path
//! works again). Replacing a live link is announced as
//! [`MeshEvent::LinkReplaced`]: the frames still queued for the old link move
//! to the new one in order, but frames already written to the old stream may
//! be lost. The transport settings (`mesh_transport`) keep heartbeats from
//! being starved by QUIC's loss recovery ([`HeartbeatFloor`]), and every
//! heartbeat goes out twice, half an interval apart ([`Mesh::send_heartbeat`]),
//! so that heavy random loss does not add up to a failure timeout of silence.
//!
//! The mesh only moves bytes: what heartbeats and messages mean is decided by
//! the cluster task that receives [`MeshEvent`]s.

pub mod wire;

use std::any::Any;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::ServerId;
use crate::config::{ClusterConfig, Timing};
use crate::tls::ServerIdentity;
use wire::{Heartbeat, PeerMessage, WIRE_VERSION};

/// ALPN of mesh connections.
pub const MESH_ALPN: &[u8] = b"chatmesh-mesh/1";

/// Application close codes on mesh connections.
mod close_code {
    /// The server is stopping: peers treat it as down at once.
    pub const SHUTDOWN: u32 = 0;
    /// Lost the tie-break against another connection of the same pair.
    pub const DUPLICATE: u32 = 1;
    /// Spoke another wire version, or broke the framing.
    pub const PROTOCOL: u32 = 2;
    /// Its certificate names no configured server.
    pub const UNKNOWN_PEER: u32 = 3;
    /// Nothing heard on it for the failure timeout: the peer was declared
    /// down ([`super::Mesh::drop_silent_link`]).
    pub const NOT_HEARD: u32 = 4;
    /// Simulated crash in tests: not a clean shutdown.
    pub const CRASH: u32 = 99;
}

/// A young link that meets a second connection of the same pair is a
/// simultaneous dial, settled by the tie-break; an older one was lost by the
/// peer, and the new connection replaces it.
const SIMULTANEOUS_DIAL: Duration = Duration::from_secs(1);

/// How long the higher-priority server of a pair waits for the lower one to
/// dial before dialing itself.
pub const HIGHER_DIAL_GRACE: Duration = Duration::from_millis(300);

/// The longest a dial may take before it is given up and started afresh
/// (QUIC's handshake backs off exponentially under loss; a fresh dial starts
/// again from short retransmission timers).
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a new connection may take to deliver its `Hello` before it is
/// refused (both sides; generous, since under heavy loss the stream's first
/// bytes may need several retransmissions).
const HELLO_TIMEOUT: Duration = Duration::from_secs(4);

/// The longest first frame taken for a `Hello` (a `Hello` is a few dozen
/// bytes): a connection is not given a megabyte of buffer before it is known.
const MAX_HELLO_FRAME: usize = 1024;

/// First pause after a failed dial; it doubles up to [`MAX_DIAL_BACKOFF`].
const MIN_DIAL_BACKOFF: Duration = Duration::from_millis(50);

/// Longest pause between two dials to a peer that does not answer: small, so
/// that a healed partition is linked again within about the failure timeout
/// (an Initial packet every few hundred ms costs nothing on a LAN).
const MAX_DIAL_BACKOFF: Duration = Duration::from_millis(250);

/// The lines of mesh handshakes refused for their certificate: anyone who
/// can reach the mesh port can make one a connection, so at most these a
/// second are logged, the rest counted into the next (`left_out`; every
/// refusal is counted in `/metrics` too).
static CERTIFICATE_REFUSALS: crate::logging::LogBudget = crate::logging::LogBudget::new(5);

/// Outbound frames queued per link; beyond this the link is too slow and
/// further messages are dropped (election and registry retry on their own).
const LINK_QUEUE: usize = 4096;

/// Frames for a peer with no link wait this long for one (a booting server's
/// first messages go out before its links are up); older ones are dropped.
const PENDING_MAX_AGE: Duration = Duration::from_secs(2);

/// At most this many frames wait per unlinked peer.
const PENDING_MAX: usize = 1024;

/// What the mesh tells its owner.
#[derive(Debug)]
pub enum MeshEvent {
    /// A link to this peer is (newly) up.
    LinkUp(ServerId),
    /// A live link to this peer was replaced by a new connection (the peer
    /// restarted, or the old link went silent, or both dialed at once): the
    /// new link is up. Frames still queued for the old link go out on the new
    /// one, in order; frames already written to the old link may have been
    /// lost, so whatever must arrive should be sent again.
    LinkReplaced(ServerId),
    /// The link to this peer ended (not replaced by a newer one): the peer
    /// stopped (a clean close: down at once), crashed, or restarted. Anything
    /// sent on the link may have been lost.
    LinkDown(ServerId),
    /// A heartbeat datagram from this peer.
    Heartbeat(ServerId, Heartbeat),
    /// A message frame from this peer (never `Hello`).
    Message(ServerId, PeerMessage),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct MeshCounters {
    /// Heartbeat datagrams sent.
    pub heartbeats_sent: AtomicU64,
    /// Heartbeat datagrams received and accepted.
    pub heartbeats_received: AtomicU64,
    /// Frames sent on streams.
    pub messages_sent: AtomicU64,
    /// Frames received on streams.
    pub messages_received: AtomicU64,
    /// Connections refused (bad certificate, version, ...).
    pub links_refused: AtomicU64,
    /// Heartbeats the transport would not send (too large, datagrams off).
    pub heartbeat_send_errors: AtomicU64,
    /// Live links replaced by a newer connection ([`MeshEvent::LinkReplaced`]).
    pub links_replaced: AtomicU64,
    /// Replacements dialed because a link carried nothing for longer than
    /// the failure timeout.
    pub silent_link_redials: AtomicU64,
    /// Links that ended without being replaced ([`MeshEvent::LinkDown`]).
    pub links_down: AtomicU64,
}

/// A snapshot of one link's transport state.
#[derive(Debug, Clone)]
pub struct LinkStats {
    /// quinn's counters: congestion window, lost packets, datagram frames sent, ...
    pub quic: quinn::ConnectionStats,
    /// Free bytes in the datagram send buffer: less than the configured size
    /// means heartbeats are queued behind the congestion window.
    pub datagram_send_space: usize,
}

/// Handle to a server's mesh endpoint. Cheap to clone.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

struct Inner {
    me: ServerId,
    /// This process among the lives of this server (see
    /// [`PeerMessage::Hello`]).
    incarnation: u64,
    /// Position of every server in ascending priority.
    rank: HashMap<ServerId, usize>,
    /// Mesh address of every peer.
    addrs: HashMap<ServerId, SocketAddr>,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    links: Mutex<HashMap<ServerId, Link>>,
    /// Frames for peers without a link, sent when one comes up.
    pending: Mutex<HashMap<ServerId, std::collections::VecDeque<(Instant, Bytes)>>>,
    next_generation: AtomicU64,
    events: mpsc::Sender<MeshEvent>,
    counters: MeshCounters,
    started: Instant,
    /// A link silent for longer than this gets a replacement dialed.
    silence_limit: Duration,
    /// When the copy of each heartbeat goes out (half an interval later).
    heartbeat_copy_delay: Duration,
    /// Per peer: wakes its dial loop to dial a replacement now ([`Mesh::redial`]).
    redial: HashMap<ServerId, Arc<tokio::sync::Notify>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// The frames waiting for a peer's link. Owned by the peer's current link,
/// handed on to the link that replaces it, so that nothing queued is lost.
#[derive(Clone)]
struct Outbox {
    sender: mpsc::Sender<Bytes>,
    /// The writer task of the current link holds the lock; the writer of a
    /// replacing link waits for the old one to let go (it ends as soon as its
    /// connection is closed), then goes on reading the same queue.
    receiver: Arc<tokio::sync::Mutex<mpsc::Receiver<Bytes>>>,
}

impl Outbox {
    fn new() -> Outbox {
        let (sender, receiver) = mpsc::channel(LINK_QUEUE);
        Outbox {
            sender,
            receiver: Arc::new(tokio::sync::Mutex::new(receiver)),
        }
    }
}

struct Link {
    connection: quinn::Connection,
    outbox: Outbox,
    dialed_by_me: bool,
    /// The peer's process at the other end (its `Hello`'s).
    peer_incarnation: u64,
    generation: u64,
    since: Instant,
    /// [`Mesh::clock_ms`] when the link last carried a heartbeat or a frame.
    heard_ms: Arc<AtomicU64>,
    /// Cancelled when a newer connection replaces this link: its writer lets
    /// go of the queue at once, even while the old connection stays open.
    retired: CancellationToken,
    /// Other connections to the peer, kept open (not used for frames) because
    /// the peer may still count one of them as its link: the one this link
    /// replaced, until the peer installs this one, or the one that lost a
    /// tie-break here but that the peer installed. Heartbeats go out on these
    /// too (see [`Mesh::send_heartbeat`]); each is closed by
    /// [`Mesh::close_once_peer_installed`].
    handover: Vec<quinn::Connection>,
    /// On the accepting side of a replacement, the link this one replaced,
    /// until the peer shows it installed this one (a heartbeat on it). If
    /// the peer gives this connection up first (its wait for our answer
    /// timed out: it never installed it, and still counts the old one as its
    /// link), the old link is the link again (see [`Mesh::read_link`]).
    previous: Option<Box<Link>>,
}

impl Link {
    /// The connections in `handover` that are still open.
    fn open_handover(&self) -> Vec<quinn::Connection> {
        self.handover
            .iter()
            .filter(|c| c.close_reason().is_none())
            .cloned()
            .collect()
    }
}

impl Mesh {
    /// Starts the mesh endpoint on `socket` (bound to this server's mesh
    /// port, possibly impaired) and starts linking to every peer.
    pub fn start(
        config: &ClusterConfig,
        me: &str,
        identity: &ServerIdentity,
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        events: mpsc::Sender<MeshEvent>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<Mesh> {
        if config.server(me).is_none() {
            return Err(anyhow!("server {me:?} is not in the config"));
        }
        let mut addrs = HashMap::new();
        for server in config.servers.iter().filter(|s| s.id != me) {
            let addr = server.resolve(server.mesh_port).with_context(|| {
                format!(
                    "cannot resolve host {:?} of server {}",
                    server.host, server.id
                )
            })?;
            addrs.insert(server.id.clone(), addr);
        }
        let server_config = mesh_server_config(identity, &config.timing)?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let redial = addrs
            .keys()
            .map(|peer| (peer.clone(), Arc::new(tokio::sync::Notify::new())))
            .collect();
        let inner = Arc::new(Inner {
            me: me.to_owned(),
            incarnation: incarnation_now(),
            rank: config
                .servers
                .iter()
                .enumerate()
                .map(|(i, s)| (s.id.clone(), i))
                .collect(),
            addrs,
            endpoint,
            client_config: mesh_client_config(identity, &config.timing)?,
            links: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
            events,
            counters: MeshCounters::default(),
            started: Instant::now(),
            silence_limit: config.timing.failure_timeout,
            heartbeat_copy_delay: config.timing.heartbeat_interval / 2,
            redial,
            shutdown,
            tasks,
        });
        let mesh = Mesh { inner };
        mesh.inner.tasks.spawn(mesh.clone().accept_loop());
        for peer in mesh.inner.addrs.keys() {
            let span = info_span!("peer", peer = %peer);
            mesh.inner
                .tasks
                .spawn(mesh.clone().dial_loop(peer.clone()).instrument(span));
        }
        Ok(mesh)
    }

    /// The UDP address the mesh endpoint listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// Transport counters.
    pub fn counters(&self) -> &MeshCounters {
        &self.inner.counters
    }

    /// Dials a replacement for the live link to `peer` now, as the silence
    /// watch does for a silent link (the old link stays until the new one is
    /// up); false if `peer` is not a peer. For tests: a replacement under
    /// heavy loss, whose `Hello` exchange takes many retransmissions, is the
    /// hard case of a link's life (tests/lossy/transport.rs).
    pub fn redial(&self, peer: &str) -> bool {
        match self.inner.redial.get(peer) {
            Some(notify) => {
                notify.notify_one();
                true
            }
            None => false,
        }
    }

    /// Milliseconds since the mesh started (heartbeat send times).
    pub fn clock_ms(&self) -> u64 {
        self.inner.started.elapsed().as_millis() as u64
    }

    /// Peers with a link up now.
    pub fn linked_peers(&self) -> Vec<ServerId> {
        let links = self.links();
        links
            .iter()
            .filter(|(_, link)| link.connection.close_reason().is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Queues a message to `to`. Without a link it waits (bounded, at most
    /// `PENDING_MAX_AGE`) for one; false if it had to be dropped.
    pub fn send(&self, to: &str, message: &PeerMessage) -> bool {
        self.send_frame(to, wire::encode_frame(message))
    }

    /// [`Mesh::send`] of a message already encoded by
    /// [`wire::encode_frame`]: one encoding serves every peer it goes to.
    pub fn send_frame(&self, to: &str, frame: Bytes) -> bool {
        // The peer would refuse it and drop the link, over and over.
        if frame.len() > 4 + wire::MAX_FRAME {
            error!(peer = %to, bytes = frame.len(), limit = wire::MAX_FRAME, "mesh message over the frame limit; not sent");
            return false;
        }
        let links = self.links();
        let Some(link) = links.get(to) else {
            drop(links);
            if !self.inner.addrs.contains_key(to) {
                return false;
            }
            let mut pending = self.pending();
            let queue = pending.entry(to.to_owned()).or_default();
            let now = Instant::now();
            while queue
                .front()
                .is_some_and(|(at, _)| now - *at > PENDING_MAX_AGE)
            {
                queue.pop_front();
            }
            if queue.len() >= PENDING_MAX {
                return false;
            }
            queue.push_back((now, frame));
            return true;
        };
        match link.outbox.sender.try_send(frame) {
            Ok(()) => true,
            Err(_) => {
                warn!(peer = %to, "mesh link queue full; message dropped");
                false
            }
        }
    }

    fn pending(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ServerId, std::collections::VecDeque<(Instant, Bytes)>>>
    {
        self.inner.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a heartbeat datagram to `to` if linked, and a copy of it half a
    /// heartbeat interval later.
    ///
    /// Why the copy: the failure timeout (350 ms) spans about 17 heartbeats,
    /// and with 51 % loss per link (30 % at each end) and +-40 ms of jitter, a
    /// run of lost heartbeats that long came about once every few minutes
    /// per link, each a false `peer_down` (measured: 5-22 per minute in a
    /// cluster of 5). With a copy in a separate packet, an interval is lost
    /// only if both are: 0.51^2 = 26 %, and such a run becomes vanishingly
    /// rare, for 60 bytes per peer per interval.
    ///
    /// While a link is being handed over to a new connection, the heartbeat
    /// (and its copy) also goes out on the connections the peer may still
    /// count as its link (`Link::handover`). Why: the accepting side of a
    /// replacement installs the new link first and the dialer only once our
    /// `Hello` answer reaches it, which under heavy loss takes several
    /// retransmissions. Until then the dialer reads only the old connection;
    /// heartbeats sent on the new one alone left it hearing nothing, and an
    /// answer later than the failure timeout was a false `peer_down`
    /// (measured: 483 ms at 51 % loss). The peer counts the second copy of a
    /// heartbeat as stale.
    pub fn send_heartbeat(&self, to: &str, heartbeat: &Heartbeat) {
        let (connection, handover) = {
            let links = self.links();
            let Some(link) = links.get(to) else { return };
            (link.connection.clone(), link.open_handover())
        };
        let datagram = wire::encode_heartbeat(heartbeat);
        for old in handover {
            // Best effort: it closes as soon as the peer has switched.
            let _ = self.send_heartbeat_twice(old, datagram.clone());
        }
        match self.send_heartbeat_twice(connection, datagram) {
            Ok(()) => self
                .inner
                .counters
                .heartbeats_sent
                .fetch_add(1, Ordering::Relaxed),
            // The link just closed: the next dial takes over, nothing to count.
            Err(quinn::SendDatagramError::ConnectionLost(_)) => 0,
            Err(e) => {
                warn!(peer = %to, error = %e, "heartbeat not sent");
                self.inner
                    .counters
                    .heartbeat_send_errors
                    .fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    /// Sends a heartbeat datagram on `connection` now and its copy half an
    /// interval later. The copy is a datagram of its own, in a later packet:
    /// the receiver counts it as stale if the first one arrived.
    fn send_heartbeat_twice(
        &self,
        connection: quinn::Connection,
        datagram: Bytes,
    ) -> Result<(), quinn::SendDatagramError> {
        connection.send_datagram(datagram.clone())?;
        let delay = self.inner.heartbeat_copy_delay;
        self.inner.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = connection.send_datagram(datagram);
        });
        Ok(())
    }

    /// Transport statistics of the live link to `peer` (diagnosis and tests).
    pub fn link_stats(&self, peer: &str) -> Option<LinkStats> {
        let connection = self.live_link(peer)?;
        Some(LinkStats {
            quic: connection.stats(),
            datagram_send_space: connection.datagram_send_buffer_space(),
        })
    }

    /// The largest datagram the link to `peer` carries now, if linked.
    pub fn max_datagram_size(&self, peer: &str) -> Option<usize> {
        self.live_link(peer)?.max_datagram_size()
    }

    /// Closes every link as a clean shutdown (peers treat this server as down
    /// at once) and waits, bounded, for the close frames to go out.
    pub async fn close(&self) {
        self.inner
            .endpoint
            .close(close_code::SHUTDOWN.into(), b"server stopping");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
    }

    /// Drops every link without a clean-shutdown code, like a crash would
    /// look to the peers, and stops accepting (in-process tests).
    pub fn abort(&self) {
        self.inner.endpoint.set_server_config(None);
        for link in self.links().values() {
            link.connection.close(close_code::CRASH.into(), b"");
        }
    }

    /// Closes every connection to `peer` (the link, and any kept for a
    /// handover) if the link carried nothing from `peer` for `silence` (the
    /// failure timeout: the detector declared `peer` down). A link that did
    /// carry something meanwhile stays: the detector only lagged (the
    /// cluster task drops heartbeats it has no room for).
    ///
    /// A cut that drops only what `peer` sends here would otherwise leave the
    /// link open at `peer`'s end until QUIC's idle timeout: `peer` goes on
    /// hearing this server's heartbeats, and takes it for alive (a leader
    /// that hears nobody would keep every server from electing another).
    /// The close frame travels the direction that still works, so `peer`
    /// sees this server down at once, as after a two-way cut. The dial loop
    /// then dials again at once; a new link comes up only if both directions
    /// carry again.
    pub fn drop_silent_link(&self, peer: &str, silence: Duration) {
        let links = self.links();
        let Some(link) = links.get(peer) else {
            return;
        };
        let silent_ms = self
            .clock_ms()
            .saturating_sub(link.heard_ms.load(Ordering::Relaxed));
        if silent_ms < silence.as_millis() as u64 || link.connection.close_reason().is_some() {
            return;
        }
        let mut connections = vec![link.connection.clone()];
        connections.extend(link.handover.iter().cloned());
        connections.extend(link.previous.iter().map(|p| p.connection.clone()));
        drop(links);
        info!(peer = %peer, silent_ms, "closing the mesh link to a peer not heard, so that it sees this server down too");
        for connection in connections {
            connection.close(close_code::NOT_HEARD.into(), b"not heard");
        }
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<ServerId, Link>> {
        self.inner.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live_link(&self, peer: &str) -> Option<quinn::Connection> {
        self.links()
            .get(peer)
            .filter(|l| l.connection.close_reason().is_none())
            .map(|l| l.connection.clone())
    }

    fn live_link_heard(&self, peer: &str) -> Option<(quinn::Connection, Arc<AtomicU64>)> {
        self.links()
            .get(peer)
            .filter(|l| l.connection.close_reason().is_none())
            .map(|l| (l.connection.clone(), l.heard_ms.clone()))
    }

    /// Resolves once the link has carried nothing for longer than the
    /// silence limit; returns how long it has been silent.
    async fn silence(&self, heard_ms: &AtomicU64) -> Duration {
        loop {
            let silent = Duration::from_millis(
                self.clock_ms()
                    .saturating_sub(heard_ms.load(Ordering::Relaxed)),
            );
            if silent > self.inner.silence_limit {
                return silent;
            }
            // Wakes when the limit would be passed if nothing arrives meanwhile.
            let left = self.inner.silence_limit - silent + Duration::from_millis(1);
            tokio::time::sleep(left).await;
        }
    }

    async fn accept_loop(self) {
        loop {
            let incoming = tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                incoming = self.inner.endpoint.accept() => incoming,
            };
            let Some(incoming) = incoming else { return };
            let remote = incoming.remote_address();
            let mesh = self.clone();
            self.inner.tasks.spawn(
                async move {
                    // A stopping server waits for its tasks: a handshake
                    // still under way would hold it up to the idle timeout.
                    let handshake = tokio::select! {
                        _ = mesh.inner.shutdown.cancelled() => return,
                        handshake = incoming => handshake,
                    };
                    match handshake {
                        Ok(connection) => mesh.accepted(connection).await,
                        Err(e) => {
                            mesh.inner.counters.links_refused.fetch_add(1, Ordering::Relaxed);
                            if is_certificate_error(&e) {
                                CERTIFICATE_REFUSALS.log(|left_out| {
                                    warn!(%remote, error = %e, left_out, "mesh connection refused: its certificate is not one of this cluster's");
                                });
                            } else {
                                // A dialer that gave up, loss or a pause
                                // mid-handshake: it dials again.
                                debug!(%remote, error = %e, "mesh handshake did not complete");
                            }
                        }
                    }
                }
                .instrument(info_span!("mesh_accept", %remote)),
            );
        }
    }

    /// Identifies an incoming connection by its certificate, checks its
    /// `Hello`, then installs it. Until then any live link to that peer stays
    /// as it is.
    async fn accepted(&self, connection: quinn::Connection) {
        let peer = match self.identify(&connection) {
            Ok(peer) => peer,
            Err(why) => {
                self.inner
                    .counters
                    .links_refused
                    .fetch_add(1, Ordering::Relaxed);
                warn!(remote = %connection.remote_address(), reason = %why, "mesh link refused");
                connection.close(close_code::UNKNOWN_PEER.into(), b"unknown peer");
                return;
            }
        };
        let hello = tokio::select! {
            _ = self.inner.shutdown.cancelled() => return,
            hello = tokio::time::timeout(HELLO_TIMEOUT, receive_hello(&self.inner.me, &peer, &connection)) => hello,
        };
        match hello {
            Ok(Ok(received)) => self.install(peer, connection, false, None, received),
            Ok(Err(why)) => self.refuse_hello(&peer, &connection, &why),
            Err(_) => self.refuse_hello(&peer, &connection, "no Hello in time"),
        }
    }

    fn refuse_hello(&self, peer: &str, connection: &quinn::Connection, why: &str) {
        // Closed by the peer (it lost the tie-break, gave up waiting, or
        // found our Hello wrong, which it logs): nothing to refuse.
        if connection.close_reason().is_some() {
            debug!(peer = %peer, reason = %why, "mesh connection closed by the peer before its Hello");
            return;
        }
        self.inner
            .counters
            .links_refused
            .fetch_add(1, Ordering::Relaxed);
        warn!(peer = %peer, remote = %connection.remote_address(), reason = %why, "mesh connection refused: bad Hello");
        connection.close(close_code::PROTOCOL.into(), b"bad hello");
    }

    /// The configured server whose id the peer's (CA-verified) certificate
    /// names. Exactly one must match.
    fn identify(&self, connection: &quinn::Connection) -> Result<ServerId, String> {
        let certs = connection
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .ok_or("no client certificate")?;
        let leaf = certs.first().ok_or("empty certificate chain")?;
        let cert =
            webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("bad certificate: {e}"))?;
        let matches: Vec<&ServerId> = self
            .inner
            .addrs
            .keys()
            .filter(|id| {
                ServerName::try_from(id.as_str())
                    .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
            })
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err("its certificate names no configured peer id".into()),
            _ => Err("its certificate names several peer ids".into()),
        }
    }

    async fn dial_loop(self, peer: ServerId) {
        let addr = self.inner.addrs[&peer];
        let me_higher = self.inner.rank.get(&self.inner.me) > self.inner.rank.get(&peer);
        let mut backoff = MIN_DIAL_BACKOFF;
        let mut fresh = true;
        // Whether the current silence of the live link was already noticed.
        let mut silence_noticed = false;
        let redial = self.inner.redial[&peer].clone();
        loop {
            if let Some((connection, heard_ms)) = self.live_link_heard(&peer) {
                let silent_since = tokio::select! {
                    _ = self.inner.shutdown.cancelled() => return,
                    _ = connection.closed() => None,
                    silent = self.silence(&heard_ms) => Some(Some(silent)),
                    _ = redial.notified() => Some(None),
                };
                match silent_since {
                    // Lost at the QUIC level: dial again at once.
                    None => {
                        backoff = MIN_DIAL_BACKOFF;
                        fresh = true;
                        silence_noticed = false;
                        continue;
                    }
                    // Silent: the old link stays (it may recover) while a
                    // replacement is dialed; the first of the pair to notice
                    // dials without waiting for the grace.
                    Some(None) => {
                        info!(peer = %peer, "dialing a replacement of a live mesh link, as asked");
                        backoff = MIN_DIAL_BACKOFF;
                    }
                    Some(Some(silent)) => {
                        if !silence_noticed {
                            silence_noticed = true;
                            self.inner
                                .counters
                                .silent_link_redials
                                .fetch_add(1, Ordering::Relaxed);
                            info!(peer = %peer, silent_ms = silent.as_millis() as u64, "mesh link silent for longer than the failure timeout; dialing a replacement");
                            backoff = MIN_DIAL_BACKOFF;
                        }
                    }
                }
            } else if me_higher && fresh {
                fresh = false;
                tokio::select! {
                    _ = self.inner.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(HIGHER_DIAL_GRACE) => {}
                }
                continue;
            }
            let dial = async {
                let connecting = self
                    .inner
                    .endpoint
                    .connect_with(self.inner.client_config.clone(), addr, &peer)
                    .map_err(|e| e.to_string())?;
                connecting.await.map_err(|e| e.to_string())
            };
            let result = tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                result = tokio::time::timeout(DIAL_TIMEOUT, dial) => result,
            };
            // Hellos both ways before the connection becomes the link: ours
            // first (the peer checks it and installs its end), then the peer's.
            let result = match result {
                Ok(Ok(connection)) => {
                    let greet = async {
                        let sent = self.send_hello(&connection).await?;
                        let received = receive_hello(&self.inner.me, &peer, &connection).await?;
                        Ok::<_, String>((sent, received))
                    };
                    let greeted = tokio::select! {
                        _ = self.inner.shutdown.cancelled() => return,
                        greeted = tokio::time::timeout(HELLO_TIMEOUT, greet) => greeted,
                    };
                    match greeted {
                        Ok(Ok(streams)) => Ok(Ok((connection, streams))),
                        Ok(Err(why)) => {
                            self.refuse_hello(&peer, &connection, &why);
                            Ok(Err(why))
                        }
                        Err(_) => {
                            self.refuse_hello(&peer, &connection, "no Hello in time");
                            Ok(Err("no Hello in time".to_owned()))
                        }
                    }
                }
                Ok(Err(e)) => Ok(Err(e)),
                Err(elapsed) => Err(elapsed),
            };
            match result {
                Ok(Ok((connection, (sent, received)))) => {
                    self.install(peer.clone(), connection, true, Some(sent), received);
                    fresh = true;
                    silence_noticed = false;
                    backoff = MIN_DIAL_BACKOFF;
                    continue;
                }
                Ok(Err(e)) => debug!(%addr, error = %e, "mesh dial failed"),
                Err(_) => debug!(%addr, "mesh dial timed out"),
            }
            // Jitter keeps two servers that lost each other from dialing in lockstep.
            let jitter = Duration::from_millis(rand::random::<u64>() % 25);
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff + jitter) => {}
            }
            backoff = (backoff * 2).min(MAX_DIAL_BACKOFF);
        }
    }

    /// Makes `connection`, whose `Hello` arrived on `received` and checked
    /// (with the peer's incarnation), the link to `peer`, or refuses it as a
    /// duplicate. `sent` is our stream with our `Hello` on it already, if
    /// sent (the dialer's); else the writer opens it and sends `Hello` first.
    fn install(
        &self,
        peer: ServerId,
        connection: quinn::Connection,
        dialed_by_me: bool,
        sent: Option<quinn::SendStream>,
        (received, incarnation): (quinn::RecvStream, u64),
    ) {
        let me_lower = self.inner.rank.get(&self.inner.me) < self.inner.rank.get(&peer);
        let dialer_is_lower = |dialed_by_me: bool| dialed_by_me == me_lower;
        let generation = self.inner.next_generation.fetch_add(1, Ordering::Relaxed);
        // The peer installs its end only when its side of the handshake ends,
        // which under loss can take up to a dial timeout: a new link is not
        // called silent before that.
        let first_heartbeat_grace = DIAL_TIMEOUT.saturating_sub(self.inner.silence_limit);
        let heard_ms = Arc::new(AtomicU64::new(
            self.clock_ms() + first_heartbeat_grace.as_millis() as u64,
        ));
        let retired = CancellationToken::new();
        let (outbox, old_connection) = {
            let mut links = self.links();
            let mut outbox = None;
            let mut old_connection = None;
            let mut handover = Vec::new();
            if let Some(existing) = links.get_mut(&peer)
                && existing.connection.close_reason().is_none()
            {
                // A late connection of an earlier life of the peer (its
                // Hello held up while it restarted): the link to the
                // present one stays.
                if incarnation < existing.peer_incarnation {
                    debug!(peer = %peer, dialed_by_me, "mesh connection from an earlier life of the peer closed");
                    connection.close(close_code::DUPLICATE.into(), b"earlier life");
                    return;
                }
                // Only the same process dials twice at once: a connection
                // from a peer that restarted replaces the link, however
                // young (a fault tester: a young link refused a restarted
                // leader's dials for up to a second as "simultaneous", and
                // it built its registry without this server's names and
                // granted them again).
                let simultaneous = existing.since.elapsed() < SIMULTANEOUS_DIAL
                    && existing.peer_incarnation == incarnation;
                if simultaneous
                    && dialer_is_lower(existing.dialed_by_me)
                    && !dialer_is_lower(dialed_by_me)
                {
                    debug!(peer = %peer, dialed_by_me, "duplicate mesh connection closed (tie-break)");
                    if dialed_by_me {
                        // The peer answered our Hello: it installed this
                        // connection, and until it installs the one kept
                        // here, closing this one would be a lost link there
                        // (a false down). Meanwhile it heartbeats on this
                        // one only: both ways, heartbeats use it too.
                        existing.handover.retain(|c| c.close_reason().is_none());
                        existing.handover.push(connection.clone());
                        self.inner
                            .tasks
                            .spawn(self.clone().close_once_peer_installed(
                                peer.clone(),
                                connection,
                                existing.connection.clone(),
                                Some(existing.heard_ms.clone()),
                            ));
                    } else {
                        // Refused before our Hello: the peer never installs it.
                        connection.close(close_code::DUPLICATE.into(), b"duplicate");
                    }
                    return;
                }
                // Its writer stops at once, and its queue carries on: frames
                // not yet written go out on the new link, ahead of anything
                // sent from now on. The connection itself is closed below.
                existing.retired.cancel();
                outbox = Some(existing.outbox.clone());
                old_connection = Some(existing.connection.clone());
                if !dialed_by_me {
                    // The peer keeps the old connection as its link until our
                    // answer reaches it: heartbeats go out on it too until
                    // then (see `send_heartbeat`). What the peer sends on it
                    // is read by the old link's reader meanwhile.
                    handover = existing.open_handover();
                    handover.push(existing.connection.clone());
                }
            }
            let previous = if old_connection.is_some() && !dialed_by_me {
                // One step back only: what the old link had itself replaced
                // is closed by its own close_once_peer_installed task.
                links.remove(&peer).map(|mut old| {
                    old.previous = None;
                    Box::new(old)
                })
            } else {
                None
            };
            let outbox = outbox.unwrap_or_else(Outbox::new);
            // Frames that waited for a link go first, in order.
            if let Some(queue) = self.pending().remove(&peer) {
                let now = Instant::now();
                for (_, frame) in queue
                    .into_iter()
                    .filter(|(at, _)| now - *at <= PENDING_MAX_AGE)
                {
                    let _ = outbox.sender.try_send(frame);
                }
            }
            links.insert(
                peer.clone(),
                Link {
                    connection: connection.clone(),
                    outbox: outbox.clone(),
                    dialed_by_me,
                    peer_incarnation: incarnation,
                    generation,
                    since: Instant::now(),
                    heard_ms: heard_ms.clone(),
                    retired: retired.clone(),
                    handover,
                    previous,
                },
            );
            (outbox, old_connection)
        };
        let replaced = old_connection.is_some();
        if let Some(old) = old_connection {
            if dialed_by_me {
                // The peer sent its Hello only once it had installed the new
                // link: it no longer uses the old one.
                old.close(close_code::DUPLICATE.into(), b"replaced");
            } else {
                // The peer installs the new link only when our Hello reaches
                // it, and counts the old one as current until then: closing
                // it now would reach the peer first and be a lost link there
                // (a false down, and a new link it would announce as up, not
                // as a replacement). The peer closes it itself when it
                // installs; this is the safety net. The old link's reader
                // goes on reading it meanwhile.
                self.inner
                    .tasks
                    .spawn(self.clone().close_once_peer_installed(
                        peer.clone(),
                        old,
                        connection.clone(),
                        None,
                    ));
            }
        }
        info!(peer = %peer, remote = %connection.remote_address(), dialed_by_me, replaced, "mesh link up");
        // Not nested in the caller's span: the dialer's is this same peer
        // span, which logs read as `peer{peer=s3}:peer{peer=s3}`.
        let span = info_span!(parent: None, "peer", peer = %peer);
        self.inner.tasks.spawn(
            self.clone()
                .write_link(
                    peer.clone(),
                    connection.clone(),
                    sent,
                    outbox.receiver,
                    retired,
                )
                .instrument(span.clone()),
        );
        // The reader announces the link first, so that the event comes before
        // any message that arrives on it.
        let event = if replaced {
            self.inner
                .counters
                .links_replaced
                .fetch_add(1, Ordering::Relaxed);
            MeshEvent::LinkReplaced(peer.clone())
        } else {
            MeshEvent::LinkUp(peer.clone())
        };
        self.inner.tasks.spawn(
            self.clone()
                .read_link(peer, connection, generation, heard_ms, event, received)
                .instrument(span),
        );
    }

    async fn write_link(
        self,
        peer: ServerId,
        connection: quinn::Connection,
        sent: Option<quinn::SendStream>,
        queue: Arc<tokio::sync::Mutex<mpsc::Receiver<Bytes>>>,
        retired: CancellationToken,
    ) {
        let result = async {
            let mut stream = match sent {
                Some(stream) => stream,
                None => self.send_hello(&connection).await.map_err(|e| anyhow!(e))?,
            };
            // A replaced link's writer lets go of the queue as soon as its
            // connection is closed, which `install` did before spawning this.
            let mut rx = tokio::select! {
                _ = retired.cancelled() => return Ok(()),
                _ = connection.closed() => return Ok(()),
                rx = queue.lock_owned() => rx,
            };
            let mut batch = Vec::new();
            loop {
                // Ends with the connection: waiting on the queue alone would keep
                // this task (and the mesh it holds) alive after the link is gone.
                // Biased: once the link is closed (replaced), no frame is taken
                // out of the queue to be lost on it.
                let frame = tokio::select! {
                    biased;
                    _ = retired.cancelled() => break,
                    _ = connection.closed() => break,
                    frame = rx.recv() => match frame {
                        Some(frame) => frame,
                        None => break,
                    },
                };
                batch.clear();
                batch.extend_from_slice(&frame);
                let mut count = 1;
                while let Ok(more) = rx.try_recv() {
                    batch.extend_from_slice(&more);
                    count += 1;
                }
                stream.write_all(&batch).await?;
                self.inner
                    .counters
                    .messages_sent
                    .fetch_add(count, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        };
        if let Err(e) = result.await {
            debug!(peer = %peer, error = %e, "mesh link writer ended");
        }
    }

    async fn read_link(
        self,
        peer: ServerId,
        connection: quinn::Connection,
        generation: u64,
        heard_ms: Arc<AtomicU64>,
        up: MeshEvent,
        greeted: quinn::RecvStream,
    ) {
        let _ = self.inner.events.send(up).await;
        // The stream whose Hello was checked before the link was installed.
        self.spawn_frame_reader(&peer, &connection, greeted, true, &heard_ms);
        let reason = loop {
            tokio::select! {
                reason = connection.closed() => break reason,
                stream = connection.accept_uni() => match stream {
                    // Any further stream must start with a Hello of its own.
                    Ok(stream) => self.spawn_frame_reader(&peer, &connection, stream, false, &heard_ms),
                    Err(reason) => break reason,
                },
                datagram = connection.read_datagram() => match datagram {
                    Ok(datagram) => {
                        heard_ms.fetch_max(self.clock_ms(), Ordering::Relaxed);
                        self.heartbeat(&peer, &datagram);
                    }
                    Err(reason) => break reason,
                },
            }
        };
        // The peer gave this connection up without installing it: its wait
        // for our `Hello` answer timed out (it closes the connection as a
        // bad Hello), or it went quiet for the idle timeout.
        let gave_up = match &reason {
            quinn::ConnectionError::TimedOut => true,
            quinn::ConnectionError::ApplicationClosed(close) => {
                close.error_code == close_code::PROTOCOL.into()
            }
            _ => false,
        };
        // Never confirmed: no heartbeat came on it, so the peer never used it.
        let unconfirmed = connection.stats().frame_rx.datagram == 0;
        let handed_back = {
            let mut links = self.links();
            if links.get(&peer).is_none_or(|l| l.generation != generation) {
                return;
            }
            let Some(mut ended) = links.remove(&peer) else {
                return;
            };
            match ended.previous.take() {
                // A replacement the peer gave up before installing it: the
                // peer still counts the old connection (kept open for that
                // reason) as its link, so it is the link again, not a lost
                // one (that was a false down at both ends: here at once, and
                // at the peer when the old connection was then closed).
                Some(previous)
                    if gave_up && unconfirmed && previous.connection.close_reason().is_none() =>
                {
                    let mut previous = *previous;
                    previous.retired = CancellationToken::new();
                    let writer = (
                        previous.connection.clone(),
                        previous.outbox.receiver.clone(),
                        previous.retired.clone(),
                    );
                    links.insert(peer.clone(), previous);
                    Some(writer)
                }
                Some(previous) => {
                    previous
                        .connection
                        .close(close_code::DUPLICATE.into(), b"replaced");
                    None
                }
                None => None,
            }
        };
        if let Some((old, queue, retired)) = handed_back {
            info!(peer = %peer, reason = %reason, "mesh link replacement given up by the peer before it installed it; the link it replaced is the link again");
            // The old writer let go of its stream: a new stream with a new
            // Hello carries the frames from now on (a link accepts further
            // streams that start with one).
            self.inner.tasks.spawn(
                self.clone()
                    .write_link(peer.clone(), old, None, queue, retired)
                    .instrument(tracing::Span::current()),
            );
            // Frames written to the given-up connection are lost: announced
            // like a replacement, so whatever must arrive is sent again.
            let _ = self.inner.events.send(MeshEvent::LinkReplaced(peer)).await;
            return;
        }
        info!(peer = %peer, reason = %reason, "mesh link down");
        self.inner
            .counters
            .links_down
            .fetch_add(1, Ordering::Relaxed);
        let _ = self.inner.events.send(MeshEvent::LinkDown(peer)).await;
    }

    /// Closes `unused`, a connection to `peer` this end no longer uses but
    /// the peer may still count as its link, once the peer shows it has
    /// installed `kept`: a heartbeat arrived on it (heartbeats go out on
    /// installed links only; its `Hello` does not count, it comes before the
    /// install). Also at once when this server stops (a stopping server
    /// waits for its tasks).
    ///
    /// With `heard`, `unused` lost the tie-break here, and no link reader
    /// reads it: the heartbeats the peer sends on it meanwhile are read here
    /// and count as the link's sign of life; it is also closed when `kept`
    /// ends, or after [`HELLO_TIMEOUT`].
    ///
    /// Without, `unused` is the link that `kept` replaced on the accepting
    /// side. If `kept` ends first, its reader decides (the old link may be
    /// the link again: see [`Mesh::read_link`]), and `unused` stays open if
    /// so. After [`HELLO_TIMEOUT`] it is closed only once the peer no longer
    /// heartbeats on it: a timer closing the connection the peer still uses
    /// as its link was a false down there.
    async fn close_once_peer_installed(
        self,
        peer: ServerId,
        unused: quinn::Connection,
        kept: quinn::Connection,
        heard: Option<Arc<AtomicU64>>,
    ) {
        let start = Instant::now();
        let mut unused_rx = unused.stats().frame_rx.datagram;
        let mut unused_rx_at = Instant::now();
        while !self.inner.shutdown.is_cancelled()
            && unused.close_reason().is_none()
            && kept.stats().frame_rx.datagram == 0
        {
            if kept.close_reason().is_some() {
                if heard.is_some() {
                    break;
                }
                let current = self.links().get(&peer).map(|l| l.connection.stable_id());
                if current == Some(unused.stable_id()) {
                    // The link again: not to be closed.
                    return;
                }
                if current != Some(kept.stable_id()) {
                    break;
                }
                // The reader of `kept` has not decided yet.
            }
            let rx = unused.stats().frame_rx.datagram;
            if rx != unused_rx {
                unused_rx = rx;
                unused_rx_at = Instant::now();
            }
            if start.elapsed() >= HELLO_TIMEOUT
                && (heard.is_some() || unused_rx_at.elapsed() > self.inner.silence_limit)
            {
                break;
            }
            let pause = tokio::time::sleep(Duration::from_millis(5));
            match &heard {
                Some(heard) => tokio::select! {
                    datagram = unused.read_datagram() => if let Ok(datagram) = datagram {
                        heard.fetch_max(self.clock_ms(), Ordering::Relaxed);
                        self.heartbeat(&peer, &datagram);
                    },
                    _ = pause => {}
                },
                None => pause.await,
            }
        }
        unused.close(close_code::DUPLICATE.into(), b"replaced");
        // No way back to it now.
        if let Some(link) = self.links().get_mut(&peer)
            && link
                .previous
                .as_ref()
                .is_some_and(|p| p.connection.stable_id() == unused.stable_id())
        {
            link.previous = None;
        }
    }

    fn spawn_frame_reader(
        &self,
        peer: &str,
        connection: &quinn::Connection,
        stream: quinn::RecvStream,
        greeted: bool,
        heard_ms: &Arc<AtomicU64>,
    ) {
        let mesh = self.clone();
        let peer = peer.to_owned();
        let connection = connection.clone();
        let heard_ms = heard_ms.clone();
        self.inner.tasks.spawn(
            async move {
                if let Err(why) = mesh.read_frames(&peer, stream, greeted, &heard_ms).await {
                    warn!(peer = %peer, reason = %why, "mesh link closed: bad frames");
                    connection.close(close_code::PROTOCOL.into(), b"protocol error");
                }
            }
            .instrument(tracing::Span::current()),
        );
    }

    /// Opens this side's stream of `connection` and sends our `Hello` on it.
    async fn send_hello(
        &self,
        connection: &quinn::Connection,
    ) -> Result<quinn::SendStream, String> {
        let mut stream = connection.open_uni().await.map_err(|e| e.to_string())?;
        let hello = PeerMessage::Hello {
            version: WIRE_VERSION,
            id: self.inner.me.clone(),
            incarnation: self.inner.incarnation,
        };
        stream
            .write_all(&wire::encode_frame(&hello))
            .await
            .map_err(|e| e.to_string())?;
        Ok(stream)
    }

    fn heartbeat(&self, peer: &str, datagram: &[u8]) {
        match wire::decode_heartbeat(datagram) {
            Ok(heartbeat) if heartbeat.from == peer => {
                self.inner
                    .counters
                    .heartbeats_received
                    .fetch_add(1, Ordering::Relaxed);
                // Lossy by nature: if the cluster task is behind, drop rather than wait.
                let _ = self
                    .inner
                    .events
                    .try_send(MeshEvent::Heartbeat(peer.to_owned(), heartbeat));
            }
            Ok(heartbeat) => {
                warn!(peer = %peer, claimed = %heartbeat.from, "heartbeat with another server's id ignored")
            }
            Err(e) => debug!(peer = %peer, error = %e, "bad heartbeat datagram ignored"),
        }
    }

    async fn read_frames(
        &self,
        peer: &str,
        mut stream: quinn::RecvStream,
        mut greeted: bool,
        heard_ms: &AtomicU64,
    ) -> Result<(), String> {
        loop {
            let mut prefix = [0u8; 4];
            match stream.read_exact(&mut prefix).await {
                Ok(()) => {}
                // The stream or connection ended: not a protocol error.
                Err(_) => return Ok(()),
            }
            let len = wire::frame_len(prefix).map_err(|e| e.to_string())?;
            let Some(body) = read_body(&mut stream, len).await else {
                return Ok(());
            };
            heard_ms.fetch_max(self.clock_ms(), Ordering::Relaxed);
            let message = wire::decode_frame(&body).map_err(|e| e.to_string())?;
            match (greeted, message) {
                (false, PeerMessage::Hello { version, id, .. }) => {
                    check_hello(&self.inner.me, peer, version, &id)?;
                    greeted = true;
                }
                (false, _) => return Err("first frame is not Hello".into()),
                (true, PeerMessage::Hello { .. }) => return Err("second Hello".into()),
                (true, message) => {
                    self.inner
                        .counters
                        .messages_received
                        .fetch_add(1, Ordering::Relaxed);
                    if self
                        .inner
                        .events
                        .send(MeshEvent::Message(peer.to_owned(), message))
                        .await
                        .is_err()
                    {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Whether a failed handshake was TLS refusing the peer's certificate (a
/// server of another cluster, or a certificate not made by this cluster's
/// CA), as opposed to a handshake cut short by the network or the peer.
fn is_certificate_error(error: &quinn::ConnectionError) -> bool {
    let code = match error {
        quinn::ConnectionError::TransportError(e) => e.code,
        quinn::ConnectionError::ConnectionClosed(close) => close.error_code,
        _ => return false,
    };
    // TLS alerts travel as QUIC's crypto error codes (RFC 9001 4.8).
    (0x100..0x200).contains(&u64::from(code))
}

/// Whether a `Hello` is the one expected from `peer`, the configured peer
/// (never `me`) that its certificate names: so the id it claims must be a
/// configured peer, not this server, and the one in its certificate.
fn check_hello(me: &str, peer: &str, version: u8, id: &str) -> Result<(), String> {
    if version != WIRE_VERSION {
        return Err(format!(
            "wire version {version}, this server speaks {WIRE_VERSION}"
        ));
    }
    if id == me {
        return Err(format!(
            "claims to be this server ({id:?}); its certificate says {peer:?}"
        ));
    }
    if id != peer {
        return Err(format!(
            "claims to be {id:?} but its certificate says {peer:?}"
        ));
    }
    Ok(())
}

/// Waits for the peer's stream on `connection` and reads its first frame,
/// which must be a `Hello` from `peer`; returns the stream, ready for the
/// frames after it. Not bounded in time here: callers time it out.
/// This process's incarnation: the time it started, in nanoseconds since
/// the epoch, so that a later life of a server has a higher one.
fn incarnation_now() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since_epoch.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Waits for `peer`'s `Hello` on `connection` and checks it; the stream
/// it came on, and the peer's incarnation.
async fn receive_hello(
    me: &str,
    peer: &str,
    connection: &quinn::Connection,
) -> Result<(quinn::RecvStream, u64), String> {
    let mut stream = connection
        .accept_uni()
        .await
        .map_err(|e| format!("connection lost before its Hello: {e}"))?;
    let mut prefix = [0u8; 4];
    stream
        .read_exact(&mut prefix)
        .await
        .map_err(|e| format!("stream ended before its Hello: {e}"))?;
    let len = wire::frame_len(prefix).map_err(|e| e.to_string())?;
    if len > MAX_HELLO_FRAME {
        return Err(format!("a first frame of {len} bytes is no Hello"));
    }
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| format!("stream ended inside its Hello: {e}"))?;
    match wire::decode_frame(&body).map_err(|e| e.to_string())? {
        PeerMessage::Hello {
            version,
            id,
            incarnation,
        } => {
            check_hello(me, peer, version, &id)?;
            Ok((stream, incarnation))
        }
        _ => Err("first frame is not Hello".into()),
    }
}

/// Reads a frame body of `len` bytes; `None` if the stream ends first. The
/// buffer grows as the bytes arrive, so a length prefix alone (up to
/// [`wire::MAX_FRAME`]) never makes this server allocate more than 64 KiB.
async fn read_body(stream: &mut quinn::RecvStream, len: usize) -> Option<Vec<u8>> {
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    while body.len() < len {
        match stream.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) | Err(_) => return None,
        }
    }
    Some(body)
}

/// Every transport setting of a mesh connection, with its reason. `timing`
/// is the cluster's heartbeat and failure timing, which the QUIC timers must
/// agree with.
fn mesh_transport(timing: &Timing) -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    // Long enough that a partition shorter than this heals on the same
    // connection, nothing lost (the failure detector has long said "down" by
    // then: it works on heartbeats, not on this); a silent link does not wait
    // for it anyway, a replacement is dialed after the failure timeout. At
    // least 3 s, and never less than ten failure timeouts.
    let idle = (timing.failure_timeout * 10).max(Duration::from_secs(3));
    transport
        .max_idle_timeout(Some(idle.try_into().unwrap_or_else(|_| {
            quinn::IdleTimeout::from(quinn::VarInt::from_u32(3_000))
        })));
    // Heartbeats keep the link busy; should the cluster task stall, a ping at
    // half the failure timeout still keeps the path (and NAT state) warm, and
    // the peer's silence watch quiet.
    transport.keep_alive_interval(Some(timing.failure_timeout / 2));
    // A LAN: start loss recovery from a realistic RTT instead of quinn's
    // internet default of 333 ms, so handshakes under loss retry quickly.
    transport.initial_rtt(Duration::from_millis(20));
    // Heartbeats must never queue behind loss recovery: see HeartbeatFloor.
    transport.congestion_controller_factory(Arc::new(HeartbeatFloor::default()));
    // Heartbeats are tiny; 64 KiB holds hundreds if the reader lags, and
    // bounds memory if it lags more (older datagrams are dropped first).
    transport.datagram_receive_buffer_size(Some(64 * 1024));
    transport.datagram_send_buffer_size(64 * 1024);
    // One uni stream per direction; a few spare for a reconnect race.
    transport.max_concurrent_uni_streams(4u8.into());
    transport.max_concurrent_bidi_streams(0u8.into());
    Arc::new(transport)
}

/// The congestion window of a mesh connection never falls below this.
///
/// Measured (tests/lossy/transport.rs): heartbeat datagrams count against
/// the congestion window like any packet. During a cut of 2.5 s, the frames
/// the cluster kept sending to the unreachable peer filled the window (in
/// flight until acknowledged), every later heartbeat waited in the datagram
/// send buffer, and after the heal neither side sent anything but QUIC's
/// probe packets, whose timer had backed off exponentially (quinn's backoff is
/// not configurable): the link stayed silent until the idle timeout closed it,
/// 0.5 s after the heal. Under 51 % random loss the window collapses to its
/// minimum (2 packets) over and over, with the same effect in short bursts.
/// Loss on a LAN is not congestion, and mesh traffic is small control
/// messages, so the floor is generous: 15 s of heartbeats to four peers plus
/// the frames queued during a partition as long as the idle timeout.
pub const MESH_MIN_WINDOW: u64 = 1024 * 1024;

/// quinn's default congestion controller (Cubic) with a floor on its window
/// ([`MESH_MIN_WINDOW`]), so that heartbeats are never held back by loss
/// recovery. Above the floor Cubic behaves as usual.
#[derive(Debug, Default)]
pub struct HeartbeatFloor {
    cubic: quinn::congestion::CubicConfig,
}

impl quinn::congestion::ControllerFactory for HeartbeatFloor {
    fn build(
        self: Arc<Self>,
        now: std::time::Instant,
        current_mtu: u16,
    ) -> Box<dyn quinn::congestion::Controller> {
        let cubic = Arc::new(self.cubic.clone()).build(now, current_mtu);
        Box::new(FlooredController { inner: cubic })
    }
}

/// A controller whose window is at least [`MESH_MIN_WINDOW`].
struct FlooredController {
    inner: Box<dyn quinn::congestion::Controller>,
}

impl quinn::congestion::Controller for FlooredController {
    fn on_sent(&mut self, now: std::time::Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: std::time::Instant,
        sent: std::time::Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: std::time::Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: std::time::Instant,
        sent: std::time::Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window().max(MESH_MIN_WINDOW)
    }

    fn metrics(&self) -> quinn::congestion::ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn quinn::congestion::Controller> {
        Box::new(FlooredController {
            inner: self.inner.clone_box(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window().max(MESH_MIN_WINDOW)
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

fn roots(identity: &ServerIdentity) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(identity.ca.clone())
        .context("the cluster CA certificate is unusable")?;
    Ok(Arc::new(roots))
}

fn mesh_server_config(identity: &ServerIdentity, timing: &Timing) -> Result<quinn::ServerConfig> {
    let provider = crate::tls::provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(identity)?,
        provider.clone(),
    )
    .build()
    .context("cannot build the mesh client verifier")?;
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .context("server certificate and key do not match")?;
    crypto.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(mesh_transport(timing));
    Ok(config)
}

fn mesh_client_config(identity: &ServerIdentity, timing: &Timing) -> Result<quinn::ClientConfig> {
    let mut crypto = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(identity)?)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .context("server certificate and key do not match")?;
    crypto.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(mesh_transport(timing));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClusterConfig;

    /// Two meshes s1 and s2 on loopback, linked; returns them with s1's
    /// and s2's events, the certs directory, and the config.
    struct Pair {
        s1: Mesh,
        s2: Mesh,
        events: mpsc::Receiver<MeshEvent>,
        events2: mpsc::Receiver<MeshEvent>,
        certs: std::path::PathBuf,
        config: ClusterConfig,
        shutdown: CancellationToken,
    }

    impl Pair {
        /// Stops both meshes and removes the certificates.
        fn stop(self) {
            self.shutdown.cancel();
            self.s1.abort();
            self.s2.abort();
            let _ = std::fs::remove_dir_all(&self.certs);
        }
    }

    #[test]
    fn only_a_tls_alert_is_called_a_certificate_problem() {
        use quinn_proto::{TransportError, TransportErrorCode};
        let alert = |code| TransportError {
            code: TransportErrorCode::crypto(code),
            frame: None,
            reason: "invalid peer certificate: UnknownIssuer".into(),
        };
        // unknown_ca (48), from our TLS or from the peer's close.
        assert!(is_certificate_error(
            &quinn::ConnectionError::TransportError(alert(48))
        ));
        let closed = quinn_proto::ConnectionClose {
            error_code: TransportErrorCode::crypto(42),
            frame_type: None,
            reason: bytes::Bytes::from_static(b"bad certificate"),
        };
        assert!(is_certificate_error(
            &quinn::ConnectionError::ConnectionClosed(closed)
        ));
        // A duplicated or damaged first packet, or a dialer gone quiet.
        let garbled = TransportError {
            code: TransportErrorCode::PROTOCOL_VIOLATION,
            frame: None,
            reason: "authentication failed".into(),
        };
        assert!(!is_certificate_error(
            &quinn::ConnectionError::TransportError(garbled)
        ));
        assert!(!is_certificate_error(&quinn::ConnectionError::TimedOut));
    }

    /// `failure_timeout`: the silence after which a link gets a replacement
    /// dialed (no heartbeats run unless the test sends them).
    async fn linked_pair(tag: &str, failure_timeout: Duration) -> Pair {
        let (sock1, _) = crate::netsim::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let (sock2, _) = crate::netsim::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let (p1, p2) = (
            sock1.local_addr().unwrap().port(),
            sock2.local_addr().unwrap().port(),
        );
        let mut config =
            ClusterConfig::parse(&format!("s1 127.0.0.1 0 {p1}\ns2 127.0.0.1 0 {p2}\n"), "t")
                .unwrap();
        config.timing.failure_timeout = failure_timeout;
        let certs =
            std::env::temp_dir().join(format!("chatmesh-mesh-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&certs);
        crate::tls::generate(&config, &certs, false).unwrap();
        let shutdown = CancellationToken::new();
        let (tx1, mut events) = mpsc::channel(4096);
        let (tx2, events2) = mpsc::channel(4096);
        let id1 = ServerIdentity::load(&certs, "s1").unwrap();
        let id2 = ServerIdentity::load(&certs, "s2").unwrap();
        let s1 = Mesh::start(
            &config,
            "s1",
            &id1,
            sock1,
            tx1,
            shutdown.clone(),
            TaskTracker::new(),
        )
        .unwrap();
        let s2 = Mesh::start(
            &config,
            "s2",
            &id2,
            sock2,
            tx2,
            shutdown.clone(),
            TaskTracker::new(),
        )
        .unwrap();
        let up = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match events.recv().await {
                    Some(MeshEvent::LinkUp(peer)) if peer == "s2" => return,
                    Some(_) => {}
                    None => panic!("s1's events ended"),
                }
            }
        })
        .await;
        assert!(up.is_ok(), "s1 and s2 did not link within 20 s");
        Pair {
            s1,
            s2,
            events,
            events2,
            certs,
            config,
            shutdown,
        }
    }

    /// A connection to s1 made with s2's (valid) certificate, outside s2's mesh.
    async fn intruder(pair: &Pair) -> (quinn::Endpoint, quinn::Connection) {
        let identity = ServerIdentity::load(&pair.certs, "s2").unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint
            .set_default_client_config(mesh_client_config(&identity, &pair.config.timing).unwrap());
        let connection = tokio::time::timeout(
            Duration::from_secs(20),
            endpoint
                .connect(pair.s1.local_addr().unwrap(), "s1")
                .unwrap(),
        )
        .await
        .expect("handshake within 20 s")
        .expect("a valid certificate completes the handshake");
        (endpoint, connection)
    }

    /// Waits until s1 closes `connection`; returns its application close code.
    async fn closed_by_s1(connection: &quinn::Connection) -> Option<u64> {
        let reason = tokio::time::timeout(HELLO_TIMEOUT * 4, connection.closed())
            .await
            .expect("s1 closes a connection without a good Hello");
        match reason {
            quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
            _ => None,
        }
    }

    fn assert_link_kept(pair: &mut Pair) {
        while let Ok(event) = pair.events.try_recv() {
            assert!(
                !matches!(event, MeshEvent::LinkReplaced(_) | MeshEvent::LinkDown(_)),
                "the live link to s2 was disturbed: {event:?}"
            );
        }
        assert_eq!(pair.s1.counters().links_replaced.load(Ordering::Relaxed), 0);
        assert_eq!(pair.s1.linked_peers(), ["s2"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_without_a_good_hello_never_replaces_the_live_link() {
        // No heartbeats run here: a long failure timeout keeps the silence
        // watch from dialing replacements of its own during the test.
        let mut pair = linked_pair("hello", Duration::from_secs(60)).await;
        let hello = |version, id: &str| {
            wire::encode_frame(&PeerMessage::Hello {
                version,
                id: id.to_owned(),
                incarnation: u64::MAX,
            })
        };
        let refused = |pair: &Pair| pair.s1.counters().links_refused.load(Ordering::Relaxed);
        // Each attempt: what the intruder sends on its stream (None: it
        // opens none at all).
        let attempts: Vec<(&str, Option<Bytes>)> = vec![
            ("no stream, no Hello", None),
            (
                "a Hello cut short",
                Some(hello(WIRE_VERSION, "s2").slice(..6)),
            ),
            (
                "a first frame too long for a Hello",
                Some(Bytes::from_static(&[0, 1, 0, 0, 0])),
            ),
            ("another server's id", Some(hello(WIRE_VERSION, "s1"))),
            ("another wire version", Some(hello(WIRE_VERSION + 1, "s2"))),
            (
                "a message before any Hello",
                Some(wire::encode_frame(&PeerMessage::Election(
                    crate::election::ElectionMessage::Coordinator { term: 99 },
                ))),
            ),
        ];
        for (what, first) in attempts {
            let before = refused(&pair);
            let (endpoint, connection) = intruder(&pair).await;
            // Kept open until s1 decides, so an empty stream is not ended.
            let _stream = match first {
                Some(bytes) => {
                    let mut stream = connection.open_uni().await.unwrap();
                    stream.write_all(&bytes).await.unwrap();
                    Some(stream)
                }
                None => None,
            };
            let code = closed_by_s1(&connection).await;
            assert_eq!(code, Some(close_code::PROTOCOL.into()), "{what}");
            assert_eq!(refused(&pair), before + 1, "{what}: counted as refused");
            assert_link_kept(&mut pair);
            endpoint.close(0u8.into(), b"");
            println!("{what}: refused, link to s2 kept");
        }

        // The control: the same connection with a good Hello does replace the
        // link (a holder of s2's key is s2 as far as the mesh can tell).
        let (_endpoint, connection) = intruder(&pair).await;
        let mut stream = connection.open_uni().await.unwrap();
        stream.write_all(&hello(WIRE_VERSION, "s2")).await.unwrap();
        let replaced = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(MeshEvent::LinkReplaced(peer)) = pair.events.recv().await {
                    return peer;
                }
            }
        })
        .await
        .expect("a good Hello replaces the link");
        assert_eq!(replaced, "s2");
        pair.stop();
    }

    /// A connection to s1 with s2's key and a good `Hello` of `incarnation`
    /// is closed as a duplicate, and the live link to s2 kept.
    async fn refused_as_duplicate(pair: &mut Pair, incarnation: u64) {
        let (endpoint, connection) = intruder(pair).await;
        let mut stream = connection.open_uni().await.unwrap();
        stream.write_all(&s2_hello(incarnation)).await.unwrap();
        let code = closed_by_s1(&connection).await;
        assert_eq!(code, Some(close_code::DUPLICATE.into()));
        endpoint.close(0u8.into(), b"");
        assert_link_kept(pair);
    }

    /// s2's `Hello` frame, from its process `incarnation`.
    fn s2_hello(incarnation: u64) -> Bytes {
        wire::encode_frame(&PeerMessage::Hello {
            version: WIRE_VERSION,
            id: "s2".to_owned(),
            incarnation,
        })
    }

    /// A second connection of a pair within a second of its link is a
    /// simultaneous dial, and the one the higher server dialed loses the
    /// tie-break; but only from the same process. One from a peer that
    /// restarted (a later incarnation in its `Hello`) replaces the young link
    /// at once, and one from an earlier life is refused (a fault tester: s1
    /// refused a restarted leader's dials for up to a second, and the
    /// leader, elected with another restarted server, built its registry
    /// without s1's names and granted them again).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_peer_replaces_a_young_link_at_once() {
        let mut pair = linked_pair("restarted-young", Duration::from_millis(350)).await;
        let linked = Instant::now();
        let s2 = pair.s2.inner.incarnation;
        // s2's own process dialing again: the tie-break, dialed by s2 (the
        // higher), refused.
        refused_as_duplicate(&mut pair, s2).await;
        // A late connection of an earlier life of s2: refused, at any age
        // of the link (a reviewer: it replaced the live link, and the link
        // was lost once the dead connection timed out).
        refused_as_duplicate(&mut pair, s2 - 1).await;
        // A later process with s2's key: it replaces the link, young as it is.
        let (_endpoint, _connection) = replaced_by_intruder(&mut pair).await;
        let age = linked.elapsed();
        assert!(age < SIMULTANEOUS_DIAL, "replaced only after {age:?}");
        pair.stop();
    }

    /// A replacement whose `Hello` answer has not reached the dialer yet:
    /// s1 accepts a new connection from "s2" (made with s2's key, outside
    /// s2's mesh) with a good `Hello`, installs it, and answers; the answer
    /// is never read, like one lost over and over under heavy loss. s2's mesh
    /// still counts the old connection as its link, and must keep hearing
    /// s1's heartbeats on it, and s1 must not call its new link silent while
    /// s2's heartbeats arrive on the old one. Both, until the answer's
    /// deadline ([`HELLO_TIMEOUT`]); at 51 % loss an answer later than the
    /// failure timeout was a false `peer_down` on the dialer's side.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replacement_awaiting_its_answer_keeps_both_ends_hearing_each_other() {
        // The main crate's failure timeout, so that the silence watch runs.
        let failure_timeout = Duration::from_millis(350);
        let mut pair = linked_pair("handover", failure_timeout).await;
        let pump = heartbeat_pump(&pair);
        // A link younger than this meets a second connection as a
        // simultaneous dial (a tie-break), not as a replacement.
        tokio::time::sleep(SIMULTANEOUS_DIAL + Duration::from_millis(100)).await;
        let (_endpoint, connection) = replaced_by_intruder(&mut pair).await;
        let installed = Instant::now();
        while pair.events2.try_recv().is_ok() {}
        // Watched for 2.5 s: s1 calls a link silent 2 s after installing it
        // (the first-heartbeat grace plus the failure timeout), and closes
        // the old connection 4 s after (HELLO_TIMEOUT).
        let watch = Duration::from_millis(2500);
        let mut heard_by_s2 = 0;
        let mut last_heard = installed;
        let mut longest_gap = Duration::ZERO;
        while installed.elapsed() < watch {
            match tokio::time::timeout(Duration::from_millis(10), pair.events2.recv()).await {
                Ok(Some(MeshEvent::Heartbeat(from, _))) if from == "s1" => {
                    heard_by_s2 += 1;
                    longest_gap = longest_gap.max(last_heard.elapsed());
                    last_heard = Instant::now();
                }
                Ok(Some(MeshEvent::LinkDown(peer))) => {
                    panic!("s2 lost its link to {peer} during the handover")
                }
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => panic!("s2's events ended"),
            }
        }
        longest_gap = longest_gap.max(last_heard.elapsed());
        let redials = pair
            .s1
            .counters()
            .silent_link_redials
            .load(Ordering::Relaxed);
        let on_new = connection.stats().frame_rx.datagram;
        println!(
            "{watch:?} after s1 installed the new connection: s2 heard {heard_by_s2} heartbeats from s1 on its link (longest gap {longest_gap:?}); s1 redialed {redials} silent links; the new connection received {on_new} heartbeat datagrams"
        );
        assert!(
            heard_by_s2 >= 10 && longest_gap < failure_timeout,
            "s2 kept hearing s1 on the old connection: {heard_by_s2} heartbeats, longest gap {longest_gap:?}"
        );
        assert!(on_new > 0, "s1 heartbeats on its new link too");
        assert_eq!(
            redials, 0,
            "s1 called the new link silent while s2 heartbeated on the old one"
        );
        assert_eq!(pair.s2.linked_peers(), ["s1"]);
        pump.abort();
        pair.stop();
    }

    /// A replacement whose dialer gives up waiting for the answer (it closes
    /// the connection as a bad Hello, as `dial_loop` does after
    /// [`HELLO_TIMEOUT`]) after s1 installed it: the dialer never installed
    /// it and still counts the old connection as its link. s1 must take the
    /// old link back (announced as a replacement: frames written to the
    /// given-up connection are lost), never report the link down, never
    /// close the old connection while s2 heartbeats on it, and carry frames
    /// on it again. Seen at 51 % loss when a `Hello` took 4.3 s to arrive:
    /// a false down at both ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replacement_given_up_by_its_dialer_leaves_the_old_link_in_place() {
        let failure_timeout = Duration::from_millis(350);
        let mut pair = linked_pair("giveup", failure_timeout).await;
        let pump = heartbeat_pump(&pair);
        // A link younger than this meets a second connection as a
        // simultaneous dial (a tie-break), not as a replacement.
        tokio::time::sleep(SIMULTANEOUS_DIAL + Duration::from_millis(100)).await;
        let (_endpoint, connection) = replaced_by_intruder(&mut pair).await;
        connection.close(close_code::PROTOCOL.into(), b"bad hello");
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match pair.events.recv().await {
                    Some(MeshEvent::LinkReplaced(peer)) if peer == "s2" => return,
                    Some(MeshEvent::LinkDown(peer)) => {
                        panic!("s1 reported its link to {peer} down")
                    }
                    Some(_) => {}
                    None => panic!("s1's events ended"),
                }
            }
        })
        .await
        .expect("s1 takes the old link back within 20 s");
        let message =
            PeerMessage::Election(crate::election::ElectionMessage::Coordinator { term: 77 });
        assert!(pair.s1.send("s2", &message));
        // Watched past the old connection's HELLO_TIMEOUT safety net.
        let watch = HELLO_TIMEOUT + Duration::from_secs(1);
        let start = Instant::now();
        let (mut delivered, mut heard_by_s2) = (false, 0);
        while start.elapsed() < watch {
            while let Ok(event) = pair.events.try_recv() {
                assert!(
                    !matches!(event, MeshEvent::LinkDown(_)),
                    "s1 reported its link down: {event:?}"
                );
            }
            match tokio::time::timeout(Duration::from_millis(10), pair.events2.recv()).await {
                Ok(Some(MeshEvent::Message(from, got))) if from == "s1" && got == message => {
                    delivered = true
                }
                Ok(Some(MeshEvent::Heartbeat(from, _))) if from == "s1" => heard_by_s2 += 1,
                Ok(Some(MeshEvent::LinkDown(peer))) => {
                    panic!("s2 lost its link to {peer}")
                }
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => panic!("s2's events ended"),
            }
        }
        println!(
            "{watch:?} after s1 took the old link back: the frame reached s2: {delivered}; s2 heard {heard_by_s2} heartbeats from s1"
        );
        assert!(delivered, "a frame sent after the hand-back reached s2");
        assert!(heard_by_s2 >= 10, "s2 kept hearing s1");
        for mesh in [&pair.s1, &pair.s2] {
            assert_eq!(mesh.counters().links_down.load(Ordering::Relaxed), 0);
        }
        assert_eq!(pair.s1.linked_peers(), ["s2"]);
        assert_eq!(pair.s2.linked_peers(), ["s1"]);
        pump.abort();
        pair.stop();
    }

    /// Heartbeats between s1 and s2 every 20 ms, as the cluster task sends them.
    fn heartbeat_pump(pair: &Pair) -> tokio::task::JoinHandle<()> {
        let (s1, s2) = (pair.s1.clone(), pair.s2.clone());
        tokio::spawn(async move {
            for seq in 1.. {
                for (mesh, from, to) in [(&s1, "s1", "s2"), (&s2, "s2", "s1")] {
                    let heartbeat = Heartbeat {
                        from: from.to_owned(),
                        term: 0,
                        leader: None,
                        seq,
                        sent_at_ms: mesh.clock_ms(),
                    };
                    mesh.send_heartbeat(to, &heartbeat);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }

    /// A connection to s1 with s2's key and a good `Hello`, installed by s1
    /// as the replacement of its link to s2; its answer is never read.
    async fn replaced_by_intruder(pair: &mut Pair) -> (quinn::Endpoint, quinn::Connection) {
        let (endpoint, connection) = intruder(pair).await;
        let mut stream = connection.open_uni().await.unwrap();
        stream.write_all(&s2_hello(u64::MAX)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match pair.events.recv().await {
                    Some(MeshEvent::LinkReplaced(peer)) if peer == "s2" => return,
                    Some(MeshEvent::LinkDown(peer)) => panic!("s1 lost its link to {peer}"),
                    Some(_) => {}
                    None => panic!("s1's events ended"),
                }
            }
        })
        .await
        .expect("s1 installs the new connection within 20 s");
        // Kept open: the stream is finished when dropped, not reset.
        std::mem::forget(stream);
        (endpoint, connection)
    }
}
