//! Chat on one server: its rooms, the sessions in them, and the fan-out of
//! events, exactly as `shared/PROTOCOL.md` orders them.
//!
//! All room state of a server sits behind one lock, and every event a request
//! causes is queued to its recipients' outboxes while that lock is held, so all
//! clients see events in one consistent order. Queuing never blocks (see
//! [`Outbox`]), so a slow client cannot stall the lock.
//!
//! Names that must be unique cluster-wide go through a [`Directory`]: standalone
//! it is [`LocalDirectory`]; in a cluster, the registry that asks the leader.

mod directory;
mod outbox;
mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tracing::debug;

pub use directory::{BoxFuture, Directory, RemoteRoom};
pub use outbox::Outbox;
pub use session::run_session;

use crate::ServerId;
use crate::client_proto::{Approved, ServerMessage};
use crate::config::Limits;
use crate::journal::{NameJournal, NameKind};

/// One server's chat state and the operations of the client protocol on it.
pub struct ChatServer {
    id: ServerId,
    main_hall: String,
    limits: Limits,
    directory: Arc<dyn Directory>,
    /// Where holds and releases of names are recorded (tests).
    journal: Option<NameJournal>,
    state: Mutex<Rooms>,
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
        }
    }

    /// Sends to every member of `room` but `except`.
    fn broadcast(&self, room: &str, line: &Bytes, except: Option<&str>) {
        if let Some(room) = self.rooms.get(room) {
            for member in &room.members {
                if Some(member.as_str()) != except {
                    self.send(member, line);
                }
            }
        }
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
        Arc::new(ChatServer {
            id,
            main_hall,
            limits,
            directory,
            journal,
            state: Mutex::new(Rooms {
                rooms,
                members: HashMap::new(),
            }),
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

    fn lock(&self) -> MutexGuard<'_, Rooms> {
        // Every mutation below leaves the maps consistent at each step that can
        // panic (none should), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Answers `list` from the directory, which knows every room of the cluster.
    pub fn list(&self, identity: &str) {
        let reply = ServerMessage::RoomList {
            rooms: self.directory.rooms(),
        }
        .encode();
        self.lock().send(identity, &reply);
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
        let Some(member) = state.members.get_mut(identity) else {
            drop(state);
            self.directory.release_room(room);
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
            let event = ServerMessage::room_change(identity, room, room).encode();
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

    /// Sends the client `route` to `remote` and takes it out of this server:
    /// `roomchange(identity, former, room)` goes to the room it leaves. Its
    /// identity stays held (moving) in the directory.
    pub fn move_out(&self, identity: &str, room: &str, remote: &RemoteRoom) {
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
    pub fn evict(&self, identities: &[String], rooms: &[String]) {
        let mut state = self.lock();
        for room in rooms {
            if room != &self.main_hall {
                self.remove_room(&mut state, room);
            }
        }
        // Rooms of evicted owners that were not evicted themselves are freed.
        let mut orphaned = Vec::new();
        for identity in identities {
            let Some(owns) = state.members.get(identity).map(|m| m.owns.clone()) else {
                continue;
            };
            if let Some(room) = owns {
                self.remove_room(&mut state, &room);
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
            self.directory.release_room(&room);
        }
    }

    /// Answers `deleteroom`.
    pub fn delete_room(&self, identity: &str, room: &str) {
        let mut state = self.lock();
        let owned = state
            .rooms
            .get(room)
            .is_some_and(|r| r.owner == identity && !identity.is_empty());
        let reply = ServerMessage::DeleteRoom {
            roomid: room.to_owned(),
            approved: Approved(owned),
        };
        state.send(identity, &reply.encode());
        if owned {
            self.remove_room(&mut state, room);
            drop(state);
            self.directory.release_room(room);
        }
    }

    /// Moves every member of `room` to the main hall, announcing each move to
    /// the room's members and the main hall, and forgets the room.
    fn remove_room(&self, state: &mut Rooms, room: &str) {
        let Some(removed) = state.rooms.remove(room) else {
            return;
        };
        self.record(NameKind::Room, room, false);
        if let Some(owner) = state.members.get_mut(&removed.owner) {
            owner.owns = None;
        }
        let hall = self.main_hall.as_str();
        let mut audience: Vec<String> = state
            .rooms
            .get(hall)
            .map(|h| h.members.clone())
            .unwrap_or_default();
        audience.extend(removed.members.iter().cloned());
        for moved in &removed.members {
            state.add_to_room(hall, moved);
        }
        for moved in &removed.members {
            let event = ServerMessage::room_change(moved, room, hall).encode();
            for recipient in &audience {
                state.send(recipient, &event);
            }
        }
    }

    /// Sends a chat line to every other member of the speaker's room.
    pub fn message(&self, identity: &str, content: String) {
        let state = self.lock();
        let Some(member) = state.members.get(identity) else {
            return;
        };
        let line = ServerMessage::Message {
            identity: identity.to_owned(),
            content,
        }
        .encode();
        state.broadcast(&member.room, &line, Some(identity));
    }

    /// A client leaves for good (`quit` or a dropped connection): its room is
    /// deleted if it owns one, then `roomchange(identity, former, "")` goes to the
    /// former room and, when `tell_client`, to the client itself. Releases the
    /// identity and any room in the directory.
    pub fn leave(&self, identity: &str, tell_client: bool) {
        let mut state = self.lock();
        let Some(owns) = state.members.get(identity).map(|m| m.owns.clone()) else {
            return;
        };
        if let Some(room) = &owns {
            self.remove_room(&mut state, room);
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
        drop(state);
        if let Some(room) = &owns {
            self.directory.release_room(room);
        }
        self.directory.release_identity(identity);
    }
}
