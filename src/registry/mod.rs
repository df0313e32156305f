//! The cluster-wide registry of identities and rooms, and the leader's claim
//! serializer, as one pure state machine per server.
//!
//! # Model
//! Every server runs one [`Registry`]. It holds:
//! - its **own holdings**: the identities of its connected clients and the rooms
//!   it hosts. A server is the source of truth for what it owns.
//! - a **replica** of everybody else's holdings, fed by the leader, so `list`,
//!   `joinroom` routing and friends are answered locally.
//! - the **asker** side: the claims, releases and moves it has asked the leader
//!   for and not yet heard back about.
//! - while it leads, the **leader** side: the authoritative registry, the
//!   per-asker answer cache (idempotency) and the sync state of its followers.
//!
//! Main halls are not stored: `MainHall-<id>` exists for every configured
//! server this server sees alive.
//!
//! # Driving it
//! Like `caio/foca` or `quinn-proto`, the registry never reads the clock and
//! never does I/O: the runtime calls [`Registry::handle`] with the current time
//! and one [`Input`] (a peer message, a chat-layer request, a failure-detector
//! transition, an election result or a timer) and applies the returned
//! [`Action`]s in order. Timers are never cancelled: every timer re-checks its
//! deadline when it fires, so a late or stale timer is a harmless no-op.
//!
//! # Flows
//! - **Claim** (`newidentity`, `createroom`): the asker sends
//!   [`RegistryMessage::Request`] with [`Op::Claim`] to the leader. The leader
//!   checks the name against its registry, records it with a fresh [`Stamp`],
//!   answers ([`RegistryMessage::Answer`]) and broadcasts the change
//!   ([`RegistryMessage::Announce`]). Only on the answer does the asker own it.
//!   A claim not answered within [`RegistryConfig::claim_timeout`] is
//!   refused to its client but stays in flight until the leader answers;
//!   a new claim of the same name on that server takes it over (under
//!   heavy loss the answer is usually on its way), and a grant nobody
//!   waits for any more is released.
//! - **Release** (`quit`, disconnect, `deleteroom`): the asker drops the name
//!   from its holdings at once (it is the source of truth) and tells the
//!   leader, retrying until acknowledged. Its client is answered on that
//!   acknowledgement (given after the commit, like a grant), so whoever it
//!   tells may claim the names at once on any server; or at the claim
//!   timeout, or as soon as no leader can be asked. A later claim of the
//!   same name from the same server waits until that release is
//!   acknowledged, so the two can never be reordered. A client that leaves
//!   gives back its identity and the room it owns in one request
//!   ([`Op::Release`] names both, each with the [`Stamp`] of its grant: the
//!   leader frees only those grants).
//! - **Move** (`joinroom` to a room on another server): the origin A asks
//!   [`Op::MoveStart`] and from then on counts the identity as reserved, not
//!   held; the chat layer sends `route` once that is granted. When the client
//!   sends `movejoin` to B, B asks [`Op::MoveDone`], which the leader grants
//!   only if the identity is moving to B (a forged `movejoin` is refused)
//!   and the arrival proves it is the client that started the move: A puts
//!   a [`MoveProof`] (the one-time token it sends in `route`, and the
//!   client's source address at A) in `MoveStart`, the leader keeps it in
//!   the moving [`IdentityEntry`] (so a new leader learns it from reports
//!   and replicas like the move itself), and B's [`Arrival`] must show that
//!   token, or come from that address when it shows none
//!   ([`Arrival::proves`]). A wrong arrival is refused with
//!   [`Refusal::WrongMoveProof`] and changes nothing: the move stays open
//!   for the real client. The identity is re-homed to B with its original
//!   stamp. B's `MoveDone` names that stamp when B's replica shows the move,
//!   and the leader then completes only that move. An arrival B gives up on
//!   stays in flight like a claim until its answer comes; the same client's
//!   `movejoin` again (same token, or no token and the same address) takes
//!   it over. A grant that comes after B told its client no is kept for
//!   that client's `movejoin` until the move timeout (`unclaimed`), then
//!   released by the stamp the answer names (a release of whatever B holds,
//!   reaching a leader late, could free a later grant of the identity to
//!   B); one whose client left is released at once; another arrival of the
//!   identity at B waits for that answer. A move that does not arrive within
//!   [`RegistryConfig::move_timeout`] is released by the **leader**: it is
//!   the one place that sees both the start and the
//!   arrival, so it decides atomically which came first. (An arrival that
//!   reached it in time but waits, queued or asked again, holds the move
//!   open for a claim timeout at a time.) A move the origin
//!   gives up on is cancelled ([`Op::MoveCancel`], naming the move's proof:
//!   a late cancel must not cancel a later move of the identity).
//! - **Commit**: every change is announced with a number
//!   ([`RegistryMessage::Announce`]); each follower applies announcements in
//!   order and acknowledges the last one applied ([`RegistryMessage::Ack`]).
//!   An announcement is committed once a majority of the configured servers
//!   (the leader included) has applied it, and a grant is answered only once
//!   the announcement it was decided at is committed; refusals go at once.
//!   Unacknowledged announcements are sent again on the retry timer and when
//!   a mesh link is replaced ([`Input::LinkReset`]).
//! - **Leader change**: the new leader asks every live server for its
//!   holdings ([`RegistryMessage::HoldingsRequest`] /
//!   [`RegistryMessage::Holdings`]); a report carries the sender's own
//!   holdings and its replica with the [`Position`] it stands at. Once a
//!   majority (itself included) has reported, the leader takes the most
//!   advanced replica among those reports as the base of its registry and
//!   merges every report's own holdings over it. It grants nothing new
//!   before that, nor until each live server answered or
//!   [`RegistryConfig::sync_timeout`] passed; requests that arrive meanwhile
//!   wait in a bounded queue. Followers also send their holdings unasked
//!   when they learn of a new leader. The leader answers every merged report
//!   with a full [`RegistryMessage::Snapshot`] (its own report too, to
//!   itself); after that, numbered announcements keep the replica current,
//!   and a gap in the numbers makes the follower re-sync.
//! - **Server down**: followers tell the leader which servers their
//!   detectors see down ([`RegistryMessage::Liveness`], and in every
//!   report). The leader removes everything a server held and announces
//!   [`Change::PurgeServer`] only when a majority (itself included) sees that
//!   server down and every live follower does too: a server that the leader
//!   cannot hear, or that some live server still hears (a non-transitive
//!   cut), may be serving clients that servers it talks to serve too, and
//!   keeps its names. A follower that was down itself then (cut off on the
//!   freed server's side) may come back still hearing it: its claims and
//!   arrivals are refused ([`Refusal::HearsDownServer`]) until it sees that
//!   server down too or the server's holdings are merged again (a new
//!   leader counts every down server holding nothing in its base as freed);
//!   it asks again until its client's deadline.
//!   Every request carries the asker's view, so the leader judges it by the
//!   view it was sent with.
//! - **Heal / restart**: when a server comes back, the leader merges its
//!   holdings. Two holders of one name are resolved by [`Stamp`]: the later
//!   grant wins (under a majority quorum, the later grant is the one the
//!   majority made while the other holder was cut off), and the loser is told
//!   with [`RegistryMessage::Evict`], which surfaces as [`Action::EvictLocal`].
//!   The loser also evicts itself when an announcement or snapshot shows the
//!   name on another server under a later stamp, so a lost `Evict` is harmless.
//!
//! # Safety argument, in short
//! The rule: **a leader answers a grant only after a majority of the
//! configured servers has acknowledged it at the leader's term, and a server
//! that has reported to a newer leader never acknowledges an older one.**
//! Any two majorities share a server, so two leaders can never both commit,
//! and a new leader, which builds its registry from a majority's reports,
//! always sees what any earlier leader committed. In more detail:
//! - Elections may go wrong (one-way cuts, lost `Coordinator`s, two servers
//!   each believing it leads): nothing here relies on them. Hearing a
//!   majority is not enough either ([`Registry::has_majority`] is only a
//!   quick refusal): under one-way cuts two leaders can each hear one.
//! - A server that reports its holdings to a leader of a newer epoch (term,
//!   then rank, as the election orders leaders) fences itself: it ignores
//!   older leaders from then on, neither applying nor acknowledging their
//!   announcements, so an older leader loses its majority the moment a
//!   newer one has one; the leader merges only reports made at its own term.
//! - A committed announcement was applied by a majority; the new leader's
//!   majority of reports includes one of those servers, whose replica (or a
//!   later one: positions are ordered, and a later leader's state includes
//!   everything its predecessors committed) holds it. So the base holds
//!   every committed grant, including those of servers the new leader cannot
//!   hear, and those names stay taken until a majority, and every live
//!   server, sees their server down.
//! - Request ids are `(incarnation, id)`; the leader caches its answers per
//!   asker, so a retried request gets the same answer (a grant only once
//!   committed). An asker accepts answers only from its current leader and
//!   term; a claim or move that an old leader decided but never answered is
//!   decided afresh, and found already registered to its asker if the old
//!   decision reached the base.
//! - Reports are versioned, and the leader discards a report that is older
//!   than one it merged, than a request it decided, or than a holding it took
//!   from that server (evicted, moved away, expired): a late report can
//!   neither resurrect nor drop a name.
//! - Answers carry the announcement number they were decided at, and an
//!   announcement older than the answer that set an own name never touches
//!   it: the two travel separately and may overtake each other.
//! - An asker whose claim times out tells its client at once but keeps the
//!   request in flight; a grant that arrives with nobody waiting is
//!   released (an arrival's after the move timeout: see above), so it does
//!   not leak, and a new claim of the same name on that server adopts the
//!   request instead of racing with that release.
//!
//! # What the runtime must provide
//! - Registry messages between two live servers are delivered (QUIC streams),
//!   in any order, or lost; lost messages cost liveness, never safety.
//!   Requests, reports and announcements are sent again on the retry timer;
//!   the runtime feeds [`Input::LinkReset`] when a mesh link is replaced so
//!   that this happens at once.
//! - [`Input::LeaderChanged`] never goes back in epoch (Fast Bully ignores
//!   older `Coordinator`s); a late, older one is ignored here too.
//! - Every peer starts down: feed [`Input::PeerUp`] when the detector first
//!   hears it.
//! - The incarnation passed to [`Registry::new`] grows across restarts.
//! - The chat layer sends `route` only after [`LocalRequest::StartMove`] is
//!   granted, keeps the client on a refusal, and disconnects the clients
//!   (deletes the rooms) named by [`Action::EvictLocal`].
//! - The chat layer asks [`LocalRequest::AcceptMove`] for one identity at a
//!   time: a second one while the first is in flight is refused
//!   ([`Refusal::NotMoving`]), so an impostor's `movejoin` in flight would
//!   otherwise turn the real client away.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::ServerId;

