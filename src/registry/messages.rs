//! The registry's data types: names and their holdings, the messages
//! between servers, and the inputs and actions of [`super::Registry`].

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::is_valid_name;
use crate::ServerId;

/// Timing and policy of the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Grant new names only while a majority of the configured servers is
    /// reachable (`quorum = "majority"`); `false` is `quorum = "none"`.
    pub require_majority: bool,
    /// How long a claim may wait for the leader before it is refused.
    pub claim_timeout: Duration,
    /// How often unanswered requests and sync requests are sent again.
    pub retry_interval: Duration,
    /// How long a new leader (or a leader seeing a server come back) waits
    /// for holdings before it grants again without them.
    pub sync_timeout: Duration,
    /// How long an identity may stay "moving" before the leader releases it.
    pub move_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            require_majority: true,
            claim_timeout: Duration::from_millis(2000),
            retry_interval: Duration::from_millis(200),
            sync_timeout: Duration::from_millis(500),
            move_timeout: Duration::from_secs(10),
        }
    }
}

/// Which grant a holding comes from: unique cluster-wide and ordered, so two
/// holders of one name can be told apart and the later grant wins. Moves and
/// re-registration keep the original stamp.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// Term of the leader that granted the name.
    pub term: u64,
    /// Sequence number of the announcement that carried the grant.
    pub seq: u64,
    /// The granting leader; keeps stamps unique even if two leaders of split
    /// groups ever share a term.
    pub leader: ServerId,
}

/// A registered identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityEntry {
    /// The identity.
    pub identity: String,
    /// The server its client is connected to.
    pub server: ServerId,
    /// Set while the client moves to another server (still reserved).
    pub moving_to: Option<ServerId>,
    /// The grant it comes from.
    pub stamp: Stamp,
    /// What the arriving `movejoin` must show: set exactly while
    /// `moving_to` is (`None` otherwise).
    pub move_proof: Option<MoveProof>,
}

/// What the origin server of a move knows about its client, so that only
/// that client can complete the move (`movejoin`): the one-time token sent
/// in `route`, and the client's source address there. A `movejoin` with a
/// token must show this token; one without (classic clients) must come from
/// this address. `Debug` hides the token: it must never reach a log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveProof {
    /// The unguessable one-time token sent to the client in `route`.
    pub token: String,
    /// The client's source IP address on the origin server; unspecified
    /// (`0.0.0.0`, which no connection comes from) for a client that always
    /// echoes the token (a web page), whose move no `movejoin` without the
    /// token completes.
    pub ip: IpAddr,
}

impl fmt::Debug for MoveProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MoveProof")
            .field("token", &"<hidden>")
            .field("ip", &self.ip)
            .finish()
    }
}

/// What an arriving `movejoin` shows: the token it echoed (if any) and the
/// source address it came from. `Debug` hides the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arrival {
    /// The `token` key of the `movejoin`, if it had one.
    pub token: Option<String>,
    /// The source IP address of the `movejoin`'s connection.
    pub ip: IpAddr,
}

impl fmt::Debug for Arrival {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arrival")
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("ip", &self.ip)
            .finish()
    }
}

impl Arrival {
    /// Whether `other` is the same client asking again: the same token if
    /// this one showed one (from any address, as a move's proof is
    /// checked), otherwise no token and the same address.
    pub fn same_client(&self, other: &Arrival) -> bool {
        match (&self.token, &other.token) {
            (Some(mine), Some(theirs)) => mine == theirs,
            (None, None) => self.ip == other.ip,
            _ => false,
        }
    }

    /// Whether this arrival is the client the move was started for: the
    /// token if it shows one (a client may arrive from another address,
    /// e.g. another interface), otherwise the same source address.
    /// Addresses are compared in canonical form, so an IPv4 client seen
    /// as `::ffff:a.b.c.d` by a dual-stack socket still matches.
    pub fn proves(&self, proof: &MoveProof) -> bool {
        match &self.token {
            Some(token) => *token == proof.token,
            // A web page's move is proved by its token only (its proof
            // names no address).
            None => !proof.ip.is_unspecified() && self.ip.to_canonical() == proof.ip.to_canonical(),
        }
    }
}

