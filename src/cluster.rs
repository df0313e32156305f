//! The thin task that owns a server's pure cluster state machines (the
//! [`FailureDetector`] and the Fast Bully [`Election`]), feeds them mesh
//! events, timers and the clock, and carries out what they ask for: messages,
//! timers, heartbeats, log events, and the status snapshot that `/status` shows.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;
use tracing::{info, warn};

use crate::ServerId;
use crate::config::ClusterConfig;
use crate::detector::{DetectorConfig, FailureDetector, Transition};
use crate::election::{Action, Election, ElectionTimings, Input};
use crate::mesh::wire::{Heartbeat, PeerMessage};
use crate::mesh::{Mesh, MeshEvent};

/// One member as `/status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MemberStatus {
    /// Server id.
    pub id: ServerId,
    /// Whether this server believes it alive (itself: always).
    pub alive: bool,
    /// Milliseconds since its last heartbeat arrived (`null` if never, 0 for itself).
    pub last_heartbeat_ms: Option<u64>,
}

/// This server's view of the cluster, refreshed every heartbeat interval.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ClusterView {
    /// Term of the current leader (0 before any election).
    pub term: u64,
    /// The leader this server follows, if any.
    pub leader: Option<ServerId>,
    /// Fast Bully phase, for debugging.
    pub phase: String,
    /// Every configured server, in config order.
    pub members: Vec<MemberStatus>,
    /// Elections this server started.
    pub elections_started: u64,
    /// Times this server's leader changed.
    pub leader_changes: u64,
    /// Peer up/down transitions seen.
    pub peer_state_changes: u64,
}

/// Shared, cheaply readable cluster view.
pub type SharedView = Arc<Mutex<ClusterView>>;

