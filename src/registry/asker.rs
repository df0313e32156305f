//! The asker side: this server's requests to the leader (claims, releases,
//! moves), their retries, deadlines and answers.

use std::collections::HashSet;
use std::time::Instant;

use super::*;

/// A request of this server's that the leader has not answered yet.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    pub(super) op: Op,
    /// `None` for releases and cancels nobody waits for.
    pub(super) token: Option<u64>,
    /// `None`: retried until acknowledged (releases, cancels, abandoned
    /// claims).
    pub(super) deadline: Option<Instant>,
    pub(super) last_sent: Option<Instant>,
    /// Nobody waits for it any more (its client was told it timed out, or
    /// the chat layer released the name meanwhile): release the name if
    /// granted (an arrival whose client was told no: keep it for the
    /// client's retry, see `told_no`), unless a new request adopts it first.
    pub(super) abandoned: bool,
    /// An arrival whose client was told it timed out (not one that left):
    /// if granted, kept for that client's `movejoin` again.
    pub(super) told_no: bool,
    /// Why the leader refused this request when it was asked before (see
    /// [`Registry::unless_asked_again`]): what its client is told at the
    /// deadline.
    pub(super) refused: Option<Refusal>,
}

impl Registry {
    pub(super) fn own_has(&self, key: &NameKey) -> bool {
        match key {
            NameKey::Identity(identity) => self.own.identities.contains_key(identity),
            NameKey::Room(room) => self.own.rooms.contains_key(room),
        }
    }

    /// Whether a request about `key` that `what` picks is in flight.
    fn pending_for(&self, key: &NameKey, what: impl Fn(&Pending) -> bool) -> bool {
        self.pending_ids(key)
            .any(|id| self.pending.get(&id).is_some_and(&what))
    }

    /// Whether a claim or an arrival of `key` is in flight with a client
    /// waiting for it.
    pub(super) fn claim_pending_for(&self, key: &NameKey) -> bool {
        self.pending_for(key, |p| {
            matches!(p.op, Op::Claim(_) | Op::MoveDone { .. }) && !p.abandoned
        })
    }

    /// Whether an arrival of `key` is in flight, or waits for claims.
    pub(super) fn arrival_pending_for(&self, key: &NameKey) -> bool {
        let parked = match key {
            NameKey::Identity(identity) => self.parked.iter().any(|p| p.identity == *identity),
            NameKey::Room(_) => false,
        };
        parked || self.pending_for(key, |p| matches!(p.op, Op::MoveDone { .. }) && !p.abandoned)
    }

    /// Whether an arrival of `key` is in flight, abandoned or not: if
    /// granted, the leader registers the identity to this server.
    pub(super) fn any_arrival_pending_for(&self, key: &NameKey) -> bool {
        self.pending_for(key, |p| matches!(p.op, Op::MoveDone { .. }))
    }

    /// Whether a claim or an arrival of `key` is in flight, abandoned or
    /// not: if granted, its answer makes this server hold the name (or
    /// release it).
    pub(super) fn any_claim_pending_for(&self, key: &NameKey) -> bool {
        self.pending_for(key, |p| matches!(p.op, Op::Claim(_) | Op::MoveDone { .. }))
    }