/// A registered room (main halls are never registered).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomEntry {
    /// The room id.
    pub room: String,
    /// The server that hosts it.
    pub server: ServerId,
    /// The identity that created it.
    pub owner: String,
    /// The grant it comes from.
    pub stamp: Stamp,
}

/// A name that must be unique cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Name {
    /// A client identity.
    Identity(String),
    /// A room and the identity that owns it (ignored when releasing).
    Room {
        /// The room id.
        room: String,
        /// Its owner.
        owner: String,
    },
}

impl Name {
    pub(super) fn key(&self) -> NameKey {
        match self {
            Name::Identity(identity) => NameKey::Identity(identity.clone()),
            Name::Room { room, .. } => NameKey::Room(room.clone()),
        }
    }

    pub(super) fn is_valid(&self) -> bool {
        match self {
            Name::Identity(identity) => is_valid_name(identity),
            Name::Room { room, owner } => is_valid_name(room) && is_valid_name(owner),
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Name::Identity(identity) => write!(f, "identity {identity}"),
            Name::Room { room, .. } => write!(f, "room {room}"),
        }
    }
}

/// A name without its room owner: what uniqueness is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum NameKey {
    Identity(String),
    Room(String),
}

/// What an asker asks the leader to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Register a new name for the asker.
    Claim(Name),
    /// Forget names the asker held: a client that leaves gives back its
    /// identity and the room it owns in one request.
    Release(Vec<Given>),
    /// The asker's client is moving to server `to`: reserve its identity there.
    MoveStart {
        /// The moving identity.
        identity: String,
        /// Where it goes.
        to: ServerId,
        /// What its arrival must show.
        proof: MoveProof,
    },
    /// The moving client arrived at the asker (`movejoin`): re-home it.
    MoveDone {
        /// The arriving identity.
        identity: String,
        /// What the `movejoin` showed.
        arrival: Arrival,
        /// The grant the identity moves with, when the asker's replica
        /// shows the move: the leader completes only that move. `None`: the
        /// move was not announced here yet (the client came first); the
        /// leader completes whatever move to the asker it has. (An arrival
        /// nobody waits for any more is undone by the stamp its answer
        /// names, never by this one.)
        stamp: Option<Stamp>,
    },
    /// Undo a `MoveStart` the asker gave up on.
    MoveCancel {
        /// The identity that stays.
        identity: String,
        /// The proof of the move given up on: the leader cancels only that
        /// move. A cancel can reach a leader late (queued while the leader
        /// was cut off), after the identity started another move; it must
        /// not cancel that one.
        proof: MoveProof,
    },
    /// The moving client quit on its old connection before arriving: free
    /// the identity, if it is still on that move (the proof names it). If
    /// the client arrived anyway, or the name was freed and granted again,
    /// or came back by another move (same stamp), nothing changes: unlike a
    /// release, this can only free the move it names.
    MoveGiveUp {
        /// The identity to free.
        identity: String,
        /// The proof of the move given up on.
        proof: MoveProof,
    },
}

/// A name given back to the leader, and the grant it was held by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Given {
    /// The name.
    pub name: Name,
    /// The grant the asker held it by: only that holding is released. A
    /// release can reach a leader late (queued while the leader was cut
    /// off), after another leader granted the name to the asker again; it
    /// must not free that later grant.
    pub stamp: Stamp,
}

impl Op {
    /// The names the request is about: one, or those a release gives back.
    pub(super) fn keys(&self) -> impl Iterator<Item = NameKey> + '_ {
        let (one, given) = match self {
            Op::Claim(name) => (Some(name.key()), &[][..]),
            Op::Release(given) => (None, given.as_slice()),
            Op::MoveStart { identity, .. }
            | Op::MoveDone { identity, .. }
            | Op::MoveCancel { identity, .. }
            | Op::MoveGiveUp { identity, .. } => {
                (Some(NameKey::Identity(identity.clone())), &[][..])
            }
        };
        one.into_iter().chain(given.iter().map(|g| g.name.key()))
    }

    /// Whether the request gives a name back: a later claim of that name
    /// from the same server waits for its answer, so that the leader sees
    /// the two in order.
    pub(super) fn gives_back(&self) -> bool {
        matches!(self, Op::Release(_) | Op::MoveGiveUp { .. })
    }

    /// New names and moves wait until the leader knows every live server's
    /// holdings; releases and cancels only ever free things and never wait.
    pub(super) fn waits_for_sync(&self) -> bool {
        matches!(
            self,
            Op::Claim(_) | Op::MoveStart { .. } | Op::MoveDone { .. }
        )
    }
}

