//! The follower side: the replica of other servers' holdings, fed by the
//! leader's announcements, snapshots and evictions, and what they mean for
//! this server's own names.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::*;

impl Registry {
    /// Whether news as of `at` (term, announcement number) may change the
    /// own name `key`: it must not be older than the answer that set it.
    pub(super) fn fresh(&self, key: &NameKey, at: (u64, u64)) -> bool {
        self.marks.get(key).is_none_or(|mark| at >= *mark)
    }

    /// The leader refused a move or its cancel. `Taken`: another server has
    /// the identity now, so it is lost here. Otherwise the move did not
    /// happen: the client stays (and if the leader did not know the
    /// identity at all, this server re-registers).
    pub(super) fn move_refused(
        &mut self,
        now: Instant,
        identity: &str,
        to: Option<&str>,
        reason: &Refusal,
        out: &mut Vec<Action>,
    ) {
        // Only a cancel of the move the entry shows clears it when granted:
        // one of an earlier move (given up on before the client let go of
        // the identity and claimed it again) would leave it reserved.
        let shown = self
            .own
            .identities
            .get(identity)
            .and_then(|e| e.move_proof.as_ref());
        let cancel_pending = self.pending.values().any(|p| {
            matches!(&p.op, Op::MoveCancel { identity: i, proof }
                if i == identity && Some(proof) == shown)
        });
        match reason {
            Refusal::Taken => {
                if self.drop_own_identity(identity).is_some() {
                    Self::evict_local(vec![identity.to_string()], vec![], out);
                }
            }
            _ if cancel_pending => {}
            _ => {
                if let Some(entry) = self.own.identities.get_mut(identity)
                    && (to.is_none() || entry.moving_to.as_deref() == to)
                {
                    entry.moving_to = None;
                    entry.move_proof = None;
                }
                if *reason == Refusal::NotOwner {
                    self.last_seq = None;
                    self.request_sync(now, true, out);
                }
            }
        }
    }

    /// The leader (as of `at`) has `entry` on another server. With the same
    /// stamp, this server's client moved there; with a later stamp, this
    /// server lost a heal conflict (the leader's `Evict` says the same, but
    /// the registry does not depend on it arriving).
    pub(super) fn check_identity(
        &mut self,
        entry: &IdentityEntry,
        at: (u64, u64),
        out: &mut Vec<Action>,
    ) {
        let key = NameKey::Identity(entry.identity.clone());
        let lost = self
            .own
            .identities
            .get(&entry.identity)
            .is_some_and(|own| own.stamp <= entry.stamp);
        if lost && self.fresh(&key, at) {
            self.lose_identity(&entry.identity, out);
        }
    }

    /// Like [`Registry::check_identity`] for rooms (which never move).
    pub(super) fn check_room(&mut self, entry: &RoomEntry, at: (u64, u64), out: &mut Vec<Action>) {
        let key = NameKey::Room(entry.room.clone());
        let lost = self
            .own
            .rooms
            .get(&entry.room)
            .is_some_and(|own| own.stamp <= entry.stamp);
        if lost && self.fresh(&key, at) && self.drop_own_room(&entry.room).is_some() {
            Self::evict_local(vec![], vec![entry.room.clone()], out);
        }
    }

    /// Whether this server's chat layer still has a client for `identity`:
    /// it holds it (not as a kept arrival nobody took yet), or the client
    /// has not been routed away yet (its move is still being asked for, or
    /// was given up and is being cancelled).
    pub(super) fn client_here(&self, identity: &str) -> bool {
        self.own
            .identities
            .get(identity)
            .is_some_and(|e| e.moving_to.is_none())
            && !self.unclaimed.contains_key(identity)
            || self.pending.values().any(|p| match &p.op {
                Op::MoveStart { identity: i, .. } | Op::MoveCancel { identity: i, .. } => {
                    i == identity
                }
                _ => false,
            })
    }

    /// Drops an own identity the leader re-homed elsewhere or released. If
    /// the chat layer still has its client (a move given up on completed
    /// anyway), that client must be disconnected.
    pub(super) fn lose_identity(&mut self, identity: &str, out: &mut Vec<Action>) {
        let here = self.client_here(identity);
        if self.drop_own_identity(identity).is_some() && here {
            Self::evict_local(vec![identity.to_string()], vec![], out);
        }
    }

    pub(super) fn evict_local(identities: Vec<String>, rooms: Vec<String>, out: &mut Vec<Action>) {
        out.push(Action::Log(LogEvent::Evicted {
            identities: identities.clone(),
            rooms: rooms.clone(),
        }));
        out.push(Action::EvictLocal { identities, rooms });
    }

    pub(super) fn drop_own_identity(&mut self, identity: &str) -> Option<IdentityEntry> {
        self.marks.remove(&NameKey::Identity(identity.to_string()));
        self.unclaimed.remove(identity);
        self.own.remove_identity(identity)
    }

