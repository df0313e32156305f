//! The thin task that owns a server's pure cluster state machines (the
//! [`FailureDetector`], the Fast Bully [`Election`] and the [`Registry`] of
//! names), feeds them mesh events, timers, local requests and the clock, and
//! carries out what they ask for: messages, timers, heartbeats, replies to the
//! chat layer, evictions, log events, and the snapshots that `/status` and
//! the chat layer read.
//!
//! [`ClusterDirectory`] is the chat layer's view of it: claims and moves go to
//! the task as requests; the room list and room locations are read from a
//! snapshot the task refreshes after every change.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;
use tracing::{debug, info, warn};

use crate::ServerId;
use crate::chat::{BoxFuture, ChatServer, Directory, RemoteRoom};
use crate::config::{ClusterConfig, MAIN_HALL_PREFIX, Quorum};
use crate::detector::{DetectorConfig, FailureDetector, Transition};
use crate::election::{Action, Election, ElectionTimings, Input};
use crate::logging::LogBudget;
use crate::mesh::wire::{self, Heartbeat, PeerMessage};
use crate::mesh::{Mesh, MeshEvent};
use crate::registry::{
    self, Arrival, LocalRequest, MoveProof, Name, Refusal, Registry, RegistryConfig, RoomChanges,
};

/// One member as `/status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MemberStatus {
    /// Server id.
    pub id: ServerId,
    /// Whether this server believes it alive (itself: always).
    pub alive: bool,
    /// Milliseconds since its last heartbeat arrived (`null` if never, 0 for itself).
    pub last_heartbeat_ms: Option<u64>,
}

/// This server's view of the cluster, refreshed every heartbeat interval.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ClusterView {
    /// Term of the current leader (0 before any election).
    pub term: u64,
    /// The leader this server follows, if any.
    pub leader: Option<ServerId>,
    /// Fast Bully phase, for debugging.
    pub phase: String,
    /// Every configured server, in config order.
    pub members: Vec<MemberStatus>,
    /// Elections this server started.
    pub elections_started: u64,
    /// Times this server's leader changed.
    pub leader_changes: u64,
    /// Peer up/down transitions seen.
    pub peer_state_changes: u64,
    /// Identities in this server's replica of the registry (the whole cluster).
    pub identities: usize,
    /// Rooms in the replica, main halls excluded.
    pub rooms: usize,
}

/// Shared, cheaply readable cluster view.
pub type SharedView = Arc<Mutex<ClusterView>>;

/// A request from the chat layer to the registry, with where to answer.
type Request = (LocalRequest, Option<oneshot::Sender<Result<(), Refusal>>>);

/// What the chat layer reads without asking the task: every room of a live
/// server and where it is, kept up to date room by room.
#[derive(Default)]
struct Names {
    /// Main halls of live servers in config order, with their servers.
    halls: Vec<(String, ServerId)>,
    /// Every other room, sorted by id (the `list` order), and its server.
    rooms: BTreeMap<String, ServerId>,
}

impl Names {
    fn list(&self) -> Vec<String> {
        let halls = self.halls.iter().map(|(hall, _)| hall);
        halls.chain(self.rooms.keys()).cloned().collect()
    }

    fn server(&self, room: &str) -> Option<&ServerId> {
        self.rooms.get(room).or_else(|| {
            let (_, server) = self.halls.iter().find(|(hall, _)| hall == room)?;
            Some(server)
        })
    }
}

/// The cluster-wide namespace as the chat layer uses it ([`Directory`]).
pub struct ClusterDirectory {
    me: ServerId,
    /// Unbounded so that a release is never lost (releases are bounded by the
    /// names this server holds); claims are bounded by `claim_slots`.
    requests: mpsc::UnboundedSender<Request>,
    /// One per claim not yet answered.
    claim_slots: ClaimSlots,
    names: Arc<Mutex<Names>>,
    /// Client host, client port and web port of every server, for `route`.
    clients: HashMap<ServerId, (String, u16, Option<u16>)>,
    /// One turn per identity with `movejoin`s being decided: the registry
    /// refuses a second arrival of an identity while one is in flight, so
    /// an impostor's `movejoin` must not overlap the real client's. Later
    /// arrivals wait their turn (the lock is fair); an entry lives while
    /// somebody holds or waits for its turn.
    arrivals: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// A place in the queue of `movejoin`s for one identity; leaving it (done
/// or cancelled) forgets the identity once nobody else waits.
struct ArrivalTurn {
    arrivals: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    identity: String,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for ArrivalTurn {
    fn drop(&mut self) {
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        // Held by the map and by this turn only: nobody else waits. (Turns
        // are cloned from the map under this same lock.)
        if Arc::strong_count(&self.gate) == 2 {
            arrivals.remove(&self.identity);
        }
    }
}

impl ClusterDirectory {
    fn ask(
        &self,
        request: LocalRequest,
        client_gone: CancellationToken,
    ) -> BoxFuture<Result<(), String>> {
        let requests = self.requests.clone();
        let claim_slots = self.claim_slots.clone();
        Box::pin(async move { ask_via(&requests, &claim_slots, request, &client_gone).await })
    }

    /// Sends a request that needs no turn (it only frees names); the
    /// future resolves when the registry answers it.
    fn tell(&self, request: LocalRequest) -> BoxFuture<()> {
        let (tx, rx) = oneshot::channel();
        // Fails only once the cluster task is gone (the server is stopping);
        // the answer then never comes, and the wait ends at once.
        let _ = self.requests.send((request, Some(tx)));
        Box::pin(async move {
            let _ = rx.await;
        })
    }

