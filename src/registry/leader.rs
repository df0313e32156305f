//! The leader side: the authoritative registry, the claim serializer, the
//! per-asker answer cache, and the merging of holdings reports.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
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
    pub(super) moves: HashMap<String, MoveDue>,
    /// Moves granted by an earlier leader that their origin, reporting,
    /// had not heard of (its client still there, not routed), by identity,
    /// with the grant's stamp: if such a move ends unfinished (its target
    /// freed, or timed out), the identity stays with its origin instead of
    /// being freed under its client. Forgotten once anything else changes
    /// the identity.
    pub(super) unheard: HashMap<String, Stamp>,
    /// Moving identities whose move this leader granted to their origin:
    /// its answer may have reached the origin, so a report made before it
    /// did (not moving) does not make the move unheard.
    pub(super) told: HashSet<String>,
    /// Holdings taken from a server (evicted, moved away, expired) that it
    /// may not have heard of yet: a report still listing one (same stamp)
    /// is older than that news and must not re-register it. Forgotten when
    /// the server reports without it.
    pub(super) gone: HashMap<ServerId, HashMap<NameKey, Stamp>>,
    /// The registry's base is built: a quorum of servers reported to this
    /// leader (promising to ignore older leaders), and the most advanced
    /// replica among their reports became the registry.
    pub(super) based: bool,
    /// Reports that arrived before the base was built, the newest per server.
    pub(super) reports: BTreeMap<ServerId, HoldingsReport>,
    /// Highest announcement of this term each follower acknowledged.
    pub(super) acked: HashMap<ServerId, u64>,
    /// Highest announcement a quorum (this leader included) acknowledged;
    /// `Some(0)`: a quorum applied this leader's snapshot, nothing more.
    pub(super) committed: Option<u64>,
    /// Answers decided at an announcement not committed yet, or not
    /// applied by every live follower yet (see [`SPREAD_WAIT`]), in order.
    pub(super) held: VecDeque<HeldAnswer>,
    /// When the [`Timer::HeldAnswers`] set last goes off, if one is set.
    pub(super) held_timer: Option<Instant>,
    /// Live followers an answer waited [`SPREAD_WAIT`] for in vain: not
    /// waited for again until one of their acknowledgements comes within
    /// that time of its announcement (so a lossy or cut-off follower costs
    /// one wait, not one per grant; the first grant after it recovers is
    /// not waited for either).
    pub(super) laggards: HashSet<ServerId>,
    /// Recent announcements, sent again to a follower that does not
    /// acknowledge them.
    pub(super) recent: VecDeque<Sent>,
    /// Servers each follower's failure detector sees down, as it last said.
    pub(super) down_votes: HashMap<ServerId, BTreeSet<ServerId>>,
    /// Servers whose names were freed in this term (or, down and holding
    /// nothing when the base was built, maybe in an earlier one), until
    /// their holdings are merged again.
    pub(super) purged: BTreeSet<ServerId>,
    /// The announcement being filled, numbered `seq` already: what is
    /// decided while the runtime hands the registry a batch of inputs goes
    /// out as one announcement when the batch ends (see
    /// [`Registry::end_batch`]).
    pub(super) open: Option<Sent>,
    /// The names decided on in `open`: a decision on one of them sends
    /// `open` first, so that an announcement never holds two holdings of one
    /// name (they would have the same stamp).
    pub(super) open_names: HashSet<NameKey>,
    /// Moves granted to another server whose origin has not yet applied
    /// the announcement that granted them, by identity: that
    /// announcement's number, and the move's proof. The origin routes its
    /// client only when the answer, which follows that announcement on the
    /// same link, arrives: the later of its acknowledgement and the
    /// answer's sending dates the move (see [`Registry::date_routes`]).
    pub(super) unrouted: HashMap<String, (u64, MoveProof)>,
}

/// When an open move ends.
#[derive(Debug, Clone, Copy)]
pub(super) struct MoveDue {
    /// Its timeout, counted from its route.
    pub(super) timeout: Instant,
    /// Later than that, while its client's arrival waits (see
    /// [`Registry::hold_move`]); kept when the move is dated again.
    pub(super) held: Option<Instant>,
}

impl MoveDue {
    fn at(&self) -> Instant {
        self.held
            .map_or(self.timeout, |held| held.max(self.timeout))
    }
}

/// An answer waiting for the announcement it was decided at to commit.
#[derive(Debug, Clone)]
pub(super) struct HeldAnswer {
    pub(super) seq: u64,
    /// When it was decided.
    pub(super) at: Option<Instant>,
    pub(super) to: ServerId,
    pub(super) ticket: Ticket,
    pub(super) verdict: Verdict,
}

/// An announcement as sent, kept for sending again.
#[derive(Debug, Clone)]
pub(super) struct Sent {
    pub(super) seq: u64,
    pub(super) at: Option<Instant>,
    pub(super) changes: Vec<Change>,
}

/// Announcements kept for sending again; a follower further behind gets a
/// snapshot instead.
const RECENT: usize = 1024;

/// How long a committed grant's answer waits for the live followers that
/// have not applied it yet. A quorum having applied it keeps it safe; every
/// live server having applied it means that whoever its client tells (a
/// room's id, a name given back) finds it so on any server at once. A
/// follower slower than this (lossy, cut one way) delays answers no more.
pub(super) const SPREAD_WAIT: Duration = Duration::from_millis(50);

/// Most announcements sent again to one follower at once; further behind,
/// it is asked for its holdings and gets a snapshot back.
const RESEND_MAX: u64 = 64;