    pub(super) fn drop_own_room(&mut self, room: &str) -> Option<RoomEntry> {
        self.marks.remove(&NameKey::Room(room.to_string()));
        self.own.remove_room(room)
    }

    /// Whether the registry's `entry` belongs in the replica: every entry
    /// but this server's own names, which are in `own`. An identity
    /// registered here that this server does not hold, on its way
    /// elsewhere, is kept too: a client an earlier life of this server
    /// routed away, which the registry keeps until it arrives. Without it
    /// the replica would lack it, and a later leader building its registry
    /// from this replica would free the name.
    pub(super) fn replicates(&self, entry: &IdentityEntry) -> bool {
        entry.server != self.id
            || (entry.moving_to.is_some() && !self.own.identities.contains_key(&entry.identity))
    }

    /// Applies one announced change (as of `at`: term, announcement number)
    /// to the replica and, where it concerns this server's own names, to its
    /// holdings. Returns whether this server must re-register (the leader
    /// dropped a name this server still holds, or purged this server).
    pub(super) fn apply_change(
        &mut self,
        change: &Change,
        at: (u64, u64),
        out: &mut Vec<Action>,
    ) -> bool {
        match change {
            Change::SetIdentity(entry) => {
                self.note_move(entry);
                if !self.replicates(entry) {
                    self.replica.remove_identity(&entry.identity);
                } else {
                    self.check_identity(entry, at, out);
                    self.replica.set_identity(entry.clone());
                }
                false
            }
            Change::RemoveIdentity { identity, stamp } => {
                self.moves_seen.remove(identity);
                self.replica.remove_identity(identity);
                let key = NameKey::Identity(identity.clone());
                let moving = match self.own.identities.get(identity) {
                    Some(own) if own.stamp == *stamp && self.fresh(&key, at) => {
                        own.moving_to.is_some()
                    }
                    _ => return false,
                };
                if moving {
                    // The move expired.
                    self.lose_identity(identity, out);
                }
                !moving
            }
            Change::SetRoom(entry) => {
                if entry.server == self.id {
                    self.replica.remove_room(&entry.room);
                } else {
                    self.check_room(entry, at, out);
                    self.replica.set_room(entry.clone());
                }
                false
            }
            Change::RemoveRoom { room, stamp } => {
                self.replica.remove_room(room);
                let key = NameKey::Room(room.clone());
                self.own
                    .rooms
                    .get(room)
                    .is_some_and(|own| own.stamp == *stamp)
                    && self.fresh(&key, at)
            }
            Change::PurgeServer { server } => {
                self.replica.purge(server);
                *server == self.id
            }
        }
    }

    /// Notes when this server first saw `entry`'s move, if it is moving;
    /// forgets it if not.
    pub(super) fn note_move(&mut self, entry: &IdentityEntry) {
        match (&entry.moving_to, &entry.move_proof, self.clock) {
            (Some(_), Some(proof), Some(now)) => {
                let seen = self.moves_seen.get(&entry.identity);
                if seen.is_none_or(|s| s.proof != *proof) {
                    let first = MoveSeen::new(proof.clone(), now, false);
                    self.moves_seen.insert(entry.identity.clone(), first);
                }
            }
            _ => {
                self.moves_seen.remove(&entry.identity);
            }
        }
    }

    /// Dates the open moves a snapshot has as its leader does (`ages`): a
    /// server that just restarted, or missed the moves' announcements, would
    /// otherwise date them from now, and report that to the next leader.
    /// The leader sends a server its snapshot after merging that server's
    /// report, so an origin's own date of its route is the leader's too.
    fn date_moves_as_leader(&mut self, now: Instant, ages: &[MoveAge]) {
        let timeout = self.config.move_timeout;
        for age in ages {
            let Some(seen) = self.moves_seen.get_mut(&age.identity) else {
                continue;
            };
            if seen.proof == age.proof {
                let age = Duration::from_millis(age.age_ms).min(timeout);
                seen.at = now.checked_sub(age).unwrap_or(seen.at);
            }
        }
    }

    /// After `changes` are applied: if they freed a server's names, drops
    /// what `moves_seen` has of identities this server no longer knows of.
    /// Not at the purge itself: the moves of the server's clients on their
    /// way elsewhere are registered again in the same changes, and keep
    /// their age.
    pub(super) fn forget_moves_purged(&mut self, changes: &[Change]) {
        if !changes
            .iter()
            .any(|c| matches!(c, Change::PurgeServer { .. }))
        {
            return;
        }
        let (own, replica) = (&self.own.identities, &self.replica.identities);
        self.moves_seen
            .retain(|identity, _| own.contains_key(identity) || replica.contains_key(identity));
    }

    /// The position of the followed leader's announcement `seq`.
    pub(super) fn leader_position(&self, seq: u64) -> Position {
        let (term, rank) = self.epoch();
        Position {
            term,
            rank: rank as u64,
            seq,
        }
    }

