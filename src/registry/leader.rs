//! The leader side: the authoritative registry, the claim serializer, the
//! per-asker answer cache, and the merging of holdings reports.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Instant;

use super::*;

/// What the leader remembers about one asker, for idempotency.
#[derive(Debug, Clone)]
pub(super) struct AskerLog {
    pub(super) incarnation: u64,
    /// Requests below this are settled at the asker: drop them, forget them.
    pub(super) low_water: u64,
    /// Highest request id decided: a holdings report made before it is stale.
    pub(super) max_seen: Option<u64>,
    /// Version of the last holdings report merged.
    pub(super) report_version: u64,
    /// Decisions, with the announcement number they were made at.
    pub(super) answers: BTreeMap<u64, (Verdict, u64)>,
}

impl AskerLog {
    fn new(incarnation: u64) -> Self {
        AskerLog {
            incarnation,
            low_water: 0,
            max_seen: None,
            report_version: 0,
            answers: BTreeMap::new(),
        }
    }

    fn advance(&mut self, resolved_below: u64) {
        if resolved_below > self.low_water {
            self.low_water = resolved_below;
            self.answers = self.answers.split_off(&resolved_below);
        }
    }

    fn record(&mut self, id: u64, verdict: Verdict, seq: u64) {
        self.answers.insert(id, (verdict, seq));
        self.max_seen = Some(self.max_seen.map_or(id, |m| m.max(id)));
        while self.answers.len() > DEDUP_PER_ASKER {
            self.answers.pop_first();
        }
    }
}

/// A request parked until the leader knows every live server's holdings.
#[derive(Debug, Clone)]
pub(super) struct Queued {
    pub(super) asker: ServerId,
    pub(super) ticket: Ticket,
    pub(super) op: Op,
}

/// State that exists only while this server leads.
#[derive(Debug, Default)]
pub(super) struct LeaderState {
    /// The authoritative registry, this server's own names included.
    pub(super) registry: Table,
    /// Number of the last announcement of this term.
    pub(super) seq: u64,
    pub(super) askers: HashMap<ServerId, AskerLog>,
    pub(super) queue: VecDeque<Queued>,
    /// Servers whose holdings are not merged yet, with the time until which
    /// new grants wait for them.
    pub(super) unsynced: BTreeMap<ServerId, Instant>,
    /// Moving identities and when their move expires.
    pub(super) moves: HashMap<String, Instant>,
    /// Holdings taken from a server (evicted, moved away, expired) that it
    /// may not have heard of yet: a report still listing one (same stamp)
    /// is older than that news and must not re-register it. Forgotten when
    /// the server reports without it.
    pub(super) gone: HashMap<ServerId, HashMap<NameKey, Stamp>>,
}

/// Records in `gone` that `server` lost `key` (see [`LeaderState::gone`]).
pub(super) fn took(
    gone: &mut HashMap<ServerId, HashMap<NameKey, Stamp>>,
    server: &ServerId,
    key: NameKey,
    stamp: &Stamp,
) {
    gone.entry(server.clone())
        .or_default()
        .insert(key, stamp.clone());
}

impl Registry {
    /// Runs `f` with the leader state taken out of `self`, so leader code can
    /// use both freely.
    pub(super) fn with_leader(&mut self, f: impl FnOnce(&mut Self, &mut LeaderState)) {
        if let Some(mut lead) = self.leading.take() {
            f(self, &mut lead);
            self.leading = Some(lead);
        }
    }

    pub(super) fn start_leading(&mut self, now: Instant, out: &mut Vec<Action>) {
        let mut lead = LeaderState::default();
        let deadline = later(now, self.config.sync_timeout);
        lead.unsynced.insert(self.id.clone(), deadline);
        for peer in &self.live {
            lead.unsynced.insert(peer.clone(), deadline);
        }
        self.leading = Some(Box::new(lead));
        // The new registry is rebuilt only from what servers hold now.
        self.replica.clear();
        self.last_seq = Some(0);
        let peers: Vec<ServerId> = self.live.iter().cloned().collect();
        for peer in peers {
            let msg = RegistryMessage::HoldingsRequest { term: self.term };
            self.send(&peer, msg, out);
        }
        let report = self.report();
        self.loopback.push_back(RegistryMessage::Holdings {
            term: self.term,
            report,
        });
        out.push(Action::SetTimer {
            timer: Timer::SyncDeadline,
            after: self.config.sync_timeout,
        });
    }

