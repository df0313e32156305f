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
