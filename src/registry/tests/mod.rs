//! Deterministic tests: unit tests that feed one registry by hand, and a
//! simulated cluster (message delays, crashes, partitions, elections
//! injected by the test) with an invariant check after every event.
//! Every simulated test prints its seed on failure.

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// How long the simulated failure detector takes to declare a silent
/// peer down.
const DETECT: Duration = Duration::from_millis(100);
/// How long it takes to declare a peer up once it can be heard.
const UP_DELAY: Duration = Duration::from_millis(20);
/// The simulated detector looks at the topology this often.
const DETECTOR_TICK: Duration = Duration::from_millis(10);
/// After a heal or restart, duplicates between the rejoined servers are
/// tolerated this long: the cluster must converge within it.
const GRACE: Duration = Duration::from_millis(1000);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn sid(i: usize) -> ServerId {
    format!("s{}", i + 1)
}

fn test_config(require_majority: bool) -> RegistryConfig {
    RegistryConfig {
        require_majority,
        claim_timeout: ms(2000),
        retry_interval: ms(200),
        sync_timeout: ms(500),
        move_timeout: ms(1000),
    }
}

/// The proof every test move is started with: a fixed token and address.
fn proof() -> MoveProof {
    MoveProof {
        token: "0123456789abcdef0123456789abcdef".into(),
        ip: std::net::IpAddr::from([10, 0, 0, 1]),
    }
}

/// The arrival of the client that started a test move: the token it got.
fn arrival() -> Arrival {
    Arrival {
        token: Some(proof().token),
        ip: std::net::IpAddr::from([10, 0, 0, 9]),
    }
}

fn ident(name: &str) -> Name {
    Name::Identity(name.to_string())
}

fn room(room: &str, owner: &str) -> Name {
    Name::Room {
        room: room.to_string(),
        owner: owner.to_string(),
    }
}

enum Event {
    Deliver {
        from: usize,
        to: usize,
        to_inc: u64,
        bytes: Vec<u8>,
    },
    Timer {
        node: usize,
        inc: u64,
        timer: Timer,
    },
    Input {
        node: usize,
        inc: u64,
        input: Input,
    },
    Local {
        node: usize,
        inc: u64,
        request: LocalRequest,
    },
    Reelect,
    /// Heal every cut; every live server then follows `leader` at the
    /// current term, as Fast Bully's epochs let a cut-off leader of the
    /// same term and a higher rank take over without a new term.
    HealFollowing {
        leader: usize,
    },
    DetectorTick,
    /// The end of a batch of inputs begun at `node` (see `Sim::input_now`).
    EndBatch {
        node: usize,
        inc: u64,
    },
}

struct Asked {
    node: usize,
    inc: u64,
    at: Duration,
    request: LocalRequest,
}

type LossFilter = Box<dyn FnMut(usize, usize, &RegistryMessage) -> bool>;

