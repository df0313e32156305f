//! The fault schedule: a fixed list of steps drawn from the seed before the
//! run. Only "the leader" is looked up while running (from `/status`); the
//! rest of each step (durations, which other nodes) is in the list.

use std::fmt;

/// SplitMix64: tiny, and the same sequence on every platform and crate version.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with `percent` % probability.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// `k` distinct node indices of `0..n`, sorted.
    pub fn nodes(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + self.below((n - i) as u64) as usize;
            all.swap(i, j);
        }
        let mut picked = all[..k].to_vec();
        picked.sort_unstable();
        picked
    }
}

/// A server named by the schedule.
#[derive(Clone, Debug)]
pub enum Who {
    Node(usize),
    /// The current leader (or `else_node` if no leader is known).
    Leader {
        else_node: usize,
    },
    /// The node `offset` places after the current leader (mod n).
    AfterLeader {
        offset: usize,
        else_node: usize,
    },
}

/// The smaller side of a split.
#[derive(Clone, Debug)]
pub enum Minority {
    Nodes(Vec<usize>),
    /// The current leader and the node `offset` after it: a leader cut off
    /// with a follower is the case most likely to grant on both sides.
    LeaderAnd {
        offset: usize,
        else_nodes: Vec<usize>,
    },
}

/// One fault.
#[derive(Clone, Debug)]
pub enum Fault {
    /// A symmetric partition minority | rest, optionally with random loss on
    /// every mesh port, for the step's hold time.
    Split { minority: Minority, loss: u8 },
    /// Partitions straight after one another, each for its own time, then healed.
    Flap { splits: Vec<(Minority, u64)> },
    /// `deaf` drops every mesh datagram from `from`; `from` still hears `deaf`.
    OneWay { deaf: Who, from: Who },
    /// `kill -9`, restarted after `down_ms`.
    Kill { who: Who, down_ms: u64 },
    /// Random loss of this percentage on every node's arriving mesh datagrams.
    Loss { percent: u8 },
    /// A non-transitive partition: only the pairs named are cut (both ways),
    /// everyone else still talks, so the two ends of a cut both reach the
    /// servers in between.
    Cut { shape: CutShape },
    /// Every link into (`deaf`) or out of (`!deaf`) the leader cut one way:
    /// a leader that sends but hears nothing, or hears but is not heard.
    LeaderOneWay { deaf: bool },
    /// SIGSTOP for `paused_ms`, then SIGCONT: a zombie that wakes up.
    Pause { who: Who, paused_ms: u64 },
    /// `kill -9` and an immediate restart with the same id.
    Restart { who: Who },
    /// Splits shorter than the failure timeout, each followed by a whole
    /// network as short, over and over for the step's hold time.
    Flutter {
        minority: Minority,
        cut_ms: u64,
        whole_ms: u64,
    },
}

/// Which pairs a [`Fault::Cut`] cuts.
#[derive(Clone, Debug)]
pub enum CutShape {
    /// The leader and one follower (`offset` after it).
    LeaderFromOne { offset: usize },
    /// Two followers (`offsets` after the leader): the leader hears both.
    TwoFollowers { offsets: (usize, usize) },
    /// The leader from every follower but one (`keep` after it): the others
    /// are a majority without the leader, the kept one talks to both sides.
    LeaderFromAllBut { keep: usize },
}

impl Fault {
    /// The kind's name, as `CHATMESH_FAULT_KINDS` lists them.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Split { .. } => "split",
            Fault::Flap { .. } => "flap",
            Fault::OneWay { .. } => "oneway",
            Fault::Kill { .. } => "kill",
            Fault::Loss { .. } => "loss",
            Fault::Cut { .. } => "cut",
            Fault::LeaderOneWay { .. } => "leaderoneway",
            Fault::Pause { .. } => "pause",
            Fault::Restart { .. } => "restart",
            Fault::Flutter { .. } => "flutter",
        }
    }
}

/// Every kind of fault.
pub const KINDS: [&str; 10] = [
    "split",
    "flap",
    "oneway",
    "kill",
    "loss",
    "cut",
    "leaderoneway",
    "pause",
    "restart",
    "flutter",
];

/// A fault held for `hold_ms` (where it has a hold), then undone, then
/// `pause_ms` of a whole network.
#[derive(Clone, Debug)]
pub struct Step {
    pub fault: Fault,
    pub hold_ms: u64,
    pub pause_ms: u64,
}

/// How many steps to draw: more than any run gets through (the runner stops
/// at its time budget).
const STEPS: usize = 400;

