//! Heartbeat failure detector, as a pure state machine.
//!
//! Every server sends every peer a small heartbeat datagram each `heartbeat_interval`. The
//! [`FailureDetector`] is told about each one ([`FailureDetector::heartbeat`]) and about clean
//! connection closes ([`FailureDetector::connection_closed`]), and is ticked by the driver
//! ([`FailureDetector::tick`]); it answers with [`Transition`]s, which the driver turns into
//! `peer_up` / `peer_down` log events and election inputs. It never reads the clock: every call
//! takes `now`, so the tests run hours of lossy traffic in microseconds.
//!
//! # Rules
//! - A peer starts **unknown**, which counts as not alive: nothing proves it is up, and an
//!   unknown peer can never be "declared down" (no [`Transition`] until it was first up).
//!   Its first heartbeat makes it up.
//! - An up peer is declared down once nothing has been heard from it for `failure_timeout`
//!   (the seed's "alive factor" times the interval). Losing fewer consecutive heartbeats than
//!   that never causes a down.
//! - A clean close of the peer's connection declares it down at once.
//! - Any other message from the peer ([`FailureDetector::heard_from`]) counts like a
//!   heartbeat. Without it, a peer that announced itself and died before its first heartbeat
//!   would never have been up, so it could never be declared down, and whoever followed it
//!   would follow a dead server forever.
//! - Heartbeats carry a sequence number that grows over a connection's life. A heartbeat whose
//!   sequence is not above the highest seen is a duplicate or arrived out of order: it is
//!   counted and otherwise ignored, because it says nothing about the peer being alive *now*.
//!   The sequence baseline is forgotten on [`FailureDetector::connection_closed`]: the driver
//!   calls it whenever a peer's connection ends (clean close, idle timeout, replaced by a new
//!   connection after a restart), since a restarted peer counts from zero again.
//!
//! # Ticking
//! The driver may either tick every `heartbeat_interval` (a down is then reported at most one
//! interval after the timeout), or sleep until [`FailureDetector::next_deadline`] and tick then
//! (reported exactly at the timeout). Extra ticks are harmless.

use std::time::{Duration, Instant};

use crate::ServerId;

/// Timing of the heartbeats, from the cluster config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetectorConfig {
    /// How often each server sends a heartbeat to each peer.
    pub heartbeat_interval: Duration,
    /// Silence after which an up peer is declared down.
    pub failure_timeout: Duration,
}

/// What the detector believes about one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// Never heard from since this server started: not alive, but never declared down.
    Unknown,
    /// Heard from within the failure timeout.
    Up,
    /// Declared down (silent too long, or its connection closed).
    Down,
}

/// Why a peer was declared down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DownReason {
    /// No heartbeat for this long (at least the failure timeout).
    Timeout {
        /// Time since the last heartbeat when the down was noticed.
        silent_for: Duration,
    },
    /// Its connection was closed.
    ConnectionClosed,
}

/// A change of a peer's state, to log and to hand to the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The peer is alive (first heartbeat, or back after being down).
    Up {
        /// The peer.
        peer: ServerId,
    },
    /// The peer is declared down.
    Down {
        /// The peer.
        peer: ServerId,
        /// Why.
        reason: DownReason,
    },
}

impl Transition {
    /// The peer whose state changed.
    pub fn peer(&self) -> &ServerId {
        match self {
            Transition::Up { peer } | Transition::Down { peer, .. } => peer,
        }
    }

    /// Whether the peer went up.
    pub fn is_up(&self) -> bool {
        matches!(self, Transition::Up { .. })
    }
}

/// One peer's line of the `/status` page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer.
    pub id: ServerId,
    /// Whether it is currently up.
    pub alive: bool,
    /// Unknown, up or down.
    pub state: PeerState,
    /// Time since its last accepted heartbeat; `None` if never heard from.
    pub last_heartbeat_age: Option<Duration>,
    /// Time since it entered its current state (since the detector started, if unknown).
    pub state_age: Duration,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DetectorCounters {
    /// Heartbeats from known peers, including stale ones.
    pub heartbeats_received: u64,
    /// Heartbeats ignored as duplicated or reordered (sequence not above the highest seen).
    pub heartbeats_stale: u64,
    /// Heartbeats from servers that are not peers (ignored).
    pub heartbeats_unknown: u64,
    /// Transitions of any peer, up or down.
    pub state_changes: u64,
    /// Transitions to up.
    pub ups: u64,
    /// Transitions to down.
    pub downs: u64,
}