/// Identifies one request of one asker, and tells the leader which answers it
/// may forget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The asker's incarnation; must grow across restarts (boot time in ms).
    pub incarnation: u64,
    /// The request id, increasing per incarnation.
    pub id: u64,
    /// Every request of this incarnation below this id is settled at the
    /// asker and will never be sent again.
    pub resolved_below: u64,
}

/// The leader's decision on a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Done; for claims and `MoveDone`, the stamp of the asker's new holding.
    Granted {
        /// The holding's stamp (meaningless for releases).
        stamp: Stamp,
    },
    /// Not done, and why.
    Refused {
        /// Why.
        reason: Refusal,
    },
}

/// Why a request was refused; `Display` is the operator-facing reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The name does not match `^[A-Za-z][A-Za-z0-9]{2,15}$`, or a server id is wrong.
    #[error("invalid name")]
    Invalid,
    /// Somebody in the cluster holds the name.
    #[error("name already taken")]
    Taken,
    /// The deciding server does not see a majority of the configured servers.
    #[error("no majority: {reachable} of {configured} servers reachable")]
    NoMajority {
        /// Servers it can reach, itself included.
        reachable: u32,
        /// Servers in the config.
        configured: u32,
    },
    /// No leader was known or reachable within the claim timeout.
    #[error("no leader reachable")]
    NoLeader,
    /// A leader was known but did not answer within the claim timeout.
    #[error("the leader did not answer in time")]
    LeaderTimeout,
    /// Too many requests in flight; try again.
    #[error("too many requests in flight")]
    Busy,
    /// The asking server does not hold that identity (or it is moving).
    #[error("this server does not hold that identity")]
    NotOwner,
    /// The identity is already moving to another server.
    #[error("identity is already moving")]
    AlreadyMoving,
    /// `movejoin` for an identity that is not moving to this server.
    #[error("identity is not moving to this server")]
    NotMoving,
    /// `movejoin` whose token (or, without one, source address) is not the
    /// moving client's: somebody else's attempt to take the identity.
    #[error("movejoin token or source address does not match the move")]
    WrongMoveProof,
    /// The room's owner already owns a room.
    #[error("the owner already owns a room")]
    OwnerHasRoom,
    /// The room's owner is not a client of the asking server.
    #[error("the owner is not a client of this server")]
    OwnerNotHere,
    /// The target of a move is down.
    #[error("target server is not reachable")]
    TargetDown,
    /// The leader considers the asking server down.
    #[error("the leader considers this server down")]
    AskerDown,
    /// The asking server still hears a server whose names the leader freed
    /// (a majority found it down): that server may still be serving the
    /// clients of those names, and no name is held twice on servers that
    /// talk. Answered until the two agree again.
    #[error(
        "this server still hears {server}, which the leader counts as down with its names freed; new names wait until the two agree"
    )]
    HearsDownServer {
        /// The server the leader freed and the asker still hears.
        server: ServerId,
    },
    /// The chat layer released the name while its claim was in flight.
    #[error("request cancelled")]
    Cancelled,
}

/// One change of the registry, as announced by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// An identity was registered, re-homed, or started/stopped moving.
    SetIdentity(IdentityEntry),
    /// An identity was freed.
    RemoveIdentity {
        /// The identity.
        identity: String,
        /// The stamp of the removed holding.
        stamp: Stamp,
    },
    /// A room was registered.
    SetRoom(RoomEntry),
    /// A room was freed.
    RemoveRoom {
        /// The room id.
        room: String,
        /// The stamp of the removed holding.
        stamp: Stamp,
    },
    /// A server was declared down: everything it held is free.
    PurgeServer {
        /// The server.
        server: ServerId,
    },
}

