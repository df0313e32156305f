//! A journal of which server holds which cluster-unique name when, and the
//! invariant it must satisfy: no identity or room id is ever held by two
//! servers at once.
//!
//! The one exception is a network cut: servers on opposite sides cannot talk,
//! so each side may grant a name the other holds. Once the cut heals, the
//! cluster must converge (the older holder is evicted) within a grace period.
//!
//! The chat layer records every hold and release ([`NameJournal::record`]);
//! the in-process test harness adds markers (a server gone, a cut, a heal) and
//! replays the whole log with [`check`] when the cluster stops.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ServerId;

/// Most entries a journal keeps; past it entries are counted, not stored, and
/// [`check`] fails (an incomplete log proves nothing).
pub const JOURNAL_CAPACITY: usize = 1_000_000;

/// Which namespace a name belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NameKind {
    /// A client identity.
    Identity,
    /// A room id (main halls are never recorded: each server has its own).
    Room,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Identity => "identity",
            NameKind::Room => "room",
        })
    }
}

/// A server starting (`held`) or ceasing to hold a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameEvent {
    /// When, taken under the journal's lock.
    pub at: Instant,
    /// The server whose client or room holds the name.
    pub server: ServerId,
    /// Identity or room.
    pub kind: NameKind,
    /// The identity or room id.
    pub name: String,
    /// True when the hold starts, false when it ends.
    pub held: bool,
}

/// One line of the journal, in time order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A server took or gave up a name.
    Name(NameEvent),
    /// A server crashed or stopped: every name it held is no longer held.
    ServerGone {
        /// When the server could no longer serve its names.
        at: Instant,
        /// The server.
        server: ServerId,
    },
    /// Every link between `left` and `right` was cut.
    Cut {
        /// When the cut was made.
        at: Instant,
        /// One side.
        left: Vec<ServerId>,
        /// The other side.
        right: Vec<ServerId>,
    },
    /// Every cut so far was healed.
    Healed {
        /// When the links were restored.
        at: Instant,
    },
    /// The journal was full: this many entries after the stored ones were lost.
    Overflowed {
        /// Entries not stored.
        dropped: u64,
    },
}

impl Entry {
    fn at(&self) -> Option<Instant> {
        match self {
            Entry::Name(event) => Some(event.at),
            Entry::ServerGone { at, .. } | Entry::Cut { at, .. } | Entry::Healed { at } => {
                Some(*at)
            }
            Entry::Overflowed { .. } => None,
        }
    }
}

/// A shared, append-only log of [`Entry`]s. Clones write to the same log.
#[derive(Clone)]
pub struct NameJournal {
    log: Arc<Mutex<Log>>,
}

struct Log {
    entries: Vec<Entry>,
    capacity: usize,
    dropped: u64,
}

impl Default for NameJournal {
    fn default() -> Self {
        NameJournal::new()
    }
}

impl NameJournal {
    /// An empty journal of [`JOURNAL_CAPACITY`] entries.
    pub fn new() -> Self {
        NameJournal::with_capacity(JOURNAL_CAPACITY)
    }

    /// An empty journal that stores at most `capacity` entries.
    pub fn with_capacity(capacity: usize) -> Self {
        NameJournal {
            log: Arc::new(Mutex::new(Log {
                entries: Vec::new(),
                capacity,
                dropped: 0,
            })),
        }
    }

    /// Records that `server` started (`held`) or stopped holding `name`.
    pub fn record(&self, server: &str, kind: NameKind, name: &str, held: bool) {
        self.push(|at| {
            Entry::Name(NameEvent {
                at,
                server: server.to_owned(),
                kind,
                name: name.to_owned(),
                held,
            })
        });
    }

    /// Records that `server` crashed or stopped.
    pub fn server_gone(&self, server: &str) {
        self.push(|at| Entry::ServerGone {
            at,
            server: server.to_owned(),
        });
    }

    /// Records that every link between `left` and `right` is cut.
    pub fn cut(&self, left: &[ServerId], right: &[ServerId]) {
        self.push(|at| Entry::Cut {
            at,
            left: left.to_vec(),
            right: right.to_vec(),
        });
    }