    /// The ids of the pending requests about `key`, oldest first.
    fn pending_ids(&self, key: &NameKey) -> impl Iterator<Item = u64> + '_ {
        self.pending_keys.get(key).into_iter().flatten().copied()
    }

    fn add_pending(&mut self, id: u64, p: Pending) {
        for key in p.op.keys() {
            self.pending_keys.entry(key).or_default().insert(id);
        }
        self.pending.insert(id, p);
    }

    fn remove_pending(&mut self, id: u64) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        for key in p.op.keys() {
            if let Some(ids) = self.pending_keys.get_mut(&key) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.pending_keys.remove(&key);
                }
            }
        }
        Some(p)
    }

    /// Whether request `id` (a claim) must wait for an older release of the
    /// same name from this server to be acknowledged, so the leader sees
    /// them in order.
    fn waits_for_release(&self, id: u64, p: &Pending) -> bool {
        matches!(p.op, Op::Claim(_) | Op::MoveDone { .. })
            && p.op.keys().any(|key| {
                self.pending_ids(&key)
                    .take_while(|&r| r < id)
                    .any(|r| self.pending.get(&r).is_some_and(|o| o.op.gives_back()))
            })
    }

    /// Sends the requests among `ids` that have never been sent and need
    /// not wait; the others go with the retries. (What `send_pending` does,
    /// for a few requests: a submit or an answer must not cost a scan of
    /// every request in flight.)
    fn send_new(&mut self, now: Instant, ids: &[u64], out: &mut Vec<Action>) {
        let Some(leader) = self.reachable_leader() else {
            return;
        };
        let resolved_below = self.pending.keys().next().copied().unwrap_or(self.next_id);
        let down = self.down_list();
        for &id in ids {
            let ready = self
                .pending
                .get(&id)
                .is_some_and(|p| p.last_sent.is_none() && !self.waits_for_release(id, p));
            let Some(p) = self.pending.get_mut(&id).filter(|_| ready) else {
                continue;
            };
            p.last_sent = Some(now);
            let msg = RegistryMessage::Request {
                term: self.term,
                ticket: Ticket {
                    incarnation: self.incarnation,
                    id,
                    resolved_below,
                },
                op: p.op.clone(),
                down: down.clone(),
            };
            self.send(&leader, msg, out);
        }
    }

    /// A request a client asks for while an abandoned request exactly
    /// like it (`same`: a timed-out claim of the name, or an arrival of
    /// the identity by the same client, [`Arrival::same_client`]) is still in flight:
    /// that request becomes this client's, answered by `until`, instead of
    /// a second request that would race with the release of the first
    /// (an arrival: the first, granted with nobody waiting, would be given
    /// back, and the move with it). Only the newest request about the name
    /// is adopted, so a release asked after it keeps its place. Returns
    /// whether it adopted one.
    pub(super) fn adopt(
        &mut self,
        now: Instant,
        key: &NameKey,
        same: impl Fn(&Op) -> bool,
        (token, until): (u64, Instant),
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(id) = self.pending_ids(key).last() else {
            return false;
        };
        let Some(p) = self
            .pending
            .get_mut(&id)
            .filter(|p| p.abandoned && same(&p.op))
        else {
            return false;
        };
        p.abandoned = false;
        p.token = Some(token);
        p.deadline = Some(until);
        p.refused = None;
        out.push(Action::SetTimer {
            timer: Timer::RequestDeadline { id },
            after: until.saturating_duration_since(now),
        });
        true
    }

    pub(super) fn submit(
        &mut self,
        now: Instant,
        op: Op,
        token: Option<u64>,
        out: &mut Vec<Action>,
    ) {
        let until = later(now, self.config.claim_timeout);
        self.submit_by(now, op, token, until, out);
    }

    /// [`Registry::submit`], given up on at `until` if a client waits for
    /// it (an arrival that was parked keeps the deadline it was asked with).
    pub(super) fn submit_by(
        &mut self,
        now: Instant,
        op: Op,
        token: Option<u64>,
        until: Instant,
        out: &mut Vec<Action>,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        // Releases and cancels must reach the leader eventually, so they never
        // give up; everything a client waits for does (a client waiting for
        // a release is told at the deadline, the release going on).
        let deadline = match op {
            Op::Release(_) | Op::MoveCancel { .. } | Op::MoveGiveUp { .. } if token.is_none() => {
                None
            }
            _ => {
                out.push(Action::SetTimer {
                    timer: Timer::RequestDeadline { id },
                    after: until.saturating_duration_since(now),
                });
                Some(until)
            }
        };
        self.add_pending(
            id,
            Pending {
                op,
                token,
                deadline,
                last_sent: None,
                abandoned: false,
                told_no: false,
                refused: None,
            },
        );
        self.send_new(now, &[id], out);
    }

    /// Sends every pending request that is due (or all, if `force`) to the
    /// leader. A claim waits while a release of the same name from this
    /// server is unacknowledged, so the leader sees them in order.
    pub(super) fn send_pending(&mut self, now: Instant, force: bool, out: &mut Vec<Action>) {
        let Some(leader) = self.reachable_leader() else {
            return;
        };
        let resolved_below = self.pending.keys().next().copied().unwrap_or(self.next_id);
        let down = self.down_list();
        let waiting: HashSet<u64> = self
            .pending
            .iter()
            .filter(|(id, p)| self.waits_for_release(**id, p))
            .map(|(id, _)| *id)
            .collect();
        let interval = self.config.retry_interval;
        let mut messages = Vec::new();
        for (id, p) in self.pending.iter_mut() {
            let waits = waiting.contains(id);
            let due = force
                || p.last_sent
                    .is_none_or(|t| now.saturating_duration_since(t) >= interval);
            if waits || !due {
                continue;
            }
            p.last_sent = Some(now);
            messages.push(RegistryMessage::Request {
                term: self.term,
                ticket: Ticket {
                    incarnation: self.incarnation,
                    id: *id,
                    resolved_below,
                },
                op: p.op.clone(),
                down: down.clone(),
            });
        }
        for msg in messages {
            self.send(&leader, msg, out);
        }
    }

    pub(super) fn request_sync(&mut self, now: Instant, force: bool, out: &mut Vec<Action>) {
        let Some(leader) = self.reachable_leader() else {
            return;
        };
        if leader == self.id {
            return;
        }
        let due = force
            || self
                .sync_sent_at
                .is_none_or(|t| now.saturating_duration_since(t) >= self.config.retry_interval);
        if due {
            self.sync_sent_at = Some(now);
            let msg = RegistryMessage::Holdings {
                term: self.term,
                report: self.report(),
            };
            self.send(&leader, msg, out);
        }
    }

    pub(super) fn give_up(&mut self, now: Instant, id: u64, out: &mut Vec<Action>) {
        let due = self
            .pending
            .get(&id)
            .is_some_and(|p| p.deadline.is_some_and(|d| now >= d));
        if !due {
            return;
        }
        let reason = match self.pending.get(&id).and_then(|p| p.refused.clone()) {
            Some(refused) => refused,
            None if self.reachable_leader().is_some() => Refusal::LeaderTimeout,
            None => Refusal::NoLeader,
        };
        // A claim stays in flight, abandoned: the client is told now, and
        // the leader's answer is still awaited. Under heavy loss the leader
        // has usually granted it already and only the commit or the answer
        // is late; a retry of the same claim adopts this request (see
        // `adopt`) and gets that answer. Giving up here instead would
        // cost a release the retry has to wait for, and with it two more
        // commits under the same deadline: the retry timed out too, and the
        // next one, over and over (the names-free regression of issue #11).
        // A grant that arrives with nobody waiting is released then. An
        // arrival stays in flight the same way: only its answer names the
        // grant an undo may release (the move's announcement may not have
        // reached this server), and a release of whatever this server holds
        // under the name, queued at a leader nobody hears, could free a
        // later grant of it to this server. Another arrival of the identity
        // waits meanwhile (see `accept_move`).
        if let Some(p) = self.pending.get_mut(&id).filter(|p| p.op.gives_back()) {
            // Its client has waited long enough (no leader, or a slow one);
            // the release itself goes on until the leader has it.
            p.deadline = None;
            if let Some(token) = p.token.take() {
                Self::reply(out, token, Ok(()));
            }
            return;
        }
        if let Some(p) = self
            .pending
            .get_mut(&id)
            .filter(|p| matches!(p.op, Op::Claim(_) | Op::MoveDone { .. }))
        {
            p.deadline = None;
            p.abandoned = true;
            p.told_no = matches!(p.op, Op::MoveDone { .. });
            if let Some(token) = p.token.take() {
                Self::reply(out, token, Err(reason));
            }
            return;
        }
        let Some(p) = self.remove_pending(id) else {
            return;
        };
        if let Some(token) = p.token {
            Self::reply(out, token, Err(reason));
        }
        // The leader may have granted the move anyway: cancel it, so
        // nothing leaks. (An abandoned move stays reserved until its cancel
        // is acknowledged: the target may have taken the identity meanwhile.)
        if let Op::MoveStart {
            identity, proof, ..
        } = p.op
        {
            self.submit(now, Op::MoveCancel { identity, proof }, None, out);
        }
    }

    /// A claim or an arrival refused because this server still hears a
    /// server the leader counts as freed is asked again, as a new request,
    /// with the next retry, until its client's deadline: the two usually
    /// agree within a few hundred milliseconds (a leader that just
    /// restarted counts the servers it has not linked to yet as freed, and
    /// refused a client arriving at a destination that heard them; near the
    /// move's timeout, its name was lost, a fault tester). Returns the
    /// request and its answer if it is not asked again.
    fn unless_asked_again(
        &mut self,
        now: Instant,
        p: Pending,
        verdict: Verdict,
        out: &mut Vec<Action>,
    ) -> Option<(Pending, Verdict)> {
        let reason = match &verdict {
            Verdict::Refused {
                reason: reason @ Refusal::HearsDownServer { .. },
            } => reason.clone(),
            _ => return Some((p, verdict)),
        };
        let waited_for = matches!(p.op, Op::Claim(_) | Op::MoveDone { .. }) && !p.abandoned;
        let Some(deadline) = p.deadline.filter(|d| now < *d && waited_for) else {
            return Some((p, verdict));
        };
        let id = self.next_id;
        self.next_id += 1;
        out.push(Action::SetTimer {
            timer: Timer::RequestDeadline { id },
            after: deadline.saturating_duration_since(now),
        });
        // Sent with the next retry (as due from when the refused one was
        // sent), not at once: the leader would refuse it again until the
        // two agree.
        let again = Pending {
            refused: Some(reason),
            ..p
        };
        self.add_pending(id, again);
        None
    }

    pub(super) fn on_answer(
        &mut self,
        now: Instant,
        id: u64,
        seq: u64,
        verdict: Verdict,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.remove_pending(id) else {
            return;
        };
        let Some((p, verdict)) = self.unless_asked_again(now, p, verdict, out) else {
            return;
        };
        let keys: Vec<NameKey> = p.op.keys().collect();
        let was_release = p.op.gives_back();
        let sets_state = matches!(verdict, Verdict::Granted { .. }) && !p.abandoned && !was_release;
        match (p.op, verdict) {
            (Op::Claim(name), Verdict::Granted { stamp }) => {
                if p.abandoned {
                    // Nobody waits for it: give it back, unless a client
                    // here holds the name (the leader's entry is that
                    // client's then, and a release would free it under it).
                    if !self.own_has(&name.key()) {
                        self.submit(now, Op::Release(vec![Given { name, stamp }]), None, out);
                    }
                } else {
                    match name {
                        Name::Identity(identity) => self.hold_identity(identity, stamp),
                        Name::Room { room, owner } => self.own.set_room(RoomEntry {
                            room,
                            server: self.id.clone(),
                            owner,
                            stamp,
                        }),
                    }
                    if let Some(token) = p.token {
                        Self::reply(out, token, Ok(()));
                    }
                }
            }
            (
                Op::MoveDone {
                    identity, arrival, ..
                },
                Verdict::Granted { stamp },
            ) => {
                if p.abandoned {
                    // Kept for its client's `movejoin` again if it was told
                    // no, else given back; never over what a client here
                    // holds.
                    let name = Name::Identity(identity.clone());
                    if !self.holds(&name) {
                        if p.told_no {
                            self.keep_unclaimed(now, (identity, arrival), stamp, seq, out);
                        } else {
                            self.submit(now, Op::Release(vec![Given { name, stamp }]), None, out);
                        }
                    }
                } else {
                    self.replica.remove_identity(&identity);
                    self.hold_identity(identity, stamp);
                    if let Some(token) = p.token {
                        Self::reply(out, token, Ok(()));
                    }
                }
            }
            (
                Op::MoveStart {
                    identity,
                    to,
                    proof,
                },
                Verdict::Granted { .. },
            ) => {
                let result = match self.own.identities.get_mut(&identity) {
                    Some(entry) => {
                        entry.moving_to = Some(to);
                        entry.move_proof = Some(proof.clone());
                        // Its client is routed now: the move's time starts
                        // here, whatever the others saw (the answer may
                        // come long after the grant, asked again of a new
                        // leader).
                        let seen = MoveSeen::new(proof, now, true);
                        self.moves_seen.insert(identity, seen);
                        Ok(())
                    }
                    // Released or evicted meanwhile; the leader's move expires.
                    None => Err(Refusal::NotOwner),
                };
                if let Some(token) = p.token {
                    Self::reply(out, token, result);
                }
            }
            (Op::Release(_), _) => {
                if let Some(token) = p.token {
                    Self::reply(out, token, Ok(()));
                }
            }
            (Op::MoveCancel { identity, proof }, Verdict::Granted { .. }) => {
                if let Some(entry) = self
                    .own
                    .identities
                    .get_mut(&identity)
                    .filter(|e| e.move_proof.as_ref() == Some(&proof))
                {
                    entry.moving_to = None;
                    entry.move_proof = None;
                }
            }
            // The own entry went when the client quit; the leader freed
            // the identity, or it was no longer on that move.
            (Op::MoveGiveUp { .. }, _) => {
                if let Some(token) = p.token {
                    Self::reply(out, token, Ok(()));
                }
            }
            (Op::MoveCancel { identity, .. }, Verdict::Refused { reason }) => {
                self.move_refused(now, &identity, None, &reason, out);
            }
            (Op::MoveStart { identity, to, .. }, Verdict::Refused { reason }) => {
                self.move_refused(now, &identity, Some(&to), &reason, out);
                if let Some(token) = p.token {
                    Self::reply(out, token, Err(reason));
                }
            }
            (_, Verdict::Refused { reason }) => {
                if let Some(token) = p.token {
                    Self::reply(out, token, Err(reason));
                }
            }
        }
        // An acknowledged release may unblock a claim of the same names.
        let mut unblocked: Vec<u64> = Vec::new();
        for key in keys {
            if was_release {
                unblocked.extend(self.pending_ids(&key));
            }
            // Marks only matter (and only stay) while the name is held here.
            if !self.own_has(&key) {
                self.marks.remove(&key);
            } else if sets_state {
                self.marks.insert(key, (self.term, seq));
            }
        }
        unblocked.sort_unstable();
        unblocked.dedup();
        self.send_new(now, &unblocked, out);
    }
}
