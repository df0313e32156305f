//! Chat on one server: its rooms, the sessions in them, and the fan-out of
//! events, exactly as `shared/PROTOCOL.md` orders them.
//!
//! All room state of a server sits behind one lock, and every event a request
//! causes is queued to its recipients' outboxes while that lock is held, so all
//! clients see events in one consistent order. Queuing never blocks (see
//! [`Outbox`]), so a slow client cannot stall the lock, and it is cheap: an
//! event is encoded once into one [`Bytes`] that every recipient's queue
//! shares, and the many moves of a room's deletion go out as one block of
//! lines, so even a room of thousands costs one pointer per recipient while
//! the lock is held, never a line per pair of members.
//!
//! Nothing here runs on the cluster's thread: evictions the cluster task
//! orders are queued ([`ChatServer::evict`]) and carried out by the chat
//! side's own task ([`ChatServer::background`]).
//!
//! A fan-out to a crowd (more than `WAKE_AT_ONCE` recipients) queues its
//! lines under the lock but wakes the recipients' writers afterwards, in
//! paced batches, so that thousands of writers never flood the scheduler
//! ahead of every other client's request; each big write also waits for one
//! of a few turns ([`WriteTurns`]).
//!
//! Names that must be unique cluster-wide go through a [`Directory`]: the
//! cluster's registry, which asks the leader.

mod directory;
mod outbox;
mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub use directory::{BoxFuture, Directory, RemoteRoom};
pub use outbox::{Outbox, OutboxBudget, Overflow, WriteTurns, WriterEnd};
pub(crate) use session::Logged;
pub use session::{SessionEnd, Transport, run_session, run_session_on};

use crate::ServerId;
use crate::client_proto::{Approved, ServerMessage};
use crate::config::Limits;
use crate::journal::{NameJournal, NameKind};
use crate::logging::LogBudget;

/// One server's chat state and the operations of the client protocol on it.
pub struct ChatServer {
    id: ServerId,
    main_hall: String,
    limits: Limits,
    directory: Arc<dyn Directory>,
    /// Where holds and releases of names are recorded (tests).
    journal: Option<NameJournal>,
    state: Mutex<Rooms>,
    /// Evictions ordered by the cluster task, for [`ChatServer::background`].
    evict_tx: mpsc::UnboundedSender<Eviction>,
    evict_rx: Mutex<Option<mpsc::UnboundedReceiver<Eviction>>>,
    /// Outboxes to wake in paced batches, for [`ChatServer::background`].
    wake_tx: mpsc::UnboundedSender<Vec<Arc<Outbox>>>,
    wake_rx: Mutex<Option<mpsc::UnboundedReceiver<Vec<Arc<Outbox>>>>>,
    /// Whether the background task paces wake-ups (else they happen at once).
    paced_wakes: AtomicBool,
    /// Turns for big writes, shared by every session's writer.
    write_turns: WriteTurns,
    /// The memory every session's outbox may hold together.
    outbox_budget: Arc<OutboxBudget>,
    /// The lines of refused `newidentity`s (one per connection).
    pub(crate) identity_refusals: LogBudget,
    /// The lines of refused `movejoin`s (one per connection): apart from
    /// the next, so that a flood of idle connections does not hide them.
    pub(crate) movejoin_refusals: LogBudget,
    /// The other lines a connection may cause whatever its client does (a
    /// handshake timeout, an odd `movejoin`, a line too long, a reset, a
    /// bad WebSocket frame): a flood of short connections logs at most these
    /// a second, the rest counted into the next line (`left_out`).
    pub(crate) connection_lines: Arc<LogBudget>,
}

/// Names this server lost to another holder, to be let go of.
struct Eviction {
    identities: Vec<String>,
    rooms: Vec<String>,
}

/// Sizes for `/status` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChatCounts {
    /// Identified clients on this server.
    pub sessions: usize,
    /// Rooms on this server, main hall included.
    pub rooms: usize,
}

struct Room {
    owner: String,
    /// In join order, which is the order `who` lists them.
    members: Vec<String>,
}

struct Member {
    room: String,
    owns: Option<String>,
    outbox: Arc<Outbox>,
}

struct Rooms {
    rooms: HashMap<String, Room>,
    members: HashMap<String, Member>,
    /// The budget of the members' outboxes (the server's).
    budget: Arc<OutboxBudget>,
    /// Outboxes given lines by a crowd-sized fan-out but not yet told: they
    /// are woken in paced batches once the lock is released (see [`Locked`]).
    unwoken: Vec<Arc<Outbox>>,
}

/// A fan-out to more recipients than this wakes their writers in paced
/// batches instead of all at once.
///
/// Waking thousands of writer tasks in one go fills the scheduler's queues
/// with them; every other task woken meanwhile (the request of a client in
/// another room) then waits behind all of them. In batches, the queue stays
/// short: each batch is served before the next is woken.
const WAKE_AT_ONCE: usize = 32;

/// Lines a second of one kind of refusal a flood of connections causes
/// (refused `newidentity`s; the leader's `claim_denied`s); the rest are
/// counted into the next line logged.
pub const REFUSALS_LOGGED_PER_SECOND: u32 = 20;

/// Queues `line` for each of `identities`, its bytes charged to the budget
/// once ([`OutboxBudget::share`]); when `paced`, without waking their
/// writers, which are left in `unwoken`.
fn queue_for_each<'a>(
    (members, budget): (&HashMap<String, Member>, &Arc<OutboxBudget>),
    unwoken: &mut Vec<Arc<Outbox>>,
    identities: impl Iterator<Item = &'a String>,
    line: &Bytes,
    paced: bool,
) {
    let line = budget.share(line.clone());
    for identity in identities {
        let Some(member) = members.get(identity) else {
            continue;
        };
        if !paced {
            member.outbox.push_shared(&line);
        } else if member.outbox.push_unwoken(&line) {
            unwoken.push(member.outbox.clone());
        }
        outbox::note_if_congested(&member.outbox);
    }
}

/// The room state, locked. Unlocking hands the outboxes a fan-out left
/// unwoken to the paced waker (or wakes them at once if none runs).
struct Locked<'a> {
    state: MutexGuard<'a, Rooms>,
    chat: &'a ChatServer,
}