/// N registries, a message queue with random delays, crashes, partitions
/// and elections driven by the test.
struct Sim {
    seed: u64,
    rng: StdRng,
    base: Instant,
    now: Duration,
    cfg: RegistryConfig,
    nodes: Vec<Option<Registry>>,
    incs: Vec<u64>,
    heap: BinaryHeap<Reverse<(Duration, u64)>>,
    events: HashMap<u64, Event>,
    next_event: u64,
    cut: BTreeSet<(usize, usize)>,
    /// One-way cuts: messages from `.0` to `.1` are lost (`.1` does not
    /// hear `.0`, which may still hear `.1`).
    oneway: BTreeSet<(usize, usize)>,
    /// Elections may be anything (random leaders told to random subsets):
    /// the registry's safety must not depend on the election, but its
    /// convergence does, so the grace-period check is off meanwhile.
    wild: bool,
    /// When each pair last (re)connected: heal or restart.
    since: Vec<Vec<Duration>>,
    /// What each server's failure detector currently reports for each peer.
    believed: Vec<Vec<bool>>,
    /// Since when the truth differs from what the detector reports.
    differs_since: Vec<Vec<Option<Duration>>>,
    term: u64,
    delay_ms: (u64, u64),
    next_token: u64,
    asked: BTreeMap<u64, Asked>,
    replies: BTreeMap<u64, (Duration, Result<(), Refusal>)>,
    evictions: Vec<(usize, Vec<String>, Vec<String>)>,
    logs: Vec<(usize, LogEvent)>,
    /// Extra delay of every message to each server (a slow link).
    slow_to: Vec<Duration>,
    /// Extra delay of every message from each server.
    slow_from: Vec<Duration>,
    /// When two grants of one name were first seen held by servers that
    /// can talk.
    conflicts: HashMap<(NameKey, Stamp, Stamp), Duration>,
    /// Emulate the chat layer: clients routed by a granted move arrive
    /// at the target (mostly), rooms of evicted owners are deleted.
    chat: bool,
    lose: Option<LossFilter>,
    /// Which servers are in a batch of inputs (`Registry::begin_batch`),
    /// as the runtime makes them; decided by `batch_rng`, a stream of its
    /// own so that the rest of a seed's run keeps its choices.
    batching: Vec<bool>,
    batch_rng: StdRng,
}

impl Sim {
    fn new(n: usize, seed: u64, require_majority: bool) -> Sim {
        Sim::with_config(n, seed, test_config(require_majority))
    }