#[derive(Debug, Clone)]
struct Peer {
    id: ServerId,
    state: PeerState,
    last_heard: Option<Instant>,
    /// Highest sequence accepted on the current connection; `None` after a close.
    last_seq: Option<u64>,
    state_since: Instant,
}

/// Tracks every peer's heartbeats and says when a peer goes up or down. See the module docs.
#[derive(Debug, Clone)]
pub struct FailureDetector {
    me: ServerId,
    config: DetectorConfig,
    peers: Vec<Peer>,
    counters: DetectorCounters,
}

impl FailureDetector {
    /// A detector for server `me` watching `peers` (`me` and duplicates are dropped from it);
    /// every peer starts unknown at `now`.
    pub fn new(
        me: ServerId,
        peers: Vec<ServerId>,
        config: DetectorConfig,
        now: Instant,
    ) -> FailureDetector {
        let mut tracked: Vec<Peer> = Vec::with_capacity(peers.len());
        for id in peers {
            if id != me && !tracked.iter().any(|p| p.id == id) {
                tracked.push(Peer {
                    id,
                    state: PeerState::Unknown,
                    last_heard: None,
                    last_seq: None,
                    state_since: now,
                });
            }
        }
        FailureDetector {
            me,
            config,
            peers: tracked,
            counters: DetectorCounters::default(),
        }
    }

    /// This server's id.
    pub fn me(&self) -> &ServerId {
        &self.me
    }

    /// The configuration this detector was built with.
    pub fn config(&self) -> DetectorConfig {
        self.config
    }

    /// A heartbeat with sequence `seq` arrived from `from` at `now`. Returns the transition to
    /// up if this heartbeat revives an unknown or down peer. Unknown senders and stale
    /// sequences are counted and ignored.
    pub fn heartbeat(&mut self, now: Instant, from: &str, seq: u64) -> Option<Transition> {
        let Some(index) = self.index_of(from) else {
            self.counters.heartbeats_unknown += 1;
            return None;
        };
        self.counters.heartbeats_received += 1;
        let peer = &mut self.peers[index];
        if peer.last_seq.is_some_and(|last| seq <= last) {
            self.counters.heartbeats_stale += 1;
            return None;
        }
        peer.last_seq = Some(seq);
        // Keep the latest instant even if the driver hands times out of order.
        peer.last_heard = Some(peer.last_heard.map_or(now, |last| last.max(now)));
        if peer.state == PeerState::Up {
            return None;
        }
        peer.state = PeerState::Up;
        peer.state_since = now;
        let transition = Transition::Up {
            peer: peer.id.clone(),
        };
        self.count(&transition);
        Some(transition)
    }

    /// A message other than a heartbeat (an election or registry message on a stream) arrived
    /// from `from` at `now`: as good a sign of life as a heartbeat. Returns the transition to
    /// up if the peer was unknown or down. The driver must call this for every stream message,
    /// so that a peer known only from its messages (say a leader that announced itself and
    /// died before its first heartbeat) is still watched and, when silent, declared down.
    pub fn heard_from(&mut self, now: Instant, from: &str) -> Option<Transition> {
        let index = self.index_of(from)?;
        let peer = &mut self.peers[index];
        peer.last_heard = Some(peer.last_heard.map_or(now, |last| last.max(now)));
        if peer.state == PeerState::Up {
            return None;
        }
        peer.state = PeerState::Up;
        peer.state_since = now;
        let transition = Transition::Up {
            peer: peer.id.clone(),
        };
        self.count(&transition);
        Some(transition)
    }

    /// Declares down every up peer silent for the failure timeout; call it every heartbeat
    /// interval, or at [`FailureDetector::next_deadline`].
    pub fn tick(&mut self, now: Instant) -> Vec<Transition> {
        let timeout = self.config.failure_timeout;
        let mut transitions = Vec::new();
        for peer in &mut self.peers {
            if peer.state != PeerState::Up {
                continue;
            }
            let Some(last) = peer.last_heard else {
                continue;
            };
            let silent_for = now.saturating_duration_since(last);
            if silent_for >= timeout {
                peer.state = PeerState::Down;
                peer.state_since = now;
                transitions.push(Transition::Down {
                    peer: peer.id.clone(),
                    reason: DownReason::Timeout { silent_for },
                });
            }
        }
        for transition in &transitions {
            self.count(transition);
        }
        transitions
    }