    pub(super) fn next_stamp(&self, lead: &LeaderState) -> Stamp {
        Stamp {
            term: self.term,
            seq: lead.seq + 1,
            leader: self.id.clone(),
        }
    }

    /// Applies changes to the registry and this server's own view, and
    /// announces them as one numbered announcement.
    pub(super) fn commit(
        &mut self,
        lead: &mut LeaderState,
        changes: Vec<Change>,
        out: &mut Vec<Action>,
    ) {
        if changes.is_empty() {
            return;
        }
        lead.seq += 1;
        for change in &changes {
            lead.registry.apply(change);
            // The leader re-registers by merging, never by resync requests.
            let _ = self.apply_change(change, (self.term, lead.seq), out);
        }
        self.last_seq = Some(lead.seq);
        out.push(Action::Broadcast {
            msg: RegistryMessage::Announce {
                term: self.term,
                seq: lead.seq,
                changes,
            },
        });
    }

    pub(super) fn blocked(&self, lead: &LeaderState, now: Instant) -> bool {
        lead.unsynced
            .iter()
            .any(|(server, until)| now < *until && self.is_live(server))
    }

    pub(super) fn lead_request(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        from: ServerId,
        ticket: Ticket,
        op: Op,
        out: &mut Vec<Action>,
    ) {
        let log = lead
            .askers
            .entry(from.clone())
            .or_insert_with(|| AskerLog::new(ticket.incarnation));
        if ticket.incarnation < log.incarnation {
            return;
        }
        if ticket.incarnation > log.incarnation {
            *log = AskerLog::new(ticket.incarnation);
            lead.gone.remove(&from);
        }
        log.advance(ticket.resolved_below);
        if ticket.id < log.low_water {
            return;
        }
        if let Some((verdict, seq)) = log.answers.get(&ticket.id).cloned() {
            self.send_answer(&from, &ticket, verdict, seq, out);
            return;
        }
        if op.waits_for_sync() && self.blocked(lead, now) {
            let queued = lead.queue.iter().any(|q| {
                q.asker == from
                    && q.ticket.incarnation == ticket.incarnation
                    && q.ticket.id == ticket.id
            });
            if queued {
                return;
            }
            if lead.queue.len() < LEADER_QUEUE {
                lead.queue.push_back(Queued {
                    asker: from,
                    ticket,
                    op,
                });
                return;
            }
            let verdict = Verdict::Refused {
                reason: Refusal::Busy,
            };
            self.record_and_answer(lead, &from, &ticket, verdict, out);
            return;
        }
        let verdict = self.decide(lead, now, &from, &op, out);
        self.record_and_answer(lead, &from, &ticket, verdict, out);
    }

    pub(super) fn record_and_answer(
        &mut self,
        lead: &mut LeaderState,
        to: &ServerId,
        ticket: &Ticket,
        verdict: Verdict,
        out: &mut Vec<Action>,
    ) {
        if let Some(log) = lead.askers.get_mut(to) {
            log.record(ticket.id, verdict.clone(), lead.seq);
        }
        self.send_answer(to, ticket, verdict, lead.seq, out);
    }

    pub(super) fn send_answer(
        &mut self,
        to: &str,
        ticket: &Ticket,
        verdict: Verdict,
        seq: u64,
        out: &mut Vec<Action>,
    ) {
        let msg = RegistryMessage::Answer {
            term: self.term,
            incarnation: ticket.incarnation,
            id: ticket.id,
            seq,
            verdict,
        };
        self.send(to, msg, out);
    }