    fn names(&self) -> std::sync::MutexGuard<'_, Names> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Claims, moves and arrivals in flight from one server's sessions at once:
/// a quarter of what its registry takes ([`registry::MAX_PENDING`]), the rest
/// being for the releases of clients that leave meanwhile.
pub const CLAIM_SLOTS: usize = registry::MAX_PENDING / 4;

/// The turns of a server's sessions to ask the cluster for something. A
/// session whose server has [`CLAIM_SLOTS`] requests in flight waits its
/// turn (first come, first served), for at most the claim timeout: under a
/// flood of claims a client's `newidentity` is answered late, but answered,
/// where a refusal would read as "taken" (the protocol has no other no).
/// Waiting sessions are bounded by the client connections.
#[derive(Clone)]
struct ClaimSlots {
    slots: Arc<Semaphore>,
    wait: std::time::Duration,
}

impl ClaimSlots {
    fn new(slots: usize, wait: std::time::Duration) -> ClaimSlots {
        ClaimSlots {
            slots: Arc::new(Semaphore::new(slots)),
            wait,
        }
    }

    /// A turn, or `None` once the wait is over.
    async fn take(&self) -> Option<OwnedSemaphorePermit> {
        let turn = self.slots.clone().acquire_owned();
        tokio::time::timeout(self.wait, turn).await.ok()?.ok()
    }
}

/// Sends a request to the cluster task, once it is this session's turn, and
/// waits for its answer; a session whose client is gone before its turn
/// gives the turn up (once asked, the answer is waited for: a grant is
/// then given back by the session like any other).
async fn ask_via(
    requests: &mpsc::UnboundedSender<Request>,
    claim_slots: &ClaimSlots,
    request: LocalRequest,
    client_gone: &CancellationToken,
) -> Result<(), String> {
    let turn = tokio::select! {
        biased;
        () = client_gone.cancelled() => {
            return Err("the client hung up before its turn to ask the leader".to_owned());
        }
        turn = claim_slots.take() => turn,
    };
    let Some(_slot) = turn else {
        return Err("this server is too busy to ask the leader; try again".to_owned());
    };
    // The slot is held until the answer comes.
    let (tx, rx) = oneshot::channel();
    if requests.send((request, Some(tx))).is_err() {
        return Err("this server is shutting down".to_owned());
    }
    match rx.await {
        Ok(result) => result.map_err(|refusal| refusal.to_string()),
        Err(_) => Err("this server is shutting down".to_owned()),
    }
}

impl Directory for ClusterDirectory {
    fn claim_identity(
        &self,
        identity: &str,
        client_gone: CancellationToken,
    ) -> BoxFuture<Result<(), String>> {
        let claim = LocalRequest::Claim(Name::Identity(identity.to_owned()));
        self.ask(claim, client_gone)
    }

    fn release_identity(&self, identity: &str, owned_room: Option<&str>) -> BoxFuture<()> {
        let room = owned_room.map(|room| Name::Room {
            room: room.to_owned(),
            owner: String::new(),
        });
        let identity = Name::Identity(identity.to_owned());
        self.tell(LocalRequest::Release(
            room.into_iter().chain([identity]).collect(),
        ))
    }

    fn claim_room(
        &self,
        room: &str,
        owner: &str,
        client_gone: CancellationToken,
    ) -> BoxFuture<Result<(), String>> {
        let claim = LocalRequest::Claim(Name::Room {
            room: room.to_owned(),
            owner: owner.to_owned(),
        });
        self.ask(claim, client_gone)
    }

    fn release_room(&self, room: &str) -> BoxFuture<()> {
        self.tell(LocalRequest::Release(vec![Name::Room {
            room: room.to_owned(),
            owner: String::new(),
        }]))
    }

    fn rooms(&self) -> Vec<String> {
        self.names().list()
    }

    fn remote_room(&self, room: &str) -> Option<RemoteRoom> {
        let server = self.names().server(room)?.clone();
        if server == self.me {
            return None;
        }
        let (host, port, web_port) = self.clients.get(&server)?.clone();
        Some(RemoteRoom {
            server,
            host,
            port,
            web_port,
        })
    }

    fn start_move(
        &self,
        identity: &str,
        to: &RemoteRoom,
        token: &str,
        client_ip: IpAddr,
        client_gone: CancellationToken,
    ) -> BoxFuture<Result<(), String>> {
        let start = LocalRequest::StartMove {
            identity: identity.to_owned(),
            to: to.server.clone(),
            proof: MoveProof {
                token: token.to_owned(),
                ip: client_ip,
            },
        };
        self.ask(start, client_gone)
    }

    fn give_up_move(&self, identity: &str, token: &str, client_ip: IpAddr) -> BoxFuture<()> {
        self.tell(LocalRequest::GiveUpMove {
            identity: identity.to_owned(),
            proof: MoveProof {
                token: token.to_owned(),
                ip: client_ip,
            },
        })
    }