/// Most requests (claims, moves, releases) one server keeps in flight; more
/// claims are refused with [`Refusal::Busy`] so memory stays bounded. (A
/// node's sessions keep at most a quarter of this in flight, and wait for
/// a turn beyond: `cluster::CLAIM_SLOTS`.)
pub const MAX_PENDING: usize = 4096;

/// Most cached answers the leader keeps per asking server. Larger than
/// [`MAX_PENDING`] so that a well-behaved asker never loses a cached answer.
pub const DEDUP_PER_ASKER: usize = 2 * MAX_PENDING;

/// Most requests the leader parks while it waits for followers' holdings.
pub const LEADER_QUEUE: usize = 4096;

/// Messages a server may send to itself while handling one input; a guard
/// against a logic loop, far above anything a real input causes.
const LOOPBACK_BUDGET: usize = 100_000;

/// The main hall of a server: `MainHall-<id>`.
pub fn main_hall(server: &str) -> String {
    format!("MainHall-{server}")
}

/// A leader's epoch: its term, then its election rank (position in the
/// configured server list), which orders two leaders that announced the same
/// term at once, as the election does.
type Epoch = (u64, usize);

/// `now + after`, saturating: an absurd configured duration must not panic
/// (it only makes the deadline come early).
fn later(now: Instant, after: Duration) -> Instant {
    now.checked_add(after).unwrap_or(now)
}

/// Whether `name` is a valid identity or room id: `^[A-Za-z][A-Za-z0-9]{2,15}$`.
pub fn is_valid_name(name: &str) -> bool {
    (3..=16).contains(&name.len())
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric())
}

mod asker;
mod leader;
mod messages;
mod replica;
mod table;
#[cfg(test)]
mod tests;

use asker::Pending;
use leader::LeaderState;
pub use messages::*;
use table::Table;

