//! Fast Bully leader election (Lee & Choi, ICOIN 2002) as a pure state machine.
//!
//! [`Election`] never reads the clock, owns no socket and spawns no task: the driver feeds it
//! [`Input`]s together with the current time and applies the [`Action`]s it returns (send a
//! message, arm a timer, log a leader change). This is the shape of `quinn-proto` and `foca`,
//! and it is what lets every branch of the algorithm be driven deterministically from a unit
//! test with a virtual clock (see the simulator at the bottom of this file).
//!
//! # Priority
//! Servers are ranked by their position in the member list handed to [`Election::new`]:
//! later = higher priority. The highest server that is alive leads.
//!
//! # The algorithm
//! - **Boot / recovery** ([`Input::Start`]): `IAmUp` to every peer; each peer replies `View`
//!   (whom it follows, the term, whom its detector sees alive). A `View` naming a leader above
//!   us: we follow it at once. A `View` naming a leader below us (or us, from before a crash)
//!   while no higher server is known to be alive: we take the lead (`Coordinator` to every lower
//!   server). No decision within T1: if no higher server is known alive we lead, otherwise we
//!   give that server T3 to announce itself and then run an election.
//! - **Leader failure** ([`Input::PeerDown`] of the leader): `Election` to every higher server,
//!   wait T2 for `Answer`s. None: `Coordinator` to every lower server. Some: `Nomination` to
//!   the highest answerer, wait T3 for its `Coordinator`; on timeout nominate the next one; none
//!   left: start again.
//! - **Receiving `Election`** from a lower server: reply `Answer`, then wait T4 for a
//!   `Nomination` (we then announce `Coordinator` to every lower server) or a `Coordinator`.
//!   T4 runs out: we start an election ourselves.
//! - **Anti-entropy** ([`Input::Heartbeat`], not in the paper): every heartbeat datagram
//!   carries its sender's view, `(term, leader)`. A server that missed an announcement (a
//!   `Coordinator` lost with its connection) pulls it from the next heartbeat of any
//!   up-to-date peer; without this, a lost `Coordinator` splits the cluster for good, since a
//!   split in which everyone sees everyone alive sends no message that could repair it.
//!
//! # Terms (fencing)
//! Every `Coordinator` carries a term one above any term its sender has seen. A server follows
//! the leader of the newest *epoch* `(term, leader's rank)`: a higher term wins, and two
//! `Coordinator`s of the same term (two servers announcing at once) are ordered by rank, so
//! every server settles on the same one whatever order the messages arrive in. A message whose
//! term is below the epoch of the leader we follow is ignored (that is the fencing of stale
//! leaders), and answered with a `View` so that its sender catches up: a stale leader learns
//! it was deposed. (A stale `View` is only answered if it names its own sender as leader; any
//! other is a late reply to an `IAmUp`, overtaken by the `Coordinator` already on its way.)
//! `IAmUp` is the one exception to fencing: a restarted server has forgotten every term.
//!
//! Because two servers may announce the same term for the time of one message, the term alone
//! does not name a leader: whatever is fenced by term elsewhere (the registry) should compare
//! the pair `(term, leader)` the way [`Action::LeaderElected`] reports it.
//!
//! # What the driver must guarantee
//! - Every election message received from a peer also counts as a sign of life for the
//!   failure detector (`FailureDetector::heard_from`), and the resulting [`Input::PeerUp`] is
//!   fed *before* the message. The algorithm only leaves a dead leader on
//!   [`Input::PeerDown`], and a detector only reports down a peer it has seen up: a leader
//!   that announced itself and died before its first heartbeat must still be watched.
//! - Messages travel on reliable streams and are lost only with their connection (or when
//!   the receiver restarts); a lost connection is reported on *both* ends as
//!   [`Input::PeerDown`], then [`Input::PeerUp`] once a new one is up (which is what the
//!   detector's `connection_closed` and the next heartbeat do). Order between messages does
//!   not matter. A message lost all the same (a dying connection, no link yet) is repaired
//!   by the heartbeats, as long as the driver feeds them:
//! - Every heartbeat carries the sender's [`Election::term`] and [`Election::leader`] at the
//!   time it is sent, and every heartbeat received from a member is fed as
//!   [`Input::Heartbeat`] *after* the failure detector has seen it (so its `PeerUp`, if any,
//!   comes first). Lost, duplicated and reordered heartbeats are harmless; so is feeding the
//!   ones the detector discards as out of order.
//!
//! # Timers
//! Timers belong to the state machine. Each [`ElectionTimer`] carries the *round* in which it
//! was armed, and every phase change starts a new round, so a timer of an old round is simply
//! ignored when it fires; the driver never has to cancel anything.
//!
//! # Where the paper is silent
//! - A `Coordinator` of a newer term from a server *below a higher server we believe alive* is
//!   accepted: detectors on different servers fire at different instants, the announcer has
//!   already asked every higher server, and a higher server that is really alive takes the
//!   lead back on its own (see the next points). Refusing would turn every failover into two.
//! - Learning (by `Coordinator` or `View`) that a server *below us* leads at a newer epoch
//!   means the bully rule is broken while we are alive: we do not follow it, we run an
//!   election (or, while recovering and knowing no higher server alive, announce directly).
//! - A new leader also sends a `View` to every *higher* server its detector sees alive
//!   (normally none, so this costs nothing): a higher server cut off from the election learns
//!   it and takes the lead back, instead of the cluster living with two leaders.
//! - The leader itself receiving `Election` (someone suspects it wrongly) answers and at once
//!   re-announces `Coordinator` with a fresh term: the nomination would come to it anyway
//!   (it is the highest answerer), this saves T2 and a round trip, and the fresh term fences
//!   the suspicious server's pending `Nomination`s.
//! - `IAmUp` while an election is under way: answered with a `View` naming no leader; the
//!   recovering server waits for the `Coordinator` or sorts things out after T1 + T3.
//! - A leader stays in our `View`s as the leader we follow; a server whose detector has
//!   already declared that leader down does not follow it from a third party's `View` but
//!   runs an election. A `Coordinator` (or a `View` naming itself) straight from that server
//!   is proof of life and is followed.
//! - A leader followed on the strength of a third party's `View`, which our detector has never
//!   seen alive, gets T1 to show a sign of life ([`TimerKind::LeaderCheck`]); still silent, it
//!   is taken for dead and we run an election. Without this, a server restarting while the
//!   leader dies follows a dead server forever: its detector never saw that server up, so it
//!   will never report it down.
//! - A server answering an `Election` keeps following its leader until it hears otherwise
//!   (the suspicion may be wrong); it drops the leader when its own detector declares it down.
//! - An `Election` or `Answer` arriving while we run our own election: `Election` is answered
//!   and our election goes on; a late `Answer` joins the list of servers to nominate.
//! - An `Answer` from the top server of the cluster is nominated at once: no better answer
//!   can come, so waiting out T2 only delays things. We do not extend this to "every server
//!   above the answerer is down according to our detector": when the suspicion is false, that
//!   bet makes a second server announce itself next to the live leader.
//! - A nominee that receives `Nomination` announces itself even while it runs its own
//!   election (as the paper says); should a higher server be alive after all, that server's
//!   T4 makes it run an election, which it wins.
//! - Heartbeats are pulled, never answered: a server adopts the view of a peer's heartbeat
//!   when it names a newer epoch `(term, leader)` than its own and our detector sees that
//!   leader up, in whatever phase we are (it is the newest epoch we know, and its leader is
//!   alive); a peer whose view is older than ours is not told anything, it pulls ours from
//!   our heartbeats in the same way. A heartbeat's newer epoch led by a server *below* us (or
//!   by us, before a restart) breaks the bully rule: if we are `Stable` we run an election
//!   (every other phase ends on its own timer). The same heartbeat repeated 50 times a second
//!   therefore acts at most once: the adoption makes the views equal, the election leaves
//!   `Stable`. A leader our detector does not see up is ignored: it may be dead (the
//!   sender's detector lags, and will start an election) or cut off from us, and reacting
//!   (following it, or fighting it, or pushing `View`s at the peer) would only make a partial
//!   partition churn through elections. A heartbeat's term also raises the seen term, so our
//!   next `Coordinator` is not fenced by a term we heard of only that way.
//! - Messages that break the protocol's direction (`Election`/`Nomination` from a higher
//!   server, `Answer` from a lower one), from unknown servers or from ourselves are ignored and
//!   counted: they can only come from a peer with a different cluster config.
//! - Members are deduplicated (first occurrence wins). A server missing from its own member
//!   list is placed lowest, so a config mistake can never make it steal the lead.
//!
//! # Message cost
//! One election started by one server costs at most `(n-1)` `Election`s, `(n-2)` `Answer`s, a
//! few `Nomination`s and `(n-1)` `Coordinator`s (plus a `View` to a higher server the new
//! leader's detector has not yet seen die): O(n), at most `3n` in the tests. A server that has
//! answered an `Election`
//! does not start its own when its detector fires, so in practice (detections spread over a
//! heartbeat interval, messages take a fraction of it) one election runs per failure. The
//! Fast Bully worst case remains: `k` servers that detect the failure within one message
//! latency of each other each probe their higher servers, up to `n(n-1)/2` `Election`s.
//!
//! Heartbeats never send a message by themselves. While views agree (the steady state), or
//! a peer's view is older or leaderless, a heartbeat causes no action at all; adopting a
//! newer view costs nothing; only a lower server leading a newer epoch costs an election,
//! once, since it leaves `Stable`.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ServerId;

/// The four timeouts of Fast Bully, from the cluster config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElectionTimings {
    /// T1: how long a (re)starting server waits for `View` replies to its `IAmUp`; also how
    /// long a leader known only from someone else's `View` has to show a sign of life.
    pub t1: Duration,
    /// T2: how long an election's initiator waits for `Answer`s.
    pub t2: Duration,
    /// T3: how long a nominator waits for its nominee's `Coordinator`; also how long a
    /// recovering server that knows a higher server is alive waits for that server to announce.
    pub t3: Duration,
    /// T4: how long a server that answered an `Election` waits for a `Nomination` or a
    /// `Coordinator`. Should exceed T2 + T3 plus a round trip: the initiator nominates after
    /// T2, and if its first nominee died it nominates the next one only after T3 more. A
    /// shorter T4 still converges, through one more election.
    pub t4: Duration,
}

impl ElectionTimings {
    /// The duration of the timer of the given kind.
    pub fn duration(&self, kind: TimerKind) -> Duration {
        match kind {
            TimerKind::Views | TimerKind::LeaderCheck => self.t1,
            TimerKind::Answers => self.t2,
            TimerKind::Coordinator | TimerKind::Leader => self.t3,
            TimerKind::Nomination => self.t4,
        }
    }
}

/// An election message between servers. The sender's id comes from the authenticated mesh
/// connection, so it is not repeated here; every message carries the sender's term.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ElectionMessage {
    /// "The leader is gone": sent to every higher server by a server that noticed.
    Election {
        /// The highest term the sender has seen.
        term: u64,
    },
    /// "I am alive and above you": the reply to `Election`.
    Answer {
        /// The highest term the sender has seen.
        term: u64,
    },
    /// "You are the highest that answered: announce yourself."
    Nomination {
        /// The highest term the sender has seen.
        term: u64,
    },
    /// "I lead from this term on": sent by the new leader to every lower server.
    Coordinator {
        /// One above any term the sender had seen: the new leader's term.
        term: u64,
    },
    /// "I have just (re)started": sent to every server at boot.
    IAmUp {
        /// The highest term the sender has seen (0 after a restart: state is not persisted).
        term: u64,
    },
    /// What the sender knows: the reply to `IAmUp`, and the correction sent to the sender of a
    /// stale message.
    View {
        /// The leader the sender follows, if any.
        leader: Option<ServerId>,
        /// The term of that leader; without a leader, the highest term the sender has seen.
        term: u64,
        /// The servers the sender (its own id included) believes alive.
        alive: Vec<ServerId>,
    },
}

impl ElectionMessage {
    /// The sender's term carried by this message.
    pub fn term(&self) -> u64 {
        match self {
            ElectionMessage::Election { term }
            | ElectionMessage::Answer { term }
            | ElectionMessage::Nomination { term }
            | ElectionMessage::Coordinator { term }
            | ElectionMessage::IAmUp { term }
            | ElectionMessage::View { term, .. } => *term,
        }
    }

    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            ElectionMessage::Election { .. } => "election",
            ElectionMessage::Answer { .. } => "answer",
            ElectionMessage::Nomination { .. } => "nomination",
            ElectionMessage::Coordinator { .. } => "coordinator",
            ElectionMessage::IAmUp { .. } => "i_am_up",
            ElectionMessage::View { .. } => "view",
        }
    }
}

/// Something that happened, handed to [`Election::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// This server has booted: announce it with `IAmUp`. Inputs before `Start` only update
    /// the alive set; messages and timers are ignored.
    Start,
    /// An election message from a peer (the id is the authenticated peer, not a claim).
    Message {
        /// The peer that sent it.
        from: ServerId,
        /// What it sent.
        msg: ElectionMessage,
    },
    /// A timer requested by [`Action::SetTimer`] has fired.
    Timer(ElectionTimer),
    /// The failure detector declared this peer down.
    PeerDown(ServerId),
    /// The failure detector heard from this peer again (or for the first time).
    PeerUp(ServerId),
    /// A heartbeat datagram from a peer, with the view it carried: the sender's
    /// [`Election::term`] and [`Election::leader`] when it sent it. Feed every heartbeat from a
    /// member, *after* the failure detector has seen it (so that the sender is already up).
    /// This is the anti-entropy channel: an announcement a server missed (a `Coordinator` lost
    /// with its connection) reaches it through the next heartbeat of any up-to-date peer.
    /// Agreeing views, older views and leaderless views cost nothing: no action at all.
    Heartbeat {
        /// The peer that sent it.
        from: ServerId,
        /// The sender's [`Election::term`].
        term: u64,
        /// The sender's [`Election::leader`] (`None` while it runs or waits for an election).
        leader: Option<ServerId>,
    },
}