    fn accept_move(
        &self,
        identity: &str,
        token: Option<&str>,
        ip: IpAddr,
        client_gone: CancellationToken,
    ) -> BoxFuture<Result<(), String>> {
        let request = LocalRequest::AcceptMove {
            identity: identity.to_owned(),
            arrival: Arrival {
                token: token.map(str::to_owned),
                ip,
            },
        };
        let turn = {
            let mut arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
            ArrivalTurn {
                arrivals: self.arrivals.clone(),
                identity: identity.to_owned(),
                gate: arrivals.entry(identity.to_owned()).or_default().clone(),
            }
        };
        let requests = self.requests.clone();
        let claim_slots = self.claim_slots.clone();
        Box::pin(async move {
            let _mine = tokio::select! {
                biased;
                () = client_gone.cancelled() => return Err("the client hung up".to_owned()),
                mine = turn.gate.lock() => mine,
            };
            ask_via(&requests, &claim_slots, request, &client_gone).await
        })
    }
}

/// The registry side of a node before its task runs: the directory for the
/// chat server, and what the task needs to serve it.
pub struct Namespace {
    requests: mpsc::UnboundedReceiver<Request>,
    names: Arc<Mutex<Names>>,
    /// Set once the chat server exists (it needs the directory first).
    chat: Arc<OnceLock<Weak<ChatServer>>>,
}

impl Namespace {
    /// The directory for server `me` of `config`, and its task-side half.
    pub fn new(config: &ClusterConfig, me: &str) -> (Arc<ClusterDirectory>, Namespace) {
        let (tx, rx) = mpsc::unbounded_channel();
        let names = Arc::new(Mutex::new(Names::default()));
        let clients = config
            .servers
            .iter()
            .map(|s| (s.id.clone(), (s.host.clone(), s.client_port, s.web_port)))
            .collect();
        let directory = Arc::new(ClusterDirectory {
            me: me.to_owned(),
            requests: tx,
            claim_slots: ClaimSlots::new(CLAIM_SLOTS, config.limits.claim_timeout),
            names: names.clone(),
            clients,
            arrivals: Arc::default(),
        });
        let namespace = Namespace {
            requests: rx,
            names,
            chat: Arc::new(OnceLock::new()),
        };
        (directory, namespace)
    }