/// What a server holds and what it is waiting for, sent to the leader.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldingsReport {
    /// The sender's incarnation.
    pub incarnation: u64,
    /// Increases with every report of this incarnation: the leader ignores
    /// a report older than one it already merged (they can overtake each
    /// other on the network).
    pub version: u64,
    /// The sender's next request id when it made this report: the leader
    /// discards a report older than a request it has already processed.
    pub issued_below: u64,
    /// Identities whose clients are connected to the sender (or moving away).
    pub identities: Vec<IdentityEntry>,
    /// Rooms the sender hosts.
    pub rooms: Vec<RoomEntry>,
    /// Names the sender has asked for and not heard back about: the leader
    /// must not drop them from its registry just because they are not held yet.
    pub pending: Vec<Name>,
    /// Where the sender's replica stands: the leader it last applied an
    /// announcement or snapshot of, and that announcement's number. A new
    /// leader takes the replica of the most advanced report of its quorum
    /// as the base of its registry (see the module docs).
    pub position: Position,
    /// The sender's replica: every other server's identities, as of `position`.
    pub replica_identities: Vec<IdentityEntry>,
    /// The sender's replica: every other server's rooms, as of `position`.
    pub replica_rooms: Vec<RoomEntry>,
    /// Servers the sender's failure detector sees down: a leader frees a
    /// server's names only when a majority, and every live server, sees it down.
    pub down: Vec<ServerId>,
    /// How long ago the sender first saw each open move it knows of. A new
    /// leader times a move it takes over from the earliest of these, so no
    /// leader change (not even to a server that just restarted and never
    /// saw the move) gives a move a new lease.
    pub move_ages: Vec<MoveAge>,
}

/// How long ago a server first saw a move (announced, or in a snapshot), or
/// how long ago it dates it from (its route, as far as it knows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveAge {
    /// The identity moving.
    pub identity: String,
    /// The move's proof: an age is about this move, not an earlier one of
    /// the same identity.
    pub proof: MoveProof,
    /// Milliseconds since the sender first saw it.
    pub age_ms: u64,
}

/// How far a replica has come: the epoch (term, rank) of the leader whose
/// announcements it applied, then the number of the last one applied.
/// Ordered: a later leader's state includes everything an earlier one
/// committed.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    /// The leader's term.
    pub term: u64,
    /// The leader's election rank (position in the configured list).
    pub rank: u64,
    /// Last announcement applied (a snapshot counts as its number).
    pub seq: u64,
}

/// A registry message between servers. Every message carries the sender's
/// term; the transport supplies the (authenticated) sender id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistryMessage {
    /// Asker -> leader: please decide this (claim, release, move).
    Request {
        /// Sender's term.
        term: u64,
        /// Request identity.
        ticket: Ticket,
        /// What to do.
        op: Op,
        /// The servers the sender sees down as it sends this: the leader's
        /// view of what the asker hears is never older than its request
        /// (see [`Refusal::HearsDownServer`]).
        down: Vec<ServerId>,
    },
    /// Leader -> asker: the decision on a request.
    Answer {
        /// Sender's term.
        term: u64,
        /// Incarnation of the asker the request came from.
        incarnation: u64,
        /// Request id.
        id: u64,
        /// The leader's last announcement number when it decided: the
        /// decision's effects are in announcements up to this one. Orders
        /// the answer against announcements that travel separately.
        seq: u64,
        /// The decision.
        verdict: Verdict,
    },
    /// Leader -> every other server: changes, numbered per term.
    Announce {
        /// Sender's term.
        term: u64,
        /// One more than the previous announcement of this term.
        seq: u64,
        /// The changes, to apply in order.
        changes: Vec<Change>,
    },
    /// Leader -> one server: the whole registry as of announcement `seq`.
    Snapshot {
        /// Sender's term.
        term: u64,
        /// The announcement it includes up to.
        seq: u64,
        /// Every registered identity.
        identities: Vec<IdentityEntry>,
        /// Every registered room.
        rooms: Vec<RoomEntry>,
        /// How long ago the leader dates each open move from: a server
        /// that just restarted times a move as the leader does, not from
        /// when it first heard of it (a restart of every server in turn
        /// kept a move nobody finished open for as long as it went on).
        move_ages: Vec<MoveAge>,
    },
    /// Leader -> server: send me your holdings.
    HoldingsRequest {
        /// Sender's term.
        term: u64,
    },
    /// Server -> leader: my holdings (asked for, or unasked to re-register).
    Holdings {
        /// Sender's term.
        term: u64,
        /// The holdings.
        report: HoldingsReport,
    },
    /// Leader -> server: these holdings of yours lost to another holder.
    Evict {
        /// Sender's term.
        term: u64,
        /// The leader's last announcement number when it decided.
        seq: u64,
        /// Identities to drop (their clients are disconnected).
        identities: Vec<IdentityEntry>,
        /// Rooms to drop (deleted, members to the main hall).
        rooms: Vec<RoomEntry>,
    },
    /// Server -> leader: every announcement of this term up to `seq` is
    /// applied here (a snapshot counts as its number). The leader answers a
    /// request only once a majority of the configured servers acknowledged
    /// the announcement it was decided at.
    Ack {
        /// The leader's term (sent only to the leader this server follows).
        term: u64,
        /// Last announcement applied, in order.
        seq: u64,
    },
    /// Server -> leader: the servers this server's failure detector sees
    /// down, sent whenever that changes.
    Liveness {
        /// The leader's term.
        term: u64,
        /// Configured servers seen down.
        down: Vec<ServerId>,
    },
}

