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
//! the link (it restarted, or timed the old one out).
//!
//! The mesh only moves bytes: what heartbeats and messages mean is decided by
//! the cluster task that receives [`MeshEvent`]s.

pub mod wire;

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
use tracing::{Instrument, debug, info, info_span, warn};

use crate::ServerId;
use crate::config::ClusterConfig;
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
}

/// Handle to a server's mesh endpoint. Cheap to clone.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

struct Inner {
    me: ServerId,
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
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

struct Link {
    connection: quinn::Connection,
    outbox: mpsc::Sender<Bytes>,
    dialed_by_me: bool,
    generation: u64,
    since: Instant,
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
        let server_config = mesh_server_config(identity)?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let inner = Arc::new(Inner {
            me: me.to_owned(),
            rank: config
                .servers
                .iter()
                .enumerate()
                .map(|(i, s)| (s.id.clone(), i))
                .collect(),
            addrs,
            endpoint,
            client_config: mesh_client_config(identity)?,
            links: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
            events,
            counters: MeshCounters::default(),
            started: Instant::now(),
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
    /// [`PENDING_MAX_AGE`]) for one; false if it had to be dropped.
    pub fn send(&self, to: &str, message: &PeerMessage) -> bool {
        let frame = wire::encode_frame(message);
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
        match link.outbox.try_send(frame) {
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

    /// Sends a heartbeat datagram to `to` if linked.
    pub fn send_heartbeat(&self, to: &str, heartbeat: &Heartbeat) {
        let connection = self.links().get(to).map(|l| l.connection.clone());
        let Some(connection) = connection else { return };
        match connection.send_datagram(wire::encode_heartbeat(heartbeat)) {
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

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<ServerId, Link>> {
        self.inner.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live_link(&self, peer: &str) -> Option<quinn::Connection> {
        self.links()
            .get(peer)
            .filter(|l| l.connection.close_reason().is_none())
            .map(|l| l.connection.clone())
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
                    match incoming.await {
                        Ok(connection) => mesh.accepted(connection),
                        Err(e) => {
                            mesh.inner.counters.links_refused.fetch_add(1, Ordering::Relaxed);
                            warn!(%remote, error = %e, "mesh connection refused during the handshake (certificate not from the cluster CA?)");
                        }
                    }
                }
                .instrument(info_span!("mesh_accept", %remote)),
            );
        }
    }

    /// Identifies an incoming connection by its certificate, then installs it.
    fn accepted(&self, connection: quinn::Connection) {
        match self.identify(&connection) {
            Ok(peer) => self.install(peer, connection, false),
            Err(why) => {
                self.inner
                    .counters
                    .links_refused
                    .fetch_add(1, Ordering::Relaxed);
                warn!(remote = %connection.remote_address(), reason = %why, "mesh link refused");
                connection.close(close_code::UNKNOWN_PEER.into(), b"unknown peer");
            }
        }
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
        let mut backoff = Duration::from_millis(50);
        let mut fresh = true;
        loop {
            if let Some(connection) = self.live_link(&peer) {
                tokio::select! {
                    _ = self.inner.shutdown.cancelled() => return,
                    _ = connection.closed() => {}
                }
                backoff = Duration::from_millis(50);
                fresh = true;
                continue;
            }
            if me_higher && fresh {
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
                result = tokio::time::timeout(Duration::from_secs(2), dial) => result,
            };
            match result {
                Ok(Ok(connection)) => {
                    self.install(peer.clone(), connection, true);
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
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Makes `connection` the link to `peer`, or refuses it as a duplicate.
    fn install(&self, peer: ServerId, connection: quinn::Connection, dialed_by_me: bool) {
        let me_lower = self.inner.rank.get(&self.inner.me) < self.inner.rank.get(&peer);
        let dialer_is_lower = |dialed_by_me: bool| dialed_by_me == me_lower;
        let generation = self.inner.next_generation.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let replaced = {
            let mut links = self.links();
            let mut replaced = false;
            if let Some(existing) = links.get(&peer)
                && existing.connection.close_reason().is_none()
            {
                let simultaneous = existing.since.elapsed() < SIMULTANEOUS_DIAL;
                if simultaneous
                    && dialer_is_lower(existing.dialed_by_me)
                    && !dialer_is_lower(dialed_by_me)
                {
                    debug!(peer = %peer, "duplicate mesh connection closed (tie-break)");
                    connection.close(close_code::DUPLICATE.into(), b"duplicate");
                    return;
                }
                existing
                    .connection
                    .close(close_code::DUPLICATE.into(), b"replaced");
                replaced = true;
            }
            // Frames that waited for a link go first, in order.
            if let Some(queue) = self.pending().remove(&peer) {
                let now = Instant::now();
                for (_, frame) in queue
                    .into_iter()
                    .filter(|(at, _)| now - *at <= PENDING_MAX_AGE)
                {
                    let _ = tx.try_send(frame);
                }
            }
            links.insert(
                peer.clone(),
                Link {
                    connection: connection.clone(),
                    outbox: tx,
                    dialed_by_me,
                    generation,
                    since: Instant::now(),
                },
            );
            replaced
        };
        info!(peer = %peer, remote = %connection.remote_address(), dialed_by_me, replaced, "mesh link up");
        let span = info_span!("peer", peer = %peer);
        self.inner.tasks.spawn(
            self.clone()
                .write_link(peer.clone(), connection.clone(), rx)
                .instrument(span.clone()),
        );
        self.inner.tasks.spawn(
            self.clone()
                .read_link(peer.clone(), connection, generation)
                .instrument(span),
        );
        let _ = self.inner.events.try_send(MeshEvent::LinkUp(peer));
    }

    async fn write_link(
        self,
        peer: ServerId,
        connection: quinn::Connection,
        mut rx: mpsc::Receiver<Bytes>,
    ) {
        let result = async {
            let mut stream = connection.open_uni().await?;
            let hello = PeerMessage::Hello {
                version: WIRE_VERSION,
                id: self.inner.me.clone(),
            };
            stream.write_all(&wire::encode_frame(&hello)).await?;
            let mut batch = Vec::new();
            loop {
                // Ends with the connection: waiting on the queue alone would keep
                // this task (and the mesh it holds) alive after the link is gone.
                let frame = tokio::select! {
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

    async fn read_link(self, peer: ServerId, connection: quinn::Connection, generation: u64) {
        let reason = loop {
            tokio::select! {
                reason = connection.closed() => break reason,
                stream = connection.accept_uni() => match stream {
                    Ok(stream) => {
                        let mesh = self.clone();
                        let peer = peer.clone();
                        let connection = connection.clone();
                        self.inner.tasks.spawn(async move {
                            if let Err(why) = mesh.read_frames(&peer, stream).await {
                                warn!(peer = %peer, reason = %why, "mesh link closed: bad frames");
                                connection.close(close_code::PROTOCOL.into(), b"protocol error");
                            }
                        }.instrument(tracing::Span::current()));
                    }
                    Err(reason) => break reason,
                },
                datagram = connection.read_datagram() => match datagram {
                    Ok(datagram) => self.heartbeat(&peer, &datagram),
                    Err(reason) => break reason,
                },
            }
        };
        let current = {
            let mut links = self.links();
            let current = links.get(&peer).is_some_and(|l| l.generation == generation);
            if current {
                links.remove(&peer);
            }
            current
        };
        if current {
            info!(peer = %peer, reason = %reason, "mesh link down");
            let _ = self.inner.events.send(MeshEvent::LinkDown(peer)).await;
        }
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

    async fn read_frames(&self, peer: &str, mut stream: quinn::RecvStream) -> Result<(), String> {
        let mut greeted = false;
        loop {
            let mut prefix = [0u8; 4];
            match stream.read_exact(&mut prefix).await {
                Ok(()) => {}
                // The stream or connection ended: not a protocol error.
                Err(_) => return Ok(()),
            }
            let len = wire::frame_len(prefix).map_err(|e| e.to_string())?;
            let mut body = vec![0u8; len];
            if stream.read_exact(&mut body).await.is_err() {
                return Ok(());
            }
            let message = wire::decode_frame(&body).map_err(|e| e.to_string())?;
            match (greeted, message) {
                (false, PeerMessage::Hello { version, id }) => {
                    if version != WIRE_VERSION {
                        return Err(format!(
                            "wire version {version}, this server speaks {WIRE_VERSION}"
                        ));
                    }
                    if id != peer {
                        return Err(format!(
                            "claims to be {id:?} but its certificate says {peer:?}"
                        ));
                    }
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

fn mesh_transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    // Heartbeats flow every few tens of ms, so silence this long means the
    // link is gone; the failure detector decides "down" much sooner.
    transport.max_idle_timeout(Some(
        Duration::from_secs(3)
            .try_into()
            .expect("3 s is a valid idle timeout"),
    ));
    // Keeps a link up even if heartbeats were paused (no cost otherwise).
    transport.keep_alive_interval(Some(Duration::from_millis(500)));
    // A LAN: start loss recovery from a realistic RTT instead of quinn's
    // internet default of 333 ms, so handshakes under loss retry quickly.
    transport.initial_rtt(Duration::from_millis(20));
    // Heartbeats are tiny; 64 KiB holds hundreds if the reader lags, and
    // bounds memory if it lags more (older datagrams are dropped first).
    transport.datagram_receive_buffer_size(Some(64 * 1024));
    transport.datagram_send_buffer_size(64 * 1024);
    // One uni stream per direction; a few spare for a reconnect race.
    transport.max_concurrent_uni_streams(4u8.into());
    transport.max_concurrent_bidi_streams(0u8.into());
    Arc::new(transport)
}

fn roots(identity: &ServerIdentity) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(identity.ca.clone())
        .context("the cluster CA certificate is unusable")?;
    Ok(Arc::new(roots))
}

fn mesh_server_config(identity: &ServerIdentity) -> Result<quinn::ServerConfig> {
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
    config.transport_config(mesh_transport());
    Ok(config)
}

fn mesh_client_config(identity: &ServerIdentity) -> Result<quinn::ClientConfig> {
    let mut crypto = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(identity)?)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .context("server certificate and key do not match")?;
    crypto.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(mesh_transport());
    Ok(config)
}