    /// Connects the chat server that evictions go to.
    pub fn set_chat(&self, chat: &Arc<ChatServer>) {
        let _ = self.chat.set(Arc::downgrade(chat));
    }
}

/// Runs until `shutdown`. `events` comes from the [`Mesh`].
pub async fn run(
    config: ClusterConfig,
    me: ServerId,
    mesh: Mesh,
    mut events: mpsc::Receiver<MeshEvent>,
    namespace: Namespace,
    view: SharedView,
    shutdown: CancellationToken,
) {
    let Namespace {
        requests: mut local_requests,
        names,
        chat,
    } = namespace;
    let timing = &config.timing;
    let members = config.ids();
    let peers: Vec<ServerId> = members.iter().filter(|m| **m != me).cloned().collect();
    let start = Instant::now();
    let mut detector = FailureDetector::new(
        me.clone(),
        peers.clone(),
        DetectorConfig {
            heartbeat_interval: timing.heartbeat_interval,
            failure_timeout: timing.failure_timeout,
        },
        start.into_std(),
    );
    let mut election = Election::new(
        me.clone(),
        members.clone(),
        ElectionTimings {
            t1: timing.election_t1,
            t2: timing.election_t2,
            t3: timing.election_t3,
            t4: timing.election_t4,
        },
    );
    let incarnation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let registry = Registry::new(
        me.clone(),
        members.clone(),
        RegistryConfig {
            require_majority: config.quorum == Quorum::Majority,
            claim_timeout: config.limits.claim_timeout,
            move_timeout: config.limits.move_timeout,
            ..RegistryConfig::default()
        },
        incarnation,
    );
    let mut driver = Driver {
        me,
        mesh,
        timers: DelayQueue::new(),
        registry,
        registry_timers: DelayQueue::new(),
        replies: HashMap::new(),
        next_token: 0,
        names,
        chat,
        heartbeat_seq: 0,
        batch: None,
        refusals_log: LogBudget::new(crate::chat::REFUSALS_LOGGED_PER_SECOND),
    };
    driver.rebuild_names();
    let mut ticker = tokio::time::interval(timing.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Boot: give the links a moment to come up so that IAmUp reaches the live
    // peers; start as soon as every peer is linked.
    let boot_deadline = start + timing.failure_timeout;
    let mut started = false;
    let mut minority = Minority::default();

    loop {
        if !started
            && (Instant::now() >= boot_deadline || driver.mesh.linked_peers().len() == peers.len())
        {
            started = true;
            info!(
                linked = driver.mesh.linked_peers().len(),
                "election starting: sending IAmUp"
            );
            let actions = election.handle(Instant::now().into_std(), Input::Start);
            driver.apply(actions);
        }
        let now = Instant::now().into_std();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {
                driver.send_heartbeats(&peers, election.term(), election.leader().cloned());
                let now = Instant::now().into_std();
                for transition in detector.tick(now) {
                    driver.transition(&mut election, transition);
                }
                if config.quorum == Quorum::Majority {
                    let alive = detector.alive_peers();
                    for peer in minority.tick(now, &driver.me, &alive, &members, timing.heartbeat_interval) {
                        driver.mesh.drop_silent_link(&peer, timing.failure_timeout);
                    }
                }
                refresh(&view, &detector, &election, &driver.registry, &members, &driver.me);
            }
            Some(expired) = futures_util::StreamExt::next(&mut driver.timers), if !driver.timers.is_empty() => {
                let actions = election.handle(now, Input::Timer(expired.into_inner()));
                driver.apply(actions);
            }
            Some(expired) = futures_util::StreamExt::next(&mut driver.registry_timers), if !driver.registry_timers.is_empty() => {
                driver.registry(registry::Input::Timer(expired.into_inner()));
            }
            // Names wait until this server knows who is alive (every peer
            // heard, or the boot deadline passed): a claim made in the first
            // milliseconds must not be refused for "no majority".
            Some(first) = local_requests.recv(), if started && (Instant::now() >= boot_deadline || detector.alive_peers().len() == peers.len()) => {
                // Requests queued meanwhile go in the same batch: a leader
                // announces what it decided on them at once, a follower
                // forwards them to the leader in one write.
                driver.begin_batch();
                driver.local(first);
                for _ in 0..LOCAL_REQUESTS_AT_ONCE {
                    match local_requests.try_recv() {
                        Ok(next) => driver.local(next),
                        Err(_) => break,
                    }
                }
                driver.flush();
            }
            event = events.recv() => {
                let Some(event) = event else { break };
                // Whatever else the mesh has delivered meanwhile is handled
                // in the same go, and the registry's messages are sent once
                // it is all handled: a follower given several announcements
                // acknowledges only the last (see `Driver::flush`).
                driver.begin_batch();
                on_mesh_event(&mut driver, &mut election, &mut detector, event);
                for _ in 0..MESH_EVENTS_AT_ONCE {
                    match events.try_recv() {
                        Ok(event) => on_mesh_event(&mut driver, &mut election, &mut detector, event),
                        Err(_) => break,
                    }
                }
                driver.flush();
            }
        }
    }
}

/// While this server hears fewer than a majority (itself included), it
/// closes every link to a peer it does not hear that carried nothing for the
/// failure timeout ([`Mesh::drop_silent_link`]).
///
/// A server that hears nobody but is heard by all (every datagram to it
/// dropped) would otherwise stay alive in every peer's eyes until QUIC's idle
/// timeout closed its links: as the leader it refuses every claim ("no
/// majority") and, heard, it keeps the others from electing anyone, so no
/// server grants anything for seconds. Closed links make it down for its
/// peers at once (the close frames go the way that still works), and while
/// it stays deaf no new link can come up. With a majority this does nothing:
/// a server that does not hear one peer keeps its link open (a replacement is
/// dialed meanwhile), and the peer keeps following it.
#[derive(Default)]
struct Minority {
    /// Since when this server has heard fewer than a majority (`None` while
    /// it hears one).
    since: Option<std::time::Instant>,
}

impl Minority {
    /// Called on every heartbeat tick with the peers the detector hears:
    /// the peers whose silent links to close now. None while this server
    /// hears a majority, nor on the first tick of a minority: after this
    /// server's own thread stalled (a pause, a long snapshot), that tick finds
    /// every peer silent, and the heartbeats queued meanwhile are read before
    /// the next one.
    fn tick(
        &mut self,
        now: std::time::Instant,
        me: &str,
        alive: &[ServerId],
        members: &[ServerId],
        heartbeat_interval: std::time::Duration,
    ) -> Vec<ServerId> {
        if alive.len() + 1 > members.len() / 2 {
            self.since = None;
            return Vec::new();
        }
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) < heartbeat_interval / 2 {
            return Vec::new();
        }
        members
            .iter()
            .filter(|peer| *peer != me && !alive.contains(peer))
            .cloned()
            .collect()
    }
}

/// Most mesh events handled in one go after the first (see the `events`
/// arm in [`run`]): a bound, so that timers and local requests are not kept
/// waiting behind a flood.
const MESH_EVENTS_AT_ONCE: usize = 256;

/// Most local requests handled in one go after the first (as
/// [`MESH_EVENTS_AT_ONCE`]).
const LOCAL_REQUESTS_AT_ONCE: usize = 256;

/// Feeds one mesh event to the detector, the election and the registry.
fn on_mesh_event(
    driver: &mut Driver,
    election: &mut Election,
    detector: &mut FailureDetector,
    event: MeshEvent,
) {
    let now = Instant::now().into_std();
    match event {
        MeshEvent::Heartbeat(from, heartbeat) => {
            if let Some(transition) = detector.heartbeat(now, &from, heartbeat.seq) {
                driver.transition(election, transition);
            }
            // A peer's view pulls this server along if it missed an
            // announcement (acts at most once per change).
            let input = Input::Heartbeat {
                from,
                term: heartbeat.term,
                leader: heartbeat.leader,
            };
            let actions = election.handle(now, input);
            driver.apply(actions);
        }
        MeshEvent::LinkDown(peer) => {
            // A clean stop is a down at once; after a crash the
            // detector has usually said so already; either way the
            // peer's heartbeat numbering starts over on a new link.
            if let Some(transition) = detector.connection_closed(now, &peer) {
                driver.transition(election, transition);
            }
        }
        MeshEvent::LinkUp(_) => {}
        MeshEvent::LinkReplaced(peer) => {
            // Frames written to the old link may be lost: the
            // registry sends again what the peer has not
            // acknowledged (election messages repair themselves
            // through heartbeats and timers).
            debug!(peer = %peer, "mesh link replaced");
            driver.registry(registry::Input::LinkReset(peer));
        }
        MeshEvent::Message(from, PeerMessage::Election(msg)) => {
            // Any message proves the peer alive, like a heartbeat.
            if let Some(transition) = detector.heard_from(now, &from) {
                driver.transition(election, transition);
            }
            let actions = election.handle(now, Input::Message { from, msg });
            driver.apply(actions);
        }
        MeshEvent::Message(from, PeerMessage::Registry(msg)) => {
            if let Some(transition) = detector.heard_from(now, &from) {
                driver.transition(election, transition);
            }
            driver.registry(registry::Input::Message { from, msg });
        }
        MeshEvent::Message(_, PeerMessage::Hello { .. }) => {}
    }
}

struct Driver {
    me: ServerId,
    mesh: Mesh,
    timers: DelayQueue<crate::election::ElectionTimer>,
    registry: Registry,
    registry_timers: DelayQueue<registry::Timer>,
    /// Where to answer each local request, by token.
    replies: HashMap<u64, oneshot::Sender<Result<(), Refusal>>>,
    next_token: u64,
    names: Arc<Mutex<Names>>,
    chat: Arc<OnceLock<Weak<ChatServer>>>,
    heartbeat_seq: u64,
    /// While some: registry messages wait here, by destination, until
    /// [`Driver::flush`] sends them (several inputs handled in one go).
    batch: Option<Vec<(To, registry::RegistryMessage)>>,
    /// The leader's `claim_denied` lines.
    refusals_log: LogBudget,
}

/// Where a registry message goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum To {
    One(ServerId),
    /// Every peer linked when it is sent (encoded once for all of them).
    Linked,
}

impl Driver {
    fn send_heartbeats(&mut self, peers: &[ServerId], term: u64, leader: Option<ServerId>) {
        // Wall-clock microseconds, kept strictly increasing: a restarted
        // server's sequence stays above what its peers saw before the restart.
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        self.heartbeat_seq = wall.max(self.heartbeat_seq + 1);
        let heartbeat = Heartbeat {
            from: self.me.clone(),
            term,
            leader,
            seq: self.heartbeat_seq,
            sent_at_ms: self.mesh.clock_ms(),
        };
        for peer in peers {
            self.mesh.send_heartbeat(peer, &heartbeat);
        }
    }