    /// Acknowledges the followed leader's announcements up to `seq`: this
    /// server has them in its replica and will report them to any later
    /// leader, so the leader may answer the requests decided at them.
    pub(super) fn ack(&mut self, seq: u64, out: &mut Vec<Action>) {
        if let Some(leader) = self.leader.clone()
            && leader != self.id
        {
            let msg = RegistryMessage::Ack {
                term: self.term,
                seq,
            };
            self.send(&leader, msg, out);
        }
    }

    pub(super) fn on_announce(
        &mut self,
        now: Instant,
        seq: u64,
        changes: &[Change],
        out: &mut Vec<Action>,
    ) {
        self.announced = self.announced.max(seq);
        match self.last_seq {
            // Sent again (the leader saw no acknowledgement): say so again.
            Some(last) if seq <= last => self.ack(last, out),
            Some(last) if Some(seq) == last.checked_add(1) => {
                self.last_seq = Some(seq);
                self.applied = self.leader_position(seq);
                let mut resync = false;
                for change in changes {
                    resync |= self.apply_change(change, (self.term, seq), out);
                }
                self.forget_moves_purged(changes);
                if resync {
                    self.last_seq = None;
                    self.request_sync(now, true, out);
                } else {
                    self.ack(seq, out);
                }
            }
            // A gap, or no snapshot yet in this term: ask for a snapshot.
            _ => {
                self.last_seq = None;
                self.request_sync(now, false, out);
            }
        }
    }

    pub(super) fn on_snapshot(
        &mut self,
        now: Instant,
        seq: u64,
        (identities, rooms): (Vec<IdentityEntry>, Vec<RoomEntry>),
        move_ages: &[MoveAge],
        out: &mut Vec<Action>,
    ) {
        if self.last_seq.is_some_and(|last| seq < last) {
            return;
        }
        self.replica.clear();
        let mut present = BTreeSet::new();
        for entry in identities {
            if !is_valid_name(&entry.identity) {
                continue;
            }
            present.insert(entry.identity.clone());
            self.note_move(&entry);
            if !self.replicates(&entry) {
                continue;
            }
            self.check_identity(&entry, (self.term, seq), out);
            self.replica.set_identity(entry);
        }
        self.moves_seen
            .retain(|identity, _| present.contains(identity));
        self.date_moves_as_leader(now, move_ages);
        // A snapshot answers this server's own report: what the leader did
        // not register from it was refused (lost to another holder, or a
        // move that expired or completed). Names granted after the snapshot
        // was made are not judged by it.
        let at = (self.term, seq);
        let gone: Vec<String> = self
            .own
            .identities
            .keys()
            .filter(|name| !present.contains(*name))
            .filter(|name| self.fresh(&NameKey::Identity((*name).clone()), at))
            .cloned()
            .collect();
        for identity in gone {
            self.lose_identity(&identity, out);
        }
        let mut rooms_present = BTreeSet::new();
        for entry in rooms {
            if !is_valid_name(&entry.room) {
                continue;
            }
            rooms_present.insert(entry.room.clone());
            if entry.server != self.id {
                self.check_room(&entry, at, out);
                self.replica.set_room(entry);
            }
        }
        let gone: Vec<String> = self
            .own
            .rooms
            .keys()
            .filter(|name| !rooms_present.contains(*name))
            .filter(|name| self.fresh(&NameKey::Room((*name).clone()), at))
            .cloned()
            .collect();
        for room in gone {
            if self.drop_own_room(&room).is_some() {
                Self::evict_local(vec![], vec![room], out);
            }
        }
        self.last_seq = Some(seq);
        self.applied = self.leader_position(seq);
        self.sync_sent_at = None;
        self.ack(seq, out);
        if self.announced > seq {
            // Announcements dropped while waiting for this snapshot are not
            // in it: ask again.
            self.last_seq = None;
            self.request_sync(now, true, out);
        }
    }

    pub(super) fn on_evict(
        &mut self,
        at: (u64, u64),
        identities: Vec<IdentityEntry>,
        rooms: Vec<RoomEntry>,
        out: &mut Vec<Action>,
    ) {
        let mut lost_identities = Vec::new();
        for entry in identities {
            let matches = self
                .own
                .identities
                .get(&entry.identity)
                .is_some_and(|own| own.stamp == entry.stamp);
            if matches && self.fresh(&NameKey::Identity(entry.identity.clone()), at) {
                // A client that moved away has nobody here to disconnect.
                let here = self.client_here(&entry.identity);
                if self.drop_own_identity(&entry.identity).is_some() && here {
                    lost_identities.push(entry.identity);
                }
            }
        }
        let mut lost_rooms = Vec::new();
        for entry in rooms {
            let matches = self
                .own
                .rooms
                .get(&entry.room)
                .is_some_and(|own| own.stamp == entry.stamp);
            if matches && self.fresh(&NameKey::Room(entry.room.clone()), at) {
                self.drop_own_room(&entry.room);
                lost_rooms.push(entry.room);
            }
        }
        if !lost_identities.is_empty() || !lost_rooms.is_empty() {
            Self::evict_local(lost_identities, lost_rooms, out);
        }
    }
}