/// Runs until `shutdown`. `events` comes from the [`Mesh`].
pub async fn run(
    config: ClusterConfig,
    me: ServerId,
    mesh: Mesh,
    mut events: mpsc::Receiver<MeshEvent>,
    view: SharedView,
    shutdown: CancellationToken,
) {
    let timing = &config.timing;
    let members = config.ids();
    let peers: Vec<ServerId> = members.iter().filter(|m| **m != me).cloned().collect();
    let start = Instant::now();
    let mut detector = FailureDetector::new(
        me.clone(),
        peers.clone(),
        DetectorConfig {
            heartbeat_interval: timing.heartbeat_interval,
            failure_timeout: timing.failure_timeout,
        },
        start.into_std(),
    );
    let mut election = Election::new(
        me.clone(),
        members.clone(),
        ElectionTimings {
            t1: timing.election_t1,
            t2: timing.election_t2,
            t3: timing.election_t3,
            t4: timing.election_t4,
        },
    );
    let mut driver = Driver {
        me,
        mesh,
        timers: DelayQueue::new(),
        heartbeat_seq: 0,
    };
    let mut ticker = tokio::time::interval(timing.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Boot: give the links a moment to come up so that IAmUp reaches the live
    // peers; start as soon as every peer is linked.
    let boot_deadline = start + timing.failure_timeout;
    let mut started = false;

    loop {
        if !started
            && (Instant::now() >= boot_deadline || driver.mesh.linked_peers().len() == peers.len())
        {
            started = true;
            info!(
                linked = driver.mesh.linked_peers().len(),
                "election starting: sending IAmUp"
            );
            let actions = election.handle(Instant::now().into_std(), Input::Start);
            driver.apply(actions);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {
                driver.send_heartbeats(&peers, election.term());
                let now = Instant::now().into_std();
                for transition in detector.tick(now) {
                    driver.transition(&mut election, transition);
                }
                refresh(&view, &detector, &election, &members, &driver.me);
            }
            Some(expired) = futures_util::StreamExt::next(&mut driver.timers), if !driver.timers.is_empty() => {
                let actions = election.handle(Instant::now().into_std(), Input::Timer(expired.into_inner()));
                driver.apply(actions);
            }
            event = events.recv() => {
                let Some(event) = event else { break };
                let now = Instant::now().into_std();
                match event {
                    MeshEvent::Heartbeat(from, heartbeat) => {
                        if let Some(transition) = detector.heartbeat(now, &from, heartbeat.seq) {
                            driver.transition(&mut election, transition);
                        }
                    }
                    MeshEvent::LinkDown(peer) => {
                        // A clean stop is a down at once; after a crash the
                        // detector has usually said so already; either way the
                        // peer's heartbeat numbering starts over on a new link.
                        if let Some(transition) = detector.connection_closed(now, &peer) {
                            driver.transition(&mut election, transition);
                        }
                    }
                    MeshEvent::LinkUp(_) => {}
                    MeshEvent::Message(from, PeerMessage::Election(msg)) => {
                        // Any message proves the peer alive, like a heartbeat.
                        if let Some(transition) = detector.heard_from(now, &from) {
                            driver.transition(&mut election, transition);
                        }
                        let actions = election.handle(now, Input::Message { from, msg });
                        driver.apply(actions);
                    }
                    MeshEvent::Message(_, PeerMessage::Hello { .. }) => {}
                }
            }
        }
    }
}

struct Driver {
    me: ServerId,
    mesh: Mesh,
    timers: DelayQueue<crate::election::ElectionTimer>,
    heartbeat_seq: u64,
}

impl Driver {
    fn send_heartbeats(&mut self, peers: &[ServerId], term: u64) {
        // Wall-clock microseconds, kept strictly increasing: a restarted
        // server's sequence stays above what its peers saw before the restart.
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        self.heartbeat_seq = wall.max(self.heartbeat_seq + 1);
        let heartbeat = Heartbeat {
            from: self.me.clone(),
            term,
            seq: self.heartbeat_seq,
            sent_at_ms: self.mesh.clock_ms(),
        };
        for peer in peers {
            self.mesh.send_heartbeat(peer, &heartbeat);
        }
    }

    fn transition(&mut self, election: &mut Election, transition: Transition) {
        let now = Instant::now().into_std();
        let input = match transition {
            Transition::Up { peer } => {
                info!(peer = %peer, "peer_up");
                Input::PeerUp(peer)
            }
            Transition::Down { peer, reason } => {
                warn!(peer = %peer, reason = ?reason, "peer_down");
                Input::PeerDown(peer)
            }
        };
        let actions = election.handle(now, input);
        self.apply(actions);
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send { to, msg } => {
                    if !self.mesh.send(&to, &PeerMessage::Election(msg.clone())) {
                        tracing::debug!(peer = %to, message = msg.name(), "no link; election message dropped");
                    }
                }
                Action::SetTimer { timer, after } => {
                    self.timers.insert(timer, after);
                }
                Action::ElectionStarted { term } => info!(term, "election_started"),
                Action::LeaderElected { leader, term } => {
                    info!(leader = %leader, term, "leader_elected")
                }
                Action::LeaderLost { leader, term } => info!(leader = %leader, term, "leader_lost"),
            }
        }
    }
}

fn refresh(
    view: &SharedView,
    detector: &FailureDetector,
    election: &Election,
    members: &[ServerId],
    me: &str,
) {
    let now = Instant::now().into_std();
    let peers = detector.status(now);
    let members = members
        .iter()
        .map(|id| match peers.iter().find(|p| p.id == *id) {
            Some(peer) => MemberStatus {
                id: id.clone(),
                alive: peer.alive,
                last_heartbeat_ms: peer.last_heartbeat_age.map(|age| age.as_millis() as u64),
            },
            None => MemberStatus {
                id: id.clone(),
                alive: id == me,
                last_heartbeat_ms: (id == me).then_some(0),
            },
        })
        .collect();
    let stats = election.stats();
    let counters = detector.counters();
    let mut view = view.lock().unwrap_or_else(|e| e.into_inner());
    *view = ClusterView {
        term: election.term(),
        leader: election.leader().cloned(),
        phase: format!("{:?}", election.phase()),
        members,
        elections_started: stats.elections_started,
        leader_changes: stats.leader_changes,
        peer_state_changes: counters.state_changes,
    };
}