impl RegistryMessage {
    /// The sender's term.
    pub fn term(&self) -> u64 {
        match self {
            RegistryMessage::Request { term, .. }
            | RegistryMessage::Answer { term, .. }
            | RegistryMessage::Announce { term, .. }
            | RegistryMessage::Snapshot { term, .. }
            | RegistryMessage::HoldingsRequest { term }
            | RegistryMessage::Holdings { term, .. }
            | RegistryMessage::Evict { term, .. }
            | RegistryMessage::Ack { term, .. }
            | RegistryMessage::Liveness { term, .. } => *term,
        }
    }
}

/// A request from this server's chat layer. Every one gets exactly one
/// [`Action::Reply`] with its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalRequest {
    /// `newidentity` / `createroom`: claim a new name.
    Claim(Name),
    /// `quit`, disconnect, `deleteroom`, or a room deleted with its owner:
    /// the names are dropped at once and the reply is immediate. A leaving
    /// client's identity and its room go together, in one request to the
    /// leader.
    Release(Vec<Name>),
    /// `joinroom` to a room on server `to`: reserve the identity for the move.
    /// Send the client `route` only after this is granted.
    StartMove {
        /// The moving client.
        identity: String,
        /// The room's server.
        to: ServerId,
        /// The token sent in `route` and the client's address here.
        proof: MoveProof,
    },
    /// `movejoin` arrived here: take over the identity if it is moving here
    /// and the arrival proves it is the moving client ([`Arrival::proves`]).
    AcceptMove {
        /// The arriving client.
        identity: String,
        /// What its `movejoin` showed.
        arrival: Arrival,
    },
    /// `quit` on the connection a client was routed away from, before it
    /// arrived: free the identity if it is still on the move `proof` names.
    GiveUpMove {
        /// The client that quit.
        identity: String,
        /// The move's token and the client's address here.
        proof: MoveProof,
    },
}

/// Timers the registry asks its runtime for. None is ever cancelled; each one
/// re-checks its deadline when it fires.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Timer {
    /// Send unanswered requests and sync requests again.
    Retry,
    /// Give up on one request.
    RequestDeadline {
        /// Its id.
        id: u64,
    },
    /// Leader: release a move that never arrived.
    MoveExpiry {
        /// The moving identity.
        identity: String,
    },
    /// An arrival granted with nobody waiting was not taken in time.
    Unclaimed {
        /// The identity.
        identity: String,
    },
    /// Leader: stop waiting for holdings of silent servers.
    SyncDeadline,
    /// Leader: stop waiting for slow followers to apply committed grants
    /// before answering them.
    HeldAnswers,
    /// An arrival parked behind a claim of its identity is out of time
    /// (handled after every input: nothing to do but wake up).
    ParkedDeadline,
}