    /// Records that every cut is healed.
    pub fn healed(&self) {
        self.push(|at| Entry::Healed { at });
    }

    /// A copy of the log, ending with [`Entry::Overflowed`] if entries were lost.
    pub fn entries(&self) -> Vec<Entry> {
        let log = self.lock();
        let mut entries = log.entries.clone();
        if log.dropped > 0 {
            entries.push(Entry::Overflowed {
                dropped: log.dropped,
            });
        }
        entries
    }

    /// [`check`] over the log so far.
    pub fn check(&self, grace: Duration) -> Result<Summary, Vec<Violation>> {
        check(&self.entries(), grace)
    }

    fn push(&self, make: impl FnOnce(Instant) -> Entry) {
        let mut log = self.lock();
        if log.entries.len() >= log.capacity {
            log.dropped += 1;
            return;
        }
        // The clock is read under the lock, so the log's order is time order.
        let entry = make(Instant::now());
        log.entries.push(entry);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        // Every update is a single push, so a poisoned log is still whole.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a clean replay saw.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    /// Holds and releases replayed.
    pub events: usize,
    /// Distinct (kind, name) pairs ever held.
    pub names: usize,
    /// Names held on both sides of a cut, resolved within the grace.
    pub tolerated_duplicates: usize,
    /// How long the longest of those lasted, from the second hold to the end.
    pub longest_tolerated: Duration,
    /// The longest a tolerated duplicate outlived the heal that ended its cut.
    pub longest_after_heal: Duration,
    /// Releases of names the server did not hold (a recording gap: should be 0).
    pub unmatched_releases: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} name events over {} names; {} duplicates tolerated across cuts (longest {:?}, resolved at most {:?} after a heal); {} releases of names not held",
            self.events,
            self.names,
            self.tolerated_duplicates,
            self.longest_tolerated,
            self.longest_after_heal,
            self.unmatched_releases
        )
    }
}

/// A breach of the invariant. Times are relative to the log's first entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// One name held twice at once, outside what a cut excuses.
    HeldTwice {
        /// Identity or room.
        kind: NameKind,
        /// The name.
        name: String,
        /// The earlier holder, then the later one (the same server for
        /// [`Problem::SameServer`]).
        servers: [ServerId; 2],
        /// When the second hold began.
        since: Duration,
        /// Why this is not excused.
        problem: Problem,
    },
    /// The journal was full, so the log is incomplete.
    Overflowed {
        /// Entries not stored.
        dropped: u64,
    },
}

/// Why a double hold is a violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A server took a name it already held.
    SameServer,
    /// The second hold began while the two servers could talk.
    Connected,
    /// The second hold began across a cut, but both still held the name when
    /// the grace after the heal ran out, at `at`.
    GraceRanOut {
        /// When the grace ran out.
        at: Duration,
    },
    /// Both still held the name when the log ended.
    Unresolved,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::HeldTwice {
                kind,
                name,
                servers: [first, second],
                since,
                problem,
            } => {
                write!(f, "{kind} {name:?}: ")?;
                match problem {
                    Problem::SameServer => {
                        write!(f, "{second} took it again at +{since:?} while holding it")
                    }
                    Problem::Connected => write!(
                        f,
                        "held by {first} and {second} at once from +{since:?}, while they could talk"
                    ),
                    Problem::GraceRanOut { at } => write!(
                        f,
                        "held by {first} and {second} across a cut from +{since:?}, still both at +{at:?} when the grace after the heal ran out"
                    ),
                    Problem::Unresolved => write!(
                        f,
                        "held by {first} and {second} from +{since:?}, still both when the log ended"
                    ),
                }
            }
            Violation::Overflowed { dropped } => write!(
                f,
                "the name journal overflowed: {dropped} entries were not stored, so the log proves nothing"
            ),
        }
    }
}