/// Which wait a timer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimerKind {
    /// T1: a recovering server's wait for `View`s.
    Views,
    /// T3 after recovery: wait for the higher server known alive to announce itself.
    Leader,
    /// T2: an initiator's wait for `Answer`s.
    Answers,
    /// T3: a nominator's wait for its nominee's `Coordinator`.
    Coordinator,
    /// T4: an answerer's wait for a `Nomination` or `Coordinator`.
    Nomination,
    /// T1 after following a leader our detector has never seen alive (we only know it from a
    /// third party's `View`): still silent by then, it is taken for dead.
    LeaderCheck,
}

/// A typed timer request. The driver holds it and hands it back in [`Input::Timer`] when it
/// fires; it never cancels one, because a timer of an old round is ignored by the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ElectionTimer {
    kind: TimerKind,
    round: u64,
}

impl ElectionTimer {
    /// Which wait this timer ends.
    pub fn kind(&self) -> TimerKind {
        self.kind
    }

    /// The round in which the timer was armed; it only acts if that round is still current.
    pub fn round(&self) -> u64 {
        self.round
    }
}

/// What the driver must do after an input, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this message to this peer (on a reliable stream; if the peer is unreachable the
    /// message may be dropped, the algorithm copes with that through its timers).
    Send {
        /// The destination.
        to: ServerId,
        /// The message.
        msg: ElectionMessage,
    },
    /// Hand `timer` back in [`Input::Timer`] once `after` has passed.
    SetTimer {
        /// The timer to return.
        timer: ElectionTimer,
        /// How long from now.
        after: Duration,
    },
    /// This server has started an election (the `election_started` log event). It follows
    /// no leader until a [`Action::LeaderElected`].
    ElectionStarted {
        /// The highest term this server has seen; the winner's term will be above it.
        term: u64,
    },
    /// This server now follows `leader` (possibly itself) at `term` (the `leader_elected`
    /// log event). Emitted whenever the leader or its term changes.
    LeaderElected {
        /// The new leader.
        leader: ServerId,
        /// Its term.
        term: u64,
    },
    /// This server no longer follows any leader: the one it followed was declared down or an
    /// election started. Claims should wait for the next [`Action::LeaderElected`].
    LeaderLost {
        /// The leader it followed until now.
        leader: ServerId,
        /// That leader's term.
        term: u64,
    },
}

/// Where a server stands in the algorithm, for status pages and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Not started yet.
    Idle,
    /// Sent `IAmUp`; collecting `View`s for T1.
    Recovering,
    /// Recovered, knows a higher server is alive; gives it T3 to announce itself.
    AwaitingLeader,
    /// Follows a leader (or is the leader). The only timer is the [`TimerKind::LeaderCheck`]
    /// of a leader not yet heard from.
    Stable,
    /// Sent `Election` to every higher server; collecting `Answer`s for T2.
    Electing,
    /// Nominated a server; waiting T3 for its `Coordinator`.
    Nominating,
    /// Answered an `Election`; waiting T4 for a `Nomination` or `Coordinator`.
    AwaitingNomination,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ElectionStats {
    /// Elections this server started (including restarts after every nominee failed).
    pub elections_started: u64,
    /// [`Action::LeaderElected`] emitted.
    pub leader_changes: u64,
    /// Messages this server asked to send.
    pub messages_sent: u64,
    /// Messages dropped because their term was older than the followed leader's.
    pub stale_messages: u64,
    /// Timers that fired after their round had ended.
    pub stale_timers: u64,
    /// Messages ignored because they break the protocol or come from an unknown server.
    pub ignored_messages: u64,
    /// Leaders adopted from a peer's heartbeat: each is an announcement this server missed.
    pub heartbeat_adoptions: u64,
    /// Elections started because a heartbeat showed a server below us (or we ourselves, in an
    /// epoch we do not know) leading a newer epoch. Also counted in `elections_started`.
    pub heartbeat_elections: u64,
}

/// What the detector last said about a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Liveness {
    /// Nothing heard yet: neither alive nor proven dead.
    Unknown,
    Up,
    Down,
}

/// The phase with the data only that phase needs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Idle,
    /// `higher_hint`: some message or `View` showed a server above us alive.
    Recovering {
        higher_hint: bool,
    },
    AwaitingLeader,
    Stable,
    /// Ranks of the higher servers that answered.
    Electing {
        answers: Vec<usize>,
    },
    /// `remaining`: answerers not tried yet, highest first.
    Nominating {
        nominee: usize,
        remaining: Vec<usize>,
    },
    AwaitingNomination,
}

/// One server's side of the Fast Bully election. See the module docs.
#[derive(Debug, Clone)]
pub struct Election {
    /// Every configured server, ascending priority; a server is known by its index ("rank").
    members: Vec<ServerId>,
    me: usize,
    timings: ElectionTimings,
    alive: Vec<Liveness>,
    /// The leader we follow now; `None` during our own election or after it died.
    leader: Option<usize>,
    leader_since: Option<Instant>,
    /// The epoch of the newest leader we followed: stays when that leader dies, because it
    /// is what fences messages older than it.
    term: u64,
    term_leader: Option<usize>,
    /// The highest term in any message accepted so far: our next `Coordinator` goes above it.
    seen_term: u64,
    state: State,
    /// Bumped on every phase change; timers of other rounds are stale.
    round: u64,
    stats: ElectionStats,
}

impl Election {
    /// A server `me` of a cluster of `members` (every configured server, `me` included, in
    /// ascending election priority: later = higher). Nothing happens until [`Input::Start`].
    pub fn new(me: ServerId, members: Vec<ServerId>, timings: ElectionTimings) -> Election {
        let mut unique: Vec<ServerId> = Vec::with_capacity(members.len() + 1);
        for member in members {
            if !unique.contains(&member) {
                unique.push(member);
            }
        }
        // Lowest, so that a config mistake can never make this server take the lead.
        let me_rank = match unique.iter().position(|m| *m == me) {
            Some(rank) => rank,
            None => {
                unique.insert(0, me);
                0
            }
        };
        let mut alive = vec![Liveness::Unknown; unique.len()];
        alive[me_rank] = Liveness::Up;
        Election {
            members: unique,
            me: me_rank,
            timings,
            alive,
            leader: None,
            leader_since: None,
            term: 0,
            term_leader: None,
            seen_term: 0,
            state: State::Idle,
            round: 0,
            stats: ElectionStats::default(),
        }
    }

    /// This server's id.
    pub fn me(&self) -> &ServerId {
        &self.members[self.me]
    }

    /// Every member, ascending priority (deduplicated, `me` included).
    pub fn members(&self) -> &[ServerId] {
        &self.members
    }

    /// The timings this machine was built with.
    pub fn timings(&self) -> ElectionTimings {
        self.timings
    }

    /// The leader this server follows (possibly itself), if any.
    pub fn leader(&self) -> Option<&ServerId> {
        self.leader.map(|rank| &self.members[rank])
    }

    /// Whether this server is the leader it follows.
    pub fn is_leader(&self) -> bool {
        self.leader == Some(self.me)
    }

    /// The term of the newest leader this server followed (it stays while an election runs,
    /// because it is what fences older messages).
    pub fn term(&self) -> u64 {
        self.term
    }

    /// The highest term seen in any accepted message; the next `Coordinator` goes above it.
    pub fn seen_term(&self) -> u64 {
        self.seen_term
    }

    /// When this server started following its current leader (the `now` of that input).
    pub fn leader_since(&self) -> Option<Instant> {
        self.leader_since
    }

    /// Where this server stands in the algorithm.
    pub fn phase(&self) -> Phase {
        match self.state {
            State::Idle => Phase::Idle,
            State::Recovering { .. } => Phase::Recovering,
            State::AwaitingLeader => Phase::AwaitingLeader,
            State::Stable => Phase::Stable,
            State::Electing { .. } => Phase::Electing,
            State::Nominating { .. } => Phase::Nominating,
            State::AwaitingNomination => Phase::AwaitingNomination,
        }
    }

    /// The server nominated and not yet heard from, while [`Phase::Nominating`].
    pub fn nominee(&self) -> Option<&ServerId> {
        match &self.state {
            State::Nominating { nominee, .. } => Some(&self.members[*nominee]),
            _ => None,
        }
    }