/// One server's registry: replica, own holdings, asker side and (while it
/// leads) the leader side. See the module docs.
#[derive(Debug)]
pub struct Registry {
    id: ServerId,
    /// Configured servers in config order (this one included).
    servers: Vec<ServerId>,
    config: RegistryConfig,
    incarnation: u64,
    /// Peers the failure detector sees alive (never this server).
    live: BTreeSet<ServerId>,
    /// `live` changed since the last [`Registry::take_room_changes`].
    live_touched: bool,
    leader: Option<ServerId>,
    term: u64,
    /// Newest epoch of a leader this server reported its holdings to (or
    /// follows); while it is above the followed leader's epoch, that leader
    /// is ignored (see module docs).
    fence: Epoch,
    own: Table,
    /// Other servers' holdings as last announced by the leader.
    replica: Table,
    /// How far `replica` has come (reported to a new leader).
    applied: Position,
    /// Last announcement applied in this term; `None`: waiting for a snapshot.
    last_seq: Option<u64>,
    /// Highest announcement number seen in this term, applied or not: a
    /// snapshot older than it leaves this server behind.
    announced: u64,
    sync_sent_at: Option<Instant>,
    pending: BTreeMap<u64, Pending>,
    /// The ids in `pending` by the name they are about, so that a submit or
    /// an answer looks at the few requests of one name instead of scanning
    /// every request in flight (kept in step by `add_pending` and
    /// `remove_pending`, the only places that change `pending`'s keys).
    pending_keys: HashMap<NameKey, BTreeSet<u64>>,
    next_id: u64,
    /// For own names set by an answer: (term, announcement number) of that
    /// answer. Announcements and snapshots older than it do not touch the
    /// name, as they may overtake or trail the answer on the network.
    marks: HashMap<NameKey, (u64, u64)>,
    /// Holdings reports made so far (their version numbers).
    reports: u64,
    leading: Option<Box<LeaderState>>,
    retry_at: Option<Instant>,
    /// Messages to this server itself (the leader asking itself), handled
    /// before `handle` returns.
    loopback: VecDeque<RegistryMessage>,
    /// The time of the input being handled.
    clock: Option<Instant>,
    /// Between [`Registry::begin_batch`] and [`Registry::end_batch`]: the
    /// leader's decisions wait there to go out as one announcement.
    batching: bool,
    /// Arrivals (`movejoin`s) waiting for this server's claims of the same
    /// identity, sent before the move was known here, to be answered: a
    /// claim and an arrival of one name are never in flight together (the
    /// leader would grant a claim of a name its asker holds, so both would
    /// win). An arrival also waits for an earlier one that nobody waits for
    /// any more (timed out, or its client left): the leader would grant both
    /// (the second as the identity's re-homed grant), and the release that
    /// undoes the first would free the name under the second's client.
    /// Meanwhile new claims of the name are refused here. Tried again after
    /// every input; at most `MAX_PENDING`.
    parked: Vec<ParkedArrival>,
    /// Arrivals granted with nobody waiting (their client was told no, the
    /// leader's answer late): the identity is this server's, kept for that
    /// client's `movejoin` again until the move timeout, then given back.
    /// Given back at once, the move was done and the name free for anyone
    /// (a fault tester: a one-way cut from the leader, healed).
    unclaimed: BTreeMap<String, Unclaimed>,
    /// When this server first saw each open move (announced, in a snapshot,
    /// or granted by itself as leader), by identity, with the move's proof:
    /// a leader times a move it takes over from then, not from its own
    /// election (a leader changing every few seconds kept a move nobody
    /// finished open for ever, a fault tester).
    moves_seen: HashMap<String, MoveSeen>,
}

/// When a server first saw an open move.
#[derive(Debug)]
struct MoveSeen {
    proof: MoveProof,
    at: Instant,
    /// `at` is when the move's client was routed: this server is the
    /// origin, or granted the move's answer at `at`, or took `at` from the
    /// origin's report. Nobody else's older sighting moves it back then.
    routed: bool,
}

impl MoveSeen {
    fn new(proof: MoveProof, at: Instant, routed: bool) -> MoveSeen {
        MoveSeen { proof, at, routed }
    }
}

/// An arrival granted after its client was told no.
#[derive(Debug)]
struct Unclaimed {
    /// What the client showed: only the same client takes it
    /// ([`Arrival::same_client`]: its token, or its address if it showed none).
    arrival: Arrival,
    stamp: Stamp,
    /// Given back then.
    until: Instant,
}

/// An arrival waiting for claims of its identity to be answered.
#[derive(Debug)]
struct ParkedArrival {
    token: u64,
    identity: String,
    arrival: Arrival,
    /// Refused (as a request unanswered in time) if still parked then: a
    /// claim whose leader never answers stays in flight.
    until: Instant,
}

impl Registry {
    /// A registry for server `id` of a cluster whose servers are `servers`,
    /// in ascending election priority as `ClusterConfig::ids` gives them: a
    /// server's position is its rank, which orders two leaders of the same
    /// term exactly as the election does (`id` is added if missing). The
    /// order is also the order of the main halls in [`Registry::rooms`].
    /// `incarnation` must grow across restarts of this server (boot time in
    /// ms will do). Every peer starts down and there is no leader until the
    /// runtime says otherwise.
    pub fn new(
        id: ServerId,
        servers: Vec<ServerId>,
        config: RegistryConfig,
        incarnation: u64,
    ) -> Self {
        let mut unique: Vec<ServerId> = Vec::with_capacity(servers.len() + 1);
        for server in servers {
            if !unique.contains(&server) {
                unique.push(server);
            }
        }
        if !unique.contains(&id) {
            unique.push(id.clone());
        }
        Registry {
            id,
            servers: unique,
            config,
            incarnation,
            live: BTreeSet::new(),
            live_touched: false,
            leader: None,
            term: 0,
            fence: (0, 0),
            own: Table::default(),
            replica: Table::default(),
            applied: Position::default(),
            last_seq: None,
            announced: 0,
            sync_sent_at: None,
            pending: BTreeMap::new(),
            pending_keys: HashMap::new(),
            next_id: 1,
            marks: HashMap::new(),
            reports: 0,
            leading: None,
            retry_at: None,
            loopback: VecDeque::new(),
            clock: None,
            batching: false,
            parked: Vec::new(),
            unclaimed: BTreeMap::new(),
            moves_seen: HashMap::new(),
        }
    }

