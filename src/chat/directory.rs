//! The seam between one server's chat and the cluster's namespace: claims of
//! identities and room ids, the room list, where a room lives, and moves.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

/// A boxed future, for the async methods of the object-safe [`Directory`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Where a room of another server is reached by clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRoom {
    /// The server that holds the room.
    pub server: crate::ServerId,
    /// That server's client host, as sent in `route`.
    pub host: String,
    /// That server's client port.
    pub port: u16,
}

/// The cluster-wide namespace as one server's chat sees it.
///
/// Claims answer `Err(reason)` when the name is taken, invalid, or cannot be
/// granted now (no leader, no majority); the reason goes to the log.
/// Implementations must not call back into the chat server while holding a
/// lock of their own (the chat server calls them while holding its own lock).
pub trait Directory: Send + Sync + 'static {
    /// Claims an identity for a client of this server.
    fn claim_identity(&self, identity: &str) -> BoxFuture<Result<(), String>>;
    /// Frees an identity of this server.
    fn release_identity(&self, identity: &str);
    /// Claims a room id for a room of this server owned by `owner`.
    fn claim_room(&self, room: &str, owner: &str) -> BoxFuture<Result<(), String>>;
    /// Frees a room id of this server.
    fn release_room(&self, room: &str);
    /// Every room of the cluster: main halls of live servers first, then the rest.
    fn rooms(&self) -> Vec<String>;
    /// Where a room that is not on this server lives, if anywhere.
    fn remote_room(&self, room: &str) -> Option<RemoteRoom>;
    /// Records that `identity` left this server for `to` (after a `route`); the
    /// identity stays reserved until it arrives there or the move times out.
    fn start_move(&self, identity: &str, to: &RemoteRoom);
    /// Whether `identity` may arrive here by `movejoin` (it is moving to this
    /// server); on success the identity now belongs to this server.
    fn accept_move(&self, identity: &str) -> BoxFuture<bool>;
}

/// The namespace of a server that runs alone: names are unique on this server,
/// and no room is elsewhere.
pub struct LocalDirectory {
    main_hall: String,
    names: Mutex<Names>,
}

#[derive(Default)]
struct Names {
    identities: BTreeSet<String>,
    rooms: BTreeSet<String>,
}

impl LocalDirectory {
    /// A directory that knows only `main_hall`.
    pub fn new(main_hall: String) -> Self {
        LocalDirectory {
            main_hall,
            names: Mutex::new(Names::default()),
        }
    }

    fn names(&self) -> std::sync::MutexGuard<'_, Names> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn ready<T: Send + 'static>(value: T) -> BoxFuture<T> {
    Box::pin(std::future::ready(value))
}

impl Directory for LocalDirectory {
    fn claim_identity(&self, identity: &str) -> BoxFuture<Result<(), String>> {
        let fresh = self.names().identities.insert(identity.to_owned());
        ready(if fresh {
            Ok(())
        } else {
            Err("identity in use".to_owned())
        })
    }

    fn release_identity(&self, identity: &str) {
        self.names().identities.remove(identity);
    }

    fn claim_room(&self, room: &str, _owner: &str) -> BoxFuture<Result<(), String>> {
        let fresh = room != self.main_hall && self.names().rooms.insert(room.to_owned());
        ready(if fresh {
            Ok(())
        } else {
            Err("room id in use".to_owned())
        })
    }

    fn release_room(&self, room: &str) {
        self.names().rooms.remove(room);
    }

    fn rooms(&self) -> Vec<String> {
        let names = self.names();
        let mut rooms = Vec::with_capacity(names.rooms.len() + 1);
        rooms.push(self.main_hall.clone());
        rooms.extend(names.rooms.iter().cloned());
        rooms
    }

    fn remote_room(&self, _room: &str) -> Option<RemoteRoom> {
        None
    }

    fn start_move(&self, _identity: &str, _to: &RemoteRoom) {}

    fn accept_move(&self, _identity: &str) -> BoxFuture<bool> {
        // Alone, nobody can be moving here.
        ready(false)
    }
}