/// An input to [`Registry::handle`](super::Registry::handle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A message from a peer (or from this server to itself: never needed,
    /// the registry loops those back internally).
    Message {
        /// Authenticated sender.
        from: ServerId,
        /// The message.
        msg: RegistryMessage,
    },
    /// A request from the chat layer.
    Local {
        /// Echoed in the [`Action::Reply`].
        token: u64,
        /// The request.
        request: LocalRequest,
    },
    /// The failure detector heard from a peer (initially every peer is down).
    PeerUp(ServerId),
    /// The failure detector declared a peer down.
    PeerDown(ServerId),
    /// The election settled on a leader (its `LeaderElected`), or lost it
    /// (`LeaderLost`: `leader` is `None`, `term` the lost leader's).
    LeaderChanged {
        /// The leader.
        leader: Option<ServerId>,
        /// Its term.
        term: u64,
    },
    /// Messages to or from this peer may have been lost although the
    /// failure detector saw no gap (a mesh link was replaced): whatever is
    /// unacknowledged between the two is sent again at once.
    LinkReset(ServerId),
    /// A timer set with [`Action::SetTimer`] fired.
    Timer(Timer),
}

/// Log events with stable names, for the runtime's `tracing` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// `claim_granted`: the leader granted a new name.
    ClaimGranted {
        /// The asker.
        asker: ServerId,
        /// The name.
        name: Name,
    },
    /// `claim_denied`: the leader refused a new name.
    ClaimDenied {
        /// The asker.
        asker: ServerId,
        /// The name.
        name: Name,
        /// Why.
        reason: Refusal,
    },
    /// `server_purged`: the leader freed everything a down server held.
    ServerPurged {
        /// The server.
        server: ServerId,
        /// Identities freed.
        identities: usize,
        /// Rooms freed.
        rooms: usize,
    },
    /// `move_expired`: a moving identity never arrived and was freed.
    MoveExpired {
        /// The identity.
        identity: String,
        /// Where it was.
        from: ServerId,
        /// Where it was going.
        to: ServerId,
    },
    /// `move_reverted`: a move granted by an earlier leader ended unfinished
    /// before its origin heard of it; the identity stays there.
    MoveReverted {
        /// The identity.
        identity: String,
        /// Where it stays.
        from: ServerId,
        /// Where it was going.
        to: ServerId,
    },
    /// `names_evicted`: this server lost names to another holder after a heal.
    Evicted {
        /// Identities lost.
        identities: Vec<String>,
        /// Rooms lost.
        rooms: Vec<String>,
    },
}

/// What the runtime must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send a message to one peer.
    Send {
        /// The peer.
        to: ServerId,
        /// The message.
        msg: RegistryMessage,
    },
    /// Send a message to every other configured server it can reach.
    Broadcast {
        /// The message.
        msg: RegistryMessage,
    },
    /// Answer a [`Input::Local`] request.
    Reply {
        /// The request's token.
        token: u64,
        /// `Ok` if granted.
        result: Result<(), Refusal>,
    },
    /// Fire `timer` after `after`.
    SetTimer {
        /// Which timer.
        timer: Timer,
        /// Delay from now.
        after: Duration,
    },
    /// These names are no longer this server's: disconnect those clients,
    /// delete those rooms (members to the main hall). They are already gone
    /// from the registry; releasing them again is harmless but unneeded.
    EvictLocal {
        /// Clients to disconnect.
        identities: Vec<String>,
        /// Rooms to delete.
        rooms: Vec<String>,
    },
    /// Write a log line.
    Log(LogEvent),
}

/// Where a room lives, for the chat layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomInfo {
    /// The hosting server.
    pub server: ServerId,
    /// The owner (`""` for a main hall).
    pub owner: String,
}

/// Rooms whose answer from [`Registry::room`](super::Registry::room) may have changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomChanges {
    /// Just these (main halls never: they follow liveness, which is `All`).
    Rooms(Vec<String>),
    /// Any room, main halls included.
    All,
}

/// Sizes, for `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegistryCounts {
    /// Identities in this server's view of the cluster.
    pub identities: usize,
    /// Rooms in this server's view, main halls excluded.
    pub rooms: usize,
    /// Identities this server holds.
    pub own_identities: usize,
    /// Rooms this server hosts.
    pub own_rooms: usize,
    /// Requests waiting for the leader.
    pub pending: usize,
}