/// Replays `entries` (in time order) and checks that no name was ever held
/// by two servers at once, except by servers on opposite sides of a cut while
/// it lasts and for `grace` after the [`Entry::Healed`] that ends it.
pub fn check(entries: &[Entry], grace: Duration) -> Result<Summary, Vec<Violation>> {
    let origin = entries.iter().find_map(Entry::at);
    let mut replay = Replay {
        origin: origin.unwrap_or_else(Instant::now),
        grace,
        holders: HashMap::new(),
        separations: Vec::new(),
        overlaps: Vec::new(),
        summary: Summary::default(),
        violations: Vec::new(),
    };
    for entry in entries {
        if let Some(at) = entry.at() {
            replay.end_graces_before(at);
        }
        match entry {
            Entry::Name(event) => {
                replay.summary.events += 1;
                if event.held {
                    replay.hold(event);
                } else if !replay.release(event.at, &event.server, event.kind, &event.name) {
                    replay.summary.unmatched_releases += 1;
                }
            }
            Entry::ServerGone { at, server } => replay.server_gone(*at, server),
            Entry::Cut { left, right, .. } => replay.separations.push(Separation {
                left: left.clone(),
                right: right.clone(),
                healed: None,
            }),
            Entry::Healed { at } => replay.heal(*at),
            Entry::Overflowed { dropped } => replay
                .violations
                .push(Violation::Overflowed { dropped: *dropped }),
        }
    }
    replay.finish()
}

/// Two servers that cannot talk (or could not until recently).
struct Separation {
    left: Vec<ServerId>,
    right: Vec<ServerId>,
    /// When the cut healed, and when its grace runs out.
    healed: Option<(Instant, Instant)>,
}

impl Separation {
    fn splits(&self, a: &str, b: &str) -> bool {
        let on = |side: &[ServerId], s: &str| side.iter().any(|x| x == s);
        (on(&self.left, a) && on(&self.right, b)) || (on(&self.left, b) && on(&self.right, a))
    }
}

/// A name held on both sides of a cut, not yet resolved.
struct Overlap {
    kind: NameKind,
    name: String,
    servers: [ServerId; 2],
    since: Instant,
}

impl Overlap {
    fn involves(&self, server: &str, kind: NameKind, name: &str) -> bool {
        self.kind == kind && self.name == name && self.servers.iter().any(|s| s == server)
    }
}

struct Replay {
    origin: Instant,
    grace: Duration,
    /// Every name ever held, with its current holders.
    holders: HashMap<(NameKind, String), BTreeSet<ServerId>>,
    separations: Vec<Separation>,
    overlaps: Vec<Overlap>,
    summary: Summary,
    violations: Vec<Violation>,
}

