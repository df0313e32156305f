//! [`Table`]: a set of registered names with an index of room owners.

use std::collections::{BTreeMap, HashMap};

use super::messages::*;

/// A set of registered names with an index of room owners.
#[derive(Debug, Clone, Default)]
pub(super) struct Table {
    pub(super) identities: BTreeMap<String, IdentityEntry>,
    pub(super) rooms: BTreeMap<String, RoomEntry>,
    /// owner -> number of rooms it owns, for the one-room-per-owner rule.
    pub(super) room_owners: HashMap<String, usize>,
    /// Room ids changed since the last [`Registry::take_room_changes`].
    pub(super) touched: Vec<String>,
    /// Too many to list, or the whole table replaced.
    pub(super) touched_all: bool,
}

impl Table {
    pub(super) fn set_identity(&mut self, entry: IdentityEntry) {
        self.identities.insert(entry.identity.clone(), entry);
    }

    pub(super) fn remove_identity(&mut self, identity: &str) -> Option<IdentityEntry> {
        self.identities.remove(identity)
    }

    pub(super) fn set_room(&mut self, entry: RoomEntry) {
        self.remove_room(&entry.room);
        self.touch(&entry.room);
        *self.room_owners.entry(entry.owner.clone()).or_default() += 1;
        self.rooms.insert(entry.room.clone(), entry);
    }

    pub(super) fn remove_room(&mut self, room: &str) -> Option<RoomEntry> {
        let entry = self.rooms.remove(room)?;
        self.touch(room);
        if let Some(count) = self.room_owners.get_mut(&entry.owner) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.room_owners.remove(&entry.owner);
            }
        }
        Some(entry)
    }

    pub(super) fn owns_room(&self, owner: &str) -> bool {
        self.room_owners.contains_key(owner)
    }

    /// Removes everything `server` holds; returns (identities, rooms) removed.
    pub(super) fn purge(&mut self, server: &str) -> (usize, usize) {
        let before = (self.identities.len(), self.rooms.len());
        self.identities.retain(|_, e| e.server != server);
        let gone: Vec<String> = self
            .rooms
            .values()
            .filter(|r| r.server == server)
            .map(|r| r.room.clone())
            .collect();
        for room in gone {
            self.remove_room(&room);
        }
        (
            before.0 - self.identities.len(),
            before.1 - self.rooms.len(),
        )
    }

    pub(super) fn clear(&mut self) {
        *self = Table {
            touched_all: true,
            ..Table::default()
        };
    }

    pub(super) fn touch(&mut self, room: &str) {
        // Bounded: past this, a reader rebuilds everything instead.
        if self.touched.len() < 1024 {
            self.touched.push(room.to_owned());
        } else {
            self.touched_all = true;
        }
    }

    pub(super) fn apply(&mut self, change: &Change) {
        match change {
            Change::SetIdentity(entry) => self.set_identity(entry.clone()),
            Change::RemoveIdentity { identity, .. } => {
                self.remove_identity(identity);
            }
            Change::SetRoom(entry) => self.set_room(entry.clone()),
            Change::RemoveRoom { room, .. } => {
                self.remove_room(room);
            }
            Change::PurgeServer { server } => {
                self.purge(server);
            }
        }
    }
}