    /// The connection to `peer` closed (cleanly, timed out, or was replaced): down at once if
    /// it was up, and its sequence numbering starts over with the next connection.
    pub fn connection_closed(&mut self, now: Instant, peer: &str) -> Option<Transition> {
        let index = self.index_of(peer)?;
        let tracked = &mut self.peers[index];
        tracked.last_seq = None;
        if tracked.state != PeerState::Up {
            return None;
        }
        tracked.state = PeerState::Down;
        tracked.state_since = now;
        let transition = Transition::Down {
            peer: tracked.id.clone(),
            reason: DownReason::ConnectionClosed,
        };
        self.count(&transition);
        Some(transition)
    }

    /// The earliest instant at which an up peer would be declared down if nothing more is
    /// heard; `None` if no peer is up.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.peers
            .iter()
            .filter(|p| p.state == PeerState::Up)
            .filter_map(|p| p.last_heard)
            .filter_map(|last| last.checked_add(self.config.failure_timeout))
            .min()
    }

    /// Whether `peer` is currently up.
    pub fn is_alive(&self, peer: &str) -> bool {
        self.index_of(peer)
            .is_some_and(|i| self.peers[i].state == PeerState::Up)
    }

    /// The peers currently up, in the order they were given.
    pub fn alive_peers(&self) -> Vec<ServerId> {
        self.peers
            .iter()
            .filter(|p| p.state == PeerState::Up)
            .map(|p| p.id.clone())
            .collect()
    }

    /// Every peer's state at `now`, for `/status`.
    pub fn status(&self, now: Instant) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .map(|p| PeerStatus {
                id: p.id.clone(),
                alive: p.state == PeerState::Up,
                state: p.state,
                last_heartbeat_age: p.last_heard.map(|t| now.saturating_duration_since(t)),
                state_age: now.saturating_duration_since(p.state_since),
            })
            .collect()
    }

    /// Counters for `/metrics`.
    pub fn counters(&self) -> DetectorCounters {
        self.counters
    }

    fn index_of(&self, peer: &str) -> Option<usize> {
        self.peers.iter().position(|p| p.id == peer)
    }

    fn count(&mut self, transition: &Transition) {
        self.counters.state_changes += 1;
        if transition.is_up() {
            self.counters.ups += 1;
        } else {
            self.counters.downs += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The main crate's defaults: a heartbeat every 20 ms, down after 350 ms of silence.
    const CONFIG: DetectorConfig = DetectorConfig {
        heartbeat_interval: ms(20),
        failure_timeout: ms(350),
    };

    /// SplitMix64: a tiny deterministic RNG for loss patterns.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// True with probability `percent` / 100.
        fn lose(&mut self, percent: u64) -> bool {
            self.next_u64() % 100 < percent
        }
    }

    fn detector(start: Instant) -> FailureDetector {
        FailureDetector::new("s1".into(), vec!["s1".into(), "s2".into()], CONFIG, start)
    }

    /// Drives one peer ("s2") for `ticks` heartbeat intervals: at each, the heartbeat (if
    /// `delivered` says so) and then a tick. Returns every transition with its time.
    fn drive(
        fd: &mut FailureDetector,
        start: Instant,
        ticks: u64,
        mut delivered: impl FnMut(u64) -> bool,
    ) -> Vec<(Duration, Transition)> {
        let mut seen = Vec::new();
        for seq in 0..ticks {
            let offset = CONFIG.heartbeat_interval * seq as u32;
            let now = start + offset;
            if delivered(seq)
                && let Some(t) = fd.heartbeat(now, "s2", seq)
            {
                seen.push((offset, t));
            }
            for t in fd.tick(now) {
                seen.push((offset, t));
            }
        }
        seen
    }

    fn downs(transitions: &[(Duration, Transition)]) -> usize {
        transitions.iter().filter(|(_, t)| !t.is_up()).count()
    }

    #[test]
    fn a_peer_is_unknown_until_its_first_heartbeat() {
        let start = Instant::now();
        let mut fd = detector(start);
        assert_eq!(fd.alive_peers(), Vec::<ServerId>::new());
        let status = fd.status(start + ms(500));
        assert_eq!(status.len(), 1, "me is not my own peer");
        assert_eq!(status[0].state, PeerState::Unknown);
        assert!(!status[0].alive);
        assert_eq!(status[0].last_heartbeat_age, None);
        assert_eq!(status[0].state_age, ms(500));
        // An unknown peer is never "declared down", however long the silence.
        assert!(fd.tick(start + ms(10_000)).is_empty());
        assert_eq!(fd.next_deadline(), None);

        let up = fd.heartbeat(start + ms(600), "s2", 0);
        assert_eq!(up, Some(Transition::Up { peer: "s2".into() }));
        assert!(fd.is_alive("s2"));
        let status = fd.status(start + ms(650));
        assert_eq!(status[0].last_heartbeat_age, Some(ms(50)));
        assert_eq!(fd.next_deadline(), Some(start + ms(950)));
    }

    #[test]
    fn steady_heartbeats_never_go_down() {
        let start = Instant::now();
        let mut fd = detector(start);
        let seen = drive(&mut fd, start, 3_000, |_| true);
        assert_eq!(seen.len(), 1, "only the first up: {seen:?}");
        assert_eq!(fd.counters().heartbeats_received, 3_000);
        assert_eq!(fd.counters().downs, 0);
    }

    #[test]
    fn a_stop_is_detected_within_the_timeout_plus_one_interval() {
        let start = Instant::now();
        let mut fd = detector(start);
        let last = 100;
        let seen = drive(&mut fd, start, 200, |seq| seq <= last);
        let (at, down) = seen.last().expect("a down").clone();
        assert!(matches!(
            down,
            Transition::Down {
                reason: DownReason::Timeout { .. },
                ..
            }
        ));
        let silence = at - CONFIG.heartbeat_interval * last as u32;
        assert!(silence >= CONFIG.failure_timeout, "{silence:?}");
        assert!(
            silence <= CONFIG.failure_timeout + CONFIG.heartbeat_interval,
            "{silence:?}"
        );
        assert_eq!(downs(&seen), 1, "declared down once, not at every tick");
    }

    #[test]
    fn ticking_at_the_next_deadline_detects_exactly_at_the_timeout() {
        let start = Instant::now();
        let mut fd = detector(start);
        fd.heartbeat(start, "s2", 1);
        let deadline = fd.next_deadline().expect("s2 is up");
        assert_eq!(deadline, start + CONFIG.failure_timeout);
        assert!(fd.tick(deadline - ms(1)).is_empty());
        let down = fd.tick(deadline);
        assert_eq!(
            down,
            vec![Transition::Down {
                peer: "s2".into(),
                reason: DownReason::Timeout {
                    silent_for: CONFIG.failure_timeout
                }
            }]
        );
        assert_eq!(fd.next_deadline(), None);
    }

    #[test]
    fn a_resumed_peer_goes_up_again() {
        let start = Instant::now();
        let mut fd = detector(start);
        // Up, silent for a second (down), then heartbeats again with higher sequences.
        let seen = drive(&mut fd, start, 200, |seq| !(50..100).contains(&seq));
        let kinds: Vec<bool> = seen.iter().map(|(_, t)| t.is_up()).collect();
        assert_eq!(kinds, vec![true, false, true], "{seen:?}");
        let (at, _) = &seen[2];
        assert_eq!(*at, CONFIG.heartbeat_interval * 100);
        let counters = fd.counters();
        assert_eq!(
            (counters.ups, counters.downs, counters.state_changes),
            (2, 1, 3)
        );
    }

    #[test]
    fn bursts_of_loss_shorter_than_the_timeout_never_cause_a_down() {
        // 16 lost in a row leaves a 340 ms gap: under the 350 ms timeout.
        let start = Instant::now();
        let mut fd = detector(start);
        let seen = drive(&mut fd, start, 3_000, |seq| seq % 40 == 0 || seq % 40 > 16);
        assert_eq!(downs(&seen), 0, "{seen:?}");
        // 18 lost (a 380 ms gap, with a tick at 360 ms) is a down at every occurrence. (17
        // lost, 360 ms, depends on the tick's phase: here the 18th heartbeat lands first.)
        let mut fd = detector(start);
        let seen = drive(&mut fd, start, 3_000, |seq| seq % 40 == 0 || seq % 40 > 18);
        assert_eq!(downs(&seen), 75, "once per burst");
    }

    #[test]
    fn thirty_percent_random_loss_over_a_minute_gives_no_down() {
        for seed in [7_u64, 42, 2024] {
            let start = Instant::now();
            let mut fd = detector(start);
            let mut rng = Rng(seed);
            // 60 s of heartbeats every 20 ms, each lost with probability 30 %.
            let seen = drive(&mut fd, start, 3_000, |_| !rng.lose(30));
            assert_eq!(downs(&seen), 0, "seed {seed}: {seen:?}");
            assert!(fd.is_alive("s2"), "seed {seed}");
            let received = fd.counters().heartbeats_received;
            assert!(
                (1_900..2_300).contains(&received),
                "seed {seed}: {received} of 3000"
            );
        }
    }

    #[test]
    fn duplicated_and_reordered_heartbeats_are_harmless() {
        let start = Instant::now();
        let mut fd = detector(start);
        let at = |n: u64| start + ms(20 * n);
        assert!(fd.heartbeat(at(0), "s2", 0).is_some());
        for seq in 1..=10 {
            assert_eq!(fd.heartbeat(at(seq), "s2", seq), None);
            // Every heartbeat arrives twice, and an old one shows up late.
            assert_eq!(fd.heartbeat(at(seq), "s2", seq), None);
            assert_eq!(fd.heartbeat(at(seq), "s2", seq / 2), None);
        }
        assert_eq!(fd.counters().heartbeats_stale, 20);
        assert_eq!(fd.counters().state_changes, 1);
        // The peer stops after seq 10; stale copies keep arriving: they must not keep it
        // alive, nor revive it once it is down.
        for n in 11..40 {
            assert_eq!(fd.heartbeat(at(n), "s2", 3), None);
            fd.tick(at(n));
        }
        assert!(
            !fd.is_alive("s2"),
            "stale heartbeats kept a silent peer alive"
        );
        assert_eq!(
            fd.heartbeat(at(41), "s2", 10),
            None,
            "a duplicate revived it"
        );
        assert!(
            fd.heartbeat(at(42), "s2", 11).is_some(),
            "a fresh one revives it"
        );
    }

    #[test]
    fn a_closed_connection_is_down_at_once_and_the_next_one_counts_from_zero() {
        let start = Instant::now();
        let mut fd = detector(start);
        fd.heartbeat(start, "s2", 500);
        let down = fd.connection_closed(start + ms(5), "s2");
        assert_eq!(
            down,
            Some(Transition::Down {
                peer: "s2".into(),
                reason: DownReason::ConnectionClosed
            })
        );
        assert_eq!(
            fd.connection_closed(start + ms(6), "s2"),
            None,
            "already down"
        );
        // The restarted peer counts from zero on its new connection.
        assert!(fd.heartbeat(start + ms(100), "s2", 0).is_some());
        assert!(fd.is_alive("s2"));
    }

    #[test]
    fn any_message_is_a_sign_of_life() {
        let start = Instant::now();
        let mut fd = detector(start);
        // A peer that never sent a heartbeat but sent an election message is watched...
        assert_eq!(
            fd.heard_from(start, "s2"),
            Some(Transition::Up { peer: "s2".into() })
        );
        assert_eq!(fd.heard_from(start + ms(100), "s2"), None);
        // ...and declared down when it falls silent.
        assert!(fd.tick(start + ms(449)).is_empty());
        assert_eq!(fd.tick(start + ms(450)).len(), 1);
        // A message does not disturb the heartbeat sequence tracking.
        assert!(fd.heartbeat(start + ms(460), "s2", 1).is_some());
        assert_eq!(fd.heartbeat(start + ms(470), "s2", 1), None);
    }

    #[test]
    fn strangers_self_and_time_going_backwards_do_not_confuse_it() {
        let start = Instant::now() + ms(1_000);
        let mut fd = FailureDetector::new(
            "s1".into(),
            vec!["s2".into(), "s2".into(), "s3".into()],
            CONFIG,
            start,
        );
        assert_eq!(fd.status(start).len(), 2, "duplicates dropped");
        assert_eq!(fd.heartbeat(start, "s9", 1), None);
        assert_eq!(fd.heartbeat(start, "s1", 1), None);
        assert_eq!(fd.heard_from(start, "s9"), None);
        assert_eq!(fd.connection_closed(start, "s9"), None);
        assert_eq!(fd.counters().heartbeats_unknown, 2);
        assert!(fd.heartbeat(start, "s2", u64::MAX - 1).is_some());
        assert_eq!(fd.heartbeat(start, "s2", u64::MAX - 1), None);
        assert_eq!(
            fd.heartbeat(start, "s2", u64::MAX),
            None,
            "the latest time is kept"
        );
        // The driver hands an older time: nothing panics, nothing goes down.
        assert!(fd.tick(start - ms(500)).is_empty());
        let status = fd.status(start - ms(500));
        assert_eq!(status[0].last_heartbeat_age, Some(Duration::ZERO));
        assert_eq!(fd.me(), "s1");
        assert_eq!(fd.config(), CONFIG);
    }
}