    fn with_config(n: usize, seed: u64, cfg: RegistryConfig) -> Sim {
        eprintln!("seed {seed}");
        let ids: Vec<ServerId> = (0..n).map(sid).collect();
        let mut sim = Sim {
            seed,
            rng: StdRng::seed_from_u64(seed),
            base: Instant::now(),
            now: Duration::ZERO,
            cfg: cfg.clone(),
            nodes: (0..n)
                .map(|i| Some(Registry::new(sid(i), ids.clone(), cfg.clone(), 1)))
                .collect(),
            incs: vec![1; n],
            heap: BinaryHeap::new(),
            events: HashMap::new(),
            next_event: 0,
            cut: BTreeSet::new(),
            oneway: BTreeSet::new(),
            wild: false,
            since: vec![vec![Duration::ZERO; n]; n],
            believed: vec![vec![true; n]; n],
            differs_since: vec![vec![None; n]; n],
            term: 1,
            delay_ms: (1, 10),
            next_token: 1,
            asked: BTreeMap::new(),
            replies: BTreeMap::new(),
            evictions: Vec::new(),
            logs: Vec::new(),
            slow_to: vec![Duration::ZERO; n],
            slow_from: vec![Duration::ZERO; n],
            conflicts: HashMap::new(),
            chat: false,
            lose: None,
            batching: vec![false; n],
            batch_rng: StdRng::seed_from_u64(seed ^ 0xba7c),
        };
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    sim.input_now(i, Input::PeerUp(sid(j)));
                }
            }
        }
        for i in 0..n {
            let input = Input::LeaderChanged {
                leader: Some(sid(n - 1)),
                term: 1,
            };
            sim.input_now(i, input);
        }
        sim.schedule(DETECTOR_TICK, Event::DetectorTick);
        sim.run_for(ms(50));
        sim
    }

    /// A failure detector per server, driven by the real topology: a
    /// peer is declared down after `DETECT` without contact and up
    /// `UP_DELAY` after contact resumes.
    fn detector_tick(&mut self) {
        for i in self.alive() {
            for j in 0..self.n() {
                if i == j {
                    continue;
                }
                let truth = self.nodes[j].is_some() && !self.blocked(j, i);
                if truth == self.believed[i][j] {
                    self.differs_since[i][j] = None;
                    continue;
                }
                let start = *self.differs_since[i][j].get_or_insert(self.now);
                let needed = if truth { UP_DELAY } else { DETECT };
                if self.now >= start + needed {
                    self.believed[i][j] = truth;
                    self.differs_since[i][j] = None;
                    let input = if truth {
                        Input::PeerUp(sid(j))
                    } else {
                        Input::PeerDown(sid(j))
                    };
                    self.input_now(i, input);
                }
            }
        }
        self.schedule(DETECTOR_TICK, Event::DetectorTick);
    }

    fn n(&self) -> usize {
        self.nodes.len()
    }

    fn node(&self, i: usize) -> &Registry {
        self.nodes[i].as_ref().expect("node is alive")
    }

    fn alive(&self) -> Vec<usize> {
        (0..self.n()).filter(|i| self.nodes[*i].is_some()).collect()
    }

    fn is_cut(&self, a: usize, b: usize) -> bool {
        self.cut.contains(&(a.min(b), a.max(b)))
    }

    /// Whether messages from `from` to `to` are lost.
    fn blocked(&self, from: usize, to: usize) -> bool {
        self.is_cut(from, to) || self.oneway.contains(&(from, to))
    }

    /// Whether `a` and `b` hear each other.
    fn can_talk(&self, a: usize, b: usize) -> bool {
        !self.blocked(a, b) && !self.blocked(b, a)
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.heap.push(Reverse((self.now + after, id)));
        self.events.insert(id, event);
    }

    fn input_now(&mut self, node: usize, input: Input) {
        let now = self.base + self.now;
        let Some(reg) = self.nodes[node].as_mut() else {
            return;
        };
        let trace = std::env::var_os("SIM_TRACE").is_some();
        if trace {
            eprintln!("{:?} {} <- {input:?}", self.now, sid(node));
        }
        // Like the runtime, which hands the registry whatever queued up
        // meanwhile as one batch: a third of the inputs start one, which
        // ends up to 5 ms later.
        if !self.batching[node] && self.batch_rng.random_bool(0.3) {
            reg.begin_batch();
            self.batching[node] = true;
            let after = ms(self.batch_rng.random_range(0..=5));
            let inc = self.incs[node];
            self.schedule(after, Event::EndBatch { node, inc });
        }
        let Some(reg) = self.nodes[node].as_mut() else {
            return;
        };
        let actions = reg.handle(now, input);
        if trace {
            for a in &actions {
                if !matches!(a, Action::SetTimer { .. }) {
                    eprintln!("{:?} {} -> {a:?}", self.now, sid(node));
                }
            }
        }
        self.process(node, actions);
    }

    /// Tells `node`, after `after`, that `leader` leads at `term`.
    fn tell_leader(&mut self, node: usize, leader: usize, term: u64, after: Duration) {
        let input = Input::LeaderChanged {
            leader: Some(sid(leader)),
            term,
        };
        self.input_later(node, after, input);
    }

    fn input_later(&mut self, node: usize, after: Duration, input: Input) {
        let inc = self.incs[node];
        self.schedule(after, Event::Input { node, inc, input });
    }

    fn transmit(&mut self, from: usize, to: usize, msg: &RegistryMessage) {
        if self.blocked(from, to) {
            return;
        }
        if let Some(lose) = self.lose.as_mut()
            && lose(from, to, msg)
        {
            return;
        }
        let bytes = postcard::to_stdvec(msg).expect("messages encode");
        let delay = ms(self.rng.random_range(self.delay_ms.0..=self.delay_ms.1))
            + self.slow_to[to]
            + self.slow_from[from];
        let to_inc = self.incs[to];
        self.schedule(
            delay,
            Event::Deliver {
                from,
                to,
                to_inc,
                bytes,
            },
        );
    }

    fn process(&mut self, node: usize, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send { to, msg } => {
                    let to = (0..self.n()).find(|j| sid(*j) == to).expect("known peer");
                    assert_ne!(to, node, "seed {}: a send to itself", self.seed);
                    self.transmit(node, to, &msg);
                }
                Action::Broadcast { msg } => {
                    for to in 0..self.n() {
                        if to != node {
                            self.transmit(node, to, &msg);
                        }
                    }
                }
                Action::Reply { token, result } => self.on_reply(node, token, result),
                Action::SetTimer { timer, after } => {
                    let inc = self.incs[node];
                    self.schedule(after, Event::Timer { node, inc, timer });
                }
                Action::EvictLocal { identities, rooms } => {
                    if self.chat {
                        // Quitting clients take their rooms with them.
                        let owned: Vec<String> = self
                            .node(node)
                            .own
                            .rooms
                            .values()
                            .filter(|r| identities.contains(&r.owner))
                            .map(|r| r.room.clone())
                            .collect();
                        for r in owned {
                            let inc = self.incs[node];
                            let request = LocalRequest::Release(vec![room(&r, "Nobody")]);
                            self.schedule(Duration::ZERO, Event::Local { node, inc, request });
                        }
                    }
                    self.evictions.push((node, identities, rooms));
                }
                Action::Log(event) => self.logs.push((node, event)),
            }
        }
    }

    fn on_reply(&mut self, node: usize, token: u64, result: Result<(), Refusal>) {
        let seed = self.seed;
        assert!(
            !self.replies.contains_key(&token),
            "seed {seed}: token {token} answered twice"
        );
        let asked = self.asked.get(&token).expect("reply to a known token");
        assert_eq!(asked.node, node, "seed {seed}: reply on the wrong server");
        let waited = self.now - asked.at;
        assert!(
            waited <= self.cfg.claim_timeout,
            "seed {seed}: token {token} waited {waited:?}"
        );
        if let (LocalRequest::Claim(name), Ok(())) = (&asked.request, &result) {
            for (other, _) in self.holdings().remove(&name.key()).unwrap_or_default() {
                assert!(
                    other == node || !self.stable(node, other),
                    "seed {seed}: at {:?} {name} granted to {} while {} holds it",
                    self.now,
                    sid(node),
                    sid(other)
                );
            }
        }
        let asked = self.asked.get(&token).expect("reply to a known token");
        if self.chat
            && result.is_ok()
            && let LocalRequest::StartMove {
                identity,
                to,
                proof,
            } = &asked.request
            && self.rng.random_bool(0.7)
        {
            let to = (0..self.n()).find(|j| sid(*j) == *to).expect("known");
            let inc = self.incs[to];
            // The real client arrives, with its token or (half the names)
            // without one from the same address, as a classic client does.
            let token = (identity.len() % 2 == 0).then(|| proof.token.clone());
            let request = LocalRequest::AcceptMove {
                identity: identity.clone(),
                arrival: Arrival {
                    token,
                    ip: proof.ip,
                },
            };
            let after = ms(self.rng.random_range(5..=40));
            self.schedule(
                after,
                Event::Local {
                    node: to,
                    inc,
                    request,
                },
            );
        }
        self.replies.insert(token, (self.now, result));
    }

    fn local(&mut self, node: usize, request: LocalRequest) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        self.asked.insert(
            token,
            Asked {
                node,
                inc: self.incs[node],
                at: self.now,
                request: request.clone(),
            },
        );
        self.input_now(node, Input::Local { token, request });
        token
    }

    fn claim(&mut self, node: usize, name: Name) -> u64 {
        self.local(node, LocalRequest::Claim(name))
    }

    fn result(&self, token: u64) -> Option<&Result<(), Refusal>> {
        self.replies.get(&token).map(|(_, r)| r)
    }

    fn step(&mut self) -> bool {
        let Some(Reverse((at, id))) = self.heap.pop() else {
            return false;
        };
        let Some(event) = self.events.remove(&id) else {
            return true;
        };
        assert!(at >= self.now, "seed {}: time went back", self.seed);
        self.now = at;
        match event {
            Event::Deliver {
                from,
                to,
                to_inc,
                bytes,
            } => {
                if !self.blocked(from, to) && to_inc == self.incs[to] {
                    let msg: RegistryMessage =
                        postcard::from_bytes(&bytes).expect("messages decode");
                    self.input_now(
                        to,
                        Input::Message {
                            from: sid(from),
                            msg,
                        },
                    );
                }
            }
            Event::Timer { node, inc, timer } => {
                if inc == self.incs[node] {
                    self.input_now(node, Input::Timer(timer));
                }
            }
            Event::Input { node, inc, input } => {
                if inc == self.incs[node] {
                    self.input_now(node, input);
                }
            }
            Event::Local { node, inc, request } => {
                if inc == self.incs[node] && self.nodes[node].is_some() {
                    self.local(node, request);
                }
            }
            Event::Reelect => self.reelect(),
            Event::HealFollowing { leader } => {
                self.heal();
                if self.nodes[leader].is_some() {
                    let term = self.term;
                    for m in self.alive() {
                        let after = ms(self.rng.random_range(0..=20));
                        self.tell_leader(m, leader, term, after);
                    }
                }
            }
            Event::DetectorTick => self.detector_tick(),
            Event::EndBatch { node, inc } => {
                if inc == self.incs[node]
                    && let Some(reg) = self.nodes[node].as_mut()
                {
                    self.batching[node] = false;
                    let actions = reg.end_batch();
                    self.process(node, actions);
                }
            }
        }
        self.check();
        true
    }

    /// Runs until `token` is answered (at most the claim timeout) and
    /// returns the answer.
    fn answer(&mut self, token: u64) -> Result<(), Refusal> {
        let until = self.now + self.cfg.claim_timeout;
        while self.result(token).is_none() && self.now <= until && self.step() {}
        let seed = self.seed;
        self.result(token)
            .cloned()
            .unwrap_or_else(|| panic!("seed {seed}: token {token} never answered"))
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(Reverse((at, _))) = self.heap.peek() {
            if *at > end {
                break;
            }
            self.step();
        }
        self.now = end;
    }

    /// Whether `a` and `b` can talk and have for longer than the grace
    /// period (a heal or restart restarts the clock).
    fn stable(&self, a: usize, b: usize) -> bool {
        self.can_talk(a, b) && self.now >= self.since[a][b] + GRACE
    }

    /// Who holds what (moving identities are reserved, not held).
    fn holdings(&self) -> BTreeMap<NameKey, Vec<(usize, Stamp)>> {
        let mut holders: BTreeMap<NameKey, Vec<(usize, Stamp)>> = BTreeMap::new();
        for i in self.alive() {
            let reg = self.node(i);
            for e in reg.own.identities.values() {
                if e.moving_to.is_none() {
                    let key = NameKey::Identity(e.identity.clone());
                    holders.entry(key).or_default().push((i, e.stamp.clone()));
                }
            }
            for r in reg.own.rooms.values() {
                let key = NameKey::Room(r.room.clone());
                holders.entry(key).or_default().push((i, r.stamp.clone()));
            }
        }
        holders
    }

    /// Invariants after every event, between servers that can talk:
    /// one grant is never held twice, and two grants of one name (the
    /// two sides of a healed partition) are resolved within the grace
    /// period of first meeting in a group that can decide: under the
    /// majority quorum, one with a majority (a leader elected in a minority
    /// cannot build its registry, so nothing resolves conflicts there; a
    /// leader that lost its majority after its base may still evict, which
    /// this does not count on). (That no new name is granted while a
    /// connected server holds it is checked on every grant.)
    fn check(&mut self) {
        for (key, hs) in self.holdings() {
            for (x, (a, sa)) in hs.iter().enumerate() {
                for (b, sb) in &hs[x + 1..] {
                    if !self.can_talk(*a, *b) {
                        continue;
                    }
                    let (seed, now) = (self.seed, self.now);
                    let (na, nb) = (sid(*a), sid(*b));
                    assert_ne!(
                        sa, sb,
                        "seed {seed}: at {now:?} one grant of {key:?} held by {na} and {nb}"
                    );
                    let pair = (
                        key.clone(),
                        sa.clone().min(sb.clone()),
                        sa.clone().max(sb.clone()),
                    );
                    // The clock restarts when the two reconnect after a
                    // cut: convergence needs them in one group, and under
                    // the majority quorum that group must be a majority.
                    // (The duplicate grant assertion above holds anywhere.)
                    if self.cfg.require_majority && !self.in_majority(*a) {
                        self.conflicts.insert(pair, now);
                        continue;
                    }
                    let first = *self.conflicts.entry(pair).or_insert(now);
                    let since = first.max(self.since[*a][*b]);
                    assert!(
                        self.wild || now < since + GRACE,
                        "seed {seed}: at {now:?} {key:?} held by {na} and {nb} since {since:?}"
                    );
                }
            }
        }
    }

    /// Whether `node` is in a group of more than half the servers.
    fn in_majority(&self, node: usize) -> bool {
        let group = self.components().into_iter().find(|c| c.contains(&node));
        group.is_some_and(|g| g.len() > self.n() / 2)
    }

    fn crash(&mut self, node: usize) {
        self.nodes[node] = None;
        self.incs[node] += 1;
        self.batching[node] = false;
    }

    fn restart(&mut self, node: usize) {
        let ids: Vec<ServerId> = (0..self.n()).map(sid).collect();
        self.incs[node] += 1;
        self.batching[node] = false;
        let inc = self.incs[node];
        self.nodes[node] = Some(Registry::new(sid(node), ids, self.cfg.clone(), inc));
        for j in 0..self.n() {
            self.since[node][j] = self.now;
            self.since[j][node] = self.now;
            // A new process starts with every peer down.
            self.believed[node][j] = false;
            self.differs_since[node][j] = None;
        }
    }

    fn partition(&mut self, groups: &[Vec<usize>]) {
        let group_of = |i: usize| groups.iter().position(|g| g.contains(&i));
        for a in 0..self.n() {
            for b in a + 1..self.n() {
                if group_of(a) != group_of(b) {
                    self.cut.insert((a, b));
                }
            }
        }
    }

    fn heal(&mut self) {
        let oneway = std::mem::take(&mut self.oneway);
        for (a, b) in std::mem::take(&mut self.cut).into_iter().chain(oneway) {
            self.since[a][b] = self.now;
            self.since[b][a] = self.now;
        }
    }

    /// Servers in `to` stop hearing servers in `from` (not the reverse).
    fn cut_oneway(&mut self, from: &[usize], to: &[usize]) {
        for a in from {
            for b in to {
                if a != b {
                    self.oneway.insert((*a, *b));
                }
            }
        }
    }

    /// An election gone wrong: a random live server announces itself at a
    /// new term to a random subset of the servers that can hear it, as
    /// asymmetric links, lost Coordinators and flaps can make Fast Bully do.
    fn wild_elect(&mut self) {
        let alive = self.alive();
        let leader = alive[self.rng.random_range(0..alive.len())];
        self.term += 1;
        let term = self.term;
        for m in alive {
            if m != leader && (self.blocked(leader, m) || self.rng.random_bool(0.3)) {
                continue;
            }
            let after = ms(self.rng.random_range(0..=20));
            self.tell_leader(m, leader, term, after);
        }
    }

    fn components(&self) -> Vec<Vec<usize>> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for start in self.alive() {
            if !seen.insert(start) {
                continue;
            }
            let mut comp = vec![start];
            let mut stack = vec![start];
            while let Some(a) = stack.pop() {
                for b in self.alive() {
                    if self.can_talk(a, b) && seen.insert(b) {
                        comp.push(b);
                        stack.push(b);
                    }
                }
            }
            comp.sort_unstable();
            out.push(comp);
        }
        out
    }

    /// What Fast Bully would settle on: a new term, led by the highest
    /// live server of the group; members learn it at slightly different times.
    fn elect(&mut self, leader: usize, members: &[usize]) {
        self.term += 1;
        for m in members {
            let after = ms(self.rng.random_range(0..=20));
            self.tell_leader(*m, leader, self.term, after);
        }
    }

    /// Every group elects its highest server, all at one new term (as
    /// split groups can); sometimes a lower-ranked server announces the
    /// same term first, and members hear the two in either order.
    fn reelect(&mut self) {
        self.term += 1;
        let term = self.term;
        for comp in self.components() {
            let Some(&leader) = comp.last() else {
                continue;
            };
            let mut leaders = vec![leader];
            if comp.len() > 1 && self.rng.random_bool(0.3) {
                leaders.insert(0, comp[comp.len() - 2]);
            }
            for l in leaders {
                for m in &comp {
                    let after = ms(self.rng.random_range(0..=20));
                    self.tell_leader(*m, l, term, after);
                }
            }
        }
    }

    fn leader_index(&self) -> usize {
        let leaders: Vec<usize> = self
            .alive()
            .into_iter()
            .filter(|i| self.node(*i).is_leader())
            .collect();
        assert_eq!(leaders.len(), 1, "seed {}: leaders {leaders:?}", self.seed);
        leaders[0]
    }

    /// After a quiet period with everything connected: the leader's
    /// registry is exactly what the servers hold, and every server's
    /// view equals it.
    fn assert_converged(&self) {
        let seed = self.seed;
        for i in self.alive() {
            let r = self.node(i);
            eprintln!(
                "{}: leader {:?} term {} fence {:?} last_seq {:?} announced {} live {:?} leading {}",
                r.id,
                r.leader,
                r.term,
                r.fence,
                r.last_seq,
                r.announced,
                r.live,
                r.leading.is_some()
            );
        }
        assert_eq!(self.components().len(), 1, "seed {seed}: still partitioned");
        let leader = self.leader_index();
        let lead = self.node(leader).leading.as_ref().expect("leads");
        let mut identities = BTreeMap::new();
        let mut rooms = BTreeMap::new();
        for i in self.alive() {
            let reg = self.node(i);
            assert!(
                reg.pending.is_empty(),
                "seed {seed}: {} still has pending requests {:?}",
                sid(i),
                reg.pending
            );
            for e in reg.own.identities.values() {
                let dup = identities.insert(e.identity.clone(), e.clone());
                assert!(
                    dup.is_none(),
                    "seed {seed}: identity {} held twice",
                    e.identity
                );
            }
            for r in reg.own.rooms.values() {
                let dup = rooms.insert(r.room.clone(), r.clone());
                assert!(dup.is_none(), "seed {seed}: room {} held twice", r.room);
            }
        }
        assert_eq!(
            lead.registry.identities, identities,
            "seed {seed}: leader registry vs holdings"
        );
        assert_eq!(
            lead.registry.rooms, rooms,
            "seed {seed}: leader rooms vs holdings"
        );
        for i in self.alive() {
            let reg = self.node(i);
            let mut view_ids = reg.replica.identities.clone();
            view_ids.extend(reg.own.identities.clone());
            let mut view_rooms = reg.replica.rooms.clone();
            view_rooms.extend(reg.own.rooms.clone());
            assert_eq!(view_ids, identities, "seed {seed}: view of {}", sid(i));
            assert_eq!(view_rooms, rooms, "seed {seed}: rooms view of {}", sid(i));
            assert!(!reg.replica.identities.values().any(|e| e.server == reg.id));
            assert!(
                reg.marks.keys().all(|k| reg.own_has(k)),
                "seed {seed}: stale marks"
            );
        }
    }

    fn holders(&self, name: &Name) -> Vec<usize> {
        self.alive()
            .into_iter()
            .filter(|i| self.node(*i).holds(name))
            .collect()
    }
}