    fn transition(&mut self, election: &mut Election, transition: Transition) {
        let now = Instant::now().into_std();
        let (input, registry_input) = match transition {
            Transition::Up { peer } => {
                info!(peer = %peer, "peer_up");
                (Input::PeerUp(peer.clone()), registry::Input::PeerUp(peer))
            }
            Transition::Down { peer, reason } => {
                warn!(peer = %peer, reason = ?reason, "peer_down");
                (
                    Input::PeerDown(peer.clone()),
                    registry::Input::PeerDown(peer),
                )
            }
        };
        self.registry(registry_input);
        let actions = election.handle(now, input);
        self.apply(actions);
    }

    /// A local request: the registry gets it with a token for its reply.
    fn local(&mut self, (request, reply): Request) {
        let token = self.next_token;
        self.next_token += 1;
        if let Some(reply) = reply {
            self.replies.insert(token, reply);
        }
        self.registry(registry::Input::Local { token, request });
    }

    /// Feeds the registry one input and carries out its actions.
    fn registry(&mut self, input: registry::Input) {
        let now = Instant::now().into_std();
        let actions = self.registry.handle(now, input);
        self.carry_out(actions);
    }

    /// Carries out the registry's actions, in order.
    fn carry_out(&mut self, actions: Vec<registry::Action>) {
        for action in actions {
            match action {
                registry::Action::Send { to, msg } => self.send_registry(To::One(to), msg),
                registry::Action::Broadcast { msg } => self.send_registry(To::Linked, msg),
                registry::Action::Reply { token, result } => {
                    if let Some(reply) = self.replies.remove(&token) {
                        let _ = reply.send(result);
                    }
                }
                registry::Action::SetTimer { timer, after } => {
                    self.registry_timers.insert(timer, after);
                }
                registry::Action::EvictLocal { identities, rooms } => {
                    warn!(
                        ?identities,
                        ?rooms,
                        "names_evicted: held elsewhere after a partition healed"
                    );
                    if let Some(chat) = self.chat.get().and_then(Weak::upgrade) {
                        chat.evict(&identities, &rooms);
                    }
                }
                registry::Action::Log(event) => log_registry_event(event, &self.refusals_log),
            }
        }
        // Many inputs change the rooms (a peer down drops its rooms).
        self.refresh_names();
    }

    /// Sends a registry message now, or keeps it for the end of the batch.
    fn send_registry(&mut self, to: To, msg: registry::RegistryMessage) {
        match self.batch.as_mut() {
            Some(batch) => batch.push((to, msg)),
            None => self.send_now(to, msg),
        }
    }

    fn send_now(&self, to: To, msg: registry::RegistryMessage) {
        let frame = wire::encode_frame(&PeerMessage::Registry(msg));
        match to {
            To::One(peer) => {
                self.mesh.send_frame(&peer, frame);
            }
            To::Linked => {
                for peer in self.mesh.linked_peers() {
                    self.mesh.send_frame(&peer, frame.clone());
                }
            }
        }
    }

    /// Starts a batch of inputs (see [`Driver::flush`]).
    fn begin_batch(&mut self) {
        self.batch = Some(Vec::new());
        self.registry.begin_batch();
    }