    /// Feeds one input; returns what the runtime must do, in order.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Action> {
        self.clock = Some(now);
        let mut out = Vec::new();
        match input {
            Input::Message { from, msg } => self.on_message(now, from, msg, &mut out),
            Input::Local { token, request } => self.on_local(now, token, request, &mut out),
            Input::PeerUp(peer) => self.on_peer_up(now, peer, &mut out),
            Input::PeerDown(peer) => self.on_peer_down(now, peer, &mut out),
            Input::LeaderChanged { leader, term } => {
                self.on_leader_changed(now, leader, term, &mut out)
            }
            Input::LinkReset(peer) => self.on_link_reset(now, peer, &mut out),
            Input::Timer(timer) => self.on_timer(now, timer, &mut out),
        }
        let mut budget = LOOPBACK_BUDGET;
        while let Some(msg) = self.loopback.pop_front() {
            if budget == 0 {
                self.loopback.clear();
                break;
            }
            budget -= 1;
            let from = self.id.clone();
            self.on_message(now, from, msg, &mut out);
        }
        self.unpark_arrivals(now, &mut out);
        if !self.batching {
            self.with_leader(|registry, lead| registry.announce(lead, &mut out));
        }
        self.arm_retry(now, &mut out);
        out
    }

    /// Starts a batch of inputs: until [`Registry::end_batch`], what the
    /// leader decides goes out as one announcement instead of one per input
    /// (fewer messages, and followers acknowledge them together).
    pub fn begin_batch(&mut self) {
        self.batching = true;
    }

    /// Ends a batch: sends the announcement of what the leader decided in it.
    pub fn end_batch(&mut self) -> Vec<Action> {
        self.batching = false;
        let mut out = Vec::new();
        self.with_leader(|registry, lead| registry.announce(lead, &mut out));
        out
    }

    // ----- read side -------------------------------------------------------

    /// This server's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current leader, if any.
    pub fn leader(&self) -> Option<&str> {
        self.leader.as_deref()
    }

    /// The current leader's term.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Whether this server currently leads (and has not been fenced off by a
    /// newer leader).
    pub fn is_leader(&self) -> bool {
        self.leading.is_some() && self.epoch() >= self.fence
    }

    /// Whether this server sees a majority of the configured servers. A
    /// quick refusal only: what makes a grant safe is the acknowledgement
    /// of a majority (see the module docs).
    pub fn has_majority(&self) -> bool {
        self.reachable_count() * 2 > self.servers.len()
    }

    /// How many servers (the leader included) must acknowledge an
    /// announcement before it counts as committed, must report to a new
    /// leader before it grants, and must see a server down before its
    /// names are freed: a majority of the configured servers, or 1 with
    /// `quorum = "none"`.
    fn quorum(&self) -> usize {
        if self.config.require_majority {
            self.servers.len() / 2 + 1
        } else {
            1
        }
    }

    /// Configured servers this server's failure detector sees down.
    fn down_list(&self) -> Vec<ServerId> {
        self.servers
            .iter()
            .filter(|s| !self.is_live(s))
            .cloned()
            .collect()
    }

    /// Whether `server` is this one or a peer seen alive.
    pub fn is_live(&self, server: &str) -> bool {
        server == self.id || self.live.contains(server)
    }

    /// What may answer differently in [`Registry::rooms`] and
    /// [`Registry::room`] since the last call: so that a reader keeping a
    /// copy updates just those rooms instead of rebuilding it after every input.
    pub fn take_room_changes(&mut self) -> RoomChanges {
        let all = self.own.touched_all || self.replica.touched_all || self.live_touched;
        self.own.touched_all = false;
        self.replica.touched_all = false;
        self.live_touched = false;
        let mut rooms = std::mem::take(&mut self.own.touched);
        rooms.append(&mut self.replica.touched);
        if all {
            RoomChanges::All
        } else {
            RoomChanges::Rooms(rooms)
        }
    }

    /// Every room of the cluster for `list`: the main halls of live servers
    /// in config order, then the other rooms sorted by id.
    pub fn rooms(&self) -> Vec<String> {
        let mut rooms: Vec<String> = self
            .servers
            .iter()
            .filter(|s| self.is_live(s))
            .map(|s| main_hall(s))
            .collect();
        let others: BTreeSet<&String> = self
            .own
            .rooms
            .keys()
            .chain(
                self.replica
                    .rooms
                    .values()
                    .filter(|r| self.is_live(&r.server))
                    .map(|r| &r.room),
            )
            .collect();
        rooms.extend(others.into_iter().cloned());
        rooms
    }

    /// Where `room` lives and who owns it (main halls included).
    pub fn room(&self, room: &str) -> Option<RoomInfo> {
        if let Some(server) = room.strip_prefix("MainHall-") {
            return self
                .servers
                .iter()
                .find(|s| s.as_str() == server && self.is_live(s))
                .map(|s| RoomInfo {
                    server: s.clone(),
                    owner: String::new(),
                });
        }
        self.own
            .rooms
            .get(room)
            .or_else(|| {
                self.replica
                    .rooms
                    .get(room)
                    .filter(|r| self.is_live(&r.server))
            })
            .map(|r| RoomInfo {
                server: r.server.clone(),
                owner: r.owner.clone(),
            })
    }

    /// The server hosting `room`, main halls included.
    pub fn room_server(&self, room: &str) -> Option<ServerId> {
        self.room(room).map(|info| info.server)
    }

    /// The server an identity's client is on (a moving identity is still on
    /// its origin server).
    pub fn identity_server(&self, identity: &str) -> Option<ServerId> {
        self.view_identity(identity).map(|e| e.server.clone())
    }

    /// Whether `identity` is moving to `server`, as far as this server knows.
    /// A hint only: [`LocalRequest::AcceptMove`] asks the leader.
    pub fn is_moving_to(&self, identity: &str, server: &str) -> bool {
        self.view_identity(identity)
            .is_some_and(|e| e.moving_to.as_deref() == Some(server))
    }

    /// Whether this server holds `name` itself (a moving identity does not count).
    pub fn holds(&self, name: &Name) -> bool {
        match name {
            Name::Identity(identity) => self
                .own
                .identities
                .get(identity)
                .is_some_and(|e| e.moving_to.is_none()),
            Name::Room { room, .. } => self.own.rooms.contains_key(room),
        }
    }

    /// Sizes of this server's view, for `/status`.
    pub fn counts(&self) -> RegistryCounts {
        let identities = self.own.identities.len()
            + self
                .replica
                .identities
                .values()
                .filter(|e| {
                    self.is_live(&e.server) && !self.own.identities.contains_key(&e.identity)
                })
                .count();
        let rooms = self.own.rooms.len()
            + self
                .replica
                .rooms
                .values()
                .filter(|r| self.is_live(&r.server) && !self.own.rooms.contains_key(&r.room))
                .count();
        RegistryCounts {
            identities,
            rooms,
            own_identities: self.own.identities.len(),
            own_rooms: self.own.rooms.len(),
            pending: self.pending.len(),
        }
    }

    fn view_identity(&self, identity: &str) -> Option<&IdentityEntry> {
        self.own.identities.get(identity).or_else(|| {
            self.replica
                .identities
                .get(identity)
                .filter(|e| self.is_live(&e.server))
        })
    }

    fn reachable_count(&self) -> usize {
        1 + self.live.len()
    }

    fn no_majority(&self) -> Refusal {
        Refusal::NoMajority {
            reachable: u32::try_from(self.reachable_count()).unwrap_or(u32::MAX),
            configured: u32::try_from(self.servers.len()).unwrap_or(u32::MAX),
        }
    }

    // ----- plumbing --------------------------------------------------------

    fn send(&mut self, to: &str, msg: RegistryMessage, out: &mut Vec<Action>) {
        if to == self.id {
            self.loopback.push_back(msg);
        } else {
            out.push(Action::Send {
                to: to.to_string(),
                msg,
            });
        }
    }

    fn reply(out: &mut Vec<Action>, token: u64, result: Result<(), Refusal>) {
        out.push(Action::Reply { token, result });
    }

    /// The leader, if this server can talk to it and it is not fenced off.
    fn reachable_leader(&self) -> Option<ServerId> {
        let leader = self.leader.as_ref()?;
        (self.is_live(leader) && self.epoch() >= self.fence).then(|| leader.clone())
    }

    /// A server's election rank: its position in the configured list.
    fn rank(&self, server: &str) -> usize {
        self.servers.iter().position(|s| s == server).unwrap_or(0)
    }

    /// The epoch of the leader this server follows.
    fn epoch(&self) -> Epoch {
        (
            self.term,
            self.leader.as_deref().map_or(0, |l| self.rank(l)),
        )
    }

    fn sent_by_leader(&self, from: &str, term: u64) -> bool {
        self.leader.as_deref() == Some(from) && term == self.term && self.epoch() >= self.fence
    }

    fn report(&mut self) -> HoldingsReport {
        self.reports += 1;
        HoldingsReport {
            incarnation: self.incarnation,
            version: self.reports,
            issued_below: self.next_id,
            identities: self
                .own
                .identities
                .values()
                .map(|entry| self.as_reported(entry))
                .collect(),
            rooms: self.own.rooms.values().cloned().collect(),
            pending: self
                .pending
                .values()
                .filter_map(|p| match &p.op {
                    Op::Claim(name) => Some(name.clone()),
                    Op::MoveDone { identity, .. } => Some(Name::Identity(identity.clone())),
                    _ => None,
                })
                .collect(),
            position: self.applied,
            replica_identities: self.replica.identities.values().cloned().collect(),
            replica_rooms: self.replica.rooms.values().cloned().collect(),
            down: self.down_list(),
            move_ages: self.move_ages(),
        }
    }

    /// How long ago this server first saw each open move it knows of. Not
    /// for a move of its own whose client it has not routed yet (its grant
    /// is still being asked for): the leader takes an origin's age as the
    /// time of the route.
    fn move_ages(&self) -> Vec<MoveAge> {
        let Some(now) = self.clock else {
            return Vec::new();
        };
        let routed_or_not_mine = |identity: &String| {
            let own = self.own.identities.get(identity);
            own.is_none_or(|e| self.as_reported(e).moving_to.is_some())
        };
        self.moves_seen
            .iter()
            .filter(|(identity, _)| routed_or_not_mine(identity))
            .map(|(identity, seen)| MoveAge {
                identity: identity.clone(),
                proof: seen.proof.clone(),
                age_ms: u64::try_from(now.saturating_duration_since(seen.at).as_millis())
                    .unwrap_or(u64::MAX),
            })
            .collect()
    }

    /// An own identity as a holdings report shows it: one whose move is
    /// still being asked for, or was given up on and is being cancelled, is
    /// reported as not moving. Its client has not been routed away (it gets
    /// `route` only once the leader's grant is here), so the name is this
    /// server's; a leader that granted the move knows it, and one that did
    /// not must not take it for a move (a new leader freed such an
    /// identity, reported moving to a server that died as the move was
    /// asked, and a live client lost its name: an adversarial tester's
    /// finding).
    fn as_reported(&self, entry: &IdentityEntry) -> IdentityEntry {
        let asked = entry.moving_to.is_some()
            && self.pending.values().any(|p| {
                matches!(&p.op, Op::MoveStart { identity, .. } | Op::MoveCancel { identity, .. }
                    if *identity == entry.identity)
            });
        if asked {
            IdentityEntry {
                moving_to: None,
                move_proof: None,
                ..entry.clone()
            }
        } else {
            entry.clone()
        }
    }

    /// Tells the leader which servers this one sees down (a leader frees a
    /// server's names only when a majority, and every live server, sees it
    /// down).
    fn send_liveness(&mut self, out: &mut Vec<Action>) {
        let Some(leader) = self.reachable_leader() else {
            return;
        };
        if leader != self.id {
            let msg = RegistryMessage::Liveness {
                term: self.term,
                down: self.down_list(),
            };
            self.send(&leader, msg, out);
        }
    }

    fn arm_retry(&mut self, now: Instant, out: &mut Vec<Action>) {
        let interval = self.config.retry_interval;
        if let Some(at) = self.retry_at {
            // A lost timer must not stall retries for ever.
            if now.saturating_duration_since(at) < interval {
                return;
            }
        }
        let follower_unsynced =
            self.last_seq.is_none() && self.reachable_leader().is_some_and(|l| l != self.id);
        let leader_unsynced = self
            .leading
            .as_ref()
            .is_some_and(|l| !l.unsynced.is_empty() || l.behind(&self.live));
        if !self.pending.is_empty() || follower_unsynced || leader_unsynced {
            self.retry_at = Some(later(now, interval));
            out.push(Action::SetTimer {
                timer: Timer::Retry,
                after: interval,
            });
        } else {
            self.retry_at = None;
        }
    }

    // ----- inputs ----------------------------------------------------------

    fn on_message(
        &mut self,
        now: Instant,
        from: ServerId,
        msg: RegistryMessage,
        out: &mut Vec<Action>,
    ) {
        if !self.servers.contains(&from) {
            return;
        }
        match msg {
            RegistryMessage::Request {
                term,
                ticket,
                op,
                down,
            } => {
                if self.is_leader() && term <= self.term {
                    self.with_leader(|reg, lead| {
                        reg.lead_view(lead, now, &from, down, out);
                        reg.lead_request(lead, now, from, ticket, op, out)
                    });
                }
            }
            RegistryMessage::Holdings { term, report } => {
                if self.is_leader() && term == self.term {
                    self.with_leader(|reg, lead| reg.lead_report(lead, now, from, report, out));
                } else if self.is_leader() && term < self.term && from != self.id {
                    // Made before the sender was fenced at this term: an
                    // older leader may still have changed its holdings since.
                    let msg = RegistryMessage::HoldingsRequest { term: self.term };
                    self.send(&from, msg, out);
                }
            }
            RegistryMessage::HoldingsRequest { term } => {
                // Holdings are facts: answering any leader that is not stale
                // is harmless. Answering a newer one fences older ones off:
                // from now on no answer of an older epoch changes what this
                // report says.
                let epoch = (term, self.rank(&from));
                if epoch >= self.epoch() && from != self.id {
                    self.fence = self.fence.max(epoch);
                    let msg = RegistryMessage::Holdings {
                        term,
                        report: self.report(),
                    };
                    self.send(&from, msg, out);
                }
                // A leader asks as it starts: requests sent to it before it
                // knew it led were dropped, and would wait for the next
                // retry (an arrival lost its move to that wait, in the sim).
                if self.leader.as_ref() == Some(&from) && term == self.term {
                    self.send_pending(now, true, out);
                }
            }
            RegistryMessage::Answer {
                term,
                incarnation,
                id,
                seq,
                verdict,
            } => {
                if self.sent_by_leader(&from, term) && incarnation == self.incarnation {
                    self.on_answer(now, id, seq, verdict, out);
                }
            }
            RegistryMessage::Announce { term, seq, changes } => {
                if self.sent_by_leader(&from, term) && from != self.id {
                    self.on_announce(now, seq, &changes, out);
                }
            }
            RegistryMessage::Snapshot {
                term,
                seq,
                identities,
                rooms,
                move_ages,
            } => {
                if self.sent_by_leader(&from, term) && from != self.id {
                    self.on_snapshot(now, seq, (identities, rooms), &move_ages, out);
                }
            }
            RegistryMessage::Evict {
                term,
                seq,
                identities,
                rooms,
            } => {
                // Only from the leader this server follows, at its term: an
                // older or a self-appointed one must not take names away.
                // (Snapshots carry the same news, so nothing waits on it.)
                if self.sent_by_leader(&from, term) {
                    self.on_evict((term, seq), identities, rooms, out);
                }
            }
            RegistryMessage::Ack { term, seq } => {
                if self.is_leader() && term == self.term && from != self.id {
                    self.with_leader(|reg, lead| reg.lead_ack(lead, &from, seq, out));
                }
            }
            RegistryMessage::Liveness { term, down } => {
                if self.is_leader() && term == self.term && from != self.id {
                    self.with_leader(|reg, lead| reg.lead_liveness(lead, now, &from, down, out));
                }
            }
        }
    }

    /// Keeps `identity`, whose arrival was granted after its client was
    /// told no, for that client's `movejoin` again (see `unclaimed`).
    /// `seq`: the announcement the grant was decided at (news older than
    /// it, such as the move's own announcement, must not take it away).
    pub(super) fn keep_unclaimed(
        &mut self,
        now: Instant,
        (identity, arrival): (String, Arrival),
        stamp: Stamp,
        seq: u64,
        out: &mut Vec<Action>,
    ) {
        self.marks
            .insert(NameKey::Identity(identity.clone()), (self.term, seq));
        self.replica.remove_identity(&identity);
        self.hold_identity(identity.clone(), stamp.clone());
        let until = later(now, self.config.move_timeout);
        self.unclaimed.insert(
            identity.clone(),
            Unclaimed {
                arrival,
                stamp,
                until,
            },
        );
        out.push(Action::SetTimer {
            timer: Timer::Unclaimed { identity },
            after: self.config.move_timeout,
        });
    }

    /// `identity` granted to this server under `stamp`: held here, not moving.
    pub(super) fn hold_identity(&mut self, identity: String, stamp: Stamp) {
        self.own.set_identity(IdentityEntry {
            identity,
            server: self.id.clone(),
            moving_to: None,
            stamp,
            move_proof: None,
        });
    }

    /// The unclaimed arrival of `identity`, taken out, if this server still
    /// has that grant (it may have lost it to a heal meanwhile).
    fn take_unclaimed(&mut self, identity: &str) -> Option<Unclaimed> {
        let kept = self.unclaimed.remove(identity)?;
        self.own
            .identities
            .get(identity)
            .is_some_and(|e| e.stamp == kept.stamp && e.moving_to.is_none())
            .then_some(kept)
    }

    /// An arrival of `identity` here (a `movejoin`), to be answered by
    /// `until` (the claim timeout after it was asked).
    fn accept_move(
        &mut self,
        now: Instant,
        token: u64,
        identity: String,
        arrival: Arrival,
        until: Instant,
        out: &mut Vec<Action>,
    ) {
        let key = NameKey::Identity(identity.clone());
        if self.config.require_majority && !self.has_majority() {
            // Refused at once, as a claim is, and not asked: an arrival
            // left in flight here would be granted once the cluster is
            // back, with nobody waiting. Not even a kept arrival is handed
            // out: cut off, this server's names may have been freed and
            // granted again on the other side (a fault tester: two clients
            // served under one name until the heal).
            Self::reply(out, token, Err(self.no_majority()));
            return;
        }
        if let Some(kept) = self.take_unclaimed(&identity) {
            let result = if kept.arrival.same_client(&arrival) {
                Ok(())
            } else {
                self.unclaimed.insert(identity, kept);
                Err(Refusal::WrongMoveProof)
            };
            Self::reply(out, token, result);
            return;
        }
        // A client connected here refuses it (one holding the identity, or
        // moving away but not routed yet: the leader may still have the
        // identity here, not moving, and would take the arrival for the
        // retry of one it granted). An identity merely reserved here (its
        // client moved away and may be coming back) is for the leader to
        // decide.
        let refusal = if !is_valid_name(&identity) || self.client_here(&identity) {
            Some(Refusal::NotMoving)
        } else if self
            .move_here(&identity)
            .and_then(|e| e.move_proof.as_ref())
            .is_some_and(|proof| !arrival.proves(proof))
        {
            // Refused here, from the announced move, without a trip to the
            // leader: impostors' `movejoin`s queue ahead of the real
            // client's (one arrival of a name at a time), and with a leader
            // round trip each, a few hundred of them outlasted the move.
            // The leader checks the proof again: refusing is always safe.
            Some(Refusal::WrongMoveProof)
        } else if self.arrival_pending_for(&key) {
            Some(Refusal::NotMoving)
        } else if self.adopt(
            now,
            &key,
            |op| matches!(op, Op::MoveDone { identity: i, arrival: a, .. } if *i == identity && a.same_client(&arrival)),
            (token, until),
            out,
        ) {
            return;
        } else if self.pending.len() + self.parked.len() >= MAX_PENDING {
            Some(Refusal::Busy)
        } else {
            None
        };
        match refusal {
            Some(reason) => Self::reply(out, token, Err(reason)),
            None if self.any_claim_pending_for(&key) => {
                out.push(Action::SetTimer {
                    timer: Timer::ParkedDeadline,
                    after: until.saturating_duration_since(now),
                });
                self.parked.push(ParkedArrival {
                    token,
                    identity,
                    arrival,
                    until,
                });
            }
            None => {
                let stamp = self.move_here(&identity).map(|e| e.stamp.clone());
                let op = Op::MoveDone {
                    identity,
                    arrival,
                    stamp,
                };
                self.submit_by(now, op, Some(token), until, out)
            }
        }
    }

    /// Sends on the parked arrivals whose identity has no claim in flight
    /// any more, and refuses those parked too long. (While one is parked a
    /// claim is pending, so the retry timer brings an input at least every
    /// retry interval.)
    fn unpark_arrivals(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.parked.is_empty() {
            return;
        }
        let parked = std::mem::take(&mut self.parked);
        for p in parked {
            let key = NameKey::Identity(p.identity.clone());
            if now >= p.until {
                Self::reply(out, p.token, Err(Refusal::LeaderTimeout));
            } else if self.any_claim_pending_for(&key) {
                self.parked.push(p);
            } else {
                self.accept_move(now, p.token, p.identity, p.arrival, p.until, out);
            }
        }
    }

    /// The announced entry of `identity` if it is moving to this server.
    fn move_here(&self, identity: &str) -> Option<&IdentityEntry> {
        self.replica
            .identities
            .get(identity)
            .filter(|e| e.moving_to.as_ref() == Some(&self.id))
    }

    /// Whether `key` is an identity moving to this server, or with an
    /// arrival waiting here or in flight (abandoned too: the leader grants
    /// a claim of an identity registered to its asker, and the release
    /// that undoes a granted arrival nobody waits for would free it).
    fn moving_here(&self, key: &NameKey) -> bool {
        let NameKey::Identity(identity) = key else {
            return false;
        };
        self.move_here(identity).is_some()
            || self.parked.iter().any(|p| p.identity == *identity)
            || self.any_arrival_pending_for(key)
    }

    fn on_local(&mut self, now: Instant, token: u64, request: LocalRequest, out: &mut Vec<Action>) {
        match request {
            LocalRequest::Claim(name) => {
                let key = name.key();
                let refusal = if !name.is_valid() {
                    Some(Refusal::Invalid)
                } else if self.own_has(&key)
                    || self.claim_pending_for(&key)
                    || self.moving_here(&key)
                {
                    // A name moving here is its mover's: a flood of claims
                    // of it must not hold its arrival up (see `parked`).
                    Some(Refusal::Taken)
                } else if self.config.require_majority && !self.has_majority() {
                    Some(self.no_majority())
                } else if self.pending.len() >= MAX_PENDING {
                    Some(Refusal::Busy)
                } else {
                    None
                };
                match refusal {
                    Some(reason) => Self::reply(out, token, Err(reason)),
                    None if self.adopt(
                        now,
                        &key,
                        |op| *op == Op::Claim(name.clone()),
                        (token, later(now, self.config.claim_timeout)),
                        out,
                    ) => {}
                    None => self.submit(now, Op::Claim(name), Some(token), out),
                }
            }
            LocalRequest::StartMove {
                identity,
                to,
                proof,
            } => {
                let refusal = match self.own.identities.get(&identity) {
                    None => Some(Refusal::NotOwner),
                    Some(e) if e.moving_to.is_some() => Some(Refusal::AlreadyMoving),
                    Some(_) if to == self.id || !self.servers.contains(&to) => {
                        Some(Refusal::Invalid)
                    }
                    Some(_) if !self.live.contains(&to) => Some(Refusal::TargetDown),
                    Some(_) if self.pending.len() >= MAX_PENDING => Some(Refusal::Busy),
                    Some(_) => None,
                };
                match refusal {
                    Some(reason) => Self::reply(out, token, Err(reason)),
                    None => {
                        // Reserved for the move from now on: the leader may
                        // grant the arrival before its answer gets here.
                        if let Some(entry) = self.own.identities.get_mut(&identity) {
                            entry.moving_to = Some(to.clone());
                            entry.move_proof = Some(proof.clone());
                        }
                        let op = Op::MoveStart {
                            identity,
                            to,
                            proof,
                        };
                        self.submit(now, op, Some(token), out)
                    }
                }
            }
            LocalRequest::AcceptMove { identity, arrival } => {
                let until = later(now, self.config.claim_timeout);
                self.accept_move(now, token, identity, arrival, until, out)
            }
            // Answered once the leader has freed the names (or there was
            // nothing to free here), or at the claim timeout, or at once
            // while there is no leader to ask: the client is told it left
            // only once another may take its names.
            LocalRequest::GiveUpMove { identity, proof } => {
                let token = self.release_waiter(token, out);
                // Only the move that client's `route` started: the name may
                // be held here again by then (granted anew, or back by
                // another move), and then it is not this client's to free.
                let on_that_move = self.own.identities.get(&identity).is_some_and(|e| {
                    e.moving_to.is_some() && e.move_proof.as_ref() == Some(&proof)
                });
                if on_that_move {
                    self.drop_own_identity(&identity);
                    self.submit(now, Op::MoveGiveUp { identity, proof }, token, out);
                } else if let Some(token) = token {
                    Self::reply(out, token, Ok(()));
                }
            }
            LocalRequest::Release(names) => {
                let token = self.release_waiter(token, out);
                let mut given = Vec::new();
                for name in names {
                    if let Some(stamp) = self.let_go(name.key(), out) {
                        given.push(Given { name, stamp });
                    }
                }
                if !given.is_empty() {
                    self.submit(now, Op::Release(given), token, out);
                } else if let Some(token) = token {
                    Self::reply(out, token, Ok(()));
                }
            }
        }
    }

    /// The token a release's client waits on, or `None` (told now) while
    /// no leader can be asked: it would wait out the claim timeout.
    fn release_waiter(&self, token: u64, out: &mut Vec<Action>) -> Option<u64> {
        if self.reachable_leader().is_some() {
            Some(token)
        } else {
            Self::reply(out, token, Ok(()));
            None
        }
    }

    /// Once no leader can be asked, the clients of releases in flight are
    /// told they left, as a release asked then is (see
    /// [`Registry::release_waiter`]): the answer they wait for cannot come
    /// before the claim timeout. The releases go on until a leader has them.
    fn answer_releases_without_leader(&mut self, out: &mut Vec<Action>) {
        if self.reachable_leader().is_some() {
            return;
        }
        for p in self.pending.values_mut().filter(|p| p.op.gives_back()) {
            if let Some(token) = p.token.take() {
                p.deadline = None;
                Self::reply(out, token, Ok(()));
            }
        }
    }

    /// The chat layer let go of `key`: an arrival of it still parked and a
    /// claim of it still in flight have nobody waiting any more, and the
    /// holding is dropped. Returns the stamp of the holding, if there was
    /// one: the leader must be told.
    fn let_go(&mut self, key: NameKey, out: &mut Vec<Action>) -> Option<Stamp> {
        if let NameKey::Identity(identity) = &key {
            for p in self.parked.extract_if(.., |p| p.identity == *identity) {
                Self::reply(out, p.token, Err(Refusal::Cancelled));
            }
        }
        let ids: Vec<u64> = self
            .pending_keys
            .get(&key)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default();
        for id in ids {
            let Some(p) = self.pending.get_mut(&id) else {
                continue;
            };
            // Releases are indexed under their names too: only claims count.
            // Its client left: a grant is given back.
            p.told_no = false;
            if matches!(p.op, Op::Claim(_) | Op::MoveDone { .. }) && !p.abandoned {
                p.abandoned = true;
                if let Some(t) = p.token.take() {
                    Self::reply(out, t, Err(Refusal::Cancelled));
                }
            }
        }
        match &key {
            NameKey::Identity(identity) => self.drop_own_identity(identity).map(|e| e.stamp),
            NameKey::Room(room) => self.drop_own_room(room).map(|r| r.stamp),
        }
    }

    fn on_peer_up(&mut self, now: Instant, peer: ServerId, out: &mut Vec<Action>) {
        if peer == self.id || !self.servers.contains(&peer) || !self.live.insert(peer.clone()) {
            return;
        }
        self.live_touched = true;
        if self.is_leader() {
            // A server coming back re-registers what it still holds; new
            // grants wait briefly so it is not robbed of a name it kept.
            let deadline = later(now, self.config.sync_timeout);
            if let Some(lead) = self.leading.as_mut() {
                lead.unsynced.insert(peer.clone(), deadline);
            }
            let msg = RegistryMessage::HoldingsRequest { term: self.term };
            self.send(&peer, msg, out);
            out.push(Action::SetTimer {
                timer: Timer::SyncDeadline,
                after: self.config.sync_timeout,
            });
        }
        if self.leader.as_ref() == Some(&peer) {
            self.send_pending(now, true, out);
            if self.last_seq.is_none() {
                self.request_sync(now, true, out);
            }
        }
        self.send_liveness(out);
    }

    fn on_peer_down(&mut self, now: Instant, peer: ServerId, out: &mut Vec<Action>) {
        if peer == self.id || !self.live.remove(&peer) {
            return;
        }
        self.live_touched = true;
        if self.is_leader() {
            self.with_leader(|reg, lead| {
                reg.lead_check_purges(lead, now, out);
                // Answers held for it go now.
                reg.advance_commit(lead, out);
            });
        }
        self.send_liveness(out);
        self.answer_releases_without_leader(out);
    }

    /// Whatever is unacknowledged between this server and `peer` goes again:
    /// the requests and holdings of a follower whose leader it is, the
    /// announcements and holdings requests of a leader to a follower.
    fn on_link_reset(&mut self, now: Instant, peer: ServerId, out: &mut Vec<Action>) {
        if peer == self.id || !self.live.contains(&peer) {
            return;
        }
        if self.is_leader() {
            self.with_leader(|reg, lead| reg.lead_link_reset(lead, now, &peer, out));
        }
        if self.leader.as_ref() == Some(&peer) {
            self.send_pending(now, true, out);
            match self.last_seq {
                // Where this server stands: the leader sends again what is
                // missing (a gap in what arrives then asks for a snapshot).
                Some(seq) => self.ack(seq, out),
                None => self.request_sync(now, true, out),
            }
            self.send_liveness(out);
        }
    }

    fn on_leader_changed(
        &mut self,
        now: Instant,
        leader: Option<ServerId>,
        term: u64,
        out: &mut Vec<Action>,
    ) {
        let leader = leader.filter(|l| self.servers.contains(l));
        // Epochs never go back (Fast Bully ignores older Coordinators); a
        // late notification of an older election is stale. `None` (leader
        // lost) keeps the term.
        let epoch = (term, leader.as_deref().map_or(0, |l| self.rank(l)));
        let older = term < self.term || (leader.is_some() && epoch < self.epoch());
        if (leader == self.leader && term == self.term) || older {
            return;
        }
        // What this server decided as leader goes out under its term.
        self.with_leader(|registry, lead| registry.announce(lead, out));
        self.leader = leader.clone();
        self.term = term;
        if leader.is_some() {
            self.fence = self.fence.max(epoch);
        }
        self.leading = None;
        self.last_seq = None;
        self.announced = 0;
        self.sync_sent_at = None;
        match leader {
            Some(l) if l == self.id => self.start_leading(now, out),
            Some(_) => self.request_sync(now, true, out),
            None => {}
        }
        self.send_pending(now, true, out);
        self.answer_releases_without_leader(out);
    }

    fn on_timer(&mut self, now: Instant, timer: Timer, out: &mut Vec<Action>) {
        match timer {
            Timer::Retry => {
                if self.retry_at.is_some_and(|at| now < at) {
                    return;
                }
                self.retry_at = None;
                self.send_pending(now, false, out);
                if self.last_seq.is_none() {
                    self.request_sync(now, false, out);
                }
                if self.is_leader() {
                    self.with_leader(|reg, lead| reg.lead_retry(lead, now, out));
                    let unsynced: Vec<ServerId> = self
                        .leading
                        .as_ref()
                        .map(|l| l.unsynced.keys().cloned().collect())
                        .unwrap_or_default();
                    for server in unsynced {
                        if server == self.id {
                            let report = self.report();
                            let msg = RegistryMessage::Holdings {
                                term: self.term,
                                report,
                            };
                            self.loopback.push_back(msg);
                        } else if self.live.contains(&server) {
                            let msg = RegistryMessage::HoldingsRequest { term: self.term };
                            self.send(&server, msg, out);
                        }
                    }
                }
            }
            Timer::RequestDeadline { id } => self.give_up(now, id, out),
            Timer::Unclaimed { identity } => {
                if self
                    .unclaimed
                    .get(&identity)
                    .is_some_and(|u| now >= u.until)
                    && self.take_unclaimed(&identity).is_some()
                    && let Some(stamp) = self.let_go(NameKey::Identity(identity.clone()), out)
                {
                    let given = Given {
                        name: Name::Identity(identity),
                        stamp,
                    };
                    self.submit(now, Op::Release(vec![given]), None, out);
                }
            }
            Timer::MoveExpiry { identity } => {
                if self.is_leader() {
                    self.with_leader(|reg, lead| reg.lead_move_expiry(lead, now, &identity, out));
                }
            }
            Timer::SyncDeadline => {
                if self.is_leader() {
                    self.with_leader(|reg, lead| reg.flush_queue(lead, now, out));
                }
            }
            Timer::HeldAnswers => {
                self.with_leader(|reg, lead| {
                    if lead.held_timer.is_some_and(|at| at <= now) {
                        lead.held_timer = None;
                    }
                    reg.advance_commit(lead, out);
                });
            }
            // `handle` unparks (or refuses) after every input.
            Timer::ParkedDeadline => {}
        }
    }
}