impl std::ops::Deref for Locked<'_> {
    type Target = Rooms;
    fn deref(&self) -> &Rooms {
        &self.state
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Rooms {
        &mut self.state
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if self.state.unwoken.is_empty() {
            return;
        }
        let unwoken = std::mem::take(&mut self.state.unwoken);
        if self.chat.paced_wakes.load(Ordering::Acquire) {
            // Fails only once the background task is gone (shutting down).
            let _ = self.chat.wake_tx.send(unwoken);
        } else {
            for outbox in unwoken {
                outbox.wake();
            }
        }
    }
}

/// Takes a queue's receiving end out of its slot (once).
fn take_queue<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// What a `joinroom` led to.
pub enum JoinOutcome {
    /// Joined a room of this server, or refused: events are queued.
    Done,
    /// The room is on another server and the client may go: reserve the move
    /// in the directory, then [`ChatServer::move_out`] (or
    /// [`ChatServer::refuse_join`] if the directory says no).
    Remote(RemoteRoom),
}

impl Rooms {
    fn send(&self, identity: &str, line: &Bytes) {
        if let Some(member) = self.members.get(identity) {
            member.outbox.push(line.clone());
            outbox::note_if_congested(&member.outbox);
        }
    }

    /// Sends to every member of `room` but `except`.
    fn broadcast(&mut self, room: &str, line: &Bytes, except: Option<&str>) {
        let Rooms {
            rooms,
            members,
            budget,
            unwoken,
        } = self;
        let Some(room) = rooms.get(room) else {
            return;
        };
        let paced = room.members.len() > WAKE_AT_ONCE;
        let recipients = room.members.iter().filter(|m| Some(m.as_str()) != except);
        queue_for_each((members, budget), unwoken, recipients, line, paced);
    }

    /// Sends to every one of `identities` but `except`.
    fn send_to_all(&mut self, identities: &[String], line: &Bytes, except: Option<&str>) {
        let paced = identities.len() > WAKE_AT_ONCE;
        let recipients = identities.iter().filter(|m| Some(m.as_str()) != except);
        let members = (&self.members, &self.budget);
        queue_for_each(members, &mut self.unwoken, recipients, line, paced);
    }

    fn remove_from_room(&mut self, room: &str, identity: &str) {
        if let Some(room) = self.rooms.get_mut(room) {
            room.members.retain(|m| m != identity);
        }
    }

    fn add_to_room(&mut self, room: &str, identity: &str) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.members.push(identity.to_owned());
        }
        if let Some(member) = self.members.get_mut(identity) {
            member.room = room.to_owned();
        }
    }
}

impl ChatServer {
    /// A server with only its main hall, recording holds and releases of
    /// names in `journal` if given.
    pub fn new(
        id: ServerId,
        limits: Limits,
        directory: Arc<dyn Directory>,
        journal: Option<NameJournal>,
    ) -> Arc<Self> {
        let main_hall = crate::config::main_hall_of(&id);
        let mut rooms = HashMap::new();
        rooms.insert(
            main_hall.clone(),
            Room {
                owner: String::new(),
                members: Vec::new(),
            },
        );
        let (evict_tx, evict_rx) = mpsc::unbounded_channel();
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        let outbox_budget = OutboxBudget::new(limits.outbox_total_bytes);
        Arc::new(ChatServer {
            id,
            main_hall,
            limits,
            directory,
            journal,
            state: Mutex::new(Rooms {
                rooms,
                members: HashMap::new(),
                budget: outbox_budget.clone(),
                unwoken: Vec::new(),
            }),
            evict_tx,
            evict_rx: Mutex::new(Some(evict_rx)),
            wake_tx,
            wake_rx: Mutex::new(Some(wake_rx)),
            paced_wakes: AtomicBool::new(false),
            write_turns: WriteTurns::new(),
            outbox_budget,
            identity_refusals: LogBudget::new(REFUSALS_LOGGED_PER_SECOND),
            movejoin_refusals: LogBudget::new(REFUSALS_LOGGED_PER_SECOND),
            connection_lines: Arc::new(LogBudget::new(REFUSALS_LOGGED_PER_SECOND)),
        })
    }

    /// This server's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// This server's main hall.
    pub fn main_hall(&self) -> &str {
        &self.main_hall
    }

    /// The per-client limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The budget every session's outbox is charged to.
    pub fn outbox_budget(&self) -> &Arc<OutboxBudget> {
        &self.outbox_budget
    }

    /// The cluster-wide name directory.
    pub fn directory(&self) -> &Arc<dyn Directory> {
        &self.directory
    }

    /// Current sizes.
    pub fn counts(&self) -> ChatCounts {
        let state = self.lock();
        ChatCounts {
            sessions: state.members.len(),
            rooms: state.rooms.len(),
        }
    }

    /// Notes that this server now holds (`held`) or no longer holds a name.
    /// Called with the state lock held, so the journal orders this server's
    /// changes as the lock did.
    fn record(&self, kind: NameKind, name: &str, held: bool) {
        debug!(server = %self.id, %kind, %name, held, "name_holding");
        if let Some(journal) = &self.journal {
            journal.record(&self.id, kind, name, held);
        }
    }