    /// Ends a batch: the leader's announcement of what it decided in it,
    /// then the registry messages the batch held, in order, except
    /// acknowledgements that a later one to the same leader at the same
    /// term covers. An `Ack` is cumulative (the follower has applied every
    /// announcement up to `seq`) and the leader keeps the highest it heard,
    /// so the last one says all the earlier ones did; registry messages may
    /// arrive in any order anyway (see the registry's module docs).
    fn flush(&mut self) {
        let actions = self.registry.end_batch();
        self.carry_out(actions);
        let Some(batch) = self.batch.take() else {
            return;
        };
        for (to, msg) in coalesce_acks(batch) {
            self.send_now(to, msg);
        }
    }

    /// Brings the chat layer's room list and room locations up to date with
    /// the registry: the rooms it names, or everything when liveness changed.
    fn refresh_names(&mut self) {
        match self.registry.take_room_changes() {
            RoomChanges::Rooms(rooms) if rooms.is_empty() => {}
            RoomChanges::Rooms(rooms) => {
                let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
                for room in rooms {
                    match self.registry.room_server(&room) {
                        Some(server) => names.rooms.insert(room, server),
                        None => names.rooms.remove(&room),
                    };
                }
            }
            RoomChanges::All => self.rebuild_names(),
        }
    }

    /// Rebuilds the chat layer's room list and room locations from scratch.
    fn rebuild_names(&self) {
        let mut names = Names::default();
        for room in self.registry.rooms() {
            let Some(server) = self.registry.room_server(&room) else {
                continue;
            };
            if room.starts_with(MAIN_HALL_PREFIX) {
                names.halls.push((room, server));
            } else {
                names.rooms.insert(room, server);
            }
        }
        *self.names.lock().unwrap_or_else(|e| e.into_inner()) = names;
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send { to, msg } => {
                    if !self.mesh.send(&to, &PeerMessage::Election(msg.clone())) {
                        tracing::debug!(peer = %to, message = msg.name(), "no link; election message dropped");
                    }
                }
                Action::SetTimer { timer, after } => {
                    self.timers.insert(timer, after);
                }
                Action::ElectionStarted { term } => info!(term, "election_started"),
                Action::LeaderElected { leader, term } => {
                    info!(leader = %leader, term, "leader_elected");
                    self.registry(registry::Input::LeaderChanged {
                        leader: Some(leader),
                        term,
                    });
                }
                Action::LeaderLost { leader, term } => {
                    info!(leader = %leader, term, "leader_lost");
                    self.registry(registry::Input::LeaderChanged { leader: None, term });
                }
            }
        }
    }
}

/// `batch` without the acknowledgements that a later one covers: of the
/// `Ack`s to one server at one term, only the highest goes, in the place of
/// the last of them.
fn coalesce_acks(
    batch: Vec<(To, registry::RegistryMessage)>,
) -> Vec<(To, registry::RegistryMessage)> {
    use registry::RegistryMessage::Ack;
    let mut highest: HashMap<(&To, u64), (usize, u64)> = HashMap::new();
    for (i, (to, msg)) in batch.iter().enumerate() {
        if let Ack { term, seq } = msg {
            let entry = highest.entry((to, *term)).or_insert((i, *seq));
            *entry = (i, entry.1.max(*seq));
        }
    }
    let keep: HashMap<usize, u64> = highest.into_values().collect();
    let mut out = Vec::with_capacity(batch.len());
    for (i, (to, msg)) in batch.into_iter().enumerate() {
        match msg {
            Ack { term, .. } => {
                if let Some(&seq) = keep.get(&i) {
                    out.push((to, Ack { term, seq }));
                }
            }
            msg => out.push((to, msg)),
        }
    }
    out
}

fn log_registry_event(event: registry::LogEvent, refusals_log: &LogBudget) {
    use registry::LogEvent;
    match event {
        LogEvent::ClaimGranted { asker, name } => debug!(%asker, %name, "claim_granted"),
        LogEvent::ClaimDenied {
            asker,
            name,
            reason,
        } => match refusals_log.take(std::time::Instant::now()) {
            Some(0) => info!(%asker, %name, %reason, "claim_denied"),
            Some(left_out) => info!(
                %asker,
                %name,
                %reason,
                left_out,
                "claim_denied (and {left_out} more since the last line)"
            ),
            None => {}
        },
        LogEvent::ServerPurged {
            server,
            identities,
            rooms,
        } => warn!(%server, identities, rooms, "server_purged"),
        LogEvent::MoveExpired { identity, from, to } => {
            info!(%identity, %from, %to, "move_expired")
        }
        LogEvent::MoveReverted { identity, from, to } => {
            info!(%identity, %from, %to, "move_reverted")
        }
        LogEvent::Evicted { identities, rooms } => warn!(?identities, ?rooms, "names_evicted"),
    }
}