    pub(super) fn decide(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        asker: &ServerId,
        op: &Op,
        out: &mut Vec<Action>,
    ) -> Verdict {
        let refused = |reason| Verdict::Refused { reason };
        let granted = |stamp| Verdict::Granted { stamp };
        match op {
            Op::Claim(name) => {
                let verdict = self.decide_claim(lead, asker, name, out);
                out.push(Action::Log(match &verdict {
                    Verdict::Granted { .. } => LogEvent::ClaimGranted {
                        asker: asker.clone(),
                        name: name.clone(),
                    },
                    Verdict::Refused { reason } => LogEvent::ClaimDenied {
                        asker: asker.clone(),
                        name: name.clone(),
                        reason: reason.clone(),
                    },
                }));
                verdict
            }
            Op::Release(name) => {
                let change = match name {
                    Name::Identity(identity) => lead
                        .registry
                        .identities
                        .get(identity)
                        .filter(|e| e.server == *asker)
                        .map(|e| Change::RemoveIdentity {
                            identity: identity.clone(),
                            stamp: e.stamp.clone(),
                        }),
                    Name::Room { room, .. } => lead
                        .registry
                        .rooms
                        .get(room)
                        .filter(|r| r.server == *asker)
                        .map(|r| Change::RemoveRoom {
                            room: room.clone(),
                            stamp: r.stamp.clone(),
                        }),
                };
                if let Name::Identity(identity) = name
                    && change.is_some()
                {
                    lead.moves.remove(identity);
                }
                self.commit(lead, change.into_iter().collect(), out);
                granted(Stamp::default())
            }
            Op::MoveStart { identity, to } => {
                let entry = match lead.registry.identities.get(identity) {
                    Some(e) if e.server == *asker => e.clone(),
                    // Another server has it now (a movejoin won a race, or
                    // a heal): the asker's client must go.
                    Some(_) => return refused(Refusal::Taken),
                    None => return refused(Refusal::NotOwner),
                };
                if let Some(target) = &entry.moving_to {
                    return if target == to {
                        granted(entry.stamp)
                    } else {
                        refused(Refusal::AlreadyMoving)
                    };
                }
                if to == asker || !self.servers.contains(to) {
                    return refused(Refusal::Invalid);
                }
                if !self.is_live(to) {
                    return refused(Refusal::TargetDown);
                }
                let stamp = entry.stamp.clone();
                let moving = IdentityEntry {
                    moving_to: Some(to.clone()),
                    ..entry
                };
                self.commit(lead, vec![Change::SetIdentity(moving)], out);
                self.expire_move_at(lead, now, identity, out);
                granted(stamp)
            }
            Op::MoveDone { identity } => {
                let Some(entry) = lead
                    .registry
                    .identities
                    .get(identity)
                    .filter(|e| e.moving_to.as_ref() == Some(asker))
                    .cloned()
                else {
                    return refused(Refusal::NotMoving);
                };
                if !self.is_live(asker) {
                    return refused(Refusal::AskerDown);
                }
                let stamp = entry.stamp.clone();
                took(
                    &mut lead.gone,
                    &entry.server,
                    NameKey::Identity(identity.clone()),
                    &stamp,
                );
                let arrived = IdentityEntry {
                    server: asker.clone(),
                    moving_to: None,
                    ..entry
                };
                lead.moves.remove(identity);
                self.commit(lead, vec![Change::SetIdentity(arrived)], out);
                granted(stamp)
            }
            Op::MoveCancel { identity } => {
                let entry = match lead.registry.identities.get(identity) {
                    Some(e) if e.server == *asker => e.clone(),
                    Some(_) => return refused(Refusal::Taken),
                    None => return refused(Refusal::NotOwner),
                };
                let stamp = entry.stamp.clone();
                if entry.moving_to.is_some() {
                    lead.moves.remove(identity);
                    let stays = IdentityEntry {
                        moving_to: None,
                        ..entry
                    };
                    self.commit(lead, vec![Change::SetIdentity(stays)], out);
                }
                granted(stamp)
            }
        }
    }