    fn lock(&self) -> Locked<'_> {
        // Every mutation below leaves the maps consistent at each step that can
        // panic (none should), so a poisoned lock is still usable.
        Locked {
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()),
            chat: self,
        }
    }

    /// Puts a client whose identity is already claimed into `room` (or the main
    /// hall if that room is not here), queueing `reply` to it first, then
    /// `roomchange(identity, former, room)` to the room, the newcomer included.
    /// Returns false if the identity already has a session here.
    pub fn enter(
        &self,
        identity: &str,
        outbox: Arc<Outbox>,
        reply: Bytes,
        former: &str,
        room: Option<&str>,
    ) -> bool {
        let mut state = self.lock();
        if state.members.contains_key(identity) {
            return false;
        }
        self.record(NameKind::Identity, identity, true);
        let room = match room {
            Some(r) if state.rooms.contains_key(r) => r.to_owned(),
            _ => self.main_hall.clone(),
        };
        outbox.push(reply);
        state.members.insert(
            identity.to_owned(),
            Member {
                room: room.clone(),
                owns: None,
                outbox,
            },
        );
        state.add_to_room(&room, identity);
        let event = ServerMessage::room_change(identity, former, &room).encode();
        state.broadcast(&room, &event, None);
        true
    }

    /// Answers `who`.
    pub fn who(&self, identity: &str) {
        let state = self.lock();
        let Some(member) = state.members.get(identity) else {
            return;
        };
        let Some(room) = state.rooms.get(&member.room) else {
            return;
        };
        let reply = ServerMessage::RoomContents {
            roomid: member.room.clone(),
            identities: room.members.clone(),
            owner: room.owner.clone(),
        };
        member.outbox.push(reply.encode());
    }

    /// Answers `list` straight into the asker's outbox: every room of the
    /// cluster, main halls first.
    ///
    /// Rooms of other servers come from the directory. This server's own
    /// rooms come from its own state: the directory hears of them through the
    /// cluster task a moment later, and a client must see the room it just
    /// made, and not the one it just deleted.
    pub fn list(&self, outbox: &Outbox) {
        let (mut halls, mut rooms): (Vec<String>, Vec<String>) = self
            .directory
            .rooms()
            .into_iter()
            .filter(|room| *room == self.main_hall || self.directory.remote_room(room).is_some())
            .partition(|room| room.starts_with(crate::config::MAIN_HALL_PREFIX));
        rooms.extend(
            self.lock()
                .rooms
                .keys()
                .filter(|room| **room != self.main_hall)
                .cloned(),
        );
        rooms.sort_unstable();
        rooms.dedup();
        halls.append(&mut rooms);
        outbox.push(ServerMessage::RoomList { rooms: halls }.encode());
    }

    /// Whether this client may ask for a new room at all (it owns none yet).
    pub fn owns_room(&self, identity: &str) -> bool {
        self.lock()
            .members
            .get(identity)
            .is_some_and(|m| m.owns.is_some())
    }

    /// Whether a room of this name exists on this server.
    pub fn has_room(&self, room: &str) -> bool {
        self.lock().rooms.contains_key(room)
    }

    /// Creates `room`, whose id the directory has granted, owned by `identity`,
    /// and moves the owner in: reply, then roomchange to the owner, then to the
    /// members left in the former room.
    pub fn create_room(&self, identity: &str, room: &str) {
        let mut state = self.lock();
        if !state.members.contains_key(identity) {
            drop(state);
            // Nobody to answer: the release goes on unwatched.
            drop(self.directory.release_room(room));
            return;
        }
        // Still here while its owner's leaving or deletion waits for the
        // cluster (which has let the id go already): this grant lost.
        if state.rooms.contains_key(room) {
            state.send(
                identity,
                &ServerMessage::CreateRoom {
                    roomid: room.to_owned(),
                    approved: Approved(false),
                }
                .encode(),
            );
            drop(state);
            drop(self.directory.release_room(room));
            return;
        }
        let Some(member) = state.members.get_mut(identity) else {
            return;
        };
        member.owns = Some(room.to_owned());
        let former = member.room.clone();
        self.record(NameKind::Room, room, true);
        state.rooms.insert(
            room.to_owned(),
            Room {
                owner: identity.to_owned(),
                members: Vec::new(),
            },
        );
        state.remove_from_room(&former, identity);
        state.add_to_room(room, identity);
        let reply = ServerMessage::CreateRoom {
            roomid: room.to_owned(),
            approved: Approved(true),
        };
        let event = ServerMessage::room_change(identity, &former, room).encode();
        state.send(identity, &reply.encode());
        state.send(identity, &event);
        state.broadcast(&former, &event, None);
    }

    /// Answers `joinroom`.
    pub fn join_room(&self, identity: &str, room: &str) -> JoinOutcome {
        let mut state = self.lock();
        let Some(member) = state.members.get(identity) else {
            return JoinOutcome::Done;
        };
        let former = member.room.clone();
        let owns_current = member.owns.as_deref() == Some(former.as_str());
        let refuse = |state: &Rooms| {
            // roomchange(I, "", "") would tell the client it quit: a join
            // of no room is refused with the room it is in.
            let shown = if room.is_empty() { &former } else { room };
            let event = ServerMessage::room_change(identity, shown, shown).encode();
            state.send(identity, &event);
            JoinOutcome::Done
        };
        if former == room || owns_current {
            return refuse(&state);
        }
        let event = ServerMessage::room_change(identity, &former, room).encode();
        if state.rooms.contains_key(room) {
            state.remove_from_room(&former, identity);
            state.add_to_room(room, identity);
            state.broadcast(&former, &event, None);
            state.broadcast(room, &event, None);
            return JoinOutcome::Done;
        }
        match self.directory.remote_room(room) {
            Some(remote) => JoinOutcome::Remote(remote),
            None => refuse(&state),
        }
    }

    /// A refused `joinroom`: `roomchange(identity, room, room)` to the client only.
    pub fn refuse_join(&self, identity: &str, room: &str) {
        let event = ServerMessage::room_change(identity, room, room).encode();
        self.lock().send(identity, &event);
    }

    /// Sends the client `route` to `remote` with the move's `token` and takes
    /// it out of this server: `roomchange(identity, former, room)` goes to
    /// the room it leaves. Its identity stays held (moving) in the directory.
    pub fn move_out(&self, identity: &str, room: &str, remote: &RemoteRoom, token: &str) {
        let mut state = self.lock();
        let Some(member) = state.members.get(identity) else {
            return;
        };
        let former = member.room.clone();
        // Released before `route` is queued: from then on the client may
        // arrive at the other server and be held there.
        self.record(NameKind::Identity, identity, false);
        let route = ServerMessage::Route {
            roomid: room.to_owned(),
            host: remote.host.clone(),
            port: remote.port.to_string(),
            token: Some(token.to_owned()),
        };
        state.send(identity, &route.encode());
        state.remove_from_room(&former, identity);
        state.members.remove(identity);
        let event = ServerMessage::room_change(identity, &former, room).encode();
        state.broadcast(&former, &event, None);
    }

    /// Names this server lost to another holder (a partition healed): the
    /// clients holding those identities are told and disconnected, those rooms
    /// are deleted (members to the main hall). Nothing is released: the names
    /// belong to someone else now.
    ///
    /// Only queues the eviction and returns at once: the cluster task calls
    /// this on its own thread, which must never wait for the room lock. The
    /// task that [`ChatServer::background`] returns carries it out, in order.
    pub fn evict(&self, identities: &[String], rooms: &[String]) {
        // Fails only once the eviction task is gone (the server is stopping
        // and its sessions are closing anyway).
        let _ = self.evict_tx.send(Eviction {
            identities: identities.to_vec(),
            rooms: rooms.to_vec(),
        });
    }

    /// The chat side's background task, to run on the chat side's runtime
    /// until `shutdown` (or until the server is gone): it carries out queued
    /// evictions in order, and wakes the writers of crowd-sized fan-outs in
    /// paced batches (until it runs, they are woken at once). Only the first
    /// call gets the work; later ones return a task that ends at once.
    pub fn background(
        self: &Arc<Self>,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let evictions = take_queue(&self.evict_rx);
        let wakes = take_queue(&self.wake_rx);
        if wakes.is_some() {
            self.paced_wakes.store(true, Ordering::Release);
        }
        // Weak: the queues' senders live in the server, so the task must not
        // keep the server alive.
        let chat: Weak<ChatServer> = Arc::downgrade(self);
        async move {
            let (Some(mut evictions), Some(mut wakes)) = (evictions, wakes) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    Some(eviction) = evictions.recv() => {
                        let Some(chat) = chat.upgrade() else { return };
                        chat.evict_now(&eviction.identities, &eviction.rooms);
                    }
                    Some(unwoken) = wakes.recv() => {
                        for batch in unwoken.chunks(WAKE_AT_ONCE) {
                            for outbox in batch {
                                outbox.wake();
                            }
                            // Let this batch's writers (and everyone else)
                            // run before the next batch joins the queue.
                            tokio::task::yield_now().await;
                        }
                    }
                    else => return,
                }
            }
        }
    }

    /// Carries out an eviction now (see [`ChatServer::evict`]).
    fn evict_now(&self, identities: &[String], rooms: &[String]) {
        let mut state = self.lock();
        for room in rooms {
            if room != &self.main_hall {
                self.remove_room(&mut state, room, None);
            }
        }
        // Rooms of evicted owners that were not evicted themselves are freed.
        let mut orphaned = Vec::new();
        for identity in identities {
            let Some(owns) = state.members.get(identity).map(|m| m.owns.clone()) else {
                continue;
            };
            if let Some(room) = owns {
                self.remove_room(&mut state, &room, None);
                if !rooms.contains(&room) {
                    orphaned.push(room);
                }
            }
            let Some(member) = state.members.remove(identity) else {
                continue;
            };
            self.record(NameKind::Identity, identity, false);
            state.remove_from_room(&member.room, identity);
            let event = ServerMessage::room_change(identity, &member.room, "").encode();
            state.broadcast(&member.room, &event, None);
            let notice = format!(
                "identity {identity} is held by a client of another server (the network was split); disconnecting"
            );
            member.outbox.push(ServerMessage::error(notice).encode());
            member.outbox.finish();
        }
        drop(state);
        for room in orphaned {
            drop(self.directory.release_room(&room));
        }
    }

    /// Answers `deleteroom`. An approved deletion is answered, and the
    /// room's members moved, once the cluster has freed the id: a client
    /// told the room is gone may create it again anywhere at once.
    pub async fn delete_room(&self, identity: &str, room: &str) {
        let owns = |state: &Rooms| {
            state
                .rooms
                .get(room)
                .is_some_and(|r| r.owner == identity && !identity.is_empty())
        };
        let owned = owns(&self.lock());
        if owned {
            self.directory.release_room(room).await;
        }
        let mut state = self.lock();
        let reply = ServerMessage::DeleteRoom {
            roomid: room.to_owned(),
            approved: Approved(owned),
        };
        state.send(identity, &reply.encode());
        // Unless evicted meanwhile (its members were moved then, and the id
        // may be another's room now).
        if owned && owns(&state) {
            self.remove_room(&mut state, room, None);
        }
    }

    /// Moves every member of `room` to the main hall, announcing each move to
    /// the room's members and the main hall, and forgets the room.
    ///
    /// Everyone told gets the same lines in the same order (the moves in the
    /// room's join order), so they are encoded once into one block that every
    /// recipient's outbox shares: one push per recipient, not one per move.
    /// `gone`: a member whose connection is gone (an owner that dropped
    /// it), who is told nothing.
    fn remove_room(&self, state: &mut Rooms, room: &str, gone: Option<&str>) {
        let Some(removed) = state.rooms.remove(room) else {
            return;
        };
        self.record(NameKind::Room, room, false);
        if let Some(owner) = state.members.get_mut(&removed.owner) {
            owner.owns = None;
        }
        let hall = self.main_hall.as_str();
        let mut moves = Vec::with_capacity(removed.members.len() * 96);
        for moved in &removed.members {
            moves.extend_from_slice(&ServerMessage::room_change(moved, room, hall).encode());
        }
        let moves = Bytes::from(moves);
        // The hall as it was, then the room's members: together the audience
        // of every move.
        state.broadcast(hall, &moves, None);
        state.send_to_all(&removed.members, &moves, gone);
        for moved in &removed.members {
            state.add_to_room(hall, moved);
        }
    }

    /// Sends a chat line to every other member of the speaker's room.
    pub fn message(&self, identity: &str, content: String) {
        let mut state = self.lock();
        let Some(room) = state.members.get(identity).map(|m| m.room.clone()) else {
            return;
        };
        let line = ServerMessage::Message {
            identity: identity.to_owned(),
            content,
        }
        .encode();
        state.broadcast(&room, &line, Some(identity));
    }

    /// A client leaves for good (`quit` or a dropped connection): releases
    /// the identity and any room it owns in the directory, and once the
    /// cluster has freed them (so that whoever hears of the leaving may
    /// take the names at once), deletes its room, then sends
    /// `roomchange(identity, former, "")` to the former room and, when
    /// `tell_client`, to the client itself.
    pub async fn leave(&self, identity: &str, tell_client: bool) {
        let Some(owns) = self.lock().members.get(identity).map(|m| m.owns.clone()) else {
            return;
        };
        self.directory
            .release_identity(identity, owns.as_deref())
            .await;
        let mut state = self.lock();
        // Its session is here, waiting: only an eviction changed it meanwhile.
        let Some(owns) = state.members.get(identity).map(|m| m.owns.clone()) else {
            return;
        };
        // A member's `owns` and its room's owner change together (see
        // `create_room` and `remove_room`).
        if let Some(room) = &owns {
            let gone = (!tell_client).then_some(identity);
            self.remove_room(&mut state, room, gone);
        }
        let Some(member) = state.members.get(identity) else {
            return;
        };
        let former = member.room.clone();
        let event = ServerMessage::room_change(identity, &former, "").encode();
        state.remove_from_room(&former, identity);
        state.broadcast(&former, &event, None);
        if tell_client {
            state.send(identity, &event);
        }
        state.members.remove(identity);
        self.record(NameKind::Identity, identity, false);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio_util::sync::CancellationToken;

    use super::*;

    /// A directory that grants every claim and knows no other server; with
    /// a gate, a claim (of an identity or a room id) is granted only once the
    /// gate opens.
    #[derive(Default)]
    struct Grants {
        gate: Option<Arc<Gate>>,
        /// With one, a release is answered only once it is notified.
        release_gate: Option<Arc<tokio::sync::Notify>>,
    }

    /// What a test holds of a claim waiting in [`Grants`].
    #[derive(Default)]
    struct Gate {
        /// Notified when a claim comes to the gate.
        asked: tokio::sync::Notify,
        /// Notify to grant it.
        open: tokio::sync::Notify,
        /// Set when the claim's client was gone first: it gave the claim up.
        given_up: std::sync::atomic::AtomicBool,
    }

    impl Grants {
        /// A release's answer: at once, or when the release gate is notified.
        fn released(&self) -> BoxFuture<()> {
            let gate = self.release_gate.clone();
            Box::pin(async move {
                if let Some(gate) = gate {
                    gate.notified().await;
                }
            })
        }

        /// A claim: granted at once without a gate, else when the gate
        /// opens, or given up when its client is gone first.
        fn wait_at_gate(&self, client_gone: CancellationToken) -> BoxFuture<Result<(), String>> {
            let gate = self.gate.clone();
            Box::pin(async move {
                let Some(gate) = gate else { return Ok(()) };
                gate.asked.notify_one();
                tokio::select! {
                    () = gate.open.notified() => Ok(()),
                    () = client_gone.cancelled() => {
                        gate.given_up.store(true, std::sync::atomic::Ordering::SeqCst);
                        Err("the client hung up".to_owned())
                    }
                }
            })
        }
    }

    impl Directory for Grants {
        fn claim_identity(
            &self,
            _: &str,
            client_gone: CancellationToken,
        ) -> BoxFuture<Result<(), String>> {
            self.wait_at_gate(client_gone)
        }
        fn release_identity(&self, _: &str, _: Option<&str>) -> BoxFuture<()> {
            self.released()
        }
        fn claim_room(
            &self,
            _: &str,
            _: &str,
            client_gone: CancellationToken,
        ) -> BoxFuture<Result<(), String>> {
            self.wait_at_gate(client_gone)
        }
        fn release_room(&self, _: &str) -> BoxFuture<()> {
            self.released()
        }
        fn rooms(&self) -> Vec<String> {
            vec!["MainHall-s1".to_owned()]
        }
        fn remote_room(&self, _: &str) -> Option<RemoteRoom> {
            None
        }
        fn start_move(
            &self,
            _: &str,
            _: &RemoteRoom,
            _: &str,
            _: std::net::IpAddr,
            _: CancellationToken,
        ) -> BoxFuture<Result<(), String>> {
            Box::pin(async { Err("no other server".to_owned()) })
        }
        fn give_up_move(&self, _: &str, _: &str, _: std::net::IpAddr) -> BoxFuture<()> {
            Box::pin(async {})
        }
        fn accept_move(
            &self,
            _: &str,
            _: Option<&str>,
            _: std::net::IpAddr,
            _: CancellationToken,
        ) -> BoxFuture<Result<(), String>> {
            Box::pin(async { Err("no other server".to_owned()) })
        }
    }

    struct Client {
        name: String,
        outbox: Arc<Outbox>,
    }

    impl Client {
        /// Takes what is queued for this client.
        fn take(&self) -> Vec<Bytes> {
            let queued = self.outbox.queued();
            self.outbox.clear_for_test();
            queued
        }
    }

    fn server() -> Arc<ChatServer> {
        ChatServer::new(
            "s1".to_owned(),
            Limits::default(),
            Arc::new(Grants::default()),
            None,
        )
    }

    fn enter(chat: &ChatServer, name: &str) -> Client {
        let outbox = Arc::new(Outbox::new(Limits::default().outbox_bytes));
        assert!(chat.enter(name, outbox.clone(), Bytes::from_static(b"ok\n"), "", None));
        Client {
            name: name.to_owned(),
            outbox,
        }
    }

    fn room_change(identity: &str, former: &str, room: &str) -> Bytes {
        ServerMessage::room_change(identity, former, room).encode()
    }

    /// A room of `room` members (its owner first) and a hall of `hall` more.
    fn crowd(chat: &ChatServer, room: usize, hall: usize) -> (Vec<Client>, Vec<Client>) {
        let owner = enter(chat, "Owner");
        chat.create_room("Owner", "Crowded");
        let mut members = vec![owner];
        for i in 1..room {
            let member = enter(chat, &format!("Room{i}"));
            assert!(matches!(
                chat.join_room(&member.name, "Crowded"),
                JoinOutcome::Done
            ));
            members.push(member);
        }
        let hall: Vec<Client> = (0..hall)
            .map(|i| enter(chat, &format!("Hall{i}")))
            .collect();
        for client in members.iter().chain(&hall) {
            client.take();
        }
        (members, hall)
    }

    #[tokio::test]
    async fn deleting_a_crowded_room_queues_one_shared_block_per_recipient() {
        let chat = server();
        let (members, hall) = crowd(&chat, 2000, 2000);
        let started = Instant::now();
        chat.delete_room("Owner", "Crowded").await;
        let took = started.elapsed();
        println!("delete of a room of 2000 with 2000 in the hall held the lock {took:?}");

        let moves: Vec<u8> = members
            .iter()
            .flat_map(|m| room_change(&m.name, "Crowded", "MainHall-s1").to_vec())
            .collect();
        let owner = members[0].take();
        assert_eq!(owner.len(), 2, "the reply, then the moves");
        assert_eq!(
            owner[0],
            ServerMessage::DeleteRoom {
                roomid: "Crowded".to_owned(),
                approved: Approved(true),
            }
            .encode()
        );
        assert_eq!(owner[1], moves, "every move, in the room's join order");
        let block = owner[1].as_ptr();
        for client in members[1..].iter().chain(&hall) {
            let queued = client.take();
            assert_eq!(queued.len(), 1, "{}: one block", client.name);
            assert_eq!(
                queued[0].as_ptr(),
                block,
                "{}: the block is shared, not copied",
                client.name
            );
        }
        // Everyone is in the hall now, in the room's order after the hall's.
        let hall_members = chat.lock().rooms["MainHall-s1"].members.clone();
        let expected: Vec<&str> = hall
            .iter()
            .chain(&members)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(hall_members, expected);
        assert!(
            took < Duration::from_secs(1),
            "the delete held the room lock {took:?}"
        );
    }

    #[tokio::test]
    async fn the_quit_of_an_owner_shares_the_block_too() {
        let chat = server();
        let (members, hall) = crowd(&chat, 50, 50);
        chat.leave("Owner", false).await;
        let moves: Vec<u8> = members
            .iter()
            .flat_map(|m| room_change(&m.name, "Crowded", "MainHall-s1").to_vec())
            .collect();
        let gone = room_change("Owner", "MainHall-s1", "");
        for client in members[1..].iter().chain(&hall) {
            assert_eq!(
                client.take(),
                vec![Bytes::from(moves.clone()), gone.clone()]
            );
        }
        // Its connection is gone: nothing is written to it.
        assert_eq!(members[0].take(), Vec::<Bytes>::new());
    }

    /// An owner that quits hears its room go and its own leaving, as the
    /// others do (PROTOCOL.md, quit); one that dropped its connection
    /// hears nothing: writing to it would only draw a reset.
    #[tokio::test]
    async fn an_owner_that_quits_is_told_and_one_that_dropped_is_not() {
        for quits in [true, false] {
            let chat = server();
            let owner = enter(&chat, "Owner");
            chat.create_room("Owner", "jokes");
            let member = enter(&chat, "Member");
            assert!(matches!(
                chat.join_room("Member", "jokes"),
                JoinOutcome::Done
            ));
            owner.take();
            member.take();
            chat.leave("Owner", quits).await;
            let moves = [
                room_change("Owner", "jokes", "MainHall-s1"),
                room_change("Member", "jokes", "MainHall-s1"),
            ]
            .concat();
            let gone = room_change("Owner", "MainHall-s1", "");
            let told = vec![Bytes::from(moves), gone];
            assert_eq!(member.take(), told, "quits: {quits}");
            let expected = if quits { told } else { Vec::new() };
            assert_eq!(owner.take(), expected, "quits: {quits}");
        }
    }

    #[tokio::test]
    async fn list_shows_this_servers_rooms_at_once() {
        let chat = server();
        let adel = enter(&chat, "Adel");
        chat.create_room("Adel", "jokes");
        adel.take();
        chat.list(&adel.outbox);
        let list = ServerMessage::RoomList {
            rooms: vec!["MainHall-s1".to_owned(), "jokes".to_owned()],
        };
        assert_eq!(adel.take(), vec![list.encode()]);
        chat.delete_room("Adel", "jokes").await;
        adel.take();
        chat.list(&adel.outbox);
        let list = ServerMessage::RoomList {
            rooms: vec!["MainHall-s1".to_owned()],
        };
        assert_eq!(adel.take(), vec![list.encode()]);
    }

    #[tokio::test]
    async fn evict_never_waits_for_the_room_lock() {
        let chat = server();
        let adel = enter(&chat, "Adel");
        let bob = enter(&chat, "Bob");
        chat.create_room("Adel", "jokes");
        adel.take();
        bob.take();
        let held = chat.lock();
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn({
            let chat = chat.clone();
            move || {
                chat.evict(&["Adel".to_owned()], &[]);
                let _ = done_tx.send(());
            }
        });
        done.recv_timeout(Duration::from_secs(5))
            .expect("evict returns while the room lock is held");
        drop(held);

        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chat.background(shutdown.clone()));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !adel.outbox.is_finishing() {
            assert!(Instant::now() < deadline, "the eviction was carried out");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            bob.take(),
            vec![
                room_change("Adel", "jokes", "MainHall-s1"),
                room_change("Adel", "MainHall-s1", ""),
            ]
        );
        assert_eq!(chat.counts().rooms, 1, "Adel's room went with Adel");
        shutdown.cancel();
        task.await.expect("the eviction task ends at shutdown");
    }

    /// A client of a session over an in-memory pipe.
    struct Piped {
        lines: crate::lines::LineReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>,
        writer: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    }

    impl Piped {
        fn connect(chat: &Arc<ChatServer>) -> Piped {
            let (client, server) = tokio::io::duplex(1 << 16);
            let (reader, writer) = tokio::io::split(server);
            tokio::spawn(run_session(
                chat.clone(),
                reader,
                writer,
                [127, 0, 0, 1].into(),
                CancellationToken::new(),
            ));
            let (lines, writer) = tokio::io::split(client);
            Piped {
                lines: crate::lines::LineReader::new(lines, 1 << 16),
                writer,
            }
        }

        async fn send(&mut self, line: &str) {
            use tokio::io::AsyncWriteExt;
            self.writer.write_all(line.as_bytes()).await.unwrap();
        }

        /// The next line within `within` (of the paused clock), if any.
        async fn line(&mut self, within: Duration) -> Option<String> {
            let line = tokio::time::timeout(within, self.lines.next_line()).await;
            let line = line.ok()?.expect("no read error")?;
            Some(String::from_utf8_lossy(line).into_owned())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_is_answered_at_once_with_the_events_the_pace_held_back() {
        // A pace far longer than any wait below: whatever the pace holds
        // back only comes out early through the session's flush.
        let limits = Limits {
            event_pace: Duration::from_secs(600),
            ..Limits::default()
        };
        let chat = ChatServer::new("s1".to_owned(), limits, Arc::new(Grants::default()), None);
        let second = Duration::from_secs(1);
        let line = |b: Bytes| String::from_utf8_lossy(&b).trim_end().to_owned();
        let mut adel = Piped::connect(&chat);
        adel.send("{\"type\":\"newidentity\",\"identity\":\"Adel\"}\n")
            .await;
        assert_eq!(
            adel.line(second).await.as_deref(),
            Some("{\"type\":\"newidentity\",\"approved\":\"true\"}")
        );
        let arrival = line(room_change("Adel", "", "MainHall-s1"));
        assert_eq!(adel.line(second).await, Some(arrival));

        let mut bob = Piped::connect(&chat);
        bob.send("{\"type\":\"newidentity\",\"identity\":\"Bob\"}\n")
            .await;
        assert!(bob.line(second).await.is_some(), "Bob is answered at once");
        // Adel wrote a moment ago: Bob's arrival waits for the pace...
        assert_eq!(adel.line(second * 10).await, None);
        // ...until Adel asks something: then it comes, before the answer.
        adel.send("{\"type\":\"who\"}\n").await;
        let bob_arrived = line(room_change("Bob", "", "MainHall-s1"));
        assert_eq!(adel.line(second).await, Some(bob_arrived));
        let contents = adel.line(second).await.expect("the answer to who, at once");
        assert!(contents.contains("roomcontents"), "{contents}");
    }

    /// Takes every write until told to fail.
    struct Writer(Arc<std::sync::atomic::AtomicBool>);
    impl tokio::io::AsyncWrite for Writer {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(if self.0.load(std::sync::atomic::Ordering::SeqCst) {
                Err(std::io::ErrorKind::ConnectionReset.into())
            } else {
                Ok(buf.len())
            })
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// The next line a test client gets, within 20 s.
    async fn next_line_of<R>(lines: &mut tokio::io::Lines<R>) -> String
    where
        R: tokio::io::AsyncBufRead + Unpin,
    {
        tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("a line")
            .unwrap()
            .expect("the connection stays open")
    }

    /// See [`GatedServer::bob_and_adel_on_a_failing_writer`].
    struct BobAndAdel {
        bob_in: tokio::io::Lines<tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>>,
        bob: tokio::net::tcp::OwnedWriteHalf,
        adel: tokio::io::DuplexStream,
        failing: Arc<std::sync::atomic::AtomicBool>,
        session: tokio::task::JoinHandle<SessionEnd>,
    }

    /// A chat server on a TCP listener whose directory's claims wait at a
    /// [`Gate`].
    struct GatedServer {
        chat: Arc<ChatServer>,
        gate: Arc<Gate>,
        listener: tokio::net::TcpListener,
    }

    impl GatedServer {
        async fn new() -> GatedServer {
            let gate = Arc::new(Gate::default());
            let grants = Grants {
                gate: Some(gate.clone()),
                ..Grants::default()
            };
            let chat = ChatServer::new("s1".to_owned(), Limits::default(), Arc::new(grants), None);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            GatedServer {
                chat,
                gate,
                listener,
            }
        }

        /// A client connected to a session of its own, which it has sent
        /// `first`; the session's task.
        async fn connect(
            &self,
            first: &[u8],
        ) -> (tokio::net::TcpStream, tokio::task::JoinHandle<SessionEnd>) {
            use tokio::io::AsyncWriteExt;
            let address = self.listener.local_addr().unwrap();
            let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
            let (stream, peer) = self.listener.accept().await.unwrap();
            let (reader, writer) = stream.into_split();
            let session = tokio::spawn(run_session(
                self.chat.clone(),
                reader,
                writer,
                peer.ip(),
                CancellationToken::new(),
            ));
            client.write_all(first).await.unwrap();
            (client, session)
        }

        /// Waits for a claim to come to the gate.
        async fn asked(&self, what: &str) {
            tokio::time::timeout(Duration::from_secs(20), self.gate.asked.notified())
                .await
                .unwrap_or_else(|_| panic!("{what} comes to the directory"));
        }

        /// Bob, identified over TCP, and Adel, identified on a session whose
        /// writer fails once `failing` is set, both in the main hall (Bob
        /// has heard Adel arrive).
        async fn bob_and_adel_on_a_failing_writer(&self) -> BobAndAdel {
            use tokio::io::AsyncWriteExt;
            let (bob, _) = self
                .connect(b"{\"type\":\"newidentity\",\"identity\":\"Bob\"}\n")
                .await;
            self.asked("Bob's claim").await;
            self.gate.open.notify_one();
            let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (mut adel, input) = tokio::io::duplex(4096);
            let session = tokio::spawn(run_session(
                self.chat.clone(),
                input,
                Writer(failing.clone()),
                std::net::IpAddr::from([127, 0, 0, 1]),
                CancellationToken::new(),
            ));
            adel.write_all(b"{\"type\":\"newidentity\",\"identity\":\"Adel\"}\n")
                .await
                .unwrap();
            self.asked("Adel's claim").await;
            self.gate.open.notify_one();
            let (bob_in, bob) = bob.into_split();
            let mut bob_in = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(bob_in));
            let joined =
                r#"{"type":"roomchange","identity":"Adel","former":"","roomid":"MainHall-s1"}"#;
            while next_line_of(&mut bob_in).await != joined {}
            BobAndAdel {
                bob_in,
                bob,
                adel,
                failing,
                session,
            }
        }

        fn given_up(&self) -> bool {
            self.gate.given_up.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// A client that resets its connection while its claim waits gives the
    /// claim up (under a flood of claims from connections reset at once,
    /// those waiting for a turn are never asked of the leader); one that
    /// only closes its sending side after the request is still answered.
    #[tokio::test]
    async fn a_claim_is_given_up_when_its_connection_resets_not_when_it_half_closes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let server = GatedServer::new().await;
        let within = Duration::from_secs(20);
        let connect = || async {
            let connected = server
                .connect(b"{\"type\":\"newidentity\",\"identity\":\"Adel\"}\n")
                .await;
            server.asked("the claim").await;
            connected
        };

        let (mut client, session) = connect().await;
        client.shutdown().await.unwrap();
        // Time for the session to see the end of the stream while the claim
        // waits (nothing to wait for: seeing it must change nothing).
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.gate.open.notify_one();
        let mut answer = String::new();
        tokio::time::timeout(within, client.read_to_string(&mut answer))
            .await
            .expect("answered, then closed")
            .unwrap();
        assert!(
            answer.starts_with("{\"type\":\"newidentity\",\"approved\":\"true\"}\n"),
            "{answer:?}"
        );
        assert!(!server.given_up(), "a half-closed client is not gone");
        tokio::time::timeout(within, session)
            .await
            .unwrap()
            .unwrap();

        let (client, session) = connect().await;
        client.set_zero_linger().unwrap();
        drop(client);
        tokio::time::timeout(within, session)
            .await
            .expect("the session ends without its answer")
            .unwrap();
        assert!(server.given_up(), "the reset client's claim was given up");
    }

    /// A claim waits while its connection's writer fails (a reset the
    /// writer saw first: reads then see only an end): the claim is given up.
    #[tokio::test]
    async fn a_claim_is_given_up_when_its_session_is_dropped_while_it_waits() {
        use std::sync::atomic::Ordering;
        use tokio::io::AsyncWriteExt;
        let server = GatedServer::new().await;
        let BobAndAdel {
            mut bob,
            mut adel,
            failing,
            session,
            ..
        } = server.bob_and_adel_on_a_failing_writer().await;
        let within = Duration::from_secs(20);
        failing.store(true, Ordering::SeqCst);
        adel.write_all(b"{\"type\":\"createroom\",\"roomid\":\"jokes\"}\n")
            .await
            .unwrap();
        server.asked("Adel's room claim").await;
        // Something to write to Adel while the claim waits: the write fails.
        bob.write_all(b"{\"type\":\"message\",\"content\":\"hi\"}\n")
            .await
            .unwrap();
        tokio::time::timeout(within, session)
            .await
            .expect("the session ends without its answer")
            .unwrap();
        assert!(server.given_up(), "the claim was given up");
    }

    /// A client whose connection a write finds gone first: what it sent
    /// before and the session reads on is still handled, then the session
    /// ends.
    #[tokio::test]
    async fn lines_read_after_a_write_failed_are_still_handled() {
        use std::sync::atomic::Ordering;
        use tokio::io::AsyncWriteExt;
        let server = GatedServer::new().await;
        // Bob's sending half stays open (dropping it would end his session).
        let BobAndAdel {
            mut bob_in,
            bob: _bob,
            mut adel,
            failing,
            session,
        } = server.bob_and_adel_on_a_failing_writer().await;
        let within = Duration::from_secs(20);
        let mut next_line = async || next_line_of(&mut bob_in).await;
        failing.store(true, Ordering::SeqCst);
        adel.write_all(b"{\"type\":\"who\"}\n").await.unwrap();
        // The answer's write fails; the session (on this thread) sees that
        // before the next line comes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        adel.write_all(b"{\"type\":\"message\",\"content\":\"hi\"}\n")
            .await
            .unwrap();
        drop(adel);
        assert_eq!(
            next_line().await,
            r#"{"type":"message","identity":"Adel","content":"hi"}"#
        );
        assert_eq!(
            next_line().await,
            r#"{"type":"roomchange","identity":"Adel","former":"MainHall-s1","roomid":""}"#
        );
        tokio::time::timeout(within, session)
            .await
            .expect("the session ends")
            .unwrap();
    }

    /// Requests a client sent before resetting its connection are all
    /// answered, in order: looking at the connection (before a request, and
    /// while one waits) reads nothing while requests are pending, so the
    /// reset is seen only after them and drops none of them.
    /// On two threads, so that the writer can see the reset while the
    /// session still has requests to handle.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_sent_before_a_reset_are_all_handled() {
        use tokio::io::AsyncBufReadExt;
        let server = GatedServer::new().await;
        let (bob, _) = server
            .connect(b"{\"type\":\"newidentity\",\"identity\":\"Bob\"}\n")
            .await;
        server.asked("Bob's claim").await;
        server.gate.open.notify_one();
        let mut bob = tokio::io::BufReader::new(bob).lines();
        let mut next_line = async || next_line_of(&mut bob).await;
        assert_eq!(
            next_line().await,
            r#"{"type":"newidentity","approved":"true"}"#
        );
        assert_eq!(
            next_line().await,
            r#"{"type":"roomchange","identity":"Bob","former":"","roomid":"MainHall-s1"}"#
        );

        // Alice's claim waits with her next two requests read behind it; her
        // connection is reset before the claim is granted.
        let (alice, _) = server
            .connect(
                b"{\"type\":\"newidentity\",\"identity\":\"Alice\"}\n\
                  {\"type\":\"who\"}\n{\"type\":\"message\",\"content\":\"hi\"}\n",
            )
            .await;
        server.asked("Alice's claim").await;
        alice.set_zero_linger().unwrap();
        drop(alice);
        // Time for the session to see the reset if it looked (it must not).
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.gate.open.notify_one();
        assert_eq!(
            next_line().await,
            r#"{"type":"roomchange","identity":"Alice","former":"","roomid":"MainHall-s1"}"#
        );
        assert_eq!(
            next_line().await,
            r#"{"type":"message","identity":"Alice","content":"hi"}"#
        );
        assert_eq!(
            next_line().await,
            r#"{"type":"roomchange","identity":"Alice","former":"MainHall-s1","roomid":""}"#
        );
        assert!(!server.given_up());
    }

    /// While an owner's leaving or deletion waits for the cluster to free
    /// its room id, a grant of that id to another client here (the cluster
    /// freed it already) loses: the room is the leaving owner's until it is
    /// gone. Before, the new room replaced the old one and the leaving owner
    /// then deleted it, or kept owning it and later released its grant (a
    /// reviewer's finding).
    #[tokio::test]
    async fn a_room_id_granted_again_while_its_owner_leaves_is_refused_here() {
        for quits in [true, false] {
            let gate = Arc::new(tokio::sync::Notify::new());
            let chat = ChatServer::new(
                "s1".to_owned(),
                Limits::default(),
                Arc::new(Grants {
                    release_gate: Some(gate.clone()),
                    ..Grants::default()
                }),
                None,
            );
            enter(&chat, "Owner");
            let member = enter(&chat, "Member");
            let cleo = enter(&chat, "Cleo");
            chat.create_room("Owner", "jokes");
            assert!(matches!(
                chat.join_room("Member", "jokes"),
                JoinOutcome::Done
            ));
            let leaving = tokio::spawn({
                let chat = chat.clone();
                async move {
                    if quits {
                        chat.leave("Owner", true).await;
                    } else {
                        chat.delete_room("Owner", "jokes").await;
                    }
                }
            });
            tokio::task::yield_now().await;
            gate.notify_one();
            chat.create_room("Cleo", "jokes");
            leaving.await.unwrap();
            let state = chat.lock();
            assert!(!state.rooms.contains_key("jokes"), "quits: {quits}");
            assert_eq!(state.members["Cleo"].owns, None, "quits: {quits}");
            assert_eq!(state.members["Cleo"].room, "MainHall-s1");
            assert_eq!(state.members["Member"].room, "MainHall-s1");
            if !quits {
                assert_eq!(state.members["Owner"].owns, None);
            }
            drop(state);
            let refused = ServerMessage::CreateRoom {
                roomid: "jokes".to_owned(),
                approved: Approved(false),
            }
            .encode();
            let told = cleo.take();
            assert!(
                told.contains(&refused),
                "quits: {quits}: Cleo told {told:?}"
            );
            drop(member);
        }
    }
}