impl LeaderState {
    /// Whether some announcement is not acknowledged by a quorum yet, or by
    /// some live follower.
    pub(super) fn behind(&self, live: &BTreeSet<ServerId>) -> bool {
        self.committed < Some(self.seq)
            || live
                .iter()
                .any(|p| self.acked.get(p).is_some_and(|a| *a < self.seq))
    }
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
        // This server's own report, replica included, made before anything
        // of the new term touches it.
        let report = self.report();
        let mut lead = LeaderState::default();
        let deadline = later(now, self.config.sync_timeout);
        lead.unsynced.insert(self.id.clone(), deadline);
        for peer in &self.live {
            lead.unsynced.insert(peer.clone(), deadline);
        }
        self.leading = Some(Box::new(lead));
        self.last_seq = Some(0);
        let peers: Vec<ServerId> = self.live.iter().cloned().collect();
        for peer in peers {
            let msg = RegistryMessage::HoldingsRequest { term: self.term };
            self.send(&peer, msg, out);
        }
        self.loopback.push_back(RegistryMessage::Holdings {
            term: self.term,
            report,
        });
        out.push(Action::SetTimer {
            timer: Timer::SyncDeadline,
            after: self.config.sync_timeout,
        });
    }

    /// The stamp of a holding decided now: it goes out in the open
    /// announcement, or in the next one.
    pub(super) fn next_stamp(&self, lead: &LeaderState) -> Stamp {
        Stamp {
            term: self.term,
            seq: lead.open.as_ref().map_or(lead.seq + 1, |open| open.seq),
            leader: self.id.clone(),
        }
    }

    /// Applies changes to the registry and this server's own view, as part
    /// of the open announcement (opened here if there is none). It goes out
    /// when the registry's input, or batch of inputs, is handled.
    pub(super) fn commit(
        &mut self,
        lead: &mut LeaderState,
        changes: Vec<Change>,
        out: &mut Vec<Action>,
    ) {
        if changes.is_empty() {
            return;
        }
        if lead.open.is_none() {
            lead.seq += 1;
            lead.open = Some(Sent {
                seq: lead.seq,
                at: self.clock,
                changes: Vec::new(),
            });
        }
        for change in &changes {
            match change {
                Change::SetIdentity(IdentityEntry {
                    identity,
                    moving_to,
                    ..
                }) => {
                    lead.unheard.remove(identity);
                    if moving_to.is_none() {
                        lead.told.remove(identity);
                    }
                }
                Change::RemoveIdentity { identity, .. } => {
                    lead.unheard.remove(identity);
                    lead.told.remove(identity);
                }
                Change::PurgeServer { server } => {
                    let registry = &lead.registry;
                    let elsewhere = |identity: &String| {
                        registry
                            .identities
                            .get(identity)
                            .is_none_or(|e| e.server != *server)
                    };
                    lead.unheard.retain(|identity, _| elsewhere(identity));
                    lead.told.retain(elsewhere);
                }
                Change::SetRoom(_) | Change::RemoveRoom { .. } => {}
            }
            lead.registry.apply(change);
            // The leader re-registers by merging, never by resync requests.
            let _ = self.apply_change(change, (self.term, lead.seq), out);
        }
        self.forget_moves_purged(&changes);
        self.last_seq = Some(lead.seq);
        self.applied = self.leader_position(lead.seq);
        if let Some(open) = lead.open.as_mut() {
            open.changes.extend(changes);
        }
        self.advance_commit(lead, out);
    }

    /// Sends the open announcement to every other server, and keeps it for
    /// sending again. Anything that tells a follower an announcement number
    /// (a snapshot, an eviction, a resend) calls this first, so that the
    /// number it names has gone out.
    pub(super) fn announce(&mut self, lead: &mut LeaderState, out: &mut Vec<Action>) {
        let Some(open) = lead.open.take() else {
            return;
        };
        lead.open_names.clear();
        if lead.recent.len() >= RECENT {
            lead.recent.pop_front();
        }
        let msg = RegistryMessage::Announce {
            term: self.term,
            seq: open.seq,
            changes: open.changes.clone(),
        };
        lead.recent.push_back(open);
        out.push(Action::Broadcast { msg });
    }

    /// Whether new decisions must wait: the base is not built yet, or a live
    /// server's holdings are awaited (for at most the sync timeout).
    pub(super) fn blocked(&self, lead: &LeaderState, now: Instant) -> bool {
        !lead.based
            || lead
                .unsynced
                .iter()
                .any(|(server, until)| now < *until && self.is_live(server))
    }

    /// The highest announcement a quorum has applied: the leader's own, and
    /// each follower's acknowledgement at this term (a server that is down
    /// now still applied what it acknowledged).
    fn quorum_seq(&self, lead: &LeaderState) -> Option<u64> {
        let mut seqs: Vec<Option<u64>> = self
            .servers
            .iter()
            .filter(|s| **s != self.id)
            .map(|s| lead.acked.get(s).copied())
            .collect();
        seqs.push(Some(lead.seq));
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        seqs.get(self.quorum() - 1).copied().flatten()
    }

    /// Whether announcement `seq` is committed.
    fn is_committed(lead: &LeaderState, seq: u64) -> bool {
        lead.committed.is_some_and(|c| seq <= c)
    }

    /// Whether the answer to a decision made at announcement `seq` has
    /// been let go: a refusal hands out nothing and goes at once; a grant
    /// waits in `held` until a quorum has applied everything it was decided
    /// on, so any later leader's base holds it, and the live followers too
    /// (see [`Registry::advance_commit`]). Answers leave `held` in order.
    fn answerable(lead: &LeaderState, verdict: &Verdict, seq: u64) -> bool {
        matches!(verdict, Verdict::Refused { .. }) || Self::grants_answered(lead, seq)
    }

    /// Whether the answers to the grants decided at announcement `seq`
    /// have been let go (see [`Registry::answerable`]).
    fn grants_answered(lead: &LeaderState, seq: u64) -> bool {
        Self::is_committed(lead, seq) && lead.held.front().is_none_or(|h| h.seq > seq)
    }

    /// The live followers, laggards aside, that have not acknowledged
    /// announcement `seq`.
    fn not_applied<'a>(
        &'a self,
        lead: &'a LeaderState,
        seq: u64,
    ) -> impl Iterator<Item = &'a ServerId> + 'a {
        self.live
            .iter()
            .filter(|p| !lead.laggards.contains(*p))
            .filter(move |p| lead.acked.get(*p).is_none_or(|a| *a < seq))
    }

    /// Moves the commit point and sends the answers it releases: those
    /// committed and applied by every live follower, or committed and
    /// held for [`SPREAD_WAIT`]. Sets a timer for the first one left
    /// waiting on a follower.
    pub(super) fn advance_commit(&mut self, lead: &mut LeaderState, out: &mut Vec<Action>) {
        lead.committed = lead.committed.max(self.quorum_seq(lead));
        let now = self.clock;
        while let Some(held) = lead.held.front() {
            if !Self::is_committed(lead, held.seq) {
                break;
            }
            let due = held.at.map(|at| at + SPREAD_WAIT);
            let waited = match (now, due) {
                (Some(now), Some(due)) => now >= due,
                _ => true,
            };
            if waited {
                let behind: Vec<ServerId> = self.not_applied(lead, held.seq).cloned().collect();
                lead.laggards.extend(behind);
            } else if self.not_applied(lead, held.seq).next().is_some() {
                if let (Some(now), Some(due)) = (now, due)
                    && lead.held_timer.is_none_or(|set| set < due)
                {
                    lead.held_timer = Some(due);
                    out.push(Action::SetTimer {
                        timer: Timer::HeldAnswers,
                        after: due.saturating_duration_since(now),
                    });
                }
                break;
            }
            let Some(held) = lead.held.pop_front() else {
                break;
            };
            self.send_answer(&held.to, &held.ticket, held.verdict, held.seq, out);
        }
        if !lead.unrouted.is_empty() {
            self.date_routes(lead, out);
        }
    }

    /// A follower applied announcements up to `seq`.
    pub(super) fn lead_ack(
        &mut self,
        lead: &mut LeaderState,
        from: &ServerId,
        seq: u64,
        out: &mut Vec<Action>,
    ) {
        let seq = seq.min(lead.seq);
        let acked = lead.acked.get(from).copied();
        if acked.is_none_or(|a| seq > a) {
            lead.acked.insert(from.clone(), seq);
            if lead.laggards.contains(from) {
                // Announcements in `recent` are numbered one after another.
                let sent = lead.recent.front().and_then(|first| {
                    let index = usize::try_from(seq.checked_sub(first.seq)?).ok()?;
                    lead.recent.get(index)
                });
                let timely = sent
                    .and_then(|s| s.at)
                    .zip(self.clock)
                    .is_some_and(|(at, now)| now.saturating_duration_since(at) <= SPREAD_WAIT);
                if timely {
                    lead.laggards.remove(from);
                }
            }
            self.advance_commit(lead, out);
        }
    }

    /// Dates the moves granted to another server whose origin has both
    /// applied the announcement that granted them and been sent the
    /// answer: from now, the later of the two. The origin routes its
    /// client when the answer, sent after that announcement on the same
    /// link, arrives. A grant dated from its decision lost the time the
    /// link held both back (a fault tester: the leader's datagrams to the
    /// origin dropped for 300 ms, the move ended 2.7 s after the route with
    /// a 3 s timeout, and the client arriving at 2.76 s was refused); one
    /// dated from the origin's acknowledgement lost the time the answer
    /// waited for the other followers of a larger cluster (a reviewer).
    /// Called when the commit point may have moved (on each
    /// acknowledgement too).
    fn date_routes(&mut self, lead: &mut LeaderState, out: &mut Vec<Action>) {
        let Some(now) = self.clock else {
            return;
        };
        // Moves that ended meanwhile are forgotten.
        let registry = &lead.registry;
        let open = |identity: &String, proof: &MoveProof| {
            let entry = registry.identities.get(identity);
            entry.is_some_and(|e| e.move_proof.as_ref() == Some(proof))
        };
        lead.unrouted
            .retain(|identity, (_, proof)| open(identity, proof));
        let routed: Vec<(String, MoveProof)> = lead
            .unrouted
            .iter()
            .filter(|(identity, (seq, _))| {
                let origin = registry.identities.get(*identity).map(|e| &e.server);
                let applied = origin.and_then(|o| lead.acked.get(o));
                applied.is_some_and(|a| a >= seq) && Self::grants_answered(lead, *seq)
            })
            .map(|(identity, (_, proof))| (identity.clone(), proof.clone()))
            .collect();
        for (identity, proof) in routed {
            lead.unrouted.remove(&identity);
            self.lease_from_route(lead, now, (&identity, &proof), out);
        }
    }

    /// The view a request came with: taken as the asker's liveness when it
    /// differs from the last one known (usually both are empty).
    pub(super) fn lead_view(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        from: &ServerId,
        down: Vec<ServerId>,
        out: &mut Vec<Action>,
    ) {
        if *from == self.id {
            return;
        }
        let known = lead.down_votes.get(from);
        let same =
            known.is_some_and(|d| d.len() == down.len() && down.iter().all(|s| d.contains(s)));
        if !same {
            self.lead_liveness(lead, now, from, down, out);
        }
    }

    /// A follower says which servers it sees down.
    pub(super) fn lead_liveness(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        from: &ServerId,
        down: Vec<ServerId>,
        out: &mut Vec<Action>,
    ) {
        lead.down_votes
            .insert(from.clone(), down.into_iter().collect());
        self.lead_check_purges(lead, now, out);
    }

    /// Frees the names of every server that this leader and every live
    /// follower see down, when they make a quorum. A server that some live
    /// server still hears keeps its names: it may be serving clients, and
    /// within servers that can talk no name is held twice (under a
    /// non-transitive cut, the majority that lost an old leader must not
    /// hand its names to clients of a server that still talks to it).
    pub(super) fn lead_check_purges(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if !lead.based {
            return;
        }
        let down: Vec<ServerId> = self
            .servers
            .iter()
            .filter(|s| !self.is_live(s) && !lead.purged.contains(*s))
            .filter(|s| self.all_see_down(lead, s))
            .cloned()
            .collect();
        for server in down {
            self.lead_purge(lead, now, &server, out);
        }
    }

    /// Whether every live follower sees `server` down, as this leader does
    /// (callers ask only of a server not live here), and they make a quorum.
    fn all_see_down(&self, lead: &LeaderState, server: &ServerId) -> bool {
        let sees_down = |v: &ServerId| lead.down_votes.get(v).is_some_and(|d| d.contains(server));
        let live = self.live.iter().filter(|v| **v != self.id);
        let votes = 1 + live.clone().filter(|v| sees_down(v)).count();
        live.clone().all(sees_down) && votes >= self.quorum()
    }

    /// A server whose names were freed (by this leader, or, when it is down
    /// and holds nothing in the registry, maybe by an earlier one), and not
    /// merged back since, that `asker` has not said it sees down. A server
    /// is freed only when every live follower sees it down, but one that
    /// was down itself then (cut off with it, on its side of a partition)
    /// comes back still hearing it: a name freed from that server, granted
    /// to the asker, would be held twice on two servers that talk (the
    /// faults test found this under a fluttering partition). Its claims and
    /// arrivals wait until the asker sees the server down too, or the
    /// server's holdings are merged again (not merely seen up: it may go
    /// down again before it reports).
    fn heard_purged(&self, lead: &LeaderState, asker: &ServerId) -> Option<ServerId> {
        if *asker == self.id {
            return None;
        }
        // One that is up again waits in `unsynced` (see `blocked`).
        let sees_down = lead.down_votes.get(asker);
        lead.purged
            .iter()
            .filter(|s| !self.is_live(s))
            .find(|s| !sees_down.is_some_and(|d| d.contains(*s)))
            .cloned()
    }

    /// Sends `peer` what it has not acknowledged: recent announcements
    /// older than the retry interval (all of them if `force`), or, if it is
    /// too far behind, a holdings request (a snapshot answers its report).
    fn resend(
        &mut self,
        lead: &LeaderState,
        now: Instant,
        peer: &ServerId,
        force: bool,
        out: &mut Vec<Action>,
    ) {
        let Some(&acked) = lead.acked.get(peer) else {
            return;
        };
        if acked >= lead.seq {
            return;
        }
        let reaches_back = lead.recent.front().is_some_and(|s| s.seq <= acked + 1);
        if lead.seq - acked > RESEND_MAX || !reaches_back {
            let msg = RegistryMessage::HoldingsRequest { term: self.term };
            self.send(peer, msg, out);
            return;
        }
        let interval = self.config.retry_interval;
        let due: Vec<RegistryMessage> = lead
            .recent
            .iter()
            .filter(|s| s.seq > acked)
            .filter(|s| {
                force
                    || s.at
                        .is_none_or(|at| now.saturating_duration_since(at) >= interval)
            })
            .map(|s| RegistryMessage::Announce {
                term: self.term,
                seq: s.seq,
                changes: s.changes.clone(),
            })
            .collect();
        for msg in due {
            self.send(peer, msg, out);
        }
    }

    /// Retry tick: announcements nobody acknowledged go again.
    pub(super) fn lead_retry(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        self.announce(lead, out);
        let peers: Vec<ServerId> = self.live.iter().cloned().collect();
        for peer in peers {
            self.resend(lead, now, &peer, false, out);
        }
    }

    /// The link to `peer` was replaced: what it may have missed goes again now.
    pub(super) fn lead_link_reset(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        peer: &ServerId,
        out: &mut Vec<Action>,
    ) {
        self.announce(lead, out);
        if !lead.based || lead.unsynced.contains_key(peer) || !lead.acked.contains_key(peer) {
            let msg = RegistryMessage::HoldingsRequest { term: self.term };
            self.send(peer, msg, out);
        } else {
            self.resend(lead, now, peer, true, out);
        }
    }

    /// A holdings report at this term: merged at once once the base is
    /// built; before that, kept until a quorum has reported.
    pub(super) fn lead_report(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        from: ServerId,
        report: HoldingsReport,
        out: &mut Vec<Action>,
    ) {
        if from != self.id {
            lead.down_votes
                .insert(from.clone(), report.down.iter().cloned().collect());
        }
        if lead.based {
            self.lead_holdings(lead, now, from, report, out);
            self.flush_queue(lead, now, out);
            self.lead_check_purges(lead, now, out);
            return;
        }
        if !self.is_live(&from) {
            return;
        }
        let newer = lead.reports.get(&from).is_none_or(|kept| {
            (report.incarnation, report.version) > (kept.incarnation, kept.version)
        });
        if newer {
            lead.reports.insert(from, report);
        }
        if lead.reports.len() >= self.quorum() && lead.reports.contains_key(&self.id) {
            self.build_base(lead, now, out);
        }
    }

    /// Builds the registry of this term from a quorum's reports. Every name
    /// an earlier leader committed was acknowledged by a quorum, and any two
    /// quorums share a server, so the most advanced replica among these
    /// reports holds it (or what a later commit made of it): that replica
    /// is the base, and every report's own holdings are merged over it.
    fn build_base(&mut self, lead: &mut LeaderState, now: Instant, out: &mut Vec<Action>) {
        let reports = std::mem::take(&mut lead.reports);
        let mut base = Table::default();
        if let Some(best) = reports.values().max_by_key(|r| r.position) {
            for entry in &best.replica_identities {
                if is_valid_name(&entry.identity) && self.servers.contains(&entry.server) {
                    base.set_identity(entry.clone());
                }
            }
            for entry in &best.replica_rooms {
                if is_valid_name(&entry.room)
                    && is_valid_name(&entry.owner)
                    && self.servers.contains(&entry.server)
                {
                    base.set_room(entry.clone());
                }
            }
        }
        // This server's view follows the registry from now on.
        self.replica.clear();
        for entry in base.identities.values() {
            if self.replicates(entry) {
                self.replica.set_identity(entry.clone());
            }
        }
        for entry in base.rooms.values().filter(|r| r.server != self.id) {
            self.replica.set_room(entry.clone());
        }
        let moving: Vec<IdentityEntry> = base
            .identities
            .values()
            .filter(|e| e.moving_to.is_some())
            .cloned()
            .collect();
        let moving_in_base = |identity: &String| {
            let entry = base.identities.get(identity);
            entry.is_some_and(|e| e.moving_to.is_some())
        };
        self.moves_seen
            .retain(|identity, _| moving_in_base(identity));
        lead.registry = base;
        lead.based = true;
        self.applied = self.leader_position(lead.seq);
        for entry in moving {
            self.note_move(&entry);
            let ages = reports.iter().map(|(from, r)| (from, &r.move_ages[..]));
            self.date_move(now, &entry, ages);
            self.expire_move_at(lead, now, &entry.identity, out);
        }
        // Own holdings first: they are this server's own truth. Every
        // report is merged before anything queued is decided: the base is
        // the most advanced replica, which lacks its reporter's own names
        // (they are in the report's holdings), and once the sync deadline
        // has passed nothing else holds the queue back. Deciding after the
        // first merge granted names a majority had committed to the
        // reporters still to be merged (tests/faults, leaderoneway).
        let mut reports: Vec<(ServerId, HoldingsReport)> = reports.into_iter().collect();
        reports.sort_by_key(|(from, _)| *from != self.id);
        for (from, report) in reports {
            self.lead_holdings(lead, now, from, report, out);
        }
        // A down server with no name in the registry may be one an earlier
        // leader freed: counted as freed until its holdings are merged, so
        // a server that still hears it is not given its names (see
        // `heard_purged`). Moves to it end if every live server sees it
        // down too (its clients get their names back at once); else it may
        // be up, only not heard yet by this leader, which just restarted,
        // with the client on its way (a fault tester: ending them then
        // refused the client of a move to a server that had restarted just
        // before the leader).
        let freed: Vec<ServerId> = self
            .servers
            .iter()
            .filter(|s| !self.is_live(s))
            .filter(|s| {
                !lead.registry.identities.values().any(|e| e.server == **s)
                    && !lead.registry.rooms.values().any(|r| r.server == **s)
            })
            .cloned()
            .collect();
        let dead: Vec<ServerId> = freed
            .iter()
            .filter(|s| self.all_see_down(lead, s))
            .cloned()
            .collect();
        for server in &dead {
            self.end_moves_to(lead, server, out);
        }
        lead.purged.extend(freed);
        self.lead_check_purges(lead, now, out);
        self.flush_queue(lead, now, out);
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
            // A grant not committed yet goes out when it is.
            if Self::answerable(lead, &verdict, seq) {
                if let (
                    Op::MoveStart {
                        identity, proof, ..
                    },
                    Verdict::Granted { .. },
                ) = (&op, &verdict)
                {
                    // The origin did not get it: it routes its client when
                    // this one arrives.
                    self.lease_from_route(lead, now, (identity, proof), out);
                }
                self.send_answer(&from, &ticket, verdict, seq, out);
            }
            return;
        }
        if (!lead.based || op.waits_for_sync()) && self.blocked(lead, now) {
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
            // A release or cancel is sent again until it is answered, and
            // a refusal would end it with its names still registered here:
            // left unanswered, its next retry finds room.
            if !op.waits_for_sync() {
                return;
            }
            let verdict = Verdict::Refused {
                reason: Refusal::Busy,
            };
            self.record_and_answer(lead, &from, &ticket, verdict, out);
            return;
        }
        if op.keys().any(|key| lead.open_names.contains(&key)) {
            self.announce(lead, out);
        }
        let verdict = self.decide(lead, now, &from, &op, out);
        if lead.open.is_some() {
            lead.open_names.extend(op.keys());
        }
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
        if matches!(verdict, Verdict::Refused { .. }) {
            self.send_answer(to, ticket, verdict, lead.seq, out);
        } else {
            lead.held.push_back(HeldAnswer {
                seq: lead.seq,
                at: self.clock,
                to: to.clone(),
                ticket: ticket.clone(),
                verdict,
            });
            self.advance_commit(lead, out);
        }
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
            Op::Release(given) => {
                let changes = given
                    .iter()
                    .filter_map(|g| Self::released(lead, asker, g))
                    .collect();
                self.commit(lead, changes, out);
                granted(Stamp::default())
            }
            Op::MoveStart {
                identity,
                to,
                proof,
            } => {
                let entry = match lead.registry.identities.get(identity) {
                    Some(e) if e.server == *asker => e.clone(),
                    // Another server has it now (a movejoin won a race, or
                    // a heal): the asker's client must go.
                    Some(_) => return refused(Refusal::Taken),
                    None => return refused(Refusal::NotOwner),
                };
                if let Some(target) = &entry.moving_to {
                    return if target == to && !self.is_live(to) {
                        refused(Refusal::TargetDown)
                    } else if target == to {
                        // The origin hears of the move now, and routes its
                        // client now: a full move timeout from here.
                        lead.unheard.remove(identity);
                        lead.told.insert(identity.clone());
                        self.lease_from_route(lead, now, (identity, proof), out);
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
                    move_proof: Some(proof.clone()),
                    ..entry
                };
                self.commit(lead, vec![Change::SetIdentity(moving)], out);
                lead.told.insert(identity.clone());
                self.expire_move_at(lead, now, identity, out);
                if *asker != self.id {
                    lead.unrouted
                        .insert(identity.clone(), (lead.seq, proof.clone()));
                }
                granted(stamp)
            }
            Op::MoveDone {
                identity,
                arrival,
                stamp,
            } => {
                // Only the move the asker saw announced, if it saw one.
                let this_move = |e: &IdentityEntry| stamp.as_ref().is_none_or(|s| *s == e.stamp);
                // Re-homed here under an earlier leader, whose answer never
                // came: the arrival is done. (The asker sends one `MoveDone`
                // per identity at a time, and none while a client of its own
                // has the identity, held or moving away but not routed yet,
                // so this is the retry of the request that was granted, not
                // somebody else's.)
                if let Some(e) = lead.registry.identities.get(identity)
                    && e.server == *asker
                    && e.moving_to.is_none()
                    && this_move(e)
                {
                    return granted(e.stamp.clone());
                }
                let Some(entry) = lead
                    .registry
                    .identities
                    .get(identity)
                    .filter(|e| e.moving_to.as_ref() == Some(asker) && this_move(e))
                    .cloned()
                else {
                    return refused(Refusal::NotMoving);
                };
                // Only the client that started the move may complete it: a
                // wrong token, or no token from another address, is refused
                // without touching the move, so the real client can still
                // arrive (issue 12). A move without a proof (never made by
                // this version) is refused too: fail closed.
                if !entry.move_proof.as_ref().is_some_and(|p| arrival.proves(p)) {
                    return refused(Refusal::WrongMoveProof);
                }
                if !self.is_live(asker) {
                    return refused(Refusal::AskerDown);
                }
                // An identity freed from a server the asker still hears may
                // be held there: not re-homed to the asker either. The asker
                // asks again until the two agree, and its client came in
                // time: the move waits for it.
                if let Some(server) = self.heard_purged(lead, asker) {
                    self.hold_move(lead, now, identity, out);
                    return refused(Refusal::HearsDownServer { server });
                }
                let stamp = entry.stamp.clone();
                took(
                    &mut lead.gone,
                    &entry.server,
                    NameKey::Identity(identity.clone()),
                    &stamp,
                );
                // Back on a server it moved away from (a move keeps its
                // stamp): the asker's reports listing it are news now, not
                // stale (before, its next report had it evicted there, and
                // granted to another).
                if let Some(gone) = lead.gone.get_mut(asker) {
                    gone.remove(&NameKey::Identity(identity.clone()));
                }
                let arrived = IdentityEntry {
                    server: asker.clone(),
                    moving_to: None,
                    move_proof: None,
                    ..entry
                };
                lead.moves.remove(identity);
                self.commit(lead, vec![Change::SetIdentity(arrived)], out);
                granted(stamp)
            }
            Op::MoveCancel { identity, proof } | Op::MoveGiveUp { identity, proof } => {
                let entry = match lead.registry.identities.get(identity) {
                    Some(e) if e.server == *asker => e.clone(),
                    Some(_) => return refused(Refusal::Taken),
                    None => return refused(Refusal::NotOwner),
                };
                let stamp = entry.stamp.clone();
                // Only the move given up on: a late cancel must not cancel
                // a later move of the identity, and a client's quit on the
                // connection it left must not free the identity it holds
                // again (granted anew, or back by another move).
                if entry.moving_to.is_some() && entry.move_proof.as_ref() == Some(proof) {
                    lead.moves.remove(identity);
                    let change = if matches!(op, Op::MoveGiveUp { .. }) {
                        Change::RemoveIdentity {
                            identity: identity.clone(),
                            stamp: stamp.clone(),
                        }
                    } else {
                        Change::SetIdentity(IdentityEntry {
                            moving_to: None,
                            move_proof: None,
                            ..entry
                        })
                    };
                    self.commit(lead, vec![change], out);
                }
                granted(stamp)
            }
        }
    }

    /// The change that frees `given` for `asker`, if the asker holds it by
    /// that grant: a late release must not free a later grant of the name
    /// to the same asker.
    fn released(lead: &mut LeaderState, asker: &ServerId, given: &Given) -> Option<Change> {
        let by = |held: &Stamp| given.stamp == *held;
        match &given.name {
            Name::Identity(identity) => {
                let e = lead.registry.identities.get(identity)?;
                if e.server != *asker || !by(&e.stamp) {
                    return None;
                }
                let stamp = e.stamp.clone();
                lead.moves.remove(identity);
                Some(Change::RemoveIdentity {
                    identity: identity.clone(),
                    stamp,
                })
            }
            Name::Room { room, .. } => {
                let r = lead.registry.rooms.get(room)?;
                (r.server == *asker && by(&r.stamp)).then(|| Change::RemoveRoom {
                    room: room.clone(),
                    stamp: r.stamp.clone(),
                })
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
        // Already registered: to the asker by a grant it never heard of (an
        // earlier leader's, or this claim's own before a leader change),
        // which it does not hold and asks for, so it is its to have; or
        // taken.
        let registered = match name {
            Name::Identity(identity) => lead
                .registry
                .identities
                .get(identity)
                .map(|e| (e.server == *asker && e.moving_to.is_none(), &e.stamp)),
            Name::Room { room, owner } => lead
                .registry
                .rooms
                .get(room)
                .map(|r| (r.server == *asker && r.owner == *owner, &r.stamp)),
        };
        if let Some(server) = self.heard_purged(lead, asker) {
            // A name held elsewhere is refused at once; for the others the
            // asker asks again until the two agree.
            return refused(match registered {
                Some((false, _)) => Refusal::Taken,
                _ => Refusal::HearsDownServer { server },
            });
        }
        if self.config.require_majority && !self.has_majority() {
            return refused(self.no_majority());
        }
        match registered {
            Some((true, stamp)) => {
                return Verdict::Granted {
                    stamp: stamp.clone(),
                };
            }
            Some((false, _)) => return refused(Refusal::Taken),
            None => {}
        }
        let stamp = self.next_stamp(lead);
        let change = match name {
            Name::Identity(identity) => Change::SetIdentity(IdentityEntry {
                identity: identity.clone(),
                server: asker.clone(),
                moving_to: None,
                stamp: stamp.clone(),
                move_proof: None,
            }),
            Name::Room { room, owner } => {
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
        // From when this server first saw the move: a leader taking a move
        // over does not give it a new lease.
        let since = self.moves_seen.get(identity).map_or(now, |seen| seen.at);
        let due = later(since.min(now), self.config.move_timeout);
        let held = lead.moves.get(identity).and_then(|d| d.held);
        let times = MoveDue { timeout: due, held };
        lead.moves.insert(identity.to_string(), times);
        out.push(Action::SetTimer {
            timer: Timer::MoveExpiry {
                identity: identity.to_string(),
            },
            after: due.saturating_duration_since(now),
        });
    }

    /// Keeps `identity`'s open move from ending for a claim timeout: its
    /// client has arrived, and its arrival waits here or is asked again
    /// until its deadline (see [`Registry::unless_asked_again`]).
    fn hold_move(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        identity: &str,
        out: &mut Vec<Action>,
    ) {
        let held = later(now, self.config.claim_timeout);
        let Some(due) = lead.moves.get_mut(identity).filter(|due| due.at() < held) else {
            return;
        };
        due.held = Some(held);
        out.push(Action::SetTimer {
            timer: Timer::MoveExpiry {
                identity: identity.to_string(),
            },
            after: held.saturating_duration_since(now),
        });
    }

    /// A grant of `identity`'s open move (`proof`'s) goes (again) to its
    /// origin, which routes the client when it gets it: a full move timeout
    /// from now.
    fn lease_from_route(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        (identity, proof): (&str, &MoveProof),
        out: &mut Vec<Action>,
    ) {
        let entry = lead.registry.identities.get(identity);
        let open = entry.is_some_and(|e| e.move_proof.as_ref() == Some(proof));
        if !open || !lead.moves.contains_key(identity) {
            return;
        }
        let seen = MoveSeen::new(proof.clone(), now, true);
        self.moves_seen.insert(identity.to_string(), seen);
        self.expire_move_at(lead, now, identity, out);
    }

    /// Dates `entry`'s move from the ages reported for it (for this move:
    /// the same proof), by server: from its origin's, which routed the
    /// client then, if the origin reported one; else back to the oldest
    /// reported, if that is before this server first saw it. A move taken
    /// over is timed from its route, as far as the servers that report
    /// here know it. Returns whether the move's start moved.
    fn date_move<'a>(
        &mut self,
        now: Instant,
        entry: &IdentityEntry,
        reports: impl IntoIterator<Item = (&'a ServerId, &'a [MoveAge])>,
    ) -> bool {
        let Some(seen) = self.moves_seen.get_mut(&entry.identity) else {
            return false;
        };
        let (mut origin_age, mut oldest) = (None, None);
        for (from, ages) in reports {
            let about = |a: &&MoveAge| a.identity == entry.identity && a.proof == seen.proof;
            for age in ages.iter().filter(about) {
                if *from == entry.server {
                    origin_age = Some(age.age_ms);
                }
                oldest = oldest.max(Some(age.age_ms));
            }
        }
        let timeout = self.config.move_timeout;
        let started = |age: u64| now.checked_sub(Duration::from_millis(age).min(timeout));
        let before = seen.at;
        match (origin_age, oldest) {
            (Some(age), _) => {
                if let Some(at) = started(age) {
                    seen.at = at;
                    seen.routed = true;
                }
            }
            (None, Some(age)) if !seen.routed => {
                seen.at = started(age).map_or(seen.at, |s| s.min(seen.at));
            }
            _ => {}
        }
        seen.at != before
    }

    pub(super) fn lead_move_expiry(
        &mut self,
        lead: &mut LeaderState,
        now: Instant,
        identity: &str,
        out: &mut Vec<Action>,
    ) {
        if lead.moves.get(identity).is_none_or(|due| now < due.at()) {
            return;
        }
        // An arrival queued here (this leader waits for a server's
        // holdings) came in time: the move waits for its decision. Only the
        // move's own client's: an impostor's must not hold it.
        let entry = lead.registry.identities.get(identity);
        let target = entry.and_then(|e| e.moving_to.as_ref());
        let proof = entry.and_then(|e| e.move_proof.as_ref());
        let arriving = lead.queue.iter().any(|q| {
            matches!(&q.op, Op::MoveDone { identity: i, arrival, .. }
                if i == identity && proof.is_some_and(|p| arrival.proves(p)))
                && Some(&q.asker) == target
        });
        if arriving {
            self.hold_move(lead, now, identity, out);
            return;
        }
        self.end_move(lead, identity, out);
    }

    /// Frees the moves to `server`, whose names the cluster freed: their
    /// clients cannot arrive there (an arrival it asks for later is refused,
    /// `NotMoving`), so each identity is free now rather than at its move
    /// timeout (a client whose new server died can come back under its name).
    fn end_moves_to(&mut self, lead: &mut LeaderState, server: &ServerId, out: &mut Vec<Action>) {
        let moving: Vec<String> = lead
            .registry
            .identities
            .values()
            .filter(|e| e.moving_to.as_ref() == Some(server))
            .map(|e| e.identity.clone())
            .collect();
        for identity in moving {
            self.end_move(lead, &identity, out);
        }
    }

    /// Frees `identity`, reserved for a move that will not arrive; or, if
    /// its origin had not heard of the move (see `unheard`), leaves it
    /// there, not moving.
    fn end_move(&mut self, lead: &mut LeaderState, identity: &str, out: &mut Vec<Action>) {
        lead.moves.remove(identity);
        let Some(entry) = lead.registry.identities.get(identity).cloned() else {
            return;
        };
        let Some(to) = entry.moving_to.clone() else {
            return;
        };
        // An origin whose report this leader has not merged yet may not
        // have heard either: left there too, and if it did route its
        // client, its report says so and the merge starts the move again.
        let unheard = lead.unheard.get(identity) == Some(&entry.stamp)
            || lead.unsynced.contains_key(&entry.server);
        if unheard && self.is_live(&entry.server) {
            let change = Change::SetIdentity(IdentityEntry {
                moving_to: None,
                move_proof: None,
                ..entry.clone()
            });
            self.commit(lead, vec![change], out);
            out.push(Action::Log(LogEvent::MoveReverted {
                identity: identity.to_string(),
                from: entry.server,
                to,
            }));
            return;
        }
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
        lead.purged.insert(server.clone());
        lead.queue.retain(|q| q.asker != *server);
        let (kept, identities): (Vec<&IdentityEntry>, Vec<&IdentityEntry>) = lead
            .registry
            .identities
            .values()
            .filter(|e| e.server == *server)
            .partition(|e| self.outlives_its_server(e));
        let kept: Vec<Change> = kept.into_iter().cloned().map(Change::SetIdentity).collect();
        let identities: Vec<String> = identities.iter().map(|e| e.identity.clone()).collect();
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
            let mut changes = vec![Change::PurgeServer {
                server: server.clone(),
            }];
            changes.extend(kept);
            self.commit(lead, changes, out);
        }
        self.end_moves_to(lead, server, out);
        out.push(Action::Log(LogEvent::ServerPurged {
            server: server.clone(),
            identities: identities.len(),
            rooms,
        }));
        self.flush_queue(lead, now, out);
    }

    /// Under the majority rule an identity on its way elsewhere stays
    /// registered when its server dies or restarts (its new life reports
    /// nothing of the old), until the client arrives or the move expires:
    /// the client was routed away and may still arrive (before, one that
    /// had not sent its `movejoin` by then lost its name). Without the
    /// rule, the cut-off server's side may have a leader of its own that
    /// gives the move up, and the name would be held on both sides under
    /// one grant: freed, as everything else.
    fn outlives_its_server(&self, entry: &IdentityEntry) -> bool {
        self.config.require_majority && entry.moving_to.is_some()
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
            // A move it granted before it restarted was never routed by
            // this life: its acknowledgements no longer date it.
            let registry = &lead.registry;
            let elsewhere = |identity: &String| {
                let entry = registry.identities.get(identity);
                entry.is_none_or(|e| e.server != from)
            };
            lead.unrouted.retain(|identity, _| elsewhere(identity));
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
            if entry.moving_to.is_none() {
                entry.move_proof = None;
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
        let (mut unheard, mut heard) = (Vec::new(), Vec::new());
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
                    // The proof goes with the move it belongs to.
                    let (moving_to, move_proof) = match &current.moving_to {
                        Some(to) => (Some(to.clone()), current.move_proof.clone()),
                        None => (entry.moving_to.clone(), entry.move_proof.clone()),
                    };
                    if current.moving_to.is_some() {
                        if entry.moving_to.is_some() {
                            heard.push(name.clone());
                        } else if !lead.told.contains(name) {
                            unheard.push((name.clone(), current.stamp.clone()));
                        }
                    }
                    let merged = IdentityEntry {
                        moving_to,
                        move_proof,
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
                && !self.outlives_its_server(current)
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
        for name in heard {
            lead.unheard.remove(&name);
        }
        lead.unheard.extend(unheard);
        self.announce(lead, out);
        // Moves this report starts again (reverted while their origin was
        // not merged yet, say) are as old as it says; moves open here are
        // timed again if it knows better when they started (it is their
        // origin, or saw them before anyone in the base did).
        let ages = [(&from, &report.move_ages[..])];
        for identity in started_moving {
            if let Some(entry) = lead.registry.identities.get(&identity).cloned() {
                self.date_move(now, &entry, ages);
            }
            self.expire_move_at(lead, now, &identity, out);
        }
        for age in &report.move_ages {
            let entry = lead.registry.identities.get(&age.identity);
            let open = entry.filter(|e| e.move_proof.as_ref() == Some(&age.proof));
            if let Some(entry) = open
                .filter(|_| lead.moves.contains_key(&age.identity))
                .cloned()
                && self.date_move(now, &entry, ages)
            {
                self.expire_move_at(lead, now, &entry.identity, out);
            }
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
        // Its names are its own again (those it still holds re-registered):
        // servers that hear it may be given the rest.
        lead.purged.remove(&from);
        let identities = lead.registry.identities.values().cloned().collect();
        let rooms = lead.registry.rooms.values().cloned().collect();
        if from != self.id {
            let msg = RegistryMessage::Snapshot {
                term: self.term,
                seq: lead.seq,
                identities,
                rooms,
                move_ages: self.move_ages(),
            };
            self.send(&from, msg, out);
        } else {
            // The leader answers its own report as it answers anyone's: what
            // the registry does not give it (a client that moved on under an
            // earlier leader, a name lost to a later grant) is not its own.
            self.on_snapshot(now, lead.seq, (identities, rooms), &[], out);
        }
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