    /// The servers this server believes alive (itself included), ascending priority.
    pub fn alive(&self) -> Vec<ServerId> {
        self.members
            .iter()
            .zip(&self.alive)
            .filter(|(_, liveness)| **liveness == Liveness::Up)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Counters for `/metrics`.
    pub fn stats(&self) -> ElectionStats {
        self.stats
    }

    /// Feeds one input at time `now`; returns what the driver must do, in order.
    /// Never panics, whatever a peer sent.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Start => self.on_start(now, &mut out),
            Input::Message { from, msg } => match self.rank_of(&from) {
                Some(peer) if peer != self.me && self.state != State::Idle => {
                    self.on_message(now, peer, msg, &mut out)
                }
                _ => self.stats.ignored_messages += 1,
            },
            Input::Timer(timer) => self.on_timer(now, timer, &mut out),
            Input::PeerUp(id) => {
                if let Some(peer) = self.rank_of(&id).filter(|peer| *peer != self.me) {
                    self.on_peer_up(peer, &mut out);
                }
            }
            Input::PeerDown(id) => {
                if let Some(peer) = self.rank_of(&id).filter(|peer| *peer != self.me) {
                    self.on_peer_down(now, peer, &mut out);
                }
            }
            Input::Heartbeat { from, term, leader } => {
                // Before Start the heartbeat only counted for the detector; a heartbeat from
                // an unknown server or ourselves cannot come over an authenticated mesh.
                let member = self.rank_of(&from).is_some_and(|peer| peer != self.me);
                if member && self.state != State::Idle {
                    self.on_heartbeat(now, term, leader, &mut out);
                }
            }
        }
        out
    }

    fn rank_of(&self, id: &str) -> Option<usize> {
        self.members.iter().position(|m| m == id)
    }

    fn top(&self) -> usize {
        self.members.len() - 1
    }

    fn on_start(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.state != State::Idle {
            return;
        }
        if self.members.len() == 1 {
            // Alone in the cluster: nobody to ask.
            self.become_leader(now, out);
            return;
        }
        self.enter(
            State::Recovering { higher_hint: false },
            Some(TimerKind::Views),
            out,
        );
        let term = self.seen_term;
        for peer in self.peers() {
            self.send(peer, ElectionMessage::IAmUp { term }, out);
        }
    }

    fn on_message(
        &mut self,
        now: Instant,
        peer: usize,
        msg: ElectionMessage,
        out: &mut Vec<Action>,
    ) {
        let term = msg.term();
        if let ElectionMessage::IAmUp { .. } = msg {
            // Never fenced: a restarted server has forgotten every term.
            self.on_i_am_up(peer, term, out);
            return;
        }
        if term < self.term {
            self.stats.stale_messages += 1;
            if self.deserves_correction(peer, &msg) {
                self.send_view(peer, out);
            }
            return;
        }
        self.seen_term = self.seen_term.max(term);
        match msg {
            ElectionMessage::Election { .. } => self.on_election(now, peer, out),
            ElectionMessage::Answer { .. } => self.on_answer(now, peer, out),
            ElectionMessage::Nomination { .. } => self.on_nomination(now, peer, out),
            ElectionMessage::Coordinator { term } => self.on_coordinator(now, peer, term, out),
            ElectionMessage::View {
                leader,
                term,
                alive,
            } => self.on_view(now, peer, leader, term, &alive, out),
            ElectionMessage::IAmUp { .. } => {}
        }
    }

    fn on_i_am_up(&mut self, peer: usize, term: u64, out: &mut Vec<Action>) {
        self.seen_term = self.seen_term.max(term);
        if peer > self.me
            && let State::Recovering { higher_hint } = &mut self.state
        {
            *higher_hint = true;
        }
        self.send_view(peer, out);
    }

    fn on_election(&mut self, now: Instant, peer: usize, out: &mut Vec<Action>) {
        if peer > self.me {
            // Elections only go upwards: the sender ranks the cluster differently.
            self.stats.ignored_messages += 1;
            return;
        }
        let term = self.seen_term;
        self.send(peer, ElectionMessage::Answer { term }, out);
        match self.state {
            State::Stable if self.is_leader() => self.become_leader(now, out),
            State::Recovering { .. } | State::AwaitingLeader | State::Stable => {
                self.enter(State::AwaitingNomination, Some(TimerKind::Nomination), out)
            }
            // Our own election is under way, or we already wait for a nomination: keep the
            // running timer so that a stream of Elections cannot postpone it forever.
            State::Electing { .. } | State::Nominating { .. } | State::AwaitingNomination => {}
            State::Idle => {}
        }
    }

    fn on_answer(&mut self, now: Instant, peer: usize, out: &mut Vec<Action>) {
        if peer < self.me {
            self.stats.ignored_messages += 1;
            return;
        }
        let best_possible = peer == self.top();
        match &mut self.state {
            State::Electing { answers } => {
                if !answers.contains(&peer) {
                    answers.push(peer);
                }
                if best_possible {
                    // The top server of the cluster answered: no better answer can come, so
                    // waiting out T2 would only delay things. (Not extended to "every server
                    // above it is down" by our detector: when the suspicion is false, that
                    // bet makes a second server announce itself next to the live leader.)
                    let candidates = descending(answers);
                    self.nominate_next(now, candidates, out);
                }
            }
            // A late answer: one more server to try if the current nominee fails.
            State::Nominating { nominee, remaining }
                if *nominee != peer && !remaining.contains(&peer) =>
            {
                remaining.push(peer);
                *remaining = descending(remaining);
            }
            _ => {}
        }
    }

    fn on_nomination(&mut self, now: Instant, peer: usize, out: &mut Vec<Action>) {
        if peer > self.me {
            // Only a lower server can have sent us an Election, so only it can nominate us.
            self.stats.ignored_messages += 1;
            return;
        }
        self.become_leader(now, out);
    }

    fn on_coordinator(&mut self, now: Instant, peer: usize, term: u64, out: &mut Vec<Action>) {
        let epoch = (term, Some(peer));
        let current = (self.term, self.term_leader);
        if epoch < current {
            // Same term as ours but a lower announcer: it lost the tie, tell it.
            self.stats.stale_messages += 1;
            self.send_view(peer, out);
        } else if epoch == current {
            // Duplicate of what we already follow (or declared dead): nothing new.
        } else if peer < self.me {
            self.on_lower_leader(now, out);
        } else {
            // A Coordinator is proof of life even if our detector said otherwise.
            self.follow(now, peer, term, out);
        }
    }

    fn on_view(
        &mut self,
        now: Instant,
        peer: usize,
        leader: Option<ServerId>,
        term: u64,
        alive: &[ServerId],
        out: &mut Vec<Action>,
    ) {
        let me = self.me;
        let hints_higher = peer > me
            || alive
                .iter()
                .any(|id| self.rank_of(id).is_some_and(|r| r > me));
        if let State::Recovering { higher_hint } = &mut self.state {
            *higher_hint |= hints_higher;
        }
        // A leader we do not know by name is as good as none.
        let Some(leader) = leader.and_then(|id| self.rank_of(&id)) else {
            return;
        };
        let epoch = (term, Some(leader));
        let current = (self.term, self.term_leader);
        if epoch < current {
            self.stats.stale_messages += 1;
            if leader == peer {
                // A stale leader: tell it it was deposed.
                self.send_view(peer, out);
            }
        } else if epoch == current {
            // Nothing new.
        } else if leader <= me {
            self.on_lower_leader(now, out);
        } else if self.alive[leader] == Liveness::Down && leader != peer {
            // Our own detector saw it die after the sender last heard of it.
            if !self.in_own_election() {
                self.start_election(now, out);
            }
        } else {
            self.follow(now, leader, term, out);
        }
    }

    /// A server below us (or we ourselves, in an epoch we do not know: we restarted) leads a
    /// newer epoch. The bully rule says it must not while we are alive.
    fn on_lower_leader(&mut self, now: Instant, out: &mut Vec<Action>) {
        match self.state {
            State::Recovering { higher_hint } => {
                if self.higher_known(higher_hint) {
                    self.start_election(now, out);
                } else {
                    self.become_leader(now, out);
                }
            }
            // Our election is already running and will end above the seen term.
            State::Electing { .. } | State::Nominating { .. } | State::Idle => {}
            State::AwaitingLeader | State::Stable | State::AwaitingNomination => {
                self.start_election(now, out)
            }
        }
    }

    /// Anti-entropy: the view a peer's heartbeat carried. Pull only: we adopt what is newer
    /// and never answer what is older (the peer pulls from our heartbeats in turn), so a
    /// heartbeat never sends a message by itself; only a broken bully rule starts an election.
    fn on_heartbeat(
        &mut self,
        now: Instant,
        term: u64,
        leader: Option<ServerId>,
        out: &mut Vec<Action>,
    ) {
        // Our next Coordinator must go above every term in the cluster, or it is fenced.
        self.seen_term = self.seen_term.max(term);
        // A peer in an election claims nothing; its election ends on its own timers.
        let Some(leader) = leader.and_then(|id| self.rank_of(&id)) else {
            return;
        };
        if (term, Some(leader)) <= (self.term, self.term_leader) {
            // The steady state (equal), or the peer is behind and pulls from our heartbeats.
            return;
        }
        // Only a leader our own detector sees alive is acted on: one we do not see may be
        // dead (the sender's detector lags) or cut off from us, and following it or fighting
        // it would only churn. Its own heartbeats make it up soon if it is alive.
        let visible = leader == self.me || self.alive[leader] == Liveness::Up;
        if !visible {
            return;
        }
        if leader > self.me {
            // An announcement we missed (or a leader that moved on while we waited): adopt it,
            // in whatever phase; it is the newest epoch we know of and its leader is alive.
            self.stats.heartbeat_adoptions += 1;
            self.follow(now, leader, term, out);
        } else if self.state == State::Stable {
            // A server below us (or we ourselves, before a restart) leads a newer epoch while
            // we are alive: the bully rule is broken. Every other phase ends on its own timer
            // (and a recovering server learns the same from the Views to its IAmUp).
            self.stats.heartbeat_elections += 1;
            self.start_election(now, out);
        }
    }

    fn on_timer(&mut self, now: Instant, timer: ElectionTimer, out: &mut Vec<Action>) {
        if timer.round != self.round {
            self.stats.stale_timers += 1;
            return;
        }
        match (&self.state, timer.kind) {
            (State::Recovering { higher_hint }, TimerKind::Views) => {
                if self.higher_known(*higher_hint) {
                    self.enter(State::AwaitingLeader, Some(TimerKind::Leader), out);
                } else {
                    self.become_leader(now, out);
                }
            }
            (State::AwaitingLeader, TimerKind::Leader) => self.start_election(now, out),
            (State::Electing { answers }, TimerKind::Answers) => {
                if answers.is_empty() {
                    self.become_leader(now, out);
                } else {
                    let candidates = descending(answers);
                    self.nominate_next(now, candidates, out);
                }
            }
            (State::Nominating { remaining, .. }, TimerKind::Coordinator) => {
                let remaining = remaining.clone();
                self.nominate_next(now, remaining, out);
            }
            (State::AwaitingNomination, TimerKind::Nomination) => self.start_election(now, out),
            (State::Stable, TimerKind::LeaderCheck) => {
                let silent = self
                    .leader
                    .is_some_and(|l| l != self.me && self.alive[l] != Liveness::Up);
                if silent {
                    self.start_election(now, out);
                }
            }
            // Cannot happen (a round has one phase), but a forged timer must not panic.
            _ => self.stats.stale_timers += 1,
        }
    }

    fn on_peer_up(&mut self, peer: usize, out: &mut Vec<Action>) {
        self.alive[peer] = Liveness::Up;
        if self.is_leader() {
            // A peer back from a partition may follow (or be) another leader: tell it ours;
            // the older side of the two learns and yields.
            self.send_view(peer, out);
        }
    }

    fn on_peer_down(&mut self, now: Instant, peer: usize, out: &mut Vec<Action>) {
        self.alive[peer] = Liveness::Down;
        if self.state == State::Idle {
            return;
        }
        if self.leader == Some(peer) {
            if self.state == State::Stable {
                self.start_election(now, out);
            } else {
                // Answered someone's Election: that election is already running.
                self.drop_leader(out);
            }
        }
        match &mut self.state {
            State::Electing { answers } => answers.retain(|a| *a != peer),
            State::Nominating { nominee, remaining } => {
                remaining.retain(|r| *r != peer);
                if *nominee == peer {
                    // No point waiting out T3 for a server known dead.
                    let remaining = std::mem::take(remaining);
                    self.nominate_next(now, remaining, out);
                }
            }
            _ => {}
        }
    }

    /// Starts an election: Election to every higher server, or lead at once if there is none.
    fn start_election(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.drop_leader(out);
        self.stats.elections_started += 1;
        out.push(Action::ElectionStarted {
            term: self.seen_term,
        });
        if self.me == self.top() {
            self.become_leader(now, out);
            return;
        }
        self.enter(
            State::Electing {
                answers: Vec::new(),
            },
            Some(TimerKind::Answers),
            out,
        );
        let term = self.seen_term;
        for higher in self.me + 1..self.members.len() {
            // Dead ones too: the detector may lag, and the mesh drops what it cannot deliver.
            self.send(higher, ElectionMessage::Election { term }, out);
        }
    }

    /// Nominates the first of `candidates` (highest first); none left: starts again.
    fn nominate_next(&mut self, now: Instant, candidates: Vec<usize>, out: &mut Vec<Action>) {
        let Some((&nominee, rest)) = candidates.split_first() else {
            self.start_election(now, out);
            return;
        };
        let remaining = rest.to_vec();
        self.enter(
            State::Nominating { nominee, remaining },
            Some(TimerKind::Coordinator),
            out,
        );
        let term = self.seen_term;
        self.send(nominee, ElectionMessage::Nomination { term }, out);
    }

    /// Takes the lead with a term above every term seen.
    fn become_leader(&mut self, now: Instant, out: &mut Vec<Action>) {
        let term = self.seen_term.saturating_add(1);
        self.follow(now, self.me, term, out);
        for lower in 0..self.me {
            self.send(lower, ElectionMessage::Coordinator { term }, out);
        }
        for higher in self.me + 1..self.members.len() {
            if self.alive[higher] == Liveness::Up {
                // Normally none: a higher server alive would have won. If one was cut off
                // from the election, this tells it to take the lead back.
                self.send_view(higher, out);
            }
        }
    }

    /// Follows `leader` at `term` (a newer epoch than ours, checked by the caller).
    fn follow(&mut self, now: Instant, leader: usize, term: u64, out: &mut Vec<Action>) {
        self.term = term;
        self.term_leader = Some(leader);
        self.seen_term = self.seen_term.max(term);
        self.leader = Some(leader);
        self.leader_since = Some(now);
        self.stats.leader_changes += 1;
        out.push(Action::LeaderElected {
            leader: self.members[leader].clone(),
            term,
        });
        // Our detector only reports down a peer it has seen up. A leader we know only from a
        // third party's View (it may have died since) needs a sign of life of its own, or we
        // could follow a dead server forever.
        let unheard = leader != self.me && self.alive[leader] != Liveness::Up;
        let check = unheard.then_some(TimerKind::LeaderCheck);
        self.enter(State::Stable, check, out);
    }

    fn drop_leader(&mut self, out: &mut Vec<Action>) {
        if let Some(leader) = self.leader.take() {
            self.leader_since = None;
            out.push(Action::LeaderLost {
                leader: self.members[leader].clone(),
                term: self.term,
            });
        }
    }

    /// Moves to `state` in a new round (which silences every pending timer) and arms `timer`.
    fn enter(&mut self, state: State, timer: Option<TimerKind>, out: &mut Vec<Action>) {
        self.round = self.round.wrapping_add(1);
        self.state = state;
        if let Some(kind) = timer {
            out.push(Action::SetTimer {
                timer: ElectionTimer {
                    kind,
                    round: self.round,
                },
                after: self.timings.duration(kind),
            });
        }
    }

    fn send(&mut self, to: usize, msg: ElectionMessage, out: &mut Vec<Action>) {
        self.stats.messages_sent += 1;
        out.push(Action::Send {
            to: self.members[to].clone(),
            msg,
        });
    }

    fn send_view(&mut self, to: usize, out: &mut Vec<Action>) {
        let term = if self.leader.is_some() {
            self.term
        } else {
            self.seen_term
        };
        let msg = ElectionMessage::View {
            leader: self.leader().cloned(),
            term,
            alive: self.alive(),
        };
        self.send(to, msg, out);
    }

    /// Whether the sender of a stale message should get a `View` to catch up. A `View` only
    /// does if it names its own sender as leader (a stale leader to depose): any other stale
    /// `View` is a late reply to our `IAmUp` overtaken by our own `Coordinator`, and answering
    /// those would only add traffic.
    fn deserves_correction(&self, peer: usize, msg: &ElectionMessage) -> bool {
        match msg {
            ElectionMessage::View { leader, .. } => {
                leader.as_deref().and_then(|l| self.rank_of(l)) == Some(peer)
            }
            _ => true,
        }
    }

    fn peers(&self) -> Vec<usize> {
        (0..self.members.len()).filter(|r| *r != self.me).collect()
    }

    fn in_own_election(&self) -> bool {
        matches!(
            self.state,
            State::Electing { .. } | State::Nominating { .. }
        )
    }

    /// Whether a server above us is known (or hinted by a View) to be alive.
    fn higher_known(&self, higher_hint: bool) -> bool {
        higher_hint || self.alive[self.me + 1..].contains(&Liveness::Up)
    }
}

/// The ranks, deduplicated, highest first.
fn descending(ranks: &[usize]) -> Vec<usize> {
    let mut sorted = ranks.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.dedup();
    sorted
}

#[cfg(test)]
mod tests {
    //! A deterministic cluster simulator (virtual clock, message queue with delays, scripted
    //! crashes, restarts and partitions, a modelled failure detector) and the tests over it.

    use super::*;
    use std::collections::BTreeMap;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The main crate's default timings (T4 = T2 + T3, as the paper suggests).
    const TIMINGS: ElectionTimings = ElectionTimings {
        t1: ms(150),
        t2: ms(100),
        t3: ms(150),
        t4: ms(250),
    };

    fn id(rank: usize) -> ServerId {
        format!("s{}", rank + 1)
    }

    fn ids(n: usize) -> Vec<ServerId> {
        (0..n).map(id).collect()
    }

    fn rank(server: &str) -> usize {
        server[1..]
            .parse::<usize>()
            .expect("test ids look like s<n>")
            - 1
    }