// ----- helpers for hand-fed registries ----------------------------------

fn answers(actions: &[Action]) -> Vec<(ServerId, u64, Verdict)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                to,
                msg: RegistryMessage::Answer { id, verdict, .. },
            } => Some((to.clone(), *id, verdict.clone())),
            _ => None,
        })
        .collect()
}

fn replies(actions: &[Action]) -> Vec<(u64, Result<(), Refusal>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply { token, result } => Some((*token, result.clone())),
            _ => None,
        })
        .collect()
}

fn announces(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| {
            matches!(
                a,
                Action::Broadcast {
                    msg: RegistryMessage::Announce { .. }
                }
            )
        })
        .count()
}

fn empty_report(incarnation: u64) -> HoldingsReport {
    HoldingsReport {
        incarnation,
        version: 1,
        issued_below: 1,
        identities: vec![],
        rooms: vec![],
        pending: vec![],
        ..Default::default()
    }
}

/// A request from a server that sees nobody down.
fn request(term: u64, incarnation: u64, id: u64, resolved_below: u64, op: Op) -> RegistryMessage {
    RegistryMessage::Request {
        term,
        ticket: Ticket {
            incarnation,
            id,
            resolved_below,
        },
        op,
        down: vec![],
    }
}

/// `request`, from a server that sees `servers` down.
fn seeing_down(mut request: RegistryMessage, servers: &[&str]) -> RegistryMessage {
    if let RegistryMessage::Request { down, .. } = &mut request {
        *down = servers.iter().map(|s| s.to_string()).collect();
    }
    request
}