    pub(super) fn decide_claim(
        &mut self,
        lead: &mut LeaderState,
        asker: &ServerId,
        name: &Name,
        out: &mut Vec<Action>,
    ) -> Verdict {
        let refused = |reason| Verdict::Refused { reason };
        if !name.is_valid() {
            return refused(Refusal::Invalid);
        }
        if !self.is_live(asker) {
            return refused(Refusal::AskerDown);
        }
        if self.config.require_majority && !self.has_majority() {
            return refused(self.no_majority());
        }
        let stamp = self.next_stamp(lead);
        let change = match name {
            Name::Identity(identity) => {
                if lead.registry.identities.contains_key(identity) {
                    return refused(Refusal::Taken);
                }
                Change::SetIdentity(IdentityEntry {
                    identity: identity.clone(),
                    server: asker.clone(),
                    moving_to: None,
                    stamp: stamp.clone(),
                })
            }
            Name::Room { room, owner } => {
                if lead.registry.rooms.contains_key(room) {
                    return refused(Refusal::Taken);
                }
                let owner_here = lead
                    .registry
                    .identities
                    .get(owner)
                    .is_some_and(|e| e.server == *asker && e.moving_to.is_none());
                if !owner_here {
                    return refused(Refusal::OwnerNotHere);
                }
                if lead.registry.owns_room(owner) {
                    return refused(Refusal::OwnerHasRoom);
                }
                Change::SetRoom(RoomEntry {
                    room: room.clone(),
                    server: asker.clone(),
                    owner: owner.clone(),
                    stamp: stamp.clone(),
                })
            }
        };
        self.commit(lead, vec![change], out);
        Verdict::Granted { stamp }
    }

    pub(super) fn expire_move_at(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        identity: &str,
        out: &mut Vec<Action>,
    ) {
        lead.moves
            .insert(identity.to_string(), later(now, self.config.move_timeout));
        out.push(Action::SetTimer {
            timer: Timer::MoveExpiry {
                identity: identity.to_string(),
            },
            after: self.config.move_timeout,
        });
    }

    pub(super) fn lead_move_expiry(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        identity: &str,
        out: &mut Vec<Action>,
    ) {
        if lead.moves.get(identity).is_none_or(|due| now < *due) {
            return;
        }
        lead.moves.remove(identity);
        let Some(entry) = lead.registry.identities.get(identity).cloned() else {
            return;
        };
        let Some(to) = entry.moving_to.clone() else {
            return;
        };
        took(
            &mut lead.gone,
            &entry.server,
            NameKey::Identity(identity.to_string()),
            &entry.stamp,
        );
        let change = Change::RemoveIdentity {
            identity: identity.to_string(),
            stamp: entry.stamp,
        };
        self.commit(lead, vec![change], out);
        out.push(Action::Log(LogEvent::MoveExpired {
            identity: identity.to_string(),
            from: entry.server,
            to,
        }));
    }

    pub(super) fn lead_purge(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        server: &ServerId,
        out: &mut Vec<Action>,
    ) {
        lead.unsynced.remove(server);
        lead.queue.retain(|q| q.asker != *server);
        let identities: Vec<String> = lead
            .registry
            .identities
            .values()
            .filter(|e| e.server == *server)
            .map(|e| e.identity.clone())
            .collect();
        let rooms = lead
            .registry
            .rooms
            .values()
            .filter(|r| r.server == *server)
            .count();
        for identity in &identities {
            lead.moves.remove(identity);
        }
        if !identities.is_empty() || rooms > 0 {
            let change = Change::PurgeServer {
                server: server.clone(),
            };
            self.commit(lead, vec![change], out);
        }
        out.push(Action::Log(LogEvent::ServerPurged {
            server: server.clone(),
            identities: identities.len(),
            rooms,
        }));
        self.flush_queue(lead, now, out);
    }