/// The schedule of seed `seed` for a cluster of `n` nodes.
pub fn schedule(seed: u64, n: usize) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let mut steps = Vec::with_capacity(STEPS);
    for _ in 0..STEPS {
        let roll = rng.below(100);
        let (fault, hold_ms) = match roll {
            0..=16 => {
                let minority = minority(&mut rng, n);
                let loss = if rng.chance(25) {
                    rng.between(5, 15) as u8
                } else {
                    0
                };
                (Fault::Split { minority, loss }, rng.between(1500, 6000))
            }
            17..=26 => {
                let count = rng.between(3, 6);
                let splits = (0..count)
                    .map(|_| (minority(&mut rng, n), rng.between(200, 1500)))
                    .collect();
                (Fault::Flap { splits }, 0)
            }
            27..=36 => {
                let deaf = who(&mut rng, n);
                let from = who(&mut rng, n);
                (Fault::OneWay { deaf, from }, rng.between(1500, 5000))
            }
            37..=53 => {
                let who = if rng.chance(70) {
                    Who::Leader {
                        else_node: rng.below(n as u64) as usize,
                    }
                } else {
                    Who::Node(rng.below(n as u64) as usize)
                };
                let down_ms = rng.between(1500, 5000);
                (Fault::Kill { who, down_ms }, 0)
            }
            54..=62 => (
                Fault::Loss {
                    percent: rng.between(10, 25) as u8,
                },
                rng.between(2000, 8000),
            ),
            63..=74 => {
                let offset = |rng: &mut Rng| rng.between(1, n as u64 - 1) as usize;
                let shape = match rng.below(3) {
                    0 => CutShape::LeaderFromOne {
                        offset: offset(&mut rng),
                    },
                    1 => {
                        let a = offset(&mut rng);
                        let mut b = offset(&mut rng);
                        if b == a {
                            b = a % (n - 1) + 1;
                        }
                        CutShape::TwoFollowers { offsets: (a, b) }
                    }
                    _ => CutShape::LeaderFromAllBut {
                        keep: offset(&mut rng),
                    },
                };
                (Fault::Cut { shape }, rng.between(2000, 7000))
            }
            75..=82 => (
                Fault::LeaderOneWay {
                    deaf: rng.chance(50),
                },
                rng.between(1500, 5000),
            ),
            83..=91 => {
                let who = if rng.chance(70) {
                    Who::Leader {
                        else_node: rng.below(n as u64) as usize,
                    }
                } else {
                    Who::Node(rng.below(n as u64) as usize)
                };
                (
                    Fault::Pause {
                        who,
                        paused_ms: rng.between(2000, 10000),
                    },
                    0,
                )
            }
            92..=95 => (
                Fault::Restart {
                    who: Who::Leader {
                        else_node: rng.below(n as u64) as usize,
                    },
                },
                0,
            ),
            _ => (
                Fault::Flutter {
                    minority: minority(&mut rng, n),
                    cut_ms: rng.between(50, 250),
                    whole_ms: rng.between(80, 300),
                },
                rng.between(5000, 12000),
            ),
        };
        let pause_ms = if rng.chance(20) {
            0
        } else {
            rng.between(300, 3000)
        };
        steps.push(Step {
            fault,
            hold_ms,
            pause_ms,
        });
    }
    steps
}

fn minority(rng: &mut Rng, n: usize) -> Minority {
    let size = if rng.chance(25) { 1 } else { n / 2 };
    let else_nodes = rng.nodes(n, size);
    if size > 1 && rng.chance(50) {
        Minority::LeaderAnd {
            offset: rng.between(1, n as u64 - 1) as usize,
            else_nodes,
        }
    } else {
        Minority::Nodes(else_nodes)
    }
}

fn who(rng: &mut Rng, n: usize) -> Who {
    let else_node = rng.below(n as u64) as usize;
    match rng.below(3) {
        0 => Who::Leader { else_node },
        1 => Who::AfterLeader {
            offset: rng.between(1, n as u64 - 1) as usize,
            else_node,
        },
        _ => Who::Node(else_node),
    }
}

/// Names nodes as server ids: `{s1,s2}`.
pub struct Ids<'a>(pub &'a [usize]);

impl fmt::Display for Ids<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<String> = self.0.iter().map(|i| format!("s{}", i + 1)).collect();
        write!(f, "{{{}}}", ids.join(","))
    }
}

#[test]
fn every_kind_is_drawn_early_in_a_default_schedule() {
    // A default run gets through some 25-40 steps: each kind should have a
    // fair chance to be among them.
    for seed in [1, 11] {
        let steps = schedule(seed, 5);
        for kind in KINDS {
            assert!(
                steps[..100].iter().any(|s| s.fault.kind() == kind),
                "seed {seed}: no {kind} in the first 100 steps"
            );
        }
    }
}

#[test]
fn the_same_seed_draws_the_same_schedule() {
    let a = format!("{:?}", schedule(7, 5));
    let b = format!("{:?}", schedule(7, 5));
    assert_eq!(a, b);
    assert_ne!(a, format!("{:?}", schedule(8, 5)));
}