/// A release of the identity `name` as the leader `reg` has it registered
/// (its grant's stamp), or of a grant nobody holds if it has none.
fn release_of(reg: &Registry, name: &str) -> Op {
    let stamp = reg
        .leading
        .as_ref()
        .and_then(|lead| lead.registry.identities.get(name))
        .map(|e| e.stamp.clone())
        .unwrap_or(Stamp {
            term: 0,
            seq: 0,
            leader: "nobody".into(),
        });
    Op::Release(vec![Given {
        name: ident(name),
        stamp,
    }])
}

fn msg(from: &str, msg: RegistryMessage) -> Input {
    Input::Message {
        from: from.to_string(),
        msg,
    }
}

/// s3 leading s1, s2 (term 1), with both followers' (empty) holdings merged.
fn hand_leader(servers: usize, require_majority: bool) -> (Registry, Instant) {
    let now = Instant::now();
    let ids: Vec<ServerId> = (0..servers).map(sid).collect();
    let me = sid(servers - 1);
    let mut reg = Registry::new(me.clone(), ids.clone(), test_config(require_majority), 1);
    for peer in &ids[..servers - 1] {
        reg.handle(now, Input::PeerUp(peer.clone()));
    }
    reg.handle(
        now,
        Input::LeaderChanged {
            leader: Some(me),
            term: 1,
        },
    );
    for peer in &ids[..servers - 1] {
        reg.handle(
            now,
            msg(
                peer,
                RegistryMessage::Holdings {
                    term: 1,
                    report: empty_report(1),
                },
            ),
        );
    }
    ack_all(&mut reg, now);
    assert!(!reg.blocked(reg.leading.as_ref().expect("leads"), now));
    (reg, now)
}

/// Every follower of hand-fed leader `reg` acknowledges everything it
/// announced; returns what that released (answers held for the commit).
fn ack_all(reg: &mut Registry, now: Instant) -> Vec<Action> {
    let seq = reg.leading.as_ref().expect("leads").seq;
    let me = reg.id.clone();
    let mut out = Vec::new();
    for peer in reg.servers.clone() {
        if peer != me {
            out.extend(reg.handle(
                now,
                msg(
                    &peer,
                    RegistryMessage::Ack {
                        term: reg.term,
                        seq,
                    },
                ),
            ));
        }
    }
    out
}

mod chaos;
mod safety;
mod unit;