fn refresh(
    view: &SharedView,
    detector: &FailureDetector,
    election: &Election,
    registry: &Registry,
    members: &[ServerId],
    me: &str,
) {
    let now = Instant::now().into_std();
    let peers = detector.status(now);
    let members = members
        .iter()
        .map(|id| match peers.iter().find(|p| p.id == *id) {
            Some(peer) => MemberStatus {
                id: id.clone(),
                alive: peer.alive,
                last_heartbeat_ms: peer.last_heartbeat_age.map(|age| age.as_millis() as u64),
            },
            None => MemberStatus {
                id: id.clone(),
                alive: id == me,
                last_heartbeat_ms: (id == me).then_some(0),
            },
        })
        .collect();
    let stats = election.stats();
    let counters = detector.counters();
    let mut view = view.lock().unwrap_or_else(|e| e.into_inner());
    *view = ClusterView {
        term: election.term(),
        leader: election.leader().cloned(),
        phase: format!("{:?}", election.phase()),
        members,
        elections_started: stats.elections_started,
        leader_changes: stats.leader_changes,
        peer_state_changes: counters.state_changes,
        identities: registry.counts().identities,
        rooms: registry.counts().rooms,
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use registry::RegistryMessage::{Ack, HoldingsRequest};
    use std::time::Duration;

    fn ids(names: &[&str]) -> Vec<ServerId> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// A flood of claims on one server: beyond its slots, a client's claim
    /// waits its turn and is answered (a refusal reads as "taken"); only a
    /// wait past the claim timeout is refused.
    #[tokio::test(start_paused = true)]
    async fn a_claim_beyond_the_slots_waits_its_turn_then_is_refused_in_time() {
        let slots = ClaimSlots::new(1, Duration::from_secs(2));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let claim = |name: &str| LocalRequest::Claim(registry::Name::Identity(name.into()));
        let first = tokio::spawn({
            let (tx, slots, request) = (tx.clone(), slots.clone(), claim("Adel"));
            async move { ask_via(&tx, &slots, request, &CancellationToken::new()).await }
        });
        let (_, answer) = rx.recv().await.expect("the first is asked");
        let second = tokio::spawn({
            let (tx, slots, request) = (tx.clone(), slots.clone(), claim("Bob"));
            async move { ask_via(&tx, &slots, request, &CancellationToken::new()).await }
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(rx.try_recv().is_err(), "the second waits for a slot");
        answer
            .expect("a reply channel")
            .send(Ok(()))
            .expect("asked");
        assert_eq!(first.await.expect("runs"), Ok(()));
        let (asked, answer) = tokio::time::timeout(Duration::from_secs(1), rx.recv())
            .await
            .expect("the second is asked once the first is answered")
            .expect("open");
        assert_eq!(asked, claim("Bob"));
        // Its slot is held until its answer: a third waits out its time.
        let third = tokio::spawn({
            let (tx, slots, request) = (tx.clone(), slots.clone(), claim("Cara"));
            async move { ask_via(&tx, &slots, request, &CancellationToken::new()).await }
        });
        let began = tokio::time::Instant::now();
        let refused = third.await.expect("runs").expect_err("no slot in 2 s");
        assert!(refused.contains("too busy"), "{refused}");
        assert_eq!(began.elapsed(), Duration::from_secs(2));
        answer
            .expect("a reply channel")
            .send(Ok(()))
            .expect("asked");
        assert_eq!(second.await.expect("runs"), Ok(()));
        assert!(rx.try_recv().is_err(), "the third was never asked");
    }

    /// A claim waiting for its turn whose client hangs up gives the turn up
    /// at once and is never asked; the claims behind it move up. One whose
    /// client is gone already is not asked even with a turn free.
    #[tokio::test(start_paused = true)]
    async fn a_claim_waiting_for_its_turn_is_never_asked_once_its_client_is_gone() {
        let slots = ClaimSlots::new(1, Duration::from_secs(2));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let claim = |name: &str| LocalRequest::Claim(registry::Name::Identity(name.into()));
        let ask = |name: &str, gone: &CancellationToken| {
            let (tx, slots, request, gone) = (tx.clone(), slots.clone(), claim(name), gone.clone());
            tokio::spawn(async move { ask_via(&tx, &slots, request, &gone).await })
        };
        let _first = ask("Adel", &CancellationToken::new());
        let (_, answer) = rx.recv().await.expect("the first is asked");
        let gone = CancellationToken::new();
        let second = ask("Bob", &gone);
        let third = ask("Cara", &CancellationToken::new());
        tokio::time::sleep(Duration::from_millis(100)).await;
        gone.cancel();
        let began = tokio::time::Instant::now();
        let refused = second.await.expect("runs").expect_err("given up");
        assert!(refused.contains("hung up"), "{refused}");
        assert_eq!(began.elapsed(), Duration::ZERO, "at once");
        answer
            .expect("a reply channel")
            .send(Ok(()))
            .expect("asked");
        let (asked, answer) = rx.recv().await.expect("the next turn is asked");
        assert_eq!(asked, claim("Cara"), "Bob was never asked");
        answer
            .expect("a reply channel")
            .send(Ok(()))
            .expect("asked");
        assert_eq!(third.await.expect("runs"), Ok(()));
        // Gone before it asks (a request sent and reset at once): not asked,
        // though a turn is free.
        let gone = CancellationToken::new();
        gone.cancel();
        let refused = ask("Dana", &gone).await.expect("runs");
        assert!(refused.is_err(), "{refused:?}");
        assert!(rx.try_recv().is_err(), "Dana was never asked");
    }

    /// An arrival waiting for the earlier arrival of its identity to be
    /// answered gives its turn up at once when its client hangs up, and is
    /// never asked; the next arrival of that identity is asked instead.
    #[tokio::test(start_paused = true)]
    async fn an_arrival_waiting_for_its_turn_is_never_asked_once_its_client_is_gone() {
        let config =
            ClusterConfig::parse("s1 127.0.0.1 4444 5555\ns2 127.0.0.1 4445 5556\n", "t").unwrap();
        let (directory, mut namespace) = Namespace::new(&config, "s1");
        let ip = IpAddr::from([127, 0, 0, 1]);
        let arrive = |token: &'static str, gone: &CancellationToken| {
            let (directory, gone) = (directory.clone(), gone.clone());
            tokio::spawn(async move { directory.accept_move("Adel", Some(token), ip, gone).await })
        };
        let asked_token = |request: &LocalRequest| match request {
            LocalRequest::AcceptMove { arrival, .. } => arrival.token.clone(),
            other => panic!("an arrival, not {other:?}"),
        };
        let first = arrive("first", &CancellationToken::new());
        let (asked, answer) = namespace.requests.recv().await.expect("the first is asked");
        assert_eq!(asked_token(&asked).as_deref(), Some("first"));
        let gone = CancellationToken::new();
        let second = arrive("second", &gone);
        let third = arrive("third", &CancellationToken::new());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            namespace.requests.try_recv().is_err(),
            "one arrival at a time"
        );
        gone.cancel();
        let began = tokio::time::Instant::now();
        let second = tokio::time::timeout(Duration::from_secs(1), second)
            .await
            .expect("given up without waiting for the first to be answered");
        assert_eq!(
            second.expect("runs"),
            Err("the client hung up".to_owned()),
            "given up"
        );
        assert_eq!(began.elapsed(), Duration::ZERO, "at once");
        answer
            .expect("a reply channel")
            .send(Err(Refusal::Taken))
            .expect("asked");
        assert_eq!(first.await.expect("runs"), Err(Refusal::Taken.to_string()));
        let (asked, answer) = namespace.requests.recv().await.expect("the next is asked");
        assert_eq!(
            asked_token(&asked).as_deref(),
            Some("third"),
            "the second was never asked"
        );
        answer
            .expect("a reply channel")
            .send(Ok(()))
            .expect("asked");
        assert_eq!(third.await.expect("runs"), Ok(()));
    }

    #[test]
    fn a_server_in_a_minority_silences_the_peers_it_does_not_hear_from_its_second_tick() {
        let members = ids(&["s1", "s2", "s3", "s4", "s5"]);
        let beat = Duration::from_millis(20);
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut minority = Minority::default();
        // Hearing nobody: nothing on the first tick (the server's own thread
        // may have stalled), every other server on the next.
        assert!(minority.tick(at(0), "s5", &[], &members, beat).is_empty());
        assert_eq!(
            minority.tick(at(20), "s5", &[], &members, beat),
            ids(&["s1", "s2", "s3", "s4"])
        );
        // Two of five (itself and s1) is a minority: the others, not s1.
        assert_eq!(
            minority.tick(at(40), "s5", &ids(&["s1"]), &members, beat),
            ids(&["s2", "s3", "s4"])
        );
        // Three of five is a majority: nothing, and the wait starts over.
        assert!(
            minority
                .tick(at(60), "s5", &ids(&["s1", "s2"]), &members, beat)
                .is_empty()
        );
        assert!(minority.tick(at(80), "s5", &[], &members, beat).is_empty());
        assert_eq!(minority.tick(at(100), "s5", &[], &members, beat).len(), 4);
    }

    #[test]
    fn a_majority_is_more_than_half_of_the_members_counting_the_server_itself() {
        let beat = Duration::from_millis(20);
        let t0 = std::time::Instant::now();
        let later = t0 + beat;
        let silenced = |members: &[&str], alive: &[&str]| {
            let mut minority = Minority::default();
            let members = ids(members);
            minority.tick(t0, "s1", &ids(alive), &members, beat);
            minority.tick(later, "s1", &ids(alive), &members, beat)
        };
        assert!(silenced(&["s1", "s2"], &["s2"]).is_empty());
        assert_eq!(silenced(&["s1", "s2"], &[]), ids(&["s2"]));
        assert!(silenced(&["s1", "s2", "s3"], &["s3"]).is_empty());
        assert_eq!(
            silenced(&["s1", "s2", "s3", "s4"], &["s2"]),
            ids(&["s3", "s4"])
        );
        assert!(silenced(&["s1", "s2", "s3", "s4"], &["s2", "s4"]).is_empty());
    }

    #[test]
    fn only_the_highest_ack_per_leader_and_term_goes_in_place_of_the_last() {
        let batch = vec![
            (To::One("s3".to_owned()), Ack { term: 2, seq: 5 }),
            (To::One("s3".to_owned()), HoldingsRequest { term: 2 }),
            (To::One("s3".to_owned()), Ack { term: 2, seq: 7 }),
            (To::One("s2".to_owned()), Ack { term: 2, seq: 1 }),
            (To::One("s3".to_owned()), Ack { term: 3, seq: 1 }),
            // Lower than one before it (a resent announcement's answer):
            // the highest still goes.
            (To::One("s3".to_owned()), Ack { term: 2, seq: 6 }),
        ];
        let sent: Vec<(To, String)> = coalesce_acks(batch)
            .into_iter()
            .map(|(to, msg)| (to, format!("{msg:?}")))
            .collect();
        let expect =
            |to: &str, msg: registry::RegistryMessage| (To::One(to.to_owned()), format!("{msg:?}"));
        assert_eq!(
            sent,
            vec![
                expect("s3", HoldingsRequest { term: 2 }),
                expect("s2", Ack { term: 2, seq: 1 }),
                expect("s3", Ack { term: 3, seq: 1 }),
                expect("s3", Ack { term: 2, seq: 7 }),
            ]
        );
    }
}