    /// Merges a server's holdings into the registry: free names are
    /// (re-)registered, names it no longer holds are freed, and for names
    /// somebody else holds the later grant wins and the loser is evicted.
    pub(super) fn lead_holdings(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        from: ServerId,
        report: HoldingsReport,
        out: &mut Vec<Action>,
    ) {
        // A server the leader considers down would re-register names that
        // were just freed; it is asked again when it comes back up.
        if !self.is_live(&from) {
            return;
        }
        let log = lead
            .askers
            .entry(from.clone())
            .or_insert_with(|| AskerLog::new(report.incarnation));
        if report.incarnation < log.incarnation {
            return;
        }
        if report.incarnation > log.incarnation {
            *log = AskerLog::new(report.incarnation);
            lead.gone.remove(&from);
        }
        if report.version <= log.report_version {
            // A newer report was merged already.
            return;
        }
        if log.max_seen.is_some_and(|m| report.issued_below <= m) {
            // Made before a request already decided here: ask for a new one.
            if from != self.id {
                let msg = RegistryMessage::HoldingsRequest { term: self.term };
                self.send(&from, msg, out);
            }
            return;
        }
        log.report_version = report.version;

        let mut identities: BTreeMap<String, IdentityEntry> = BTreeMap::new();
        for mut entry in report.identities {
            if !is_valid_name(&entry.identity) {
                continue;
            }
            entry.server = from.clone();
            if entry
                .moving_to
                .as_ref()
                .is_some_and(|to| *to == from || !self.servers.contains(to))
            {
                entry.moving_to = None;
            }
            let keep = identities
                .get(&entry.identity)
                .is_none_or(|seen| seen.stamp < entry.stamp);
            if keep {
                identities.insert(entry.identity.clone(), entry);
            }
        }
        let mut rooms: BTreeMap<String, RoomEntry> = BTreeMap::new();
        for mut entry in report.rooms {
            if !is_valid_name(&entry.room) || !is_valid_name(&entry.owner) {
                continue;
            }
            entry.server = from.clone();
            let keep = rooms
                .get(&entry.room)
                .is_none_or(|seen| seen.stamp < entry.stamp);
            if keep {
                rooms.insert(entry.room.clone(), entry);
            }
        }
        let pending: BTreeSet<NameKey> = report.pending.iter().map(Name::key).collect();

        let mut changes = Vec::new();
        let mut evict: BTreeMap<ServerId, (Vec<IdentityEntry>, Vec<RoomEntry>)> = BTreeMap::new();
        // Holdings taken from the reporter after it made this report: tell
        // it again instead of re-registering them.
        if let Some(gone) = lead.gone.get_mut(&from) {
            gone.retain(|key, _| match key {
                NameKey::Identity(name) => identities.contains_key(name),
                NameKey::Room(name) => rooms.contains_key(name),
            });
            let stale = |key: NameKey, stamp: &Stamp| gone.get(&key) == Some(stamp);
            let lost_identities: Vec<IdentityEntry> = identities
                .values()
                .filter(|e| stale(NameKey::Identity(e.identity.clone()), &e.stamp))
                .cloned()
                .collect();
            let lost_rooms: Vec<RoomEntry> = rooms
                .values()
                .filter(|r| stale(NameKey::Room(r.room.clone()), &r.stamp))
                .cloned()
                .collect();
            for entry in &lost_identities {
                identities.remove(&entry.identity);
            }
            for entry in &lost_rooms {
                rooms.remove(&entry.room);
            }
            if !lost_identities.is_empty() || !lost_rooms.is_empty() {
                evict.insert(from.clone(), (lost_identities, lost_rooms));
            }
        }
        let mut started_moving = Vec::new();
        for (name, entry) in &identities {
            match lead.registry.identities.get(name) {
                None => {
                    if entry.moving_to.is_some() {
                        started_moving.push(name.clone());
                    }
                    changes.push(Change::SetIdentity(entry.clone()));
                }
                Some(current) if current.server == from => {
                    // A move the leader granted but the reporter has not
                    // heard of yet is kept.
                    let merged = IdentityEntry {
                        moving_to: current.moving_to.clone().or(entry.moving_to.clone()),
                        ..entry.clone()
                    };
                    if merged.moving_to.is_some() && !lead.moves.contains_key(name) {
                        started_moving.push(name.clone());
                    }
                    if merged != *current {
                        changes.push(Change::SetIdentity(merged));
                    }
                }
                // The reporter's client moved to the current holder: nothing
                // to do, the reporter drops it when it sees the snapshot.
                Some(current)
                    if entry.moving_to.as_ref() == Some(&current.server)
                        && entry.stamp == current.stamp => {}
                // The client moving to the reporter arrived under an earlier
                // leader.
                Some(current)
                    if current.moving_to.as_ref() == Some(&from)
                        && entry.stamp == current.stamp =>
                {
                    // As reported: it may be moving on already.
                    lead.moves.remove(name);
                    took(
                        &mut lead.gone,
                        &current.server,
                        NameKey::Identity(name.clone()),
                        &current.stamp,
                    );
                    if entry.moving_to.is_some() {
                        started_moving.push(name.clone());
                    }
                    changes.push(Change::SetIdentity(entry.clone()));
                }
                Some(current) => {
                    if entry.stamp > current.stamp {
                        lead.moves.remove(name);
                        if entry.moving_to.is_some() {
                            started_moving.push(name.clone());
                        }
                        took(
                            &mut lead.gone,
                            &current.server,
                            NameKey::Identity(name.clone()),
                            &current.stamp,
                        );
                        evict
                            .entry(current.server.clone())
                            .or_default()
                            .0
                            .push(current.clone());
                        changes.push(Change::SetIdentity(entry.clone()));
                    } else {
                        took(
                            &mut lead.gone,
                            &from,
                            NameKey::Identity(name.clone()),
                            &entry.stamp,
                        );
                        evict.entry(from.clone()).or_default().0.push(entry.clone());
                    }
                }
            }
        }
        for (name, current) in &lead.registry.identities {
            if current.server == from
                && !identities.contains_key(name)
                && !pending.contains(&NameKey::Identity(name.clone()))
            {
                changes.push(Change::RemoveIdentity {
                    identity: name.clone(),
                    stamp: current.stamp.clone(),
                });
            }
        }
        for (name, entry) in &rooms {
            match lead.registry.rooms.get(name) {
                None => changes.push(Change::SetRoom(entry.clone())),
                Some(current) if current.server == from => {
                    if current != entry {
                        changes.push(Change::SetRoom(entry.clone()));
                    }
                }
                Some(current) => {
                    if entry.stamp > current.stamp {
                        took(
                            &mut lead.gone,
                            &current.server,
                            NameKey::Room(name.clone()),
                            &current.stamp,
                        );
                        evict
                            .entry(current.server.clone())
                            .or_default()
                            .1
                            .push(current.clone());
                        changes.push(Change::SetRoom(entry.clone()));
                    } else {
                        took(
                            &mut lead.gone,
                            &from,
                            NameKey::Room(name.clone()),
                            &entry.stamp,
                        );
                        evict.entry(from.clone()).or_default().1.push(entry.clone());
                    }
                }
            }
        }
        for (name, current) in &lead.registry.rooms {
            if current.server == from
                && !rooms.contains_key(name)
                && !pending.contains(&NameKey::Room(name.clone()))
            {
                changes.push(Change::RemoveRoom {
                    room: name.clone(),
                    stamp: current.stamp.clone(),
                });
            }
        }
        for change in &changes {
            if let Change::RemoveIdentity { identity, .. } = change {
                lead.moves.remove(identity);
            }
        }

        self.commit(lead, changes, out);
        for identity in started_moving {
            self.expire_move_at(lead, now, &identity, out);
        }
        for (server, (identities, rooms)) in evict {
            let msg = RegistryMessage::Evict {
                term: self.term,
                seq: lead.seq,
                identities,
                rooms,
            };
            self.send(&server, msg, out);
        }
        lead.unsynced.remove(&from);
        if from != self.id {
            let msg = RegistryMessage::Snapshot {
                term: self.term,
                seq: lead.seq,
                identities: lead.registry.identities.values().cloned().collect(),
                rooms: lead.registry.rooms.values().cloned().collect(),
            };
            self.send(&from, msg, out);
        }
        self.flush_queue(lead, now, out);
    }

    /// Decides parked requests once no live server's holdings are awaited.
    pub(super) fn flush_queue(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        while !self.blocked(lead, now) {
            let Some(queued) = lead.queue.pop_front() else {
                break;
            };
            self.lead_request(lead, now, queued.asker, queued.ticket, queued.op, out);
        }
    }
}