impl Replay {
    fn relative(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.origin)
    }

    /// The separation that excuses `a` and `b` holding one name at `at`.
    fn separation(&self, a: &str, b: &str, at: Instant) -> Option<&Separation> {
        self.separations
            .iter()
            .find(|s| s.splits(a, b) && s.healed.is_none_or(|(_, grace_end)| at <= grace_end))
    }

    fn held_twice(&mut self, overlap: Overlap, problem: Problem) {
        let since = self.relative(overlap.since);
        self.violations.push(Violation::HeldTwice {
            kind: overlap.kind,
            name: overlap.name,
            servers: overlap.servers,
            since,
            problem,
        });
    }

    fn hold(&mut self, event: &NameEvent) {
        let key = (event.kind, event.name.clone());
        let holders = self.holders.entry(key).or_default();
        let others: Vec<ServerId> = holders.iter().cloned().collect();
        let fresh = holders.insert(event.server.clone());
        let overlap_with = |other: ServerId| Overlap {
            kind: event.kind,
            name: event.name.clone(),
            servers: [other, event.server.clone()],
            since: event.at,
        };
        if !fresh {
            self.held_twice(overlap_with(event.server.clone()), Problem::SameServer);
            return;
        }
        for other in others {
            let overlap = overlap_with(other);
            if self
                .separation(&overlap.servers[0], &overlap.servers[1], event.at)
                .is_some()
            {
                self.overlaps.push(overlap);
            } else {
                self.held_twice(overlap, Problem::Connected);
            }
        }
    }

    /// Ends `server`'s hold of a name; false if it did not hold it.
    fn release(&mut self, at: Instant, server: &str, kind: NameKind, name: &str) -> bool {
        let held = self
            .holders
            .get_mut(&(kind, name.to_owned()))
            .is_some_and(|holders| holders.remove(server));
        if !held {
            return false;
        }
        let (resolved, open): (Vec<Overlap>, Vec<Overlap>) = std::mem::take(&mut self.overlaps)
            .into_iter()
            .partition(|o| o.involves(server, kind, name));
        self.overlaps = open;
        for overlap in resolved {
            let [a, b] = &overlap.servers;
            let after_heal = self
                .separation(a, b, at)
                .and_then(|s| s.healed)
                .map(|(healed_at, _)| at.saturating_duration_since(healed_at));
            let summary = &mut self.summary;
            summary.tolerated_duplicates += 1;
            summary.longest_tolerated = summary
                .longest_tolerated
                .max(at.saturating_duration_since(overlap.since));
            summary.longest_after_heal = summary
                .longest_after_heal
                .max(after_heal.unwrap_or_default());
        }
        true
    }

    fn server_gone(&mut self, at: Instant, server: &str) {
        let held: Vec<(NameKind, String)> = self
            .holders
            .iter()
            .filter(|(_, holders)| holders.contains(server))
            .map(|(key, _)| key.clone())
            .collect();
        for (kind, name) in held {
            self.release(at, server, kind, &name);
        }
    }

    fn heal(&mut self, at: Instant) {
        for separation in &mut self.separations {
            if separation.healed.is_none() {
                separation.healed = Some((at, at + self.grace));
            }
        }
    }

    /// Retires every grace that ran out before `now`, in the order they ran
    /// out; a duplicate it no longer excuses is a violation.
    fn end_graces_before(&mut self, now: Instant) {
        loop {
            let expired = self
                .separations
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some((i, s.healed?.1)))
                .filter(|&(_, grace_end)| grace_end < now)
                .min_by_key(|&(_, grace_end)| grace_end);
            let Some((index, grace_end)) = expired else {
                return;
            };
            self.separations.remove(index);
            let (excused, unexcused): (Vec<Overlap>, Vec<Overlap>) =
                std::mem::take(&mut self.overlaps)
                    .into_iter()
                    .partition(|o| {
                        self.separation(&o.servers[0], &o.servers[1], grace_end)
                            .is_some()
                    });
            self.overlaps = excused;
            let at = self.relative(grace_end);
            for overlap in unexcused {
                self.held_twice(overlap, Problem::GraceRanOut { at });
            }
        }
    }

    fn finish(mut self) -> Result<Summary, Vec<Violation>> {
        for overlap in std::mem::take(&mut self.overlaps) {
            self.held_twice(overlap, Problem::Unresolved);
        }
        if !self.violations.is_empty() {
            return Err(self.violations);
        }
        self.summary.names = self.holders.len();
        Ok(self.summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_millis(500);

    /// A synthetic log, times in milliseconds from its start.
    struct Script {
        start: Instant,
        entries: Vec<Entry>,
    }

    impl Script {
        fn new() -> Self {
            Script {
                start: Instant::now(),
                entries: Vec::new(),
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.start + Duration::from_millis(ms)
        }

        fn name(mut self, ms: u64, server: &str, kind: NameKind, name: &str, held: bool) -> Self {
            let at = self.at(ms);
            self.entries.push(Entry::Name(NameEvent {
                at,
                server: server.to_owned(),
                kind,
                name: name.to_owned(),
                held,
            }));
            self
        }

        fn hold(self, ms: u64, server: &str, identity: &str) -> Self {
            self.name(ms, server, NameKind::Identity, identity, true)
        }

        fn release(self, ms: u64, server: &str, identity: &str) -> Self {
            self.name(ms, server, NameKind::Identity, identity, false)
        }

        fn gone(mut self, ms: u64, server: &str) -> Self {
            let at = self.at(ms);
            self.entries.push(Entry::ServerGone {
                at,
                server: server.to_owned(),
            });
            self
        }

        fn cut(mut self, ms: u64, left: &[&str], right: &[&str]) -> Self {
            let at = self.at(ms);
            let ids = |side: &[&str]| side.iter().map(|s| s.to_string()).collect();
            self.entries.push(Entry::Cut {
                at,
                left: ids(left),
                right: ids(right),
            });
            self
        }

        fn healed(mut self, ms: u64) -> Self {
            let at = self.at(ms);
            self.entries.push(Entry::Healed { at });
            self
        }

        fn check(&self) -> Result<Summary, Vec<Violation>> {
            check(&self.entries, GRACE)
        }

        /// Asserts that the check fails with exactly this double hold of "Alice".
        fn fails_with(&self, first: &str, second: &str, since_ms: u64, problem: Problem) {
            let violations = self.check().expect_err("a violation");
            assert_eq!(
                violations,
                vec![held_twice(first, second, since_ms, problem)]
            );
        }
    }

    fn held_twice(first: &str, second: &str, since_ms: u64, problem: Problem) -> Violation {
        Violation::HeldTwice {
            kind: NameKind::Identity,
            name: "Alice".to_owned(),
            servers: [first.to_owned(), second.to_owned()],
            since: Duration::from_millis(since_ms),
            problem,
        }
    }

    #[test]
    fn a_clean_log_passes_and_is_counted() {
        let summary = Script::new()
            .hold(0, "s1", "Alice")
            .hold(1, "s2", "Bob")
            .name(2, "s1", NameKind::Room, "Alice", true)
            .release(3, "s1", "Alice")
            .hold(4, "s2", "Alice")
            .check()
            .expect("clean");
        assert_eq!(summary.events, 5);
        assert_eq!(
            summary.names, 3,
            "an identity and a room of one name are two names"
        );
        assert_eq!(summary.tolerated_duplicates, 0);
        assert_eq!(summary.unmatched_releases, 0);
    }

    #[test]
    fn overlapping_holds_on_two_servers_fail() {
        Script::new()
            .hold(0, "s1", "Alice")
            .hold(10, "s2", "Alice")
            .release(20, "s1", "Alice")
            .fails_with("s1", "s2", 10, Problem::Connected);
    }

    #[test]
    fn the_same_server_holding_a_name_twice_fails() {
        Script::new()
            .hold(0, "s1", "Alice")
            .hold(5, "s1", "Alice")
            .fails_with("s1", "s1", 5, Problem::SameServer);
    }

    #[test]
    fn a_move_releases_on_one_server_before_the_other_holds() {
        let summary = Script::new()
            .hold(0, "s1", "Alice")
            .release(10, "s1", "Alice")
            .hold(11, "s2", "Alice")
            .check()
            .expect("a move is no duplicate");
        assert_eq!(summary.events, 3);
    }

    #[test]
    fn a_gone_server_holds_nothing() {
        let summary = Script::new()
            .hold(0, "s1", "Alice")
            .gone(10, "s1")
            .hold(400, "s2", "Alice")
            .check()
            .expect("the crashed server's names are free");
        assert_eq!(summary.events, 2);
        assert_eq!(summary.unmatched_releases, 0);
    }

    #[test]
    fn a_duplicate_across_a_cut_resolved_within_the_grace_passes() {
        let summary = Script::new()
            .hold(0, "s1", "Alice")
            .cut(10, &["s1", "s2"], &["s3", "s4", "s5"])
            .hold(500, "s3", "Alice")
            .healed(1000)
            .release(1400, "s1", "Alice")
            .check()
            .expect("excused by the cut");
        assert_eq!(summary.tolerated_duplicates, 1);
        assert_eq!(summary.longest_tolerated, Duration::from_millis(900));
        assert_eq!(summary.longest_after_heal, Duration::from_millis(400));
    }

    #[test]
    fn a_cut_excuses_a_duplicate_whichever_side_held_first() {
        // The first holder is on the right side of the cut this time.
        let summary = Script::new()
            .hold(0, "s4", "Alice")
            .cut(10, &["s1", "s2"], &["s3", "s4", "s5"])
            .hold(500, "s1", "Alice")
            .healed(1000)
            .release(1400, "s4", "Alice")
            .check()
            .expect("excused by the cut");
        assert_eq!(summary.tolerated_duplicates, 1);
    }

    #[test]
    fn a_duplicate_across_a_cut_resolved_after_the_grace_fails() {
        Script::new()
            .hold(0, "s1", "Alice")
            .cut(10, &["s1"], &["s2"])
            .hold(500, "s2", "Alice")
            .healed(1000)
            .release(1600, "s1", "Alice")
            .fails_with(
                "s1",
                "s2",
                500,
                Problem::GraceRanOut {
                    at: Duration::from_millis(1500),
                },
            );
    }

    #[test]
    fn a_duplicate_across_a_cut_never_resolved_fails() {
        // Healed, but the log ends before either holder lets go.
        Script::new()
            .hold(0, "s1", "Alice")
            .cut(10, &["s1"], &["s2"])
            .hold(500, "s2", "Alice")
            .healed(1000)
            .fails_with("s1", "s2", 500, Problem::Unresolved);
        // Never healed.
        Script::new()
            .cut(0, &["s1"], &["s2"])
            .hold(1, "s1", "Alice")
            .hold(2, "s2", "Alice")
            .fails_with("s1", "s2", 2, Problem::Unresolved);
    }

    #[test]
    fn a_duplicate_on_one_side_of_a_cut_fails() {
        Script::new()
            .cut(0, &["s1", "s2"], &["s3"])
            .hold(10, "s1", "Alice")
            .hold(20, "s2", "Alice")
            .release(30, "s1", "Alice")
            .fails_with("s1", "s2", 20, Problem::Connected);
    }

    #[test]
    fn a_duplicate_may_begin_during_the_grace_but_not_after_it() {
        // The links are back but the two sides have not merged yet.
        let during = Script::new()
            .hold(0, "s1", "Alice")
            .cut(10, &["s1"], &["s2"])
            .healed(100)
            .hold(200, "s2", "Alice")
            .release(300, "s1", "Alice");
        assert_eq!(
            during.check().expect("in the grace").tolerated_duplicates,
            1
        );
        // The grace ran out at 600 ms: the two talk again.
        Script::new()
            .hold(0, "s1", "Alice")
            .cut(10, &["s1"], &["s2"])
            .healed(100)
            .hold(700, "s2", "Alice")
            .fails_with("s1", "s2", 700, Problem::Connected);
    }

    #[test]
    fn a_later_cut_between_the_same_servers_extends_the_excuse() {
        let summary = Script::new()
            .cut(0, &["s1"], &["s2"])
            .hold(10, "s1", "Alice")
            .hold(20, "s2", "Alice")
            .healed(100)
            .cut(200, &["s1"], &["s2", "s3"])
            .release(900, "s1", "Alice")
            .check()
            .expect("still cut when the first grace ran out");
        assert_eq!(summary.tolerated_duplicates, 1);
    }

    #[test]
    fn an_overflowed_journal_fails() {
        let journal = NameJournal::with_capacity(2);
        journal.record("s1", NameKind::Identity, "Alice", true);
        journal.record("s1", NameKind::Identity, "Alice", false);
        journal.record("s1", NameKind::Identity, "Bob", true);
        journal.server_gone("s1");
        let violations = journal.check(GRACE).expect_err("overflowed");
        assert_eq!(violations, vec![Violation::Overflowed { dropped: 2 }]);
        assert!(violations[0].to_string().contains("overflowed"));
    }

    #[test]
    fn a_journal_records_in_time_order() {
        let journal = NameJournal::new();
        let clone = journal.clone();
        journal.record("s1", NameKind::Room, "jokes", true);
        clone.cut(&["s1".to_owned()], &["s2".to_owned()]);
        clone.healed();
        journal.server_gone("s1");
        let entries = journal.entries();
        assert_eq!(entries.len(), 4);
        let times: Vec<Instant> = entries.iter().filter_map(Entry::at).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        let summary = check(&entries, GRACE).expect("clean");
        assert_eq!((summary.events, summary.names), (1, 1));
    }

    #[test]
    fn violations_read_as_sentences() {
        let text = held_twice("s1", "s3", 1234, Problem::Connected).to_string();
        assert_eq!(
            text,
            "identity \"Alice\": held by s1 and s3 at once from +1.234s, while they could talk"
        );
    }
}