    /// SplitMix64: tiny and deterministic; picks delays, victims and garbage.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            if n == 0 { 0 } else { self.next_u64() % n }
        }

        fn between(&mut self, (lo, hi): (Duration, Duration)) -> Duration {
            if hi <= lo {
                return lo;
            }
            let span = (hi - lo).as_micros() as u64;
            lo + Duration::from_micros(self.below(span + 1))
        }
    }

    /// What the interceptor decides for a message about to be delivered.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fate {
        Deliver,
        /// The receiver crashes instead of handling it (scripted "dies at the worst moment").
        CrashReceiver,
        /// The message is lost (with a dying connection, or before a link was up).
        Drop,
    }

    type Interceptor = Box<dyn FnMut(usize, usize, &ElectionMessage) -> Fate>;

    enum Event {
        Deliver {
            from: usize,
            to: usize,
            incarnation: u64,
            msg: ElectionMessage,
        },
        Timer {
            node: usize,
            incarnation: u64,
            timer: ElectionTimer,
        },
        /// The observer's failure detector re-evaluates the subject (model of heartbeats).
        Detect {
            observer: usize,
            subject: usize,
        },
        Crash(usize),
        /// Boots a node that is down (first boot or restart).
        Boot(usize),
        /// Cuts every link between the nodes of this bit mask and the others.
        Partition(u64),
        /// Restores every link.
        Heal,
        /// The node sends a heartbeat datagram to every peer, carrying its view.
        HeartbeatTick {
            node: usize,
            incarnation: u64,
        },
        /// A heartbeat datagram arrives (unless a link or node changed since it was sent).
        Heartbeat {
            from: usize,
            to: usize,
            incarnations: (u64, u64),
            term: u64,
            leader: Option<ServerId>,
        },
    }

    impl Event {
        /// Heartbeats run forever: "nothing left to happen" ignores them.
        fn is_background(&self) -> bool {
            matches!(self, Event::HeartbeatTick { .. } | Event::Heartbeat { .. })
        }
    }

    /// The heartbeat datagrams of the driver: every `interval`, each node sends each peer its
    /// `(term, leader)`; a datagram is lost with `loss_percent`, duplicated with
    /// `duplicate_percent`, and delayed like any message (so they reorder).
    #[derive(Debug, Clone, Copy)]
    struct Heartbeats {
        interval: Duration,
        loss_percent: u64,
        duplicate_percent: u64,
    }

    /// How long heartbeats must change nothing before a run with heartbeats counts as settled:
    /// at 20 ms and 30% loss, a view a peer still has to pull from ~35 heartbeats is no risk.
    const QUIET: Duration = ms(1_000);

    /// The heartbeats of the real cluster's bug report: every 20 ms, 30% lost.
    const LOSSY_HEARTBEATS: Heartbeats = Heartbeats {
        interval: ms(20),
        loss_percent: 30,
        duplicate_percent: 5,
    };

    struct SimNode {
        machine: Election,
        up: bool,
        incarnation: u64,
        /// What this node's detector last reported about each peer.
        sees_up: Vec<bool>,
        last_term: u64,
    }

    #[derive(Debug, Clone)]
    struct Sent {
        at: Duration,
        from: usize,
        to: usize,
        msg: ElectionMessage,
    }

    #[derive(Debug, Clone)]
    struct Logged {
        at: Duration,
        node: usize,
        action: Action,
    }

    struct Sim {
        seed: u64,
        timings: ElectionTimings,
        rng: Rng,
        base: Instant,
        now: Duration,
        nodes: Vec<SimNode>,
        queue: BTreeMap<(Duration, u64), Event>,
        next_key: u64,
        /// One-way delay of a message, uniform in this range (so messages reorder).
        delay: (Duration, Duration),
        /// How long a detector takes to notice a crash or a cut link...
        detect: (Duration, Duration),
        /// ...unless the observer has a fixed detection time here.
        detect_fixed: Vec<Option<Duration>>,
        /// How long a detector takes to notice a booted peer or a healed link.
        notice_up: (Duration, Duration),
        /// `cut[a][b]`: nothing passes from a to b; messages wait for the heal as long as
        /// neither detector declared the other down (a QUIC connection retransmits).
        cut: Vec<Vec<bool>>,
        intercept: Option<Interceptor>,
        /// Heartbeat datagrams, if modelled (off by default: the queue then runs dry).
        heartbeats: Option<Heartbeats>,
        /// Per mille of election messages lost on delivery, on top of the interceptor.
        drop_per_mille: u64,
        /// Events in the queue that are not heartbeats.
        busy: usize,
        /// The last instant something other than a heartbeat happened: an event that is not a
        /// heartbeat, or any action (a heartbeat that changed a view logs `LeaderElected`).
        last_activity: Duration,
        sent: Vec<Sent>,
        log: Vec<Logged>,
    }

    impl Sim {
        fn new(n: usize, seed: u64) -> Sim {
            let members = ids(n);
            let nodes = (0..n)
                .map(|i| SimNode {
                    machine: Election::new(id(i), members.clone(), TIMINGS),
                    up: false,
                    incarnation: 0,
                    sees_up: vec![false; n],
                    last_term: 0,
                })
                .collect();
            Sim {
                seed,
                timings: TIMINGS,
                rng: Rng(seed),
                base: Instant::now(),
                now: Duration::ZERO,
                nodes,
                queue: BTreeMap::new(),
                next_key: 0,
                delay: (ms(1), ms(5)),
                detect: (ms(350), ms(400)),
                detect_fixed: vec![None; n],
                notice_up: (ms(20), ms(40)),
                cut: vec![vec![false; n]; n],
                intercept: None,
                heartbeats: None,
                drop_per_mille: 0,
                busy: 0,
                last_activity: Duration::ZERO,
                sent: Vec::new(),
                log: Vec::new(),
            }
        }

        fn n(&self) -> usize {
            self.nodes.len()
        }

        fn schedule(&mut self, after: Duration, event: Event) {
            let key = (self.now + after, self.next_key);
            self.next_key += 1;
            if !event.is_background() {
                self.busy += 1;
            }
            self.queue.insert(key, event);
        }

        /// Every live node (and every node booted later) sends heartbeats from now on.
        fn start_heartbeats(&mut self, heartbeats: Heartbeats) {
            self.heartbeats = Some(heartbeats);
            for node in self.live() {
                self.schedule_first_heartbeat(node);
            }
        }

        fn schedule_first_heartbeat(&mut self, node: usize) {
            let Some(heartbeats) = self.heartbeats else {
                return;
            };
            let after = self.rng.between((Duration::ZERO, heartbeats.interval));
            let incarnation = self.nodes[node].incarnation;
            self.schedule(after, Event::HeartbeatTick { node, incarnation });
        }

        /// The driver's heartbeat tick: the view (`term()`, `leader()`) to every peer.
        fn send_heartbeats(&mut self, node: usize, heartbeats: Heartbeats) {
            let machine = &self.nodes[node].machine;
            let (term, leader) = (machine.term(), machine.leader().cloned());
            for to in (0..self.n()).filter(|to| *to != node) {
                if self.rng.below(100) < heartbeats.loss_percent {
                    continue;
                }
                let copies = if self.rng.below(100) < heartbeats.duplicate_percent {
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let after = self.rng.between(self.delay);
                    let incarnations = (self.nodes[node].incarnation, self.nodes[to].incarnation);
                    let event = Event::Heartbeat {
                        from: node,
                        to,
                        incarnations,
                        term,
                        leader: leader.clone(),
                    };
                    self.schedule(after, event);
                }
            }
            let incarnation = self.nodes[node].incarnation;
            self.schedule(
                heartbeats.interval,
                Event::HeartbeatTick { node, incarnation },
            );
        }

        fn boot_all(&mut self) {
            for node in 0..self.n() {
                self.boot(node);
            }
        }

        /// Boots a down node with a fresh state machine (nothing survives a restart).
        fn boot(&mut self, node: usize) {
            if self.nodes[node].up {
                return;
            }
            let n = self.n();
            let fresh = Election::new(id(node), ids(n), self.timings);
            let slot = &mut self.nodes[node];
            slot.machine = fresh;
            slot.up = true;
            slot.incarnation += 1;
            slot.sees_up = vec![false; n];
            slot.last_term = 0;
            self.feed(node, Input::Start);
            self.schedule_first_heartbeat(node);
            for other in (0..n).filter(|o| *o != node) {
                let after = self.rng.between(self.notice_up);
                self.schedule(
                    after,
                    Event::Detect {
                        observer: other,
                        subject: node,
                    },
                );
                let after = self.rng.between(self.notice_up);
                self.schedule(
                    after,
                    Event::Detect {
                        observer: node,
                        subject: other,
                    },
                );
            }
        }

        fn crash(&mut self, node: usize) {
            if !self.nodes[node].up {
                return;
            }
            self.nodes[node].up = false;
            for observer in (0..self.n()).filter(|o| *o != node) {
                let after = self.detect_delay(observer);
                self.schedule(
                    after,
                    Event::Detect {
                        observer,
                        subject: node,
                    },
                );
            }
        }

        /// Cuts every link between the two groups (both directions).
        fn partition(&mut self, left: &[usize], right: &[usize]) {
            for &a in left {
                for &b in right {
                    self.cut[a][b] = true;
                    self.cut[b][a] = true;
                    let after = self.detect_delay(a);
                    self.schedule(
                        after,
                        Event::Detect {
                            observer: a,
                            subject: b,
                        },
                    );
                    let after = self.detect_delay(b);
                    self.schedule(
                        after,
                        Event::Detect {
                            observer: b,
                            subject: a,
                        },
                    );
                }
            }
        }

        fn heal(&mut self) {
            let n = self.n();
            // A connection one end gave up on is dead for both: at the heal the other end
            // learns it (stateless reset, idle close) before the new connection comes up.
            for a in 0..n {
                for b in (0..n).filter(|b| *b != a) {
                    let both_up = self.nodes[a].up && self.nodes[b].up;
                    let broken = !self.nodes[a].sees_up[b] || !self.nodes[b].sees_up[a];
                    if self.cut[a][b] && both_up && broken && self.nodes[a].sees_up[b] {
                        self.nodes[a].sees_up[b] = false;
                        self.feed(a, Input::PeerDown(id(b)));
                    }
                }
            }
            self.cut = vec![vec![false; n]; n];
            for observer in 0..n {
                for subject in (0..n).filter(|s| *s != observer) {
                    let after = self.rng.between(self.notice_up);
                    self.schedule(after, Event::Detect { observer, subject });
                }
            }
        }

        fn detect_delay(&mut self, observer: usize) -> Duration {
            match self.detect_fixed[observer] {
                Some(fixed) => fixed,
                None => self.rng.between(self.detect),
            }
        }

        fn feed(&mut self, node: usize, input: Input) {
            if !self.nodes[node].up {
                return;
            }
            let now = self.base + self.now;
            let slot = &mut self.nodes[node];
            let actions = slot.machine.handle(now, input);
            let term = slot.machine.term();
            assert!(
                term >= slot.last_term,
                "seed {}: {} term went back from {} to {}",
                self.seed,
                id(node),
                slot.last_term,
                term
            );
            slot.last_term = term;
            for action in actions {
                self.apply(node, action);
            }
        }

        fn apply(&mut self, node: usize, action: Action) {
            self.last_activity = self.now;
            match action {
                Action::Send { to, msg } => {
                    let to = rank(&to);
                    assert_ne!(to, node, "seed {}: {} sent to itself", self.seed, id(node));
                    self.sent.push(Sent {
                        at: self.now,
                        from: node,
                        to,
                        msg: msg.clone(),
                    });
                    let after = self.rng.between(self.delay);
                    let incarnation = self.nodes[to].incarnation;
                    self.schedule(
                        after,
                        Event::Deliver {
                            from: node,
                            to,
                            incarnation,
                            msg,
                        },
                    );
                }
                Action::SetTimer { timer, after } => {
                    let incarnation = self.nodes[node].incarnation;
                    self.schedule(
                        after,
                        Event::Timer {
                            node,
                            incarnation,
                            timer,
                        },
                    );
                }
                other => self.log.push(Logged {
                    at: self.now,
                    node,
                    action: other,
                }),
            }
        }

        /// The driver's contract: a message is a sign of life (`FailureDetector::heard_from`),
        /// and the detector will time the sender out like any peer if nothing follows.
        fn heard_from(&mut self, observer: usize, subject: usize) {
            if self.nodes[observer].sees_up[subject] {
                return;
            }
            self.nodes[observer].sees_up[subject] = true;
            self.feed(observer, Input::PeerUp(id(subject)));
            let after = self.detect_delay(observer);
            self.schedule(after, Event::Detect { observer, subject });
        }

        fn step(&mut self) -> bool {
            let Some((at, event)) = self.queue.pop_first().map(|((at, _), e)| (at, e)) else {
                return false;
            };
            self.now = at;
            if !event.is_background() {
                self.busy -= 1;
                self.last_activity = at;
            }
            match event {
                Event::Deliver {
                    from,
                    to,
                    incarnation,
                    msg,
                } => {
                    // A restart is a new connection: what was sent to the old one is lost.
                    let target = &self.nodes[to];
                    if !target.up || target.incarnation != incarnation {
                        return true;
                    }
                    if self.cut[from][to] {
                        // A QUIC stream retransmits across a short cut; its data is lost only
                        // with the connection, which the detectors then report as down.
                        let connected =
                            self.nodes[to].sees_up[from] && self.nodes[from].sees_up[to];
                        if connected {
                            let event = Event::Deliver {
                                from,
                                to,
                                incarnation,
                                msg,
                            };
                            self.schedule(ms(25), event);
                        }
                        return true;
                    }
                    if self.drop_per_mille > 0 && self.rng.below(1_000) < self.drop_per_mille {
                        return true;
                    }
                    let mut intercept = self.intercept.take();
                    let fate = intercept
                        .as_mut()
                        .map_or(Fate::Deliver, |f| f(from, to, &msg));
                    self.intercept = intercept;
                    match fate {
                        Fate::Deliver => {
                            self.heard_from(to, from);
                            self.feed(
                                to,
                                Input::Message {
                                    from: id(from),
                                    msg,
                                },
                            );
                        }
                        Fate::CrashReceiver => self.crash(to),
                        Fate::Drop => {}
                    }
                }
                Event::Timer {
                    node,
                    incarnation,
                    timer,
                } => {
                    if self.nodes[node].incarnation == incarnation {
                        self.feed(node, Input::Timer(timer));
                    }
                }
                Event::Detect { observer, subject } => {
                    if !self.nodes[observer].up {
                        return true;
                    }
                    let truth = self.nodes[subject].up && !self.cut[subject][observer];
                    if truth != self.nodes[observer].sees_up[subject] {
                        self.nodes[observer].sees_up[subject] = truth;
                        let input = if truth {
                            Input::PeerUp(id(subject))
                        } else {
                            Input::PeerDown(id(subject))
                        };
                        self.feed(observer, input);
                    }
                }
                Event::Crash(node) => self.crash(node),
                Event::Boot(node) => self.boot(node),
                Event::Partition(mask) => {
                    let (left, right): (Vec<usize>, Vec<usize>) =
                        (0..self.n()).partition(|i| mask & (1 << i) != 0);
                    self.partition(&left, &right);
                }
                Event::Heal => self.heal(),
                Event::HeartbeatTick { node, incarnation } => {
                    let current =
                        self.nodes[node].up && self.nodes[node].incarnation == incarnation;
                    if let Some(heartbeats) = self.heartbeats.filter(|_| current) {
                        self.send_heartbeats(node, heartbeats);
                    }
                }
                Event::Heartbeat {
                    from,
                    to,
                    incarnations,
                    term,
                    leader,
                } => {
                    // A datagram rides its QUIC connection: a restart at either end or a cut
                    // link loses it (no retransmission).
                    let (from_inc, to_inc) = incarnations;
                    let delivered = self.nodes[to].up
                        && self.nodes[from].incarnation == from_inc
                        && self.nodes[to].incarnation == to_inc
                        && !self.cut[from][to];
                    if delivered {
                        // The driver's order: the detector first, then the election.
                        self.heard_from(to, from);
                        let input = Input::Heartbeat {
                            from: id(from),
                            term,
                            leader,
                        };
                        self.feed(to, input);
                    }
                }
            }
            true
        }

        fn run_until(&mut self, until: Duration) {
            while self
                .queue
                .first_key_value()
                .is_some_and(|((at, _), _)| *at <= until)
            {
                self.step();
            }
            self.now = self.now.max(until);
        }

        /// Runs until nothing is left to happen: no message in flight, no timer pending; with
        /// heartbeats (which never stop), until they have changed nothing for [`QUIET`] too.
        fn settle(&mut self) {
            let limit = self.now + Duration::from_secs(120);
            loop {
                let quiet = self.busy == 0
                    && (self.heartbeats.is_none() || self.now >= self.last_activity + QUIET);
                if quiet {
                    return;
                }
                let Some(((at, _), _)) = self.queue.first_key_value() else {
                    return;
                };
                assert!(
                    *at <= limit,
                    "seed {}: still busy 120 s later\n{}",
                    self.seed,
                    self.describe()
                );
                self.step();
            }
        }

        fn live(&self) -> Vec<usize> {
            (0..self.n()).filter(|i| self.nodes[*i].up).collect()
        }

        fn machine(&self, node: usize) -> &Election {
            &self.nodes[node].machine
        }

        fn describe(&self) -> String {
            let mut lines = String::new();
            for (i, node) in self.nodes.iter().enumerate() {
                let m = &node.machine;
                lines.push_str(&format!(
                    "  {} up={} phase={:?} leader={:?} term={} seen={}\n",
                    id(i),
                    node.up,
                    m.phase(),
                    m.leader(),
                    m.term(),
                    m.seen_term()
                ));
            }
            lines
        }

        /// Every live node is stable, follows the highest live node, at the same term.
        fn assert_agreement(&self) -> (ServerId, u64) {
            self.agreement().unwrap_or_else(|e| panic!("{e}"))
        }

        fn agreement(&self) -> Result<(ServerId, u64), String> {
            let live = self.live();
            let highest = *live.last().expect("a live node");
            let term = self.machine(highest).term();
            for &node in &live {
                let m = self.machine(node);
                let ok = m.phase() == Phase::Stable
                    && m.leader() == Some(&id(highest))
                    && m.term() == term;
                if !ok {
                    return Err(format!(
                        "seed {}: {} disagrees (expected leader {} term {})\n{}",
                        self.seed,
                        id(node),
                        id(highest),
                        term,
                        self.describe()
                    ));
                }
            }
            Ok((id(highest), term))
        }

        /// Steps until every live node agrees (returns when), or `deadline` passes (`None`).
        fn run_until_agreement(&mut self, deadline: Duration) -> Option<Duration> {
            while self.agreement().is_err() {
                let next = self.queue.first_key_value().map(|((at, _), _)| *at);
                if next.is_none_or(|at| at > deadline) {
                    return None;
                }
                self.step();
            }
            Some(self.now)
        }

        /// The (term, leader) each node follows, in rank order.
        fn views(&self) -> Vec<(u64, Option<ServerId>)> {
            self.nodes
                .iter()
                .map(|n| (n.machine.term(), n.machine.leader().cloned()))
                .collect()
        }

        fn sent_since(&self, since: Duration) -> impl Iterator<Item = &Sent> {
            self.sent.iter().filter(move |s| s.at >= since)
        }

        fn logged_since(&self, since: Duration) -> impl Iterator<Item = &Logged> {
            self.log.iter().filter(move |l| l.at >= since)
        }

        fn elections_started_since(&self, since: Duration) -> Vec<(Duration, usize)> {
            self.logged_since(since)
                .filter(|l| matches!(l.action, Action::ElectionStarted { .. }))
                .map(|l| (l.at, l.node))
                .collect()
        }
    }

    fn booted(n: usize, seed: u64) -> Sim {
        let mut sim = Sim::new(n, seed);
        sim.boot_all();
        sim.settle();
        sim.assert_agreement();
        sim
    }

    #[test]
    fn boot_of_3_and_5_nodes_agrees_on_the_highest() {
        for n in [3, 5] {
            for seed in 0..20 {
                let mut sim = Sim::new(n, seed);
                sim.boot_all();
                sim.settle();
                let (leader, term) = sim.assert_agreement();
                assert_eq!(leader, id(n - 1), "seed {seed}");
                assert_eq!(term, 1, "seed {seed}: one announcement at boot");
                // IAmUp and View between every pair, then one Coordinator per lower server.
                let messages = sim.sent.len();
                assert!(
                    messages <= 2 * n * (n - 1) + n,
                    "seed {seed}: {messages} messages"
                );
                assert!(
                    sim.elections_started_since(Duration::ZERO).is_empty(),
                    "seed {seed}"
                );
            }
        }
    }

    #[test]
    fn boot_in_any_order_ends_with_the_highest() {
        for seed in 0..50 {
            let mut rng = Rng(seed ^ 0xB007);
            let n = 2 + rng.below(5) as usize;
            let mut sim = Sim::new(n, seed);
            for node in 0..n {
                sim.schedule(ms(rng.below(2_000)), Event::Boot(node));
            }
            sim.settle();
            let (leader, _) = sim.assert_agreement();
            assert_eq!(leader, id(n - 1), "seed {seed}");
        }
    }

    #[test]
    fn a_lone_server_leads_at_once_and_a_server_without_views_after_t1() {
        let now = Instant::now();
        let mut alone = Election::new(id(0), ids(1), TIMINGS);
        let actions = alone.handle(now, Input::Start);
        assert_eq!(
            actions,
            vec![Action::LeaderElected {
                leader: id(0),
                term: 1
            }]
        );

        // Two configured, the other one never answers: lead after T1.
        let mut first = Election::new(id(0), ids(2), TIMINGS);
        let actions = first.handle(now, Input::Start);
        let timer = set_timer(&actions).expect("T1 armed");
        assert_eq!(timer.kind(), TimerKind::Views);
        let actions = first.handle(now + TIMINGS.t1, Input::Timer(timer));
        assert!(first.is_leader());
        assert!(actions.contains(&Action::LeaderElected {
            leader: id(0),
            term: 1
        }));
    }

    #[test]
    fn leader_crash_elects_the_next_highest_everywhere_with_one_term() {
        for seed in 0..30 {
            let mut sim = booted(5, seed);
            let (_, old_term) = sim.assert_agreement();
            let crash_at = sim.now;
            sim.crash(4);
            sim.settle();
            let (leader, term) = sim.assert_agreement();
            assert_eq!(leader, id(3), "seed {seed}");
            assert!(term > old_term, "seed {seed}");
            // Every survivor announced the same result, and nothing else.
            for node in 0..4 {
                let elected: Vec<_> = sim
                    .logged_since(crash_at)
                    .filter(|l| l.node == node)
                    .filter_map(|l| match &l.action {
                        Action::LeaderElected { leader, term } => Some((leader.clone(), *term)),
                        _ => None,
                    })
                    .collect();
                assert_eq!(elected, vec![(id(3), term)], "seed {seed}: {}", id(node));
            }
        }
    }

    /// Detector delays: `first` notices at 350 ms, every other observer at `others`.
    fn one_detector_first(sim: &mut Sim, first: usize, others: Duration) {
        let n = sim.n();
        sim.detect_fixed = (0..n)
            .map(|i| Some(if i == first { ms(350) } else { others }))
            .collect();
    }

    #[test]
    fn one_election_costs_at_most_3n_messages() {
        for n in [3, 5, 8, 12, 20] {
            let seed = n as u64;
            let mut sim = booted(n, seed);
            one_detector_first(&mut sim, 0, ms(700));
            let crash_at = sim.now;
            sim.crash(n - 1);
            sim.settle();
            let (leader, _) = sim.assert_agreement();
            assert_eq!(leader, id(n - 2));
            let messages = sim.sent_since(crash_at).count();
            assert!(
                messages <= 3 * n,
                "seed {seed}: {messages} messages for n = {n}, expected at most {}",
                3 * n
            );
            assert_eq!(
                sim.elections_started_since(crash_at).len(),
                1,
                "seed {seed}"
            );
        }
    }

    #[test]
    fn simultaneous_detectors_elect_one_leader() {
        for n in [3, 5, 8] {
            let seed = 100 + n as u64;
            let mut sim = booted(n, seed);
            sim.delay = (ms(2), ms(2));
            sim.detect = (ms(350), ms(350));
            let crash_at = sim.now;
            sim.crash(n - 1);
            sim.settle();
            let (leader, _) = sim.assert_agreement();
            assert_eq!(leader, id(n - 2), "seed {seed}");
            // Every survivor detected at the same instant, so each ran its own election...
            assert_eq!(
                sim.elections_started_since(crash_at).len(),
                n - 1,
                "seed {seed}"
            );
            // ...which is the Fast Bully worst case: quadratic, and no worse.
            let messages = sim.sent_since(crash_at).count();
            assert!(
                messages <= n * (n - 1) + 3 * n,
                "seed {seed}: {messages} messages for n = {n}"
            );
        }
    }

    #[test]
    fn a_nominee_that_dies_before_announcing_is_replaced_by_the_next() {
        for seed in 0..10 {
            let mut sim = Sim::new(5, seed);
            // T4 well above T2 + T3, so that the answerers outwait one failed nominee.
            sim.timings.t4 = ms(400);
            sim.boot_all();
            sim.settle();
            // Slow detectors everywhere but s1, so that only the T3 timeout can save s1.
            one_detector_first(&mut sim, 0, ms(2_000));
            sim.intercept = Some(Box::new(|_, to, msg| {
                if to == 3 && matches!(msg, ElectionMessage::Nomination { .. }) {
                    Fate::CrashReceiver
                } else {
                    Fate::Deliver
                }
            }));
            let crash_at = sim.now;
            sim.crash(4);
            sim.run_until(crash_at + ms(1_000));
            let nominated: Vec<usize> = sim
                .sent_since(crash_at)
                .filter(|s| s.from == 0 && matches!(s.msg, ElectionMessage::Nomination { .. }))
                .map(|s| s.to)
                .collect();
            assert_eq!(nominated, vec![3, 2], "seed {seed}: s4 first, then s3");
            assert_eq!(sim.machine(0).leader(), Some(&id(2)), "seed {seed}");
            // s3 got there through the nomination, not through its own T4.
            assert!(
                !sim.elections_started_since(crash_at)
                    .iter()
                    .any(|(_, node)| *node == 2),
                "seed {seed}"
            );
            sim.settle();
            let (leader, _) = sim.assert_agreement();
            assert_eq!(leader, id(2), "seed {seed}");
        }
    }

    #[test]
    fn answerers_start_their_own_election_when_no_nomination_comes() {
        for seed in 0..10 {
            let mut sim = booted(5, seed);
            one_detector_first(&mut sim, 0, ms(2_000));
            // The initiator dies as soon as the first Answer reaches it.
            sim.intercept = Some(Box::new(|_, to, msg| {
                if to == 0 && matches!(msg, ElectionMessage::Answer { .. }) {
                    Fate::CrashReceiver
                } else {
                    Fate::Deliver
                }
            }));
            let crash_at = sim.now;
            sim.crash(4);
            sim.run_until(crash_at + ms(1_500));
            // Before any of them detected anything (at 2 s), T4 made s2, s3, s4 elect.
            let started = sim.elections_started_since(crash_at);
            for node in 1..4 {
                assert!(
                    started
                        .iter()
                        .any(|(at, n)| *n == node && *at < crash_at + ms(2_000)),
                    "seed {seed}: {} never ran its T4 election: {started:?}",
                    id(node)
                );
            }
            sim.settle();
            let (leader, _) = sim.assert_agreement();
            assert_eq!(leader, id(3), "seed {seed}");
        }
    }

    #[test]
    fn the_highest_server_recovering_takes_the_lead_back_with_a_higher_term() {
        for seed in 0..20 {
            let mut sim = booted(5, seed);
            sim.crash(4);
            sim.settle();
            let (leader, term) = sim.assert_agreement();
            assert_eq!(leader, id(3), "seed {seed}");
            let back_at = sim.now;
            sim.boot(4);
            sim.settle();
            let (leader, new_term) = sim.assert_agreement();
            assert_eq!(leader, id(4), "seed {seed}");
            assert_eq!(new_term, term + 1, "seed {seed}");
            // Recovery is not an election: IAmUp, Views, one Coordinator broadcast.
            assert!(
                sim.elections_started_since(back_at).is_empty(),
                "seed {seed}"
            );
        }
    }

    #[test]
    fn a_lower_server_recovering_adopts_the_leader() {
        for seed in 0..20 {
            let mut sim = booted(5, seed);
            let (_, term) = sim.assert_agreement();
            sim.crash(1);
            sim.settle();
            sim.boot(1);
            sim.settle();
            let (leader, new_term) = sim.assert_agreement();
            assert_eq!(
                (leader, new_term),
                (id(4), term),
                "seed {seed}: nothing changes"
            );
        }
    }

    #[test]
    fn a_leader_restarting_before_anyone_notices_reannounces_with_a_new_term() {
        let mut sim = booted(4, 3);
        let (_, term) = sim.assert_agreement();
        sim.detect = (ms(5_000), ms(5_000));
        sim.crash(3);
        sim.run_until(sim.now + ms(10));
        sim.boot(3);
        sim.settle();
        let (leader, new_term) = sim.assert_agreement();
        assert_eq!(leader, id(3));
        assert!(
            new_term > term,
            "fresh term fences the previous incarnation"
        );
    }

    #[test]
    fn a_partitioned_leader_and_the_new_one_converge_after_the_heal() {
        for seed in 0..20 {
            let mut sim = booted(5, seed);
            sim.partition(&[4], &[0, 1, 2, 3]);
            sim.settle();
            // The majority elected s4; s5 alone still leads itself.
            assert_eq!(sim.machine(0).leader(), Some(&id(3)), "seed {seed}");
            assert_eq!(sim.machine(4).leader(), Some(&id(4)), "seed {seed}");
            let split_term = sim.machine(0).term();
            sim.heal();
            sim.settle();
            let (leader, term) = sim.assert_agreement();
            assert_eq!(leader, id(4), "seed {seed}");
            assert!(term > split_term, "seed {seed}");
        }
    }

    #[test]
    fn a_false_suspicion_of_the_leader_ends_with_the_same_leader_and_a_fresh_term() {
        let mut sim = booted(4, 9);
        let (_, term) = sim.assert_agreement();
        let at = sim.now;
        // s1's detector alone wrongly reports the leader down.
        sim.nodes[0].sees_up[3] = false;
        sim.feed(0, Input::PeerDown(id(3)));
        sim.settle();
        let (leader, new_term) = sim.assert_agreement();
        assert_eq!(leader, id(3));
        assert_eq!(new_term, term + 1);
        // The leader re-announced on the Election at once; nobody else claimed the lead,
        // and only the suspicious server ran an election.
        for sent in sim.sent_since(at) {
            if let ElectionMessage::Coordinator { .. } = sent.msg {
                assert_eq!(sent.from, 3, "{sent:?}");
            }
        }
        assert_eq!(sim.elections_started_since(at), vec![(at, 0)]);
        let agreed_at = sim
            .logged_since(at)
            .filter(|l| matches!(l.action, Action::LeaderElected { .. }))
            .map(|l| l.at)
            .max();
        assert!(
            agreed_at < Some(at + TIMINGS.t2),
            "agreed before T2, no nomination needed"
        );
    }

    /// Drops every `Coordinator` from `from` to any of `to`.
    fn drop_coordinators(from: usize, to: &'static [usize]) -> Interceptor {
        Box::new(move |sender, receiver, msg| {
            let lost = sender == from
                && to.contains(&receiver)
                && matches!(msg, ElectionMessage::Coordinator { .. });
            if lost { Fate::Drop } else { Fate::Deliver }
        })
    }

    /// The bug of the real cluster: s5 crashed, s4 took over, s5 restarted and announced
    /// itself, but its `Coordinator` to s2 and s3 was lost. Without heartbeats the split is
    /// stable forever (the control run proves the simulator reproduces it); with heartbeats
    /// carrying each server's view (20 ms, 30% lost, duplicated, reordered) s2 and s3 pull the
    /// new leader from the next heartbeat of any up-to-date peer, without a single message.
    #[test]
    fn a_lost_coordinator_is_repaired_by_heartbeats() {
        for seed in 0..20 {
            for with_heartbeats in [false, true] {
                let mut sim = booted(5, seed);
                if with_heartbeats {
                    sim.start_heartbeats(LOSSY_HEARTBEATS);
                }
                sim.crash(4);
                sim.settle();
                let (leader, term) = sim.assert_agreement();
                assert_eq!(leader, id(3), "seed {seed}");
                sim.intercept = Some(drop_coordinators(4, &[1, 2]));
                // As in the real cluster, s5's heartbeats see its peers up before the Views to
                // its IAmUp come back (the driver waits for its links before Start), so the new
                // leader has no peer_up left to send a View on.
                sim.notice_up = (ms(0), ms(1));
                let back_at = sim.now;
                sim.boot(4);
                if !with_heartbeats {
                    sim.settle();
                    let new = (term + 1, Some(id(4)));
                    let old = (term, Some(id(3)));
                    assert_eq!(
                        sim.views(),
                        vec![new.clone(), old.clone(), old, new.clone(), new],
                        "seed {seed}: the split of the bug report"
                    );
                    let everyone_sees_everyone =
                        (0..5).all(|a| (0..5).all(|b| a == b || sim.nodes[a].sees_up[b]));
                    assert!(everyone_sees_everyone, "seed {seed}");
                    continue;
                }
                // Bounded: well within T1 of s5's boot.
                let agreed_at = sim.run_until_agreement(back_at + ms(2_000));
                let (leader, new_term) = sim.assert_agreement();
                assert_eq!((leader, new_term), (id(4), term + 1), "seed {seed}");
                let took = agreed_at.expect("converged") - back_at;
                assert!(took < TIMINGS.t1, "seed {seed}: took {took:?}");
                // The repair cost no message and no election: s2 and s3 adopted s5 once.
                assert!(
                    sim.elections_started_since(back_at).is_empty(),
                    "seed {seed}"
                );
                for sent in sim.sent_since(back_at) {
                    assert!(
                        matches!(
                            sent.msg,
                            ElectionMessage::IAmUp { .. }
                                | ElectionMessage::View { .. }
                                | ElectionMessage::Coordinator { .. }
                        ),
                        "seed {seed}: {sent:?}"
                    );
                }
                for node in [1, 2] {
                    let stats = sim.machine(node).stats();
                    assert_eq!(stats.heartbeat_adoptions, 1, "seed {seed}");
                }
                sim.settle();
                assert_eq!(sim.assert_agreement(), (id(4), term + 1), "seed {seed}");
            }
        }
    }

    /// Drops every message to or from `node`.
    fn isolate_messages(node: usize) -> Interceptor {
        Box::new(move |from, to, _| {
            if from == node || to == node {
                Fate::Drop
            } else {
                Fate::Deliver
            }
        })
    }

    /// The leader restarts before anyone notices, and every message to or from it is lost
    /// (its IAmUps, the Views, its Coordinators): only heartbeats get through. It still takes
    /// the lead above the term the heartbeats named (so the others do not fence it), and they
    /// pull it from its heartbeats: no election anywhere.
    #[test]
    fn a_restarted_leader_whose_messages_are_all_lost_is_followed_through_heartbeats() {
        for seed in 0..10 {
            let mut sim = booted(4, seed);
            sim.start_heartbeats(LOSSY_HEARTBEATS);
            let (_, term) = sim.assert_agreement();
            sim.detect = (ms(5_000), ms(5_000));
            sim.intercept = Some(isolate_messages(3));
            sim.crash(3);
            sim.run_until(sim.now + ms(10));
            let back_at = sim.now;
            sim.boot(3);
            sim.settle();
            let (leader, new_term) = sim.assert_agreement();
            assert_eq!((leader, new_term), (id(3), term + 1), "seed {seed}");
            assert!(
                sim.elections_started_since(back_at).is_empty(),
                "seed {seed}"
            );
            for node in 0..3 {
                assert_eq!(sim.machine(node).stats().heartbeat_adoptions, 1);
            }
        }
    }

    /// The top server was cut off and the others elected s4; at the heal every message across
    /// the old cut is lost (the Views a leader sends on peer_up included), only heartbeats get
    /// through. s5 sees a lower server lead a newer epoch: it runs an election, which it wins
    /// at once (it is the top), and the others pull it from its heartbeats.
    #[test]
    fn a_lower_leader_seen_in_heartbeats_makes_the_higher_server_take_over() {
        for seed in 0..10 {
            let mut sim = booted(5, seed);
            sim.start_heartbeats(LOSSY_HEARTBEATS);
            sim.partition(&[4], &[0, 1, 2, 3]);
            sim.settle();
            assert_eq!(sim.machine(0).leader(), Some(&id(3)), "seed {seed}");
            assert_eq!(sim.machine(4).leader(), Some(&id(4)), "seed {seed}");
            let split_term = sim.machine(0).term();
            sim.intercept = Some(isolate_messages(4));
            let heal_at = sim.now;
            sim.heal();
            sim.settle();
            let (leader, term) = sim.assert_agreement();
            assert_eq!((leader, term), (id(4), split_term + 1), "seed {seed}");
            let electors: Vec<usize> = sim
                .elections_started_since(heal_at)
                .into_iter()
                .map(|(_, node)| node)
                .collect();
            assert_eq!(electors, vec![4], "seed {seed}: one election, by s5");
            assert_eq!(sim.machine(4).stats().heartbeat_elections, 1);
        }
    }

    /// Once views agree, heartbeats (lost, duplicated, reordered by up to 120 ms) cost nothing:
    /// not one message, not one log line, over a simulated minute.
    #[test]
    fn steady_state_heartbeats_send_no_message() {
        for n in [2, 3, 5, 8] {
            let seed = 200 + n as u64;
            let mut sim = booted(n, seed);
            // Some history first, so that terms and leaders are not the boot ones.
            sim.crash(n - 1);
            sim.settle();
            sim.boot(n - 1);
            sim.settle();
            let agreed = sim.assert_agreement();
            sim.delay = (ms(1), ms(120));
            sim.start_heartbeats(LOSSY_HEARTBEATS);
            let at = sim.now;
            let stats: Vec<_> = (0..n).map(|i| sim.machine(i).stats()).collect();
            sim.run_until(at + Duration::from_secs(60));
            assert_eq!(sim.sent_since(at).count(), 0, "n = {n}");
            assert_eq!(sim.logged_since(at).count(), 0, "n = {n}");
            let after: Vec<_> = (0..n).map(|i| sim.machine(i).stats()).collect();
            assert_eq!(after, stats, "n = {n}");
            assert_eq!(sim.assert_agreement(), agreed, "n = {n}");
        }
    }

    fn set_timer(actions: &[Action]) -> Option<ElectionTimer> {
        actions.iter().find_map(|a| match a {
            Action::SetTimer { timer, .. } => Some(*timer),
            _ => None,
        })
    }

    fn sends(actions: &[Action]) -> Vec<(ServerId, ElectionMessage)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { to, msg } => Some((to.clone(), msg.clone())),
                _ => None,
            })
            .collect()
    }

    fn view(leader: usize, term: u64) -> ElectionMessage {
        ElectionMessage::View {
            leader: Some(id(leader)),
            term,
            alive: vec![id(leader)],
        }
    }

    fn msg(from: usize, msg: ElectionMessage) -> Input {
        Input::Message {
            from: id(from),
            msg,
        }
    }

    /// s2 of three, following s3 at term 5.
    fn follower_of_s3_at_term_5(now: Instant) -> Election {
        let mut s2 = Election::new(id(1), ids(3), TIMINGS);
        s2.handle(now, Input::Start);
        s2.handle(now, Input::PeerUp(id(2)));
        s2.handle(now, msg(2, view(2, 5)));
        assert_eq!((s2.leader(), s2.term()), (Some(&id(2)), 5));
        s2
    }

    #[test]
    fn messages_of_an_older_term_are_ignored_and_corrected() {
        let now = Instant::now();
        let mut s2 = follower_of_s3_at_term_5(now);
        let correction = vec![(id(0), view(2, 5))];
        let correction = |actions: &[Action]| {
            let got = sends(actions);
            assert_eq!(got.len(), 1, "{got:?}");
            assert!(
                matches!(&got[0].1, ElectionMessage::View { leader: Some(l), term: 5, .. } if *l == id(2)),
                "{got:?} vs {correction:?}"
            );
        };

        // A stale leader's Coordinator: not followed.
        let actions = s2.handle(now, msg(0, ElectionMessage::Coordinator { term: 3 }));
        correction(&actions);
        // A stale Election: no Answer, no phase change.
        let actions = s2.handle(now, msg(0, ElectionMessage::Election { term: 4 }));
        correction(&actions);
        // A stale Nomination: no Coordinator.
        let actions = s2.handle(now, msg(0, ElectionMessage::Nomination { term: 2 }));
        correction(&actions);
        // A stale View naming another leader.
        let actions = s2.handle(now, msg(0, view(0, 4)));
        correction(&actions);
        // A stale leaderless View claims nothing: silently dropped.
        let actions = s2.handle(
            now,
            msg(
                0,
                ElectionMessage::View {
                    leader: None,
                    term: 1,
                    alive: vec![],
                },
            ),
        );
        assert!(actions.is_empty());

        assert_eq!(
            (s2.leader(), s2.term(), s2.phase()),
            (Some(&id(2)), 5, Phase::Stable)
        );
        assert_eq!(s2.stats().stale_messages, 5);

        // IAmUp is never fenced: a restarted server starts from term 0.
        let actions = s2.handle(now, msg(0, ElectionMessage::IAmUp { term: 0 }));
        correction(&actions);
    }

    #[test]
    fn equal_terms_are_ordered_by_rank() {
        let now = Instant::now();
        // s1 of four hears two servers announce term 3 at once, in both orders.
        for order in [[2, 3], [3, 2]] {
            let mut s1 = Election::new(id(0), ids(4), TIMINGS);
            s1.handle(now, Input::Start);
            for announcer in order {
                s1.handle(
                    now,
                    msg(announcer, ElectionMessage::Coordinator { term: 3 }),
                );
            }
            assert_eq!(
                (s1.leader(), s1.term()),
                (Some(&id(3)), 3),
                "order {order:?}"
            );
        }
        // The loser of the tie is told.
        let mut s1 = Election::new(id(0), ids(4), TIMINGS);
        s1.handle(now, Input::Start);
        s1.handle(now, msg(3, ElectionMessage::Coordinator { term: 3 }));
        let actions = s1.handle(now, msg(2, ElectionMessage::Coordinator { term: 3 }));
        assert_eq!(
            sends(&actions),
            vec![(id(2), view(3, 3)).clone()]
                .into_iter()
                .map(|(to, _)| (
                    to,
                    ElectionMessage::View {
                        leader: Some(id(3)),
                        term: 3,
                        alive: vec![id(0)]
                    }
                ))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_stale_timer_from_an_old_round_does_nothing() {
        let now = Instant::now();
        let mut s1 = Election::new(id(0), ids(3), TIMINGS);
        let t1 = set_timer(&s1.handle(now, Input::Start)).expect("T1");
        // A View settles recovery before T1 fires.
        s1.handle(now, msg(2, view(2, 1)));
        let before = (s1.phase(), s1.leader().cloned(), s1.term());
        assert!(s1.handle(now + ms(150), Input::Timer(t1)).is_empty());
        assert_eq!((s1.phase(), s1.leader().cloned(), s1.term()), before);

        // The leader dies: election round with a T2 timer.
        s1.handle(now, Input::PeerUp(id(1)));
        let t2 = set_timer(&s1.handle(now, Input::PeerDown(id(2)))).expect("T2");
        assert_eq!(t2.kind(), TimerKind::Answers);
        // A Coordinator ends it before T2; then another failure starts a new round.
        s1.handle(now, msg(1, ElectionMessage::Coordinator { term: 2 }));
        let t2_new = set_timer(&s1.handle(now, Input::PeerDown(id(1)))).expect("new T2");
        assert_eq!(s1.phase(), Phase::Electing);
        // The old T2 is of the same kind and the phase matches, but its round is over:
        // acting on it would declare victory before the new round's Answers could arrive.
        assert!(s1.handle(now + ms(100), Input::Timer(t2)).is_empty());
        assert_eq!(s1.phase(), Phase::Electing);
        assert_eq!(s1.stats().stale_timers, 2);
        // The current one acts.
        let actions = s1.handle(now + ms(100), Input::Timer(t2_new));
        assert!(s1.is_leader(), "{actions:?}");
        // A forged timer of the current round but the wrong kind is ignored too.
        let forged = ElectionTimer {
            kind: TimerKind::Nomination,
            round: s1.round,
        };
        assert!(s1.handle(now, Input::Timer(forged)).is_empty());
        assert!(s1.is_leader());
    }

    #[test]
    fn election_branches_step_by_step() {
        let now = Instant::now();
        // s2 of four: the leader s4 dies.
        let mut s2 = Election::new(id(1), ids(4), TIMINGS);
        s2.handle(now, Input::Start);
        for peer in [0, 2, 3] {
            s2.handle(now, Input::PeerUp(id(peer)));
        }
        s2.handle(now, msg(3, ElectionMessage::Coordinator { term: 1 }));
        let actions = s2.handle(now, Input::PeerDown(id(3)));
        assert_eq!(
            actions[0],
            Action::LeaderLost {
                leader: id(3),
                term: 1
            }
        );
        assert_eq!(actions[1], Action::ElectionStarted { term: 1 });
        assert_eq!(
            sends(&actions),
            vec![
                (id(2), ElectionMessage::Election { term: 1 }),
                (id(3), ElectionMessage::Election { term: 1 }),
            ]
        );
        let t2 = set_timer(&actions).expect("T2");
        // s3 answers; s4 might still answer (the detector may be wrong), so wait out T2.
        let actions = s2.handle(now, msg(2, ElectionMessage::Answer { term: 1 }));
        assert!(actions.is_empty());
        let actions = s2.handle(now + ms(100), Input::Timer(t2));
        assert_eq!(
            sends(&actions),
            vec![(id(2), ElectionMessage::Nomination { term: 1 })]
        );
        assert_eq!(
            (s2.phase(), s2.nominee()),
            (Phase::Nominating, Some(&id(2)))
        );
        let t3 = set_timer(&actions).expect("T3");
        // s3 dies before announcing: nobody left, start again.
        let actions = s2.handle(now, Input::Timer(t3));
        assert!(actions.contains(&Action::ElectionStarted { term: 1 }));
        let t2 = set_timer(&actions).expect("T2");
        // Nobody answers this time: s2 leads, tells s1.
        let actions = s2.handle(now, Input::Timer(t2));
        assert!(s2.is_leader());
        assert_eq!(s2.term(), 2);
        let to_s1: Vec<_> = sends(&actions)
            .into_iter()
            .filter(|(to, _)| *to == id(0))
            .collect();
        assert_eq!(
            to_s1,
            vec![(id(0), ElectionMessage::Coordinator { term: 2 })]
        );

        // An Election received by the leader: Answer, then re-announce at a fresh term.
        let actions = s2.handle(now, msg(0, ElectionMessage::Election { term: 2 }));
        assert_eq!(
            sends(&actions)[..2],
            [
                (id(0), ElectionMessage::Answer { term: 2 }),
                (id(0), ElectionMessage::Coordinator { term: 3 }),
            ]
        );

        // A follower answering an Election and then nominated announces itself.
        let mut s3 = Election::new(id(2), ids(4), TIMINGS);
        s3.handle(now, Input::Start);
        s3.handle(now, msg(3, ElectionMessage::Coordinator { term: 1 }));
        let actions = s3.handle(now, msg(0, ElectionMessage::Election { term: 1 }));
        assert_eq!(
            sends(&actions),
            vec![(id(0), ElectionMessage::Answer { term: 1 })]
        );
        assert_eq!(s3.phase(), Phase::AwaitingNomination);
        assert_eq!(
            s3.leader(),
            Some(&id(3)),
            "keeps following until told otherwise"
        );
        let actions = s3.handle(now, msg(0, ElectionMessage::Nomination { term: 1 }));
        assert!(s3.is_leader());
        let coordinators: Vec<_> = sends(&actions).into_iter().map(|(to, _)| to).collect();
        assert_eq!(coordinators, vec![id(0), id(1)], "to every lower server");
    }

    #[test]
    fn a_leader_known_only_from_a_third_party_must_show_a_sign_of_life() {
        let now = Instant::now();
        for heard in [false, true] {
            // s1 restarts; s2 says s3 leads, but s3 died meanwhile and s1 never saw it up,
            // so s1's detector will never report it down.
            let mut s1 = Election::new(id(0), ids(3), TIMINGS);
            s1.handle(now, Input::Start);
            s1.handle(now, Input::PeerUp(id(1)));
            let actions = s1.handle(now, msg(1, view(2, 4)));
            assert_eq!(s1.leader(), Some(&id(2)));
            let check = set_timer(&actions).expect("a leader check");
            assert_eq!(check.kind(), TimerKind::LeaderCheck);
            assert_eq!(s1.phase(), Phase::Stable);
            if heard {
                s1.handle(now, Input::PeerUp(id(2)));
            }
            let actions = s1.handle(now + TIMINGS.t1, Input::Timer(check));
            if heard {
                assert!(actions.is_empty(), "{actions:?}");
                assert_eq!(s1.leader(), Some(&id(2)));
            } else {
                assert!(
                    actions.contains(&Action::ElectionStarted { term: 4 }),
                    "{actions:?}"
                );
                assert_eq!(s1.phase(), Phase::Electing);
            }
        }
        // A leader heard from directly needs no check.
        let mut s1 = Election::new(id(0), ids(3), TIMINGS);
        s1.handle(now, Input::Start);
        s1.handle(now, Input::PeerUp(id(2)));
        let actions = s1.handle(now, msg(2, ElectionMessage::Coordinator { term: 1 }));
        assert_eq!(set_timer(&actions), None);
    }

    #[test]
    fn a_leader_our_detector_saw_die_is_not_followed_from_a_third_party_view() {
        let now = Instant::now();
        // s1 of three follows s3, then its detector declares s3 down.
        let mut s1 = Election::new(id(0), ids(3), TIMINGS);
        s1.handle(now, Input::Start);
        s1.handle(now, Input::PeerUp(id(1)));
        s1.handle(now, Input::PeerUp(id(2)));
        s1.handle(now, msg(2, ElectionMessage::Coordinator { term: 1 }));
        let actions = s1.handle(now, Input::PeerDown(id(2)));
        assert!(actions.contains(&Action::LeaderLost {
            leader: id(2),
            term: 1
        }));
        // s2, whose detector lags, still names s3 at a newer term: not followed.
        let actions = s1.handle(now, msg(1, view(2, 2)));
        assert_ne!(s1.leader(), Some(&id(2)), "{actions:?}");
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::LeaderElected { .. })),
            "{actions:?}"
        );
        // The same news straight from s3 is proof of life: followed.
        s1.handle(now, msg(2, ElectionMessage::Coordinator { term: 3 }));
        assert_eq!(s1.leader(), Some(&id(2)));
    }

    #[test]
    fn an_answer_from_the_top_server_is_nominated_without_waiting() {
        let now = Instant::now();
        // s1 of three suspects s2 (its leader); s3, the top server, answers.
        let mut s1 = Election::new(id(0), ids(3), TIMINGS);
        s1.handle(now, Input::Start);
        s1.handle(now, msg(1, ElectionMessage::Coordinator { term: 1 }));
        s1.handle(now, Input::PeerDown(id(1)));
        let actions = s1.handle(now, msg(2, ElectionMessage::Answer { term: 1 }));
        assert_eq!(
            sends(&actions),
            vec![(id(2), ElectionMessage::Nomination { term: 1 })]
        );
        assert_eq!(s1.nominee(), Some(&id(2)));
        // A late Answer from s2 (it was alive after all) becomes the fallback nominee.
        s1.handle(now, msg(1, ElectionMessage::Answer { term: 1 }));
        let t3 = match &s1.state {
            State::Nominating { remaining, .. } => {
                assert_eq!(remaining, &vec![1]);
                ElectionTimer {
                    kind: TimerKind::Coordinator,
                    round: s1.round,
                }
            }
            other => panic!("{other:?}"),
        };
        let actions = s1.handle(now + TIMINGS.t3, Input::Timer(t3));
        assert_eq!(
            sends(&actions),
            vec![(id(1), ElectionMessage::Nomination { term: 1 })]
        );
        // The second nominee is declared down: no point waiting T3, start again.
        let actions = s1.handle(now + TIMINGS.t3, Input::PeerDown(id(1)));
        assert!(
            actions.contains(&Action::ElectionStarted { term: 1 }),
            "{actions:?}"
        );
    }

    #[test]
    fn protocol_breaking_messages_are_ignored() {
        let now = Instant::now();
        let mut s2 = follower_of_s3_at_term_5(now);
        let before = (s2.phase(), s2.leader().cloned(), s2.term());
        for input in [
            msg(2, ElectionMessage::Election { term: 9 }),
            msg(2, ElectionMessage::Nomination { term: 9 }),
            msg(0, ElectionMessage::Answer { term: 9 }),
            msg(1, ElectionMessage::Coordinator { term: 9 }),
            Input::Message {
                from: "stranger".into(),
                msg: ElectionMessage::Coordinator { term: 9 },
            },
            Input::PeerDown("stranger".into()),
            Input::PeerDown(id(1)),
            Input::Start,
        ] {
            assert!(s2.handle(now, input.clone()).is_empty(), "{input:?}");
        }
        assert_eq!((s2.phase(), s2.leader().cloned(), s2.term()), before);
    }

    #[test]
    fn a_lower_leader_is_not_followed_while_we_are_alive() {
        let now = Instant::now();
        let mut s2 = follower_of_s3_at_term_5(now);
        // A View says s1 leads at term 6: s2 is above s1 and alive, so it runs an election.
        let actions = s2.handle(now, msg(0, view(0, 6)));
        assert!(actions.contains(&Action::ElectionStarted { term: 6 }));
        assert_eq!(s2.phase(), Phase::Electing);
        assert_eq!(
            sends(&actions),
            vec![(id(2), ElectionMessage::Election { term: 6 })]
        );
    }

    fn heartbeat(from: usize, term: u64, leader: Option<usize>) -> Input {
        Input::Heartbeat {
            from: id(from),
            term,
            leader: leader.map(id),
        }
    }

    #[test]
    fn heartbeat_rules_step_by_step() {
        let now = Instant::now();
        // s2 of four, following s3 at term 5; s1 and s3 up, s4 unknown.
        let mut s2 = Election::new(id(1), ids(4), TIMINGS);
        s2.handle(now, Input::Start);
        s2.handle(now, Input::PeerUp(id(0)));
        s2.handle(now, Input::PeerUp(id(2)));
        s2.handle(now, msg(2, ElectionMessage::Coordinator { term: 5 }));
        let state = |e: &Election| (e.phase(), e.leader().cloned(), e.term());
        let following_s3 = (Phase::Stable, Some(id(2)), 5);
        assert_eq!(state(&s2), following_s3);

        // The same view, an older one, a leaderless one: nothing at all.
        for input in [
            heartbeat(2, 5, Some(2)),
            heartbeat(0, 5, Some(2)),
            heartbeat(0, 4, Some(3)),
            heartbeat(0, 5, Some(1)),
            heartbeat(0, 9, None),
            heartbeat(0, 9, Some(7)),
        ] {
            assert!(s2.handle(now, input.clone()).is_empty(), "{input:?}");
            assert_eq!(state(&s2), following_s3, "{input:?}");
        }
        // A leaderless view still raises the term our next Coordinator must beat.
        assert_eq!(s2.seen_term(), 9);
        // Not started, unknown sender, ourselves: ignored.
        let mut idle = Election::new(id(1), ids(4), TIMINGS);
        idle.handle(now, Input::PeerUp(id(3)));
        assert!(idle.handle(now, heartbeat(0, 6, Some(3))).is_empty());
        assert_eq!(idle.phase(), Phase::Idle);
        for from in ["stranger", "s2"] {
            let input = Input::Heartbeat {
                from: from.into(),
                term: 6,
                leader: Some(id(3)),
            };
            assert!(s2.handle(now, input).is_empty());
        }

        // A newer epoch led by a higher server our detector has never seen: not followed
        // (it may be dead, or cut off from us).
        assert!(s2.handle(now, heartbeat(0, 6, Some(3))).is_empty());
        assert_eq!(state(&s2), following_s3);
        // Once it is up: adopted, without a message and without a leader check.
        s2.handle(now, Input::PeerUp(id(3)));
        let actions = s2.handle(now, heartbeat(0, 6, Some(3)));
        assert_eq!(
            actions,
            vec![Action::LeaderElected {
                leader: id(3),
                term: 6
            }]
        );
        assert_eq!(s2.stats().heartbeat_adoptions, 1);
        // Duplicates and the reordered older heartbeat change nothing.
        assert!(s2.handle(now, heartbeat(0, 6, Some(3))).is_empty());
        assert!(s2.handle(now, heartbeat(0, 5, Some(2))).is_empty());
        // Same term, higher rank (two announcers at once): the higher one wins, as ever.
        let mut s1 = Election::new(id(0), ids(4), TIMINGS);
        s1.handle(now, Input::Start);
        s1.handle(now, Input::PeerUp(id(2)));
        s1.handle(now, Input::PeerUp(id(3)));
        s1.handle(now, msg(2, ElectionMessage::Coordinator { term: 3 }));
        s1.handle(now, heartbeat(3, 3, Some(3)));
        assert_eq!((s1.leader(), s1.term()), (Some(&id(3)), 3));
        assert!(s1.handle(now, heartbeat(2, 3, Some(2))).is_empty());

        // A newer epoch led by a server below us: only once our detector sees it...
        let mut s3 = Election::new(id(2), ids(4), TIMINGS);
        s3.handle(now, Input::Start);
        s3.handle(now, Input::PeerUp(id(3)));
        s3.handle(now, msg(3, ElectionMessage::Coordinator { term: 2 }));
        assert!(s3.handle(now, heartbeat(3, 4, Some(0))).is_empty());
        // ...the bully rule is broken while we are alive: run an election.
        s3.handle(now, Input::PeerUp(id(0)));
        let actions = s3.handle(now, heartbeat(3, 4, Some(0)));
        assert_eq!(
            actions[..2],
            [
                Action::LeaderLost {
                    leader: id(3),
                    term: 2
                },
                Action::ElectionStarted { term: 4 }
            ]
        );
        assert_eq!(
            sends(&actions),
            vec![(id(3), ElectionMessage::Election { term: 4 })]
        );
        assert_eq!(s3.stats().heartbeat_elections, 1);
        // While that election runs, the same heartbeats change nothing.
        for _ in 0..50 {
            assert!(s3.handle(now, heartbeat(3, 4, Some(0))).is_empty());
        }
        assert_eq!(s3.stats().elections_started, 1);
    }

    #[test]
    fn heartbeats_during_recovery() {
        let now = Instant::now();
        // s2 of three restarts; s3 is up and leads at term 4.
        let mut s2 = Election::new(id(1), ids(3), TIMINGS);
        s2.handle(now, Input::PeerUp(id(0)));
        s2.handle(now, Input::PeerUp(id(2)));
        let t1 = set_timer(&s2.handle(now, Input::Start)).expect("T1");
        // A heartbeat naming a lower leader: recovery goes on (the Views decide), but the
        // term is remembered.
        assert!(s2.handle(now, heartbeat(0, 3, Some(0))).is_empty());
        assert_eq!(s2.phase(), Phase::Recovering);
        // A heartbeat naming s3: followed before any View comes.
        let actions = s2.handle(now, heartbeat(0, 4, Some(2)));
        assert_eq!(
            actions,
            vec![Action::LeaderElected {
                leader: id(2),
                term: 4
            }]
        );
        assert!(s2.handle(now + TIMINGS.t1, Input::Timer(t1)).is_empty());

        // The top server restarts before anyone noticed: its peers' heartbeats name it at
        // term 4. Its Views are lost; after T1 it leads above term 4, or nobody would follow.
        let mut s3 = Election::new(id(2), ids(3), TIMINGS);
        s3.handle(now, Input::PeerUp(id(0)));
        let t1 = set_timer(&s3.handle(now, Input::Start)).expect("T1");
        assert!(s3.handle(now, heartbeat(0, 4, Some(2))).is_empty());
        assert_eq!(s3.phase(), Phase::Recovering);
        let actions = s3.handle(now + TIMINGS.t1, Input::Timer(t1));
        assert_eq!(
            sends(&actions),
            vec![
                (id(0), ElectionMessage::Coordinator { term: 5 }),
                (id(1), ElectionMessage::Coordinator { term: 5 }),
            ]
        );
        // Had it led at a stale term anyway, its peers' heartbeats would name it at a newer
        // one: it takes the lead again above it.
        let mut stale = Election::new(id(2), ids(3), TIMINGS);
        stale.handle(now, Input::PeerUp(id(0)));
        let t1 = set_timer(&stale.handle(now, Input::Start)).expect("T1");
        stale.handle(now + TIMINGS.t1, Input::Timer(t1));
        assert_eq!((stale.leader(), stale.term()), (Some(&id(2)), 1));
        let actions = stale.handle(now, heartbeat(0, 4, Some(2)));
        assert!(actions.contains(&Action::ElectionStarted { term: 4 }));
        assert!(actions.contains(&Action::LeaderElected {
            leader: id(2),
            term: 5
        }));
    }

    #[test]
    fn members_are_deduplicated_and_a_missing_self_is_lowest() {
        let timings = TIMINGS;
        let e = Election::new(id(1), vec![id(0), id(1), id(0), id(2)], timings);
        assert_eq!(e.members(), &[id(0), id(1), id(2)]);
        let e = Election::new("ghost".into(), ids(3), timings);
        assert_eq!(e.members()[0], "ghost");
        assert_eq!(e.me(), "ghost");
        let e = Election::new(id(0), vec![], timings);
        assert_eq!(e.members(), &[id(0)]);
    }

    #[test]
    fn messages_round_trip_through_postcard() {
        let all = [
            ElectionMessage::Election { term: 1 },
            ElectionMessage::Answer { term: 2 },
            ElectionMessage::Nomination { term: 3 },
            ElectionMessage::Coordinator { term: u64::MAX },
            ElectionMessage::IAmUp { term: 0 },
            ElectionMessage::View {
                leader: Some(id(2)),
                term: 7,
                alive: ids(3),
            },
            ElectionMessage::View {
                leader: None,
                term: 0,
                alive: vec![],
            },
        ];
        for message in all {
            let bytes = postcard::to_stdvec(&message).expect("encodes");
            let back: ElectionMessage = postcard::from_bytes(&bytes).expect("decodes");
            assert_eq!(back, message);
        }
    }

    #[test]
    fn garbage_inputs_never_panic_and_terms_never_go_back() {
        let names: Vec<ServerId> = ids(6).into_iter().chain(["".to_string()]).collect();
        for seed in 0..200 {
            let mut rng = Rng(seed);
            let now = Instant::now();
            let mut e = Election::new(id(rng.below(4) as usize), ids(4), TIMINGS);
            let mut last_term = 0;
            for step in 0..500 {
                let name = names[rng.below(names.len() as u64) as usize].clone();
                let term = match rng.below(4) {
                    0 => 0,
                    1 => u64::MAX,
                    _ => rng.below(20),
                };
                let message = match rng.below(6) {
                    0 => ElectionMessage::Election { term },
                    1 => ElectionMessage::Answer { term },
                    2 => ElectionMessage::Nomination { term },
                    3 => ElectionMessage::Coordinator { term },
                    4 => ElectionMessage::IAmUp { term },
                    _ => ElectionMessage::View {
                        leader: (rng.below(3) > 0).then(|| name.clone()),
                        term,
                        alive: (0..rng.below(8))
                            .map(|_| names[rng.below(names.len() as u64) as usize].clone())
                            .collect(),
                    },
                };
                let kinds = [
                    TimerKind::Views,
                    TimerKind::Leader,
                    TimerKind::Answers,
                    TimerKind::Coordinator,
                    TimerKind::Nomination,
                    TimerKind::LeaderCheck,
                ];
                let input = match rng.below(7) {
                    0 => Input::Start,
                    1 => Input::PeerUp(name),
                    2 => Input::PeerDown(name),
                    3 => Input::Timer(ElectionTimer {
                        kind: kinds[rng.below(kinds.len() as u64) as usize],
                        round: e.round.wrapping_sub(rng.below(2)),
                    }),
                    4 => Input::Heartbeat {
                        from: name,
                        term,
                        leader: (rng.below(3) > 0)
                            .then(|| names[rng.below(names.len() as u64) as usize].clone()),
                    },
                    _ => Input::Message {
                        from: name,
                        msg: message,
                    },
                };
                let at = now + ms(step);
                for action in e.handle(at, input) {
                    if let Action::Send { to, .. } = action {
                        assert!(e.members().contains(&to), "seed {seed}");
                        assert_ne!(&to, e.me(), "seed {seed}");
                    }
                }
                assert!(e.term() >= last_term, "seed {seed}: term went back");
                last_term = e.term();
                assert!(e.seen_term() >= e.term(), "seed {seed}");
            }
        }
    }

    /// How many seeds the randomized tests run: `ELECTION_SIM_SEEDS` raises it for a long
    /// soak (`ELECTION_SIM_SEEDS=100000 cargo test --release random_`).
    fn seed_count(default: u64) -> u64 {
        std::env::var("ELECTION_SIM_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    }

    /// One random scenario: boots at random instants, then crashes, restarts and (if
    /// `harsh`) partitions and heals at random; every link healed at the end, then run to
    /// quiescence. If `lossy`, heartbeats run throughout (up to half of them lost, some
    /// duplicated, reordered like messages) and up to 20% of the election messages are lost
    /// as well, until the end: messages the algorithm's contract says are reliable.
    fn random_run(seed: u64, harsh: bool, lossy: bool) -> Sim {
        let mut rng = Rng(seed ^ 0x5EED);
        let (max_n, max_delay, events) = if harsh { (10, 120, 30) } else { (7, 40, 14) };
        let n = 2 + rng.below(max_n - 1) as usize;
        let mut sim = Sim::new(n, seed);
        sim.delay = (ms(1), ms(1 + rng.below(max_delay)));
        sim.detect = (ms(300), ms(300 + rng.below(400)));
        sim.notice_up = (ms(10), ms(10 + rng.below(150)));
        if lossy {
            // A separate stream, so that the scenarios stay those of the reliable runs.
            let mut loss = Rng(seed ^ 0x1055);
            sim.drop_per_mille = loss.below(201);
            sim.start_heartbeats(Heartbeats {
                interval: ms(20),
                loss_percent: loss.below(51),
                duplicate_percent: loss.below(11),
            });
        }
        for node in 0..n {
            sim.schedule(ms(rng.below(400)), Event::Boot(node));
        }
        let mut at = Duration::ZERO;
        for _ in 0..rng.below(events) {
            at += ms(rng.below(1_500));
            let node = rng.below(n as u64) as usize;
            let event = match rng.below(if harsh { 5 } else { 2 }) {
                0 | 4 => Event::Crash(node),
                1 => Event::Boot(node),
                2 => Event::Partition(rng.next_u64()),
                _ => Event::Heal,
            };
            sim.schedule(at, event);
        }
        sim.run_until(at + ms(1));
        sim.heal();
        if sim.live().is_empty() {
            let node = rng.below(n as u64) as usize;
            sim.boot(node);
        }
        sim.settle();
        sim
    }

    /// Sums what the runs went through, to prove the random tests reach the hard paths.
    #[derive(Default)]
    struct Coverage {
        elections: u64,
        nominations: u64,
        stale_timers: u64,
        stale_messages: u64,
        leaders_lost: u64,
    }

    impl Coverage {
        fn add(&mut self, sim: &Sim) {
            for node in &sim.nodes {
                let stats = node.machine.stats();
                self.stale_timers += stats.stale_timers;
                self.stale_messages += stats.stale_messages;
            }
            for logged in &sim.log {
                match logged.action {
                    Action::ElectionStarted { .. } => self.elections += 1,
                    Action::LeaderLost { .. } => self.leaders_lost += 1,
                    _ => {}
                }
            }
            let nominations = sim
                .sent
                .iter()
                .filter(|s| matches!(s.msg, ElectionMessage::Nomination { .. }));
            self.nominations += nominations.count() as u64;
        }

        fn assert_reached_every_path(&self, runs: u64) {
            let counts = [
                self.elections,
                self.nominations,
                self.stale_timers,
                self.stale_messages,
                self.leaders_lost,
            ];
            assert!(
                counts.iter().all(|c| *c >= runs / 10),
                "too tame: elections {}, nominations {}, stale timers {}, stale messages {}, \
                 leaders lost {} over {runs} runs",
                self.elections,
                self.nominations,
                self.stale_timers,
                self.stale_messages,
                self.leaders_lost,
            );
        }
    }

    /// Random boots, crashes, restarts and message delays (which reorder messages): after
    /// quiescence every live server follows the highest live one at one term. Terms never go
    /// back on any server (the simulator checks it on every input).
    #[test]
    fn random_crashes_restarts_and_delays_converge() {
        let runs = seed_count(400);
        let mut coverage = Coverage::default();
        for seed in 0..runs {
            let sim = random_run(seed, false, false);
            sim.assert_agreement();
            coverage.add(&sim);
        }
        coverage.assert_reached_every_path(runs);
    }

    /// The same with up to ten servers, slow links (up to 120 ms one way, more than T2) and
    /// random partitions that heal.
    #[test]
    fn random_partitions_and_slow_links_converge_after_the_heal() {
        let runs = seed_count(300);
        let mut coverage = Coverage::default();
        for seed in 0..runs {
            let sim = random_run(seed, true, false);
            sim.assert_agreement();
            coverage.add(&sim);
        }
        coverage.assert_reached_every_path(runs);
    }

    /// After a lossy run has settled: every live server agrees, and the heartbeats that keep
    /// flowing change nothing and send nothing for two more seconds.
    fn assert_converged_and_quiet(sim: &mut Sim) {
        let agreed = sim.assert_agreement();
        let at = sim.now;
        sim.run_until(at + ms(2_000));
        assert_eq!(sim.sent_since(at).count(), 0, "seed {}", sim.seed);
        assert_eq!(sim.logged_since(at).count(), 0, "seed {}", sim.seed);
        assert_eq!(sim.assert_agreement(), agreed, "seed {}", sim.seed);
    }

    /// What heartbeats repaired over lossy runs, to prove the lost messages mattered.
    #[derive(Default, Debug)]
    struct Repairs {
        adoptions: u64,
        elections: u64,
        runs_repaired: u64,
    }

    impl Repairs {
        fn add(&mut self, sim: &Sim) {
            let mut repaired = false;
            for node in &sim.nodes {
                let stats = node.machine.stats();
                self.adoptions += stats.heartbeat_adoptions;
                self.elections += stats.heartbeat_elections;
                repaired |= stats.heartbeat_adoptions + stats.heartbeat_elections > 0;
            }
            self.runs_repaired += u64::from(repaired);
        }

        fn assert_repaired_often(&self, runs: u64, elections: bool) {
            eprintln!("{self:?} over {runs} runs");
            assert!(
                self.runs_repaired >= runs / 4 && (!elections || self.elections >= runs / 50),
                "too tame: {self:?} over {runs} runs"
            );
        }
    }

    /// Random boots, crashes and restarts as above, with lossy heartbeats and up to 20% of the
    /// election messages lost: every live server still ends up following the highest live one
    /// at one term, and then heartbeats alone cost nothing.
    #[test]
    fn random_message_loss_with_heartbeats_converges() {
        let runs = seed_count(150);
        let mut coverage = Coverage::default();
        let mut repairs = Repairs::default();
        for seed in 0..runs {
            let mut sim = random_run(seed, false, true);
            assert_converged_and_quiet(&mut sim);
            coverage.add(&sim);
            repairs.add(&sim);
        }
        coverage.assert_reached_every_path(runs);
        repairs.assert_repaired_often(runs, false);
    }

    /// The same with up to ten servers, slow links and random partitions that heal.
    #[test]
    fn random_message_loss_partitions_and_heartbeats_converge() {
        let runs = seed_count(100);
        let mut coverage = Coverage::default();
        let mut repairs = Repairs::default();
        for seed in 0..runs {
            let mut sim = random_run(seed, true, true);
            assert_converged_and_quiet(&mut sim);
            coverage.add(&sim);
            repairs.add(&sim);
        }
        coverage.assert_reached_every_path(runs);
        repairs.assert_repaired_often(runs, true);
    }
}
