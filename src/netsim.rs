//! A lossy network under quinn: an [`AsyncUdpSocket`] wrapper that drops, delays (with
//! jitter), duplicates and reorders datagrams, and cuts the link to chosen peers.
//!
//! The kernel we test on has no netem, so this layer is how chatmesh tests loss, delay and
//! partitions: in-process tests give every node an [`ImpairedSocket`], and
//! `chatmesh node --impair "loss=20%,delay=30ms,jitter=10ms,seed=7"` does the same for a real
//! process.
//!
//! # Pieces
//! - [`Impairment`]: everything the layer does, parsed from and printed as the CLI string.
//!   It holds a default [`LinkImpairment`] for every peer, per-peer overrides, the set of cut
//!   peers, the RNG seed and the delay-queue limit.
//! - [`ImpairedSocket`]: the socket quinn sees. Build it with [`bind`] (or
//!   [`ImpairedSocket::new`] around any inner socket).
//! - [`ImpairHandle`]: a cloneable remote control: change the impairment at run time, cut and
//!   heal peers, read the [`NetsimStats`] counters.
//!
//! # CLI syntax
//! Comma-separated `key=value` items; `none`, `off` or the empty string mean no impairment.
//!
//! | key | value | meaning |
//! | --- | --- | --- |
//! | `loss` | `20%` or `0.2` | independent (Bernoulli) loss per datagram |
//! | `burst` | `P_ENTER/P_EXIT[/BAD_LOSS]`, or `off` | Gilbert-Elliott bursty loss: per datagram, the link goes good->bad with `P_ENTER` and bad->good with `P_EXIT`; in the bad state a datagram is lost with `BAD_LOSS` (default 100%), in the good state never. Mean burst length is `1/P_EXIT` datagrams, mean loss `P_ENTER/(P_ENTER+P_EXIT)*BAD_LOSS`. Applied on top of `loss`. |
//! | `delay` | `30ms` (units `ns`, `us`, `ms`, `s`; `0` needs none) | base one-way delay |
//! | `jitter` | `10ms` | each copy is delayed uniformly in `[delay-jitter, delay+jitter]` (clamped at 0); reordering follows naturally |
//! | `dup` | `1%` | probability of sending a second copy (with its own delay draw) |
//! | `reorder` | `5%` | probability that a datagram is held back an extra `reorder_gap`, so later ones overtake it (works with zero delay) |
//! | `reorder_gap` | `10ms` (default) | how long a reordered datagram is held back |
//! | `dir` | `both` (default), `out`, `in` | which direction the link settings apply to |
//! | `cut` | `127.0.0.1:5001` (repeatable) | drop everything to and from that peer, both directions |
//! | `cut_out` | `127.0.0.1:5001` (repeatable) | one-way cut: drop only what this socket sends to that peer (the peer stops hearing us, we still hear it) |
//! | `cut_in` | `127.0.0.1:5001` (repeatable) | one-way cut: drop only what this socket receives from that peer (we stop hearing it, it still hears us) |
//! | `seed` | `7` | RNG seed; without it a random seed is drawn and logged |
//! | `queue` | `4096` (default) | most datagrams waiting in each delay queue; more are dropped and counted as `overflow` |
//!
//! Any link key (`loss`, `burst`, `delay`, `jitter`, `dup`, `reorder`, `reorder_gap`, `dir`)
//! may be given for one peer as `key@ADDR=value`, e.g. `loss=1%,loss@127.0.0.1:5002=50%`: the
//! override starts as a copy of the default link settings (whatever order the items come in)
//! and changes the keys given. [`Impairment`]'s `Display` prints this same form, so a parsed
//! impairment round-trips.
//!
//! # Directions
//! Outbound settings act in `try_send`, inbound ones in `poll_recv`, each with its own RNG
//! (both derived from the seed), so the draws of one direction do not depend on the traffic
//! of the other. With the default `dir=both`, every link setting acts independently on both
//! directions of this socket. When *every* node of a test is impaired, a datagram passes the
//! sender's outbound and the receiver's inbound stage, so loss compounds
//! (`1-(1-p)^2`) and delays add up: use `dir=out` on every node to get exactly the
//! configured figures per one-way link. `cut` acts on both directions whatever `dir` says;
//! `cut_out` and `cut_in` act on one ([`ImpairHandle::cut_dir`] does the same at run time):
//! "s5 does not hear s1, s1 hears s5" is `cut_out=<s5>` on s1, or `cut_in=<s1>` on s5. There is one
//! set of link settings per peer, so to give the two directions of a link different figures,
//! impair each end with `dir=out` and its own figures.
//!
//! # GSO and GRO
//! [`ImpairedSocket`] reports the inner socket's segment limits, so quinn batches exactly as
//! in production. When an impairment is active, a GSO batch (a [`Transmit`] with
//! `segment_size`) is split and every datagram gets its own fate; a GRO buffer on receive is
//! split by `stride` the same way, and the surviving datagrams are packed back together. If
//! the inner socket reports `WouldBlock` before any datagram of a batch went out, the error
//! is returned and quinn retries the whole batch; after that, a blocked datagram is dropped
//! and counted in `send_errors` (quinn recovers it like any other loss).
//!
//! # Cost when off
//! With no impairment configured, `try_send` and `poll_recv` do one atomic load and call the
//! inner socket directly: no lock, no copy, no counter. The counters therefore only cover
//! traffic that went through the impairment path.
//!
//! # Determinism and time
//! Given a seed, the sequence of fates per direction is fixed: the n-th datagram sent (after
//! GSO splitting) always gets the same decision. A batch the OS refuses with `WouldBlock`
//! before anything went out is undone (RNG and burst state restored), so quinn's retry
//! draws the same fates. Several connections sending at once interleave their draws in
//! scheduling order, and what a whole quinn connection does varies from run to run anyway,
//! since quinn's timing decides which packets exist. Delays use tokio's clock and timers (a paused tokio clock pauses them too), so a
//! socket must be created inside a tokio runtime for delays to apply (outside one, delays
//! are treated as zero).
//!
//! # Memory
//! Delayed datagrams wait in two bounded queues (`queue` datagrams each, a datagram is at
//! most 64 KiB); per-peer Gilbert-Elliott state is kept for at most [`MAX_TRACKED_PEERS`]
//! peers per direction.

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::fmt;
use std::future::poll_fn;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

/// Default limit of datagrams waiting in each delay queue (outbound and inbound).
///
/// Enough for a full congestion window of a fast loopback link at 100 ms of delay; a queue
/// that fills up means the test asked for more delay than its traffic can sit in.
pub const DEFAULT_QUEUE_LIMIT: usize = 4096;

/// Default time a datagram picked by `reorder` is held back.
pub const DEFAULT_REORDER_GAP: Duration = Duration::from_millis(10);

/// Largest `delay`, `jitter` or `reorder_gap` accepted.
///
/// Longer delays would only pile datagrams up in the queues and outlive any QUIC idle timeout.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// Most peers whose Gilbert-Elliott state is tracked per direction.
///
/// When a new peer would exceed it, all states restart in the good state; this keeps memory
/// bounded even if datagrams arrive from many spoofed addresses.
pub const MAX_TRACKED_PEERS: usize = 4096;

/// XOR-ed into the seed for the inbound RNG, so the two directions draw different sequences.
const INBOUND_SEED_SALT: u64 = 0x9E37_79B9_7F4A_7C15;

/// How many inner reads `poll_recv` does before yielding when everything it reads is dropped.
const MAX_RECV_ROUNDS: usize = 64;

/// How often the delayed sender retries a datagram the inner socket refused with `WouldBlock`.
const DELAYED_SEND_ATTEMPTS: usize = 3;

/// Bit of [`Shared::mode`]: an impairment is configured, outbound and inbound take the slow path.
const MODE_IMPAIRED: u8 = 1;
/// Bit of [`Shared::mode`]: delayed inbound datagrams are waiting, `poll_recv` must look at them.
const MODE_INBOUND_QUEUED: u8 = 2;

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

/// Which directions of a socket a [`LinkImpairment`] acts on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Outbound (in `try_send`) and inbound (in `poll_recv`), drawn independently.
    #[default]
    Both,
    /// Only datagrams this socket sends.
    Outbound,
    /// Only datagrams this socket receives.
    Inbound,
}

impl Direction {
    /// Whether this setting acts on datagrams moving `way`.
    fn covers(self, way: Way) -> bool {
        match self {
            Direction::Both => true,
            Direction::Outbound => way == Way::Out,
            Direction::Inbound => way == Way::In,
        }
    }

    /// The CLI spelling.
    fn as_str(self) -> &'static str {
        match self {
            Direction::Both => "both",
            Direction::Outbound => "out",
            Direction::Inbound => "in",
        }
    }
}

/// Gilbert-Elliott bursty loss: a two-state Markov chain stepped once per datagram.
///
/// The chain moves first, then the datagram is lost with the loss probability of the state
/// it is in: `bad_loss` in the bad state, none in the good state (use
/// [`LinkImpairment::loss`] for background loss). With `bad_loss = 1` losses come in runs of
/// mean length `1 / p_exit`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GilbertElliott {
    /// Probability of moving from the good to the bad state, per datagram.
    pub p_enter: f64,
    /// Probability of moving from the bad to the good state, per datagram.
    pub p_exit: f64,
    /// Probability that a datagram is lost while the link is in the bad state.
    pub bad_loss: f64,
}

impl GilbertElliott {
    /// A chain that loses every datagram in the bad state (the classic Gilbert model).
    pub fn new(p_enter: f64, p_exit: f64) -> Self {
        GilbertElliott {
            p_enter,
            p_exit,
            bad_loss: 1.0,
        }
    }

    /// Long-run fraction of datagrams this chain loses.
    pub fn mean_loss(&self) -> f64 {
        let total = self.p_enter + self.p_exit;
        if total <= 0.0 {
            return 0.0;
        }
        self.p_enter / total * self.bad_loss
    }

    /// Mean number of consecutive datagrams spent in the bad state.
    pub fn mean_burst_len(&self) -> f64 {
        if self.p_exit <= 0.0 {
            f64::INFINITY
        } else {
            1.0 / self.p_exit
        }
    }
}

/// What happens to the datagrams of one link (this socket and one peer address).
#[derive(Clone, Debug, PartialEq)]
pub struct LinkImpairment {
    /// Probability (0..=1) of losing a datagram, independently of the others.
    pub loss: f64,
    /// Optional bursty loss, applied on top of `loss`.
    pub burst: Option<GilbertElliott>,
    /// Base one-way delay.
    pub delay: Duration,
    /// Each copy's delay is uniform in `[delay - jitter, delay + jitter]`, clamped at zero.
    pub jitter: Duration,
    /// Probability (0..=1) of sending a second copy, which gets its own delay draw.
    pub dup: f64,
    /// Probability (0..=1) of holding a datagram back an extra `reorder_gap`.
    pub reorder: f64,
    /// How long a datagram picked by `reorder` is held back.
    pub reorder_gap: Duration,
    /// Which directions these settings act on.
    pub direction: Direction,
}

impl Default for LinkImpairment {
    fn default() -> Self {
        LinkImpairment {
            loss: 0.0,
            burst: None,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            dup: 0.0,
            reorder: 0.0,
            reorder_gap: DEFAULT_REORDER_GAP,
            direction: Direction::Both,
        }
    }
}

impl LinkImpairment {
    /// Whether these settings leave every datagram alone.
    pub fn is_none(&self) -> bool {
        self.loss <= 0.0
            && self.burst.is_none_or(|b| b.mean_loss() <= 0.0)
            && self.delay.is_zero()
            && self.jitter.is_zero()
            && self.dup <= 0.0
            && self.reorder <= 0.0
    }

    /// Checks ranges: probabilities in 0..=1, durations at most [`MAX_DELAY`].
    ///
    /// `scope` is `""` for the default link or `"@ADDR"` for an override, so the error names
    /// the key as it would be written on the command line.
    fn validate(&self, scope: &str) -> Result<(), ImpairmentError> {
        check_probability(&format!("loss{scope}"), self.loss)?;
        if let Some(b) = &self.burst {
            let key = format!("burst{scope}");
            check_probability(&key, b.p_enter)?;
            check_probability(&key, b.p_exit)?;
            check_probability(&key, b.bad_loss)?;
        }
        check_delay(&format!("delay{scope}"), self.delay)?;
        check_delay(&format!("jitter{scope}"), self.jitter)?;
        check_probability(&format!("dup{scope}"), self.dup)?;
        check_probability(&format!("reorder{scope}"), self.reorder)?;
        check_delay(&format!("reorder_gap{scope}"), self.reorder_gap)?;
        Ok(())
    }

    /// Sets one field from its CLI form.
    fn set_key(&mut self, key: &str, shown_key: &str, value: &str) -> Result<(), ImpairmentError> {
        match key {
            "loss" => self.loss = parse_probability(shown_key, value)?,
            "burst" => self.burst = parse_burst(shown_key, value)?,
            "delay" => self.delay = parse_duration(shown_key, value)?,
            "jitter" => self.jitter = parse_duration(shown_key, value)?,
            "dup" => self.dup = parse_probability(shown_key, value)?,
            "reorder" => self.reorder = parse_probability(shown_key, value)?,
            "reorder_gap" => self.reorder_gap = parse_duration(shown_key, value)?,
            "dir" => self.direction = parse_direction(shown_key, value)?,
            _ => {
                return Err(ImpairmentError::UnknownKey {
                    key: shown_key.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// The CLI items of every field that differs from `base`, each as `(key, value)`.
    fn diff_items(&self, base: &LinkImpairment) -> Vec<(&'static str, String)> {
        let mut items = Vec::new();
        if self.loss != base.loss {
            items.push(("loss", fmt_probability(self.loss)));
        }
        if self.burst != base.burst {
            items.push(("burst", fmt_burst(self.burst.as_ref())));
        }
        if self.delay != base.delay {
            items.push(("delay", fmt_duration(self.delay)));
        }
        if self.jitter != base.jitter {
            items.push(("jitter", fmt_duration(self.jitter)));
        }
        if self.dup != base.dup {
            items.push(("dup", fmt_probability(self.dup)));
        }
        if self.reorder != base.reorder {
            items.push(("reorder", fmt_probability(self.reorder)));
        }
        if self.reorder_gap != base.reorder_gap {
            items.push(("reorder_gap", fmt_duration(self.reorder_gap)));
        }
        if self.direction != base.direction {
            items.push(("dir", self.direction.as_str().to_owned()));
        }
        items
    }
}

/// Everything an [`ImpairedSocket`] does to its traffic; see the [module docs](self) for the
/// CLI form that [`FromStr`] parses and [`Display`](fmt::Display) prints.
#[derive(Clone, Debug, PartialEq)]
pub struct Impairment {
    /// Settings for every peer without an override.
    pub link: LinkImpairment,
    /// Per-peer settings that replace `link` for that peer address.
    pub peers: BTreeMap<SocketAddr, LinkImpairment>,
    /// Peers cut off: every datagram to or from them is dropped, in both directions.
    pub cut: BTreeSet<SocketAddr>,
    /// Peers this socket sends nothing to (one-way cut; what they send still arrives).
    pub cut_out: BTreeSet<SocketAddr>,
    /// Peers this socket hears nothing from (one-way cut; what it sends still leaves).
    pub cut_in: BTreeSet<SocketAddr>,
    /// RNG seed; `None` draws a random one when the socket is built (and logs it).
    pub seed: Option<u64>,
    /// Most datagrams waiting in each of the two delay queues.
    pub queue_limit: usize,
}

impl Default for Impairment {
    fn default() -> Self {
        Impairment {
            link: LinkImpairment::default(),
            peers: BTreeMap::new(),
            cut: BTreeSet::new(),
            cut_out: BTreeSet::new(),
            cut_in: BTreeSet::new(),
            seed: None,
            queue_limit: DEFAULT_QUEUE_LIMIT,
        }
    }
}

impl From<LinkImpairment> for Impairment {
    fn from(link: LinkImpairment) -> Self {
        Impairment {
            link,
            ..Impairment::default()
        }
    }
}

impl Impairment {
    /// No impairment at all: the socket takes its zero-cost fast path.
    pub fn none() -> Self {
        Impairment::default()
    }

    /// Parses the CLI form; the same as [`str::parse`].
    pub fn parse(s: &str) -> Result<Self, ImpairmentError> {
        s.parse()
    }

    /// The same impairment with a fixed seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Whether this leaves every datagram alone (seed and queue limit do not count).
    pub fn is_none(&self) -> bool {
        self.link.is_none()
            && self.cut.is_empty()
            && self.cut_out.is_empty()
            && self.cut_in.is_empty()
            && self.peers.values().all(|p| p.is_none())
    }

    /// Checks every value's range; errors name the key as written on the command line.
    pub fn validate(&self) -> Result<(), ImpairmentError> {
        self.link.validate("")?;
        for (addr, link) in &self.peers {
            link.validate(&format!("@{addr}"))?;
        }
        if self.queue_limit == 0 {
            return Err(ImpairmentError::BadValue {
                key: "queue".into(),
                value: "0".into(),
                reason: "the delay queue must hold at least one datagram".into(),
            });
        }
        Ok(())
    }

    /// Rewrites peer addresses to their canonical form, so an IPv4-mapped IPv6 address (what
    /// a dual-stack socket reports) matches the plain IPv4 address a test wrote.
    fn normalize(mut self) -> Self {
        self.peers = self
            .peers
            .into_iter()
            .map(|(addr, link)| (canonical(addr), link))
            .collect();
        self.cut = self.cut.into_iter().map(canonical).collect();
        self.cut_out = self.cut_out.into_iter().map(canonical).collect();
        self.cut_in = self.cut_in.into_iter().map(canonical).collect();
        self
    }

    /// The set of cut peers for cuts in direction `direction`.
    fn cuts_mut(&mut self, direction: Direction) -> &mut BTreeSet<SocketAddr> {
        match direction {
            Direction::Both => &mut self.cut,
            Direction::Outbound => &mut self.cut_out,
            Direction::Inbound => &mut self.cut_in,
        }
    }

    /// Whether datagrams moving `way` to or from `peer` are cut.
    fn is_cut(&self, way: Way, peer: &SocketAddr) -> bool {
        self.cut.contains(peer)
            || match way {
                Way::Out => self.cut_out.contains(peer),
                Way::In => self.cut_in.contains(peer),
            }
    }
}

/// The keys only valid for the whole socket, never per peer.
const GLOBAL_KEYS: [&str; 5] = ["cut", "cut_out", "cut_in", "seed", "queue"];
/// The keys of a [`LinkImpairment`].
const LINK_KEYS: [&str; 8] = [
    "loss",
    "burst",
    "delay",
    "jitter",
    "dup",
    "reorder",
    "reorder_gap",
    "dir",
];

impl FromStr for Impairment {
    type Err = ImpairmentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let mut imp = Impairment::default();
        if s.is_empty() || s.eq_ignore_ascii_case("none") || s.eq_ignore_ascii_case("off") {
            return Ok(imp);
        }
        let mut seen: HashSet<(String, Option<SocketAddr>)> = HashSet::new();
        // Overrides are applied after the defaults so that `loss@x=..` may come before `delay=..`.
        let mut overrides: Vec<(SocketAddr, String, String, String)> = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (raw_key, value) =
                item.split_once('=')
                    .ok_or_else(|| ImpairmentError::MissingValue {
                        item: item.to_owned(),
                    })?;
            let raw_key = raw_key.trim();
            let value = value.trim();
            let (key, peer) = match raw_key.split_once('@') {
                None => (raw_key.to_ascii_lowercase(), None),
                Some((key, addr)) => {
                    let addr: SocketAddr =
                        addr.trim().parse().map_err(|_| ImpairmentError::BadValue {
                            key: raw_key.to_owned(),
                            value: addr.trim().to_owned(),
                            reason: "expected a peer address like 127.0.0.1:5000 or [::1]:5000"
                                .into(),
                        })?;
                    (key.trim().to_ascii_lowercase(), Some(canonical(addr)))
                }
            };
            if !LINK_KEYS.contains(&key.as_str()) && !GLOBAL_KEYS.contains(&key.as_str()) {
                return Err(ImpairmentError::UnknownKey {
                    key: raw_key.to_owned(),
                });
            }
            // The cut keys are the ones that may repeat: one item per cut peer.
            let repeatable = matches!(key.as_str(), "cut" | "cut_out" | "cut_in");
            if !repeatable && !seen.insert((key.clone(), peer)) {
                return Err(ImpairmentError::DuplicateKey {
                    key: raw_key.to_owned(),
                });
            }
            match peer {
                Some(addr) => {
                    if GLOBAL_KEYS.contains(&key.as_str()) {
                        return Err(ImpairmentError::NotPerPeer { key });
                    }
                    overrides.push((addr, key, raw_key.to_owned(), value.to_owned()));
                }
                None => match key.as_str() {
                    "cut" | "cut_out" | "cut_in" => {
                        let addr: SocketAddr =
                            value.parse().map_err(|_| ImpairmentError::BadValue {
                                key: key.clone(),
                                value: value.to_owned(),
                                reason: "expected a peer address like 127.0.0.1:5000".into(),
                            })?;
                        let direction = match key.as_str() {
                            "cut_out" => Direction::Outbound,
                            "cut_in" => Direction::Inbound,
                            _ => Direction::Both,
                        };
                        imp.cuts_mut(direction).insert(canonical(addr));
                    }
                    "seed" => {
                        imp.seed = Some(value.parse().map_err(|_| ImpairmentError::BadValue {
                            key: key.clone(),
                            value: value.to_owned(),
                            reason: "expected an unsigned 64-bit integer".into(),
                        })?);
                    }
                    "queue" => {
                        imp.queue_limit = value.parse().map_err(|_| ImpairmentError::BadValue {
                            key: key.clone(),
                            value: value.to_owned(),
                            reason: "expected a number of datagrams".into(),
                        })?;
                    }
                    _ => imp.link.set_key(&key, &key, value)?,
                },
            }
        }
        for (addr, key, raw_key, value) in overrides {
            let base = imp.link.clone();
            imp.peers
                .entry(addr)
                .or_insert(base)
                .set_key(&key, &raw_key, &value)?;
        }
        imp.validate()?;
        Ok(imp)
    }
}

impl fmt::Display for Impairment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items: Vec<String> = self
            .link
            .diff_items(&LinkImpairment::default())
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for (addr, link) in &self.peers {
            let mut diff = link.diff_items(&self.link);
            if diff.is_empty() {
                // An override equal to the default still pins the peer's settings; keep it.
                diff.push(("loss", fmt_probability(link.loss)));
            }
            items.extend(diff.into_iter().map(|(k, v)| format!("{k}@{addr}={v}")));
        }
        items.extend(self.cut.iter().map(|addr| format!("cut={addr}")));
        items.extend(self.cut_out.iter().map(|addr| format!("cut_out={addr}")));
        items.extend(self.cut_in.iter().map(|addr| format!("cut_in={addr}")));
        if let Some(seed) = self.seed {
            items.push(format!("seed={seed}"));
        }
        if self.queue_limit != DEFAULT_QUEUE_LIMIT {
            items.push(format!("queue={}", self.queue_limit));
        }
        if items.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&items.join(","))
        }
    }
}

/// Why an impairment string or value was rejected; every variant names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImpairmentError {
    /// An item without `=`.
    #[error("impairment item `{item}` is not of the form key=value")]
    MissingValue {
        /// The item as written.
        item: String,
    },
    /// A key this layer does not know.
    #[error(
        "unknown impairment key `{key}` (known: loss, burst, delay, jitter, dup, reorder, \
         reorder_gap, dir, cut, cut_out, cut_in, seed, queue)"
    )]
    UnknownKey {
        /// The key as written.
        key: String,
    },
    /// A key given twice (only `cut`, `cut_out` and `cut_in` may repeat).
    #[error("impairment key `{key}` is given more than once")]
    DuplicateKey {
        /// The key as written.
        key: String,
    },
    /// A socket-wide key written as a per-peer override.
    #[error("impairment key `{key}` applies to the whole socket and cannot be set per peer")]
    NotPerPeer {
        /// The key.
        key: String,
    },
    /// A value that does not parse or is out of range.
    #[error("bad value `{value}` for impairment key `{key}`: {reason}")]
    BadValue {
        /// The key as written (with `@ADDR` for an override).
        key: String,
        /// The value as written.
        value: String,
        /// What was expected.
        reason: String,
    },
}

fn check_probability(key: &str, p: f64) -> Result<f64, ImpairmentError> {
    if p.is_finite() && (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(ImpairmentError::BadValue {
            key: key.to_owned(),
            value: if p.is_finite() {
                fmt_probability(p)
            } else {
                p.to_string()
            },
            reason: "a probability must be between 0% and 100%".into(),
        })
    }
}

fn check_delay(key: &str, d: Duration) -> Result<Duration, ImpairmentError> {
    if d <= MAX_DELAY {
        Ok(d)
    } else {
        Err(ImpairmentError::BadValue {
            key: key.to_owned(),
            value: fmt_duration(d),
            reason: format!("at most {}", fmt_duration(MAX_DELAY)),
        })
    }
}

/// `20%` (a percentage) or `0.2` (a fraction).
fn parse_probability(key: &str, value: &str) -> Result<f64, ImpairmentError> {
    let bad = |reason: &str| ImpairmentError::BadValue {
        key: key.to_owned(),
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let (number, scale) = match value.strip_suffix('%') {
        Some(n) => (n.trim(), 100.0),
        None => (value, 1.0),
    };
    let x: f64 = number
        .parse()
        .map_err(|_| bad("expected a percentage like 20% or a fraction like 0.2"))?;
    // Kept to the precision it is printed with (six decimals of a percent),
    // so that what is printed reads back as the same setting: 1e-22% would
    // otherwise be a loss that prints as `loss=0%`, which reads back as none.
    let p = (x / scale * 1e8).round() / 1e8;
    if p.is_finite() && (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(bad(
            "a probability must be between 0% and 100% (a bare number is a fraction: 0.2 = 20%)",
        ))
    }
}

/// `30ms`, `1.5s`, `250us`, `0`.
fn parse_duration(key: &str, value: &str) -> Result<Duration, ImpairmentError> {
    let bad = |reason: &str| ImpairmentError::BadValue {
        key: key.to_owned(),
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let x: f64 = number
        .parse()
        .map_err(|_| bad("expected a duration like 30ms, 1.5s or 250us"))?;
    let nanos_per_unit = match unit.trim() {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "" if x == 0.0 => 0.0,
        _ => return Err(bad("expected a unit: ns, us, ms or s (e.g. 30ms)")),
    };
    let nanos = x * nanos_per_unit;
    if !nanos.is_finite() || nanos > MAX_DELAY.as_nanos() as f64 {
        return Err(bad(&format!("at most {}", fmt_duration(MAX_DELAY))));
    }
    Ok(Duration::from_nanos(nanos.round() as u64))
}

/// `P_ENTER/P_EXIT[/BAD_LOSS]` or `off`.
fn parse_burst(key: &str, value: &str) -> Result<Option<GilbertElliott>, ImpairmentError> {
    if value.eq_ignore_ascii_case("off") || value.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let parts: Vec<&str> = value.split('/').map(str::trim).collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(ImpairmentError::BadValue {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: "expected P_ENTER/P_EXIT[/BAD_LOSS], e.g. 1%/30% or 1%/30%/80%".into(),
        });
    }
    let mut ge = GilbertElliott::new(
        parse_probability(key, parts[0])?,
        parse_probability(key, parts[1])?,
    );
    if let Some(bad_loss) = parts.get(2) {
        ge.bad_loss = parse_probability(key, bad_loss)?;
    }
    Ok(Some(ge))
}

fn parse_direction(key: &str, value: &str) -> Result<Direction, ImpairmentError> {
    match value.to_ascii_lowercase().as_str() {
        "both" => Ok(Direction::Both),
        "out" | "outbound" | "send" => Ok(Direction::Outbound),
        "in" | "inbound" | "recv" => Ok(Direction::Inbound),
        _ => Err(ImpairmentError::BadValue {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: "expected both, out or in".into(),
        }),
    }
}

/// A probability as a percentage with at most six decimals, trailing zeros trimmed.
fn fmt_probability(p: f64) -> String {
    let s = format!("{:.6}", p * 100.0);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

/// A duration in the largest unit that shows it exactly.
fn fmt_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        "0ms".into()
    } else if nanos.is_multiple_of(1_000_000_000) {
        format!("{}s", nanos / 1_000_000_000)
    } else if nanos.is_multiple_of(1_000_000) {
        format!("{}ms", nanos / 1_000_000)
    } else if nanos.is_multiple_of(1_000) {
        format!("{}us", nanos / 1_000)
    } else {
        format!("{nanos}ns")
    }
}

fn fmt_burst(burst: Option<&GilbertElliott>) -> String {
    match burst {
        None => "off".into(),
        Some(b) if b.bad_loss == 1.0 => format!(
            "{}/{}",
            fmt_probability(b.p_enter),
            fmt_probability(b.p_exit)
        ),
        Some(b) => format!(
            "{}/{}/{}",
            fmt_probability(b.p_enter),
            fmt_probability(b.p_exit),
            fmt_probability(b.bad_loss)
        ),
    }
}

/// The address form used for lookups: IPv4-mapped IPv6 addresses become plain IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

// ---------------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------------

/// Counters of one direction. A "datagram" is one UDP datagram after GSO/GRO splitting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Datagrams that entered the impairment path.
    pub offered: u64,
    /// Datagrams that left it: handed to the OS (outbound) or to quinn (inbound), counting
    /// duplicates and late deliveries.
    pub delivered: u64,
    /// Dropped by `loss` or `burst`.
    pub lost: u64,
    /// Dropped because the peer is cut.
    pub cut: u64,
    /// Copies scheduled for later delivery.
    pub delayed: u64,
    /// Extra copies made by `dup`.
    pub duplicated: u64,
    /// Datagrams held back by `reorder`.
    pub reordered: u64,
    /// Copies dropped because the delay queue was full (or a datagram did not fit quinn's buffer).
    pub overflow: u64,
    /// Outbound copies the OS refused (would-block in the middle of a GSO batch, or an error
    /// when a delayed datagram was finally sent).
    pub send_errors: u64,
}

impl DirectionStats {
    /// Everything dropped for any reason.
    pub fn dropped(&self) -> u64 {
        self.lost + self.cut + self.overflow + self.send_errors
    }
}

impl fmt::Display for DirectionStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "offered={} delivered={} lost={} cut={} delayed={} duplicated={} reordered={} \
             overflow={} send_errors={}",
            self.offered,
            self.delivered,
            self.lost,
            self.cut,
            self.delayed,
            self.duplicated,
            self.reordered,
            self.overflow,
            self.send_errors
        )
    }
}

/// A snapshot of an [`ImpairedSocket`]'s counters (only traffic that took the impairment path).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetsimStats {
    /// Datagrams this socket sent.
    pub outbound: DirectionStats,
    /// Datagrams this socket received.
    pub inbound: DirectionStats,
}

impl NetsimStats {
    /// Datagrams handed to the OS.
    pub fn sent(&self) -> u64 {
        self.outbound.delivered
    }

    /// Datagrams handed to quinn.
    pub fn received(&self) -> u64 {
        self.inbound.delivered
    }

    /// Datagrams dropped in either direction.
    pub fn dropped(&self) -> u64 {
        self.outbound.dropped() + self.inbound.dropped()
    }

    /// Copies delayed in either direction.
    pub fn delayed(&self) -> u64 {
        self.outbound.delayed + self.inbound.delayed
    }

    /// Duplicates made in either direction.
    pub fn duplicated(&self) -> u64 {
        self.outbound.duplicated + self.inbound.duplicated
    }
}

impl fmt::Display for NetsimStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "out[{}] in[{}]", self.outbound, self.inbound)
    }
}

/// Live counters of one direction.
#[derive(Debug, Default)]
struct Counters {
    offered: AtomicU64,
    delivered: AtomicU64,
    lost: AtomicU64,
    cut: AtomicU64,
    delayed: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    overflow: AtomicU64,
    send_errors: AtomicU64,
}

impl Counters {
    fn fields(&self) -> [&AtomicU64; 9] {
        [
            &self.offered,
            &self.delivered,
            &self.lost,
            &self.cut,
            &self.delayed,
            &self.duplicated,
            &self.reordered,
            &self.overflow,
            &self.send_errors,
        ]
    }

    /// Adds a batch of local counts: one atomic add per non-zero field, not per datagram.
    fn add(&self, tally: &DirectionStats) {
        let values = [
            tally.offered,
            tally.delivered,
            tally.lost,
            tally.cut,
            tally.delayed,
            tally.duplicated,
            tally.reordered,
            tally.overflow,
            tally.send_errors,
        ];
        for (field, value) in self.fields().into_iter().zip(values) {
            if value != 0 {
                field.fetch_add(value, Ordering::Relaxed);
            }
        }
    }

    fn snapshot(&self) -> DirectionStats {
        let [
            offered,
            delivered,
            lost,
            cut,
            delayed,
            duplicated,
            reordered,
            overflow,
            send_errors,
        ] = self.fields().map(|f| f.load(Ordering::Relaxed));
        DirectionStats {
            offered,
            delivered,
            lost,
            cut,
            delayed,
            duplicated,
            reordered,
            overflow,
            send_errors,
        }
    }

    fn reset(&self) {
        for field in self.fields() {
            field.store(0, Ordering::Relaxed);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The decision engine: pure apart from its RNG
// ---------------------------------------------------------------------------------------------

/// The direction a datagram is moving through this socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    Out,
    In,
}

/// What happens to one datagram.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    Cut,
    Lost,
    Pass(Plan),
}

/// The copies of a datagram that survive, each with its delay (zero: at once).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Plan {
    first: Duration,
    duplicate: Option<Duration>,
    reordered: bool,
}

impl Plan {
    const NOW: Plan = Plan {
        first: Duration::ZERO,
        duplicate: None,
        reordered: false,
    };

    fn copies(&self) -> impl Iterator<Item = Duration> {
        std::iter::once(self.first).chain(self.duplicate)
    }
}

/// Draws the fate of each datagram of one direction.
#[derive(Debug)]
struct Engine {
    way: Way,
    rng: StdRng,
    /// Gilbert-Elliott state per peer: `true` while the link is in the bad state.
    bad_state: HashMap<SocketAddr, bool>,
}

impl Engine {
    fn new(way: Way, seed: u64) -> Self {
        let seed = match way {
            Way::Out => seed,
            Way::In => seed ^ INBOUND_SEED_SALT,
        };
        Engine {
            way,
            rng: StdRng::seed_from_u64(seed),
            bad_state: HashMap::new(),
        }
    }

    /// The fate of one datagram to or from `peer` (already canonical).
    fn decide(&mut self, config: &Impairment, peer: SocketAddr) -> Fate {
        if config.is_cut(self.way, &peer) {
            return Fate::Cut;
        }
        let link = config.peers.get(&peer).unwrap_or(&config.link);
        if !link.direction.covers(self.way) || link.is_none() {
            return Fate::Pass(Plan::NOW);
        }
        if let Some(burst) = &link.burst
            && self.burst_loses(burst, peer)
        {
            return Fate::Lost;
        }
        if link.loss > 0.0 && self.rng.random::<f64>() < link.loss {
            return Fate::Lost;
        }
        let mut first = self.sample_delay(link);
        let reordered = link.reorder > 0.0 && self.rng.random::<f64>() < link.reorder;
        if reordered {
            first += link.reorder_gap;
        }
        let duplicate = if link.dup > 0.0 && self.rng.random::<f64>() < link.dup {
            Some(self.sample_delay(link))
        } else {
            None
        };
        Fate::Pass(Plan {
            first,
            duplicate,
            reordered,
        })
    }

    /// Steps the peer's Gilbert-Elliott chain and draws the loss of the state it lands in.
    fn burst_loses(&mut self, burst: &GilbertElliott, peer: SocketAddr) -> bool {
        if self.bad_state.len() >= MAX_TRACKED_PEERS && !self.bad_state.contains_key(&peer) {
            self.bad_state.clear();
        }
        let bad = self.bad_state.entry(peer).or_insert(false);
        let flip = if *bad { burst.p_exit } else { burst.p_enter };
        if flip > 0.0 && self.rng.random::<f64>() < flip {
            *bad = !*bad;
        }
        let loss = if *bad { burst.bad_loss } else { 0.0 };
        loss > 0.0 && self.rng.random::<f64>() < loss
    }

    /// Uniform in `[delay - jitter, delay + jitter]`, clamped at zero.
    fn sample_delay(&mut self, link: &LinkImpairment) -> Duration {
        if link.jitter.is_zero() {
            return link.delay;
        }
        let low = link.delay.saturating_sub(link.jitter).as_nanos() as u64;
        let high = (link.delay + link.jitter).as_nanos() as u64;
        Duration::from_nanos(self.rng.random_range(low..=high))
    }

    /// What [`Engine::restore`] needs to undo the draws for datagrams to `peer`.
    fn checkpoint(&self, peer: SocketAddr) -> (StdRng, Option<bool>) {
        (self.rng.clone(), self.bad_state.get(&peer).copied())
    }

    /// Undoes every draw since `checkpoint` was taken (only `peer`'s datagrams were decided).
    fn restore(&mut self, peer: SocketAddr, (rng, bad): (StdRng, Option<bool>)) {
        self.rng = rng;
        match bad {
            Some(bad) => {
                self.bad_state.insert(peer, bad);
            }
            None => {
                self.bad_state.remove(&peer);
            }
        }
    }

    /// Restarts the RNG and forgets every link's burst state.
    fn reseed(&mut self, seed: u64) {
        *self = Engine::new(self.way, seed);
    }
}

// ---------------------------------------------------------------------------------------------
// Delay queues
// ---------------------------------------------------------------------------------------------

/// A datagram waiting for its due time.
#[derive(Debug)]
struct Delayed {
    due: Instant,
    /// Tie-breaker so equal due times keep their arrival order (no reordering without jitter).
    seq: u64,
    /// Destination (outbound) or source (inbound), as quinn gave or will see it.
    peer: SocketAddr,
    ecn: Option<EcnCodepoint>,
    /// `src_ip` of the transmit (outbound) or `dst_ip` of the receive (inbound).
    local_ip: Option<IpAddr>,
    data: Box<[u8]>,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// A bounded queue of delayed datagrams ordered by due time.
#[derive(Debug, Default)]
struct TimedQueue {
    heap: BinaryHeap<Reverse<Delayed>>,
    next_seq: u64,
}

impl TimedQueue {
    /// Queues `d` unless `limit` datagrams already wait; returns whether it is the new earliest.
    fn push(&mut self, mut d: Delayed, limit: usize) -> Result<bool, Delayed> {
        if self.heap.len() >= limit {
            return Err(d);
        }
        d.seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let earliest = self.next_due().is_none_or(|due| d.due < due);
        self.heap.push(Reverse(d));
        Ok(earliest)
    }

    fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(d)| d.due)
    }

    fn pop_due(&mut self, now: Instant) -> Option<Delayed> {
        if self.next_due()? <= now {
            self.heap.pop().map(|Reverse(d)| d)
        } else {
            None
        }
    }

    fn len(&self) -> usize {
        self.heap.len()
    }
}

/// Outbound delayed datagrams, drained by one background task per socket.
#[derive(Debug, Default)]
struct OutboundQueue {
    queue: Mutex<TimedQueue>,
    /// Wakes the sender task when a datagram becomes the earliest or the socket closes.
    wake: Notify,
    closed: AtomicBool,
}

/// Inbound state: the engine, delayed datagrams and the timer that wakes `poll_recv` for them.
#[derive(Debug)]
struct Inbound {
    engine: Engine,
    queue: TimedQueue,
    timer: Option<Pin<Box<Sleep>>>,
}

// ---------------------------------------------------------------------------------------------
// Shared state and the handle
// ---------------------------------------------------------------------------------------------

/// State shared by the socket, its handles and its delayed-sender task.
///
/// Lock order: `config`, then `outbound_engine`, then `inbound`, then `outbound.queue`
/// (`try_send` holds `outbound_engine` while it queues).
#[derive(Debug)]
struct Shared {
    /// `MODE_*` bits; the only thing the fast path reads.
    mode: AtomicU8,
    /// The current impairment, always with `seed: Some(effective seed)`.
    config: RwLock<Arc<Impairment>>,
    outbound_engine: Mutex<Engine>,
    inbound: Mutex<Inbound>,
    outbound: OutboundQueue,
    out_counters: Counters,
    in_counters: Counters,
    /// Every datagram handed to this socket to send, and its bytes, impaired
    /// or not (`bench scale`'s mesh traffic per node).
    sent: [AtomicU64; 2],
}

/// Locks a mutex, ignoring poisoning: every critical section leaves the state consistent, and
/// a panic elsewhere must not turn into a panic on the network path.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn new(impairment: Impairment) -> Result<Self, ImpairmentError> {
        impairment.validate()?;
        let mut impairment = impairment.normalize();
        let seed = *impairment
            .seed
            .get_or_insert_with(|| rand::rng().random::<u64>());
        // The seed is in the impairment's text; it matters once an
        // impairment is set, here or later through the admin endpoint.
        let mode = if impairment.is_none() {
            tracing::debug!(%impairment, "mesh socket not impaired");
            0
        } else {
            tracing::info!(%impairment, "mesh socket impaired");
            MODE_IMPAIRED
        };
        Ok(Shared {
            mode: AtomicU8::new(mode),
            config: RwLock::new(Arc::new(impairment)),
            outbound_engine: Mutex::new(Engine::new(Way::Out, seed)),
            inbound: Mutex::new(Inbound {
                engine: Engine::new(Way::In, seed),
                queue: TimedQueue::default(),
                timer: None,
            }),
            outbound: OutboundQueue::default(),
            out_counters: Counters::default(),
            in_counters: Counters::default(),
            sent: Default::default(),
        })
    }

    fn config(&self) -> Arc<Impairment> {
        self.config
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces the configuration through `change`, validating the result and switching the
    /// fast path on or off. A new `seed` restarts both RNGs.
    fn update(&self, change: impl FnOnce(&mut Impairment)) -> Result<(), ImpairmentError> {
        let mut config = self
            .config
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let old_seed = config.seed;
        let mut next = (**config).clone();
        next.seed = None;
        change(&mut next);
        next.validate()?;
        let mut next = next.normalize();
        match next.seed {
            Some(seed) => {
                lock(&self.outbound_engine).reseed(seed);
                lock(&self.inbound).engine.reseed(seed);
            }
            None => next.seed = old_seed,
        }
        if next.is_none() {
            self.mode.fetch_and(!MODE_IMPAIRED, Ordering::Release);
        } else {
            self.mode.fetch_or(MODE_IMPAIRED, Ordering::Release);
        }
        tracing::info!(impairment = %next, "netsim impairment changed");
        *config = Arc::new(next);
        Ok(())
    }
}

/// A cloneable remote control of one [`ImpairedSocket`]: change its impairment at run time,
/// cut and heal peers, read its counters. Changes apply to the next datagram; datagrams
/// already delayed keep their due time.
#[derive(Clone, Debug)]
pub struct ImpairHandle {
    shared: Arc<Shared>,
}

impl ImpairHandle {
    /// (datagrams, bytes) handed to the socket to send since it was made,
    /// whatever the impairment did with them.
    pub fn sent(&self) -> (u64, u64) {
        let [datagrams, bytes] = &self.shared.sent;
        (
            datagrams.load(Ordering::Relaxed),
            bytes.load(Ordering::Relaxed),
        )
    }

    /// The current impairment, with the effective seed filled in.
    pub fn impairment(&self) -> Impairment {
        (*self.shared.config()).clone()
    }

    /// Replaces the whole impairment (link, overrides, cuts, queue limit). With `seed: Some`,
    /// both RNGs restart from that seed (and burst states reset); with `None` they continue.
    pub fn set(&self, impairment: Impairment) -> Result<(), ImpairmentError> {
        self.shared.update(|config| *config = impairment)
    }

    /// Replaces the default link settings, keeping overrides and cuts.
    pub fn set_link(&self, link: LinkImpairment) -> Result<(), ImpairmentError> {
        self.shared.update(|config| config.link = link)
    }

    /// Gives `peer` its own link settings.
    pub fn set_peer(&self, peer: SocketAddr, link: LinkImpairment) -> Result<(), ImpairmentError> {
        self.shared.update(|config| {
            config.peers.insert(peer, link);
        })
    }

    /// Removes `peer`'s override; it falls back to the default link settings.
    pub fn clear_peer(&self, peer: SocketAddr) {
        self.apply(|config| {
            config.peers.remove(&canonical(peer));
        });
    }

    /// Removes every impairment (the socket returns to its fast path); the seed is kept.
    pub fn clear(&self) {
        self.apply(|config| {
            *config = Impairment {
                queue_limit: config.queue_limit,
                ..Impairment::default()
            }
        });
    }

    /// Drops everything to and from `peer` (both directions) until healed.
    pub fn cut(&self, peer: SocketAddr) {
        self.apply(|config| {
            config.cut.insert(canonical(peer));
        });
    }

    /// Drops the datagrams to `peer` (`Direction::Outbound`: it stops hearing this socket),
    /// from it (`Inbound`: this socket stops hearing it) or both (`Both`, the same as
    /// [`ImpairHandle::cut`]) until healed. Cuts of different directions add up.
    pub fn cut_dir(&self, peer: SocketAddr, direction: Direction) {
        self.apply(|config| {
            config.cuts_mut(direction).insert(canonical(peer));
        });
    }

    /// Restores the link to `peer`, whichever directions were cut.
    pub fn heal(&self, peer: SocketAddr) {
        let peer = canonical(peer);
        self.apply(|config| {
            for direction in [Direction::Both, Direction::Outbound, Direction::Inbound] {
                config.cuts_mut(direction).remove(&peer);
            }
        });
    }

    /// Restores the links to every cut peer, one-way cuts included.
    pub fn heal_all(&self) {
        self.apply(|config| {
            config.cut.clear();
            config.cut_out.clear();
            config.cut_in.clear();
        });
    }

    /// Whether `peer` is cut both ways.
    pub fn is_cut(&self, peer: SocketAddr) -> bool {
        self.shared.config().cut.contains(&canonical(peer))
    }

    /// Whether datagrams moving in `direction` (`Outbound`: to `peer`, `Inbound`: from it)
    /// are cut; `Both` asks whether both directions are.
    pub fn is_cut_dir(&self, peer: SocketAddr, direction: Direction) -> bool {
        let config = self.shared.config();
        let peer = canonical(peer);
        match direction {
            Direction::Both => config.is_cut(Way::Out, &peer) && config.is_cut(Way::In, &peer),
            Direction::Outbound => config.is_cut(Way::Out, &peer),
            Direction::Inbound => config.is_cut(Way::In, &peer),
        }
    }

    /// The seed in effect (the one drawn at random if none was given).
    pub fn seed(&self) -> u64 {
        self.shared.config().seed.unwrap_or_default()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> NetsimStats {
        NetsimStats {
            outbound: self.shared.out_counters.snapshot(),
            inbound: self.shared.in_counters.snapshot(),
        }
    }

    /// Sets every counter back to zero.
    pub fn reset_stats(&self) {
        self.shared.out_counters.reset();
        self.shared.in_counters.reset();
    }

    /// Datagrams waiting in the (outbound, inbound) delay queues.
    pub fn queued(&self) -> (usize, usize) {
        (
            lock(&self.shared.outbound.queue).len(),
            lock(&self.shared.inbound).queue.len(),
        )
    }

    /// Applies a change that cannot make the configuration invalid.
    fn apply(&self, change: impl FnOnce(&mut Impairment)) {
        if let Err(error) = self.shared.update(change) {
            // Unreachable by construction (cuts and removals keep a valid config valid), but a
            // network tool must not panic: keep the old settings and say so.
            tracing::warn!(%error, "netsim: impairment change rejected");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The socket
// ---------------------------------------------------------------------------------------------

/// A quinn [`AsyncUdpSocket`] that impairs the traffic of an inner socket; see the
/// [module docs](self).
#[derive(Debug)]
pub struct ImpairedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    shared: Arc<Shared>,
    /// The runtime for timers and the delayed sender; `None` outside tokio (no delays then).
    runtime: Option<tokio::runtime::Handle>,
    /// Set once the delayed-sender task runs; started on the first delayed datagram so an
    /// unimpaired socket costs no task.
    sender_started: OnceLock<()>,
}

impl ImpairedSocket {
    /// Wraps `inner` (e.g. from `quinn::default_runtime()?.wrap_udp_socket(std_socket)`).
    ///
    /// Call it inside a tokio runtime, or delays are treated as zero.
    pub fn new(
        inner: Arc<dyn AsyncUdpSocket>,
        impairment: Impairment,
    ) -> Result<Self, ImpairmentError> {
        let runtime = tokio::runtime::Handle::try_current().ok();
        if runtime.is_none() {
            tracing::warn!("netsim socket built outside a tokio runtime: delays are disabled");
        }
        Ok(ImpairedSocket {
            inner,
            shared: Arc::new(Shared::new(impairment)?),
            runtime,
            sender_started: OnceLock::new(),
        })
    }

    /// A handle to control this socket.
    pub fn handle(&self) -> ImpairHandle {
        ImpairHandle {
            shared: self.shared.clone(),
        }
    }

    /// Whether copies may be delayed (a tokio runtime is available for the timers).
    fn can_delay(&self) -> bool {
        self.runtime.is_some()
    }

    /// Starts the task that sends delayed outbound datagrams, once.
    fn ensure_sender(&self) {
        let Some(runtime) = &self.runtime else {
            return;
        };
        self.sender_started.get_or_init(|| {
            runtime.spawn(run_delayed_sender(self.shared.clone(), self.inner.clone()));
        });
    }

    /// `try_send` with an impairment configured: split GSO batches and decide per datagram.
    fn send_impaired(&self, transmit: &Transmit) -> io::Result<()> {
        let config = self.shared.config();
        let peer = canonical(transmit.destination);
        let segment_size = match transmit.segment_size {
            Some(size) if size > 0 => size,
            _ => transmit.contents.len().max(1),
        };
        let now = Instant::now();
        let mut tally = DirectionStats::default();
        // Once a datagram of this transmit went out or was queued, a `WouldBlock` can no
        // longer be returned: quinn would resend the whole batch and duplicate it.
        let mut committed = false;
        let mut queued_any = false;
        // Held for the whole transmit, so that a refused batch can put the RNG back and
        // quinn's retry draws the same fates (keeping runs reproducible).
        let mut engine = lock(&self.shared.outbound_engine);
        let checkpoint = engine.checkpoint(peer);
        for segment in transmit.contents.chunks(segment_size) {
            tally.offered += 1;
            let fate = engine.decide(&config, peer);
            let plan = match fate {
                Fate::Cut => {
                    tally.cut += 1;
                    continue;
                }
                Fate::Lost => {
                    tally.lost += 1;
                    continue;
                }
                Fate::Pass(plan) => plan,
            };
            tally.reordered += u64::from(plan.reordered);
            tally.duplicated += u64::from(plan.duplicate.is_some());
            for delay in plan.copies() {
                if delay.is_zero() || !self.can_delay() {
                    let single = Transmit {
                        destination: transmit.destination,
                        ecn: transmit.ecn,
                        contents: segment,
                        segment_size: None,
                        src_ip: transmit.src_ip,
                    };
                    match self.inner.try_send(&single) {
                        Ok(()) => {
                            tally.delivered += 1;
                            committed = true;
                        }
                        Err(error) if !committed => {
                            engine.restore(peer, checkpoint);
                            return Err(error);
                        }
                        Err(error) => {
                            tracing::trace!(%error, "netsim: datagram of a GSO batch refused");
                            tally.send_errors += 1;
                        }
                    }
                } else {
                    committed = true;
                    let delayed = Delayed {
                        due: now + delay,
                        seq: 0,
                        peer: transmit.destination,
                        ecn: transmit.ecn,
                        local_ip: transmit.src_ip,
                        data: segment.into(),
                    };
                    let pushed =
                        lock(&self.shared.outbound.queue).push(delayed, config.queue_limit);
                    match pushed {
                        Ok(earliest) => {
                            tally.delayed += 1;
                            queued_any = true;
                            if earliest {
                                self.shared.outbound.wake.notify_one();
                            }
                        }
                        Err(_) => tally.overflow += 1,
                    }
                }
            }
        }
        if queued_any {
            self.ensure_sender();
        }
        self.shared.out_counters.add(&tally);
        Ok(())
    }

    /// `poll_recv` with an impairment configured or delayed datagrams waiting.
    fn recv_impaired(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let slots = bufs.len().min(meta.len());
        if slots == 0 {
            return Poll::Ready(Ok(0));
        }
        let config = self.shared.config();
        let mut inbound = lock(&self.shared.inbound);
        let mut tally = DirectionStats::default();
        let mut filled = 0;
        let mut result = Ok(());
        for round in 0.. {
            let now = Instant::now();
            filled += inbound.deliver_due(
                now,
                &mut bufs[filled..slots],
                &mut meta[filled..slots],
                &mut tally,
            );
            if filled == slots {
                break;
            }
            match self
                .inner
                .poll_recv(cx, &mut bufs[filled..slots], &mut meta[filled..slots])
            {
                Poll::Ready(Ok(got)) => {
                    let got = got.min(slots - filled);
                    filled += inbound.filter_received(
                        &config,
                        now,
                        config.queue_limit,
                        self.can_delay(),
                        &mut bufs[..slots],
                        &mut meta[..slots],
                        filled,
                        got,
                        &mut tally,
                    );
                    if filled > 0 {
                        break;
                    }
                }
                Poll::Ready(Err(error)) => {
                    // Hand over what is already filled; the error surfaces on the next call
                    // if it persists.
                    if filled == 0 {
                        result = Err(error);
                    }
                    break;
                }
                Poll::Pending => {
                    if filled > 0 {
                        break;
                    }
                    // The inner socket registered our waker; the timer registers it for the
                    // next delayed datagram. If that one is already due, go round again.
                    if inbound.poll_timer(cx, self.runtime.as_ref()).is_pending() {
                        break;
                    }
                }
            }
            if round + 1 >= MAX_RECV_ROUNDS {
                // Everything read so far was dropped; yield to other tasks under a flood.
                if filled == 0 {
                    cx.waker().wake_by_ref();
                }
                break;
            }
        }
        if inbound.queue.len() > 0 {
            self.shared
                .mode
                .fetch_or(MODE_INBOUND_QUEUED, Ordering::Release);
        } else {
            self.shared
                .mode
                .fetch_and(!MODE_INBOUND_QUEUED, Ordering::Release);
        }
        drop(inbound);
        self.shared.in_counters.add(&tally);
        match result {
            Err(error) => Poll::Ready(Err(error)),
            Ok(()) if filled > 0 => Poll::Ready(Ok(filled)),
            Ok(()) => Poll::Pending,
        }
    }
}

impl Drop for ImpairedSocket {
    fn drop(&mut self) {
        // Stops the delayed sender; datagrams still queued are lost, as on a closed socket.
        self.shared.outbound.closed.store(true, Ordering::Release);
        self.shared.outbound.wake.notify_one();
    }
}

impl AsyncUdpSocket for ImpairedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        // Delayed datagrams never block quinn, so writability is the inner socket's.
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let sent = if self.shared.mode.load(Ordering::Acquire) & MODE_IMPAIRED == 0 {
            self.inner.try_send(transmit)
        } else {
            self.send_impaired(transmit)
        };
        if sent.is_ok() {
            // A GSO batch is several datagrams of `segment_size` bytes.
            let len = transmit.contents.len();
            let datagrams = match transmit.segment_size {
                Some(size) if size > 0 => len.div_ceil(size),
                _ => 1,
            };
            let [count, bytes] = &self.shared.sent;
            count.fetch_add(datagrams as u64, Ordering::Relaxed);
            bytes.fetch_add(len as u64, Ordering::Relaxed);
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if self.shared.mode.load(Ordering::Acquire) == 0 {
            return self.inner.poll_recv(cx, bufs, meta);
        }
        self.recv_impaired(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        // Keep quinn batching as in production; batches are split when impaired.
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        // quinn sizes its receive buffers from this; GRO buffers are split when impaired.
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

impl Inbound {
    /// Copies due delayed datagrams into the slots, one datagram per slot.
    fn deliver_due(
        &mut self,
        now: Instant,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        tally: &mut DirectionStats,
    ) -> usize {
        let mut filled = 0;
        while filled < bufs.len().min(meta.len()) {
            let Some(d) = self.queue.pop_due(now) else {
                break;
            };
            let len = d.data.len();
            match bufs[filled].get_mut(..len) {
                Some(buf) => {
                    buf.copy_from_slice(&d.data);
                    meta[filled] = RecvMeta {
                        addr: d.peer,
                        len,
                        stride: len,
                        ecn: d.ecn,
                        dst_ip: d.local_ip,
                    };
                    tally.delivered += 1;
                    filled += 1;
                }
                // quinn's buffers hold the largest datagram it accepts, so this only drops
                // what quinn would have refused anyway.
                None => tally.overflow += 1,
            }
        }
        filled
    }

    /// Decides the fate of every datagram in slots `start..start + got`, queues the delayed
    /// ones and packs the ones due now into slots from `start` on; returns how many slots
    /// hold datagrams afterwards.
    #[allow(clippy::too_many_arguments)]
    fn filter_received(
        &mut self,
        config: &Impairment,
        now: Instant,
        limit: usize,
        can_delay: bool,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        start: usize,
        got: usize,
        tally: &mut DirectionStats,
    ) -> usize {
        let mut out = start;
        for slot in start..start + got {
            let received = meta[slot];
            let len = received.len.min(bufs[slot].len());
            if len == 0 {
                // Nothing to impair; pass the (empty) datagram through unchanged.
                meta[out] = received;
                out += 1;
                continue;
            }
            let stride = if received.stride == 0 {
                len
            } else {
                received.stride
            };
            let peer = canonical(received.addr);
            let mut written = 0;
            let mut offset = 0;
            while offset < len {
                let seg_len = stride.min(len - offset);
                tally.offered += 1;
                let plan = match self.engine.decide(config, peer) {
                    Fate::Cut => {
                        tally.cut += 1;
                        offset += seg_len;
                        continue;
                    }
                    Fate::Lost => {
                        tally.lost += 1;
                        offset += seg_len;
                        continue;
                    }
                    Fate::Pass(plan) => plan,
                };
                tally.reordered += u64::from(plan.reordered);
                tally.duplicated += u64::from(plan.duplicate.is_some());
                let keep_first = plan.first.is_zero() || !can_delay;
                // Queue the later copies before packing the first, which may overwrite the
                // bytes they are copied from.
                for (index, delay) in plan.copies().enumerate() {
                    if index == 0 && keep_first {
                        continue;
                    }
                    let delay = if can_delay { delay } else { Duration::ZERO };
                    let data = bufs[slot][offset..offset + seg_len].into();
                    let delayed = Delayed {
                        due: now + delay,
                        seq: 0,
                        peer: received.addr,
                        ecn: received.ecn,
                        local_ip: received.dst_ip,
                        data,
                    };
                    match self.queue.push(delayed, limit) {
                        Ok(_) => tally.delayed += u64::from(!delay.is_zero()),
                        Err(_) => tally.overflow += 1,
                    }
                }
                if keep_first {
                    if move_segment(bufs, slot, offset, out, written, seg_len) {
                        written += seg_len;
                        tally.delivered += 1;
                    } else {
                        tally.overflow += 1;
                    }
                }
                offset += seg_len;
            }
            if written > 0 {
                meta[out] = RecvMeta {
                    len: written,
                    stride: stride.min(written),
                    ..received
                };
                out += 1;
            }
        }
        out - start
    }

    /// Arms the timer for the earliest delayed datagram and polls it with `cx`.
    fn poll_timer(
        &mut self,
        cx: &mut Context,
        runtime: Option<&tokio::runtime::Handle>,
    ) -> Poll<()> {
        let (Some(due), Some(runtime)) = (self.queue.next_due(), runtime) else {
            self.timer = None;
            return Poll::Pending;
        };
        let timer = match &mut self.timer {
            Some(timer) => {
                if timer.deadline() != due {
                    timer.as_mut().reset(due);
                }
                timer
            }
            None => {
                let _guard = runtime.enter();
                self.timer.insert(Box::pin(tokio::time::sleep_until(due)))
            }
        };
        std::future::Future::poll(timer.as_mut(), cx)
    }
}

/// Moves `len` bytes at `src_off` of slot `src` to `dst_off` of slot `dst` (`dst <= src`, and
/// `dst_off <= src_off` when the slots are the same). Returns false if they do not fit.
fn move_segment(
    bufs: &mut [IoSliceMut<'_>],
    src: usize,
    src_off: usize,
    dst: usize,
    dst_off: usize,
    len: usize,
) -> bool {
    if src == dst {
        if dst_off == src_off {
            return true;
        }
        let buf = &mut *bufs[src];
        if src_off + len > buf.len() {
            return false;
        }
        buf.copy_within(src_off..src_off + len, dst_off);
        return true;
    }
    let (head, tail) = bufs.split_at_mut(src);
    let (Some(dst_buf), Some(src_buf)) = (head.get_mut(dst), tail.first()) else {
        return false;
    };
    match (
        dst_buf.get_mut(dst_off..dst_off + len),
        src_buf.get(src_off..src_off + len),
    ) {
        (Some(to), Some(from)) => {
            to.copy_from_slice(from);
            true
        }
        _ => false,
    }
}

/// Sends delayed outbound datagrams when due; ends when the socket is dropped.
async fn run_delayed_sender(shared: Arc<Shared>, inner: Arc<dyn AsyncUdpSocket>) {
    let mut poller = inner.clone().create_io_poller();
    let mut due_now = Vec::new();
    loop {
        if shared.outbound.closed.load(Ordering::Acquire) {
            return;
        }
        let next_due = {
            let mut queue = lock(&shared.outbound.queue);
            let now = Instant::now();
            while let Some(d) = queue.pop_due(now) {
                due_now.push(d);
            }
            queue.next_due()
        };
        let mut tally = DirectionStats::default();
        for d in due_now.drain(..) {
            if send_delayed(&*inner, &mut poller, &d).await {
                tally.delivered += 1;
            } else {
                tally.send_errors += 1;
            }
        }
        shared.out_counters.add(&tally);
        match next_due {
            Some(due) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = shared.outbound.wake.notified() => {}
                }
            }
            None => shared.outbound.wake.notified().await,
        }
    }
}

/// Sends one delayed datagram, waiting for writability a few times if the socket is full.
async fn send_delayed(
    inner: &dyn AsyncUdpSocket,
    poller: &mut Pin<Box<dyn UdpPoller>>,
    d: &Delayed,
) -> bool {
    let transmit = Transmit {
        destination: d.peer,
        ecn: d.ecn,
        contents: &d.data,
        segment_size: None,
        src_ip: d.local_ip,
    };
    for _ in 0..DELAYED_SEND_ATTEMPTS {
        match inner.try_send(&transmit) {
            Ok(()) => return true,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if let Err(error) = poll_fn(|cx| poller.as_mut().poll_writable(cx)).await {
                    tracing::debug!(%error, "netsim: delayed send failed");
                    return false;
                }
            }
            Err(error) => {
                tracing::debug!(%error, peer = %d.peer, "netsim: delayed send failed");
                return false;
            }
        }
    }
    false
}

/// Binds a UDP socket on `addr` and wraps it in an [`ImpairedSocket`] (no impairment for
/// `None`, which is the zero-cost fast path until a handle sets one).
///
/// Must be called inside a tokio runtime. Hand the socket to quinn:
///
/// ```no_run
/// # async fn demo(server_config: quinn::ServerConfig) -> std::io::Result<()> {
/// use std::sync::Arc;
/// use chatmesh::netsim::{bind, Impairment};
///
/// let impairment: Impairment = "loss=20%,delay=30ms,jitter=10ms,seed=7"
///     .parse()
///     .map_err(std::io::Error::other)?;
/// let (socket, handle) = bind("127.0.0.1:0".parse().unwrap(), Some(impairment))?;
/// let endpoint = quinn::Endpoint::new_with_abstract_socket(
///     quinn::EndpointConfig::default(),
///     Some(server_config),
///     socket,
///     Arc::new(quinn::TokioRuntime),
/// )?;
/// handle.cut("127.0.0.1:5001".parse().unwrap()); // partition from one peer
/// println!("{}", handle.stats());
/// # drop(endpoint); Ok(()) }
/// ```
pub fn bind(
    addr: SocketAddr,
    impairment: Option<Impairment>,
) -> io::Result<(Arc<dyn AsyncUdpSocket>, ImpairHandle)> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| io::Error::other("netsim::bind must be called inside a tokio runtime"))?;
    let inner = runtime.wrap_udp_socket(socket)?;
    let socket = ImpairedSocket::new(inner, impairment.unwrap_or_default())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    let handle = socket.handle();
    Ok((Arc::new(socket), handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn cli_example_parses_and_prints_back() {
        let text = "loss=20%,delay=30ms,jitter=10ms,dup=1%,seed=7";
        let imp: Impairment = text.parse().expect("valid");
        assert_eq!(imp.link.loss, 0.2);
        assert_eq!(imp.link.delay, Duration::from_millis(30));
        assert_eq!(imp.link.jitter, Duration::from_millis(10));
        assert_eq!(imp.link.dup, 0.01);
        assert_eq!(imp.seed, Some(7));
        assert_eq!(imp.to_string(), text);
    }

    #[test]
    fn every_key_parses_and_round_trips() {
        let text = "loss=0.05, burst=1%/30%/80%, delay=1.5s, jitter=250us, dup=2%, reorder=5%, \
                    reorder_gap=3ms, dir=out, cut=127.0.0.1:5001, cut=[::ffff:10.0.0.1]:6000, \
                    loss@127.0.0.1:5002=50%, delay@127.0.0.1:5002=0, seed=42, queue=100";
        let imp = Impairment::parse(text).expect("valid");
        assert_eq!(imp.link.loss, 0.05);
        assert_eq!(
            imp.link.burst,
            Some(GilbertElliott {
                p_enter: 0.01,
                p_exit: 0.3,
                bad_loss: 0.8
            })
        );
        assert_eq!(imp.link.delay, Duration::from_millis(1500));
        assert_eq!(imp.link.jitter, Duration::from_micros(250));
        assert_eq!(imp.link.reorder_gap, Duration::from_millis(3));
        assert_eq!(imp.link.direction, Direction::Outbound);
        // The mapped IPv6 address is stored as the IPv4 address a dual-stack socket means.
        assert!(imp.cut.contains(&addr("10.0.0.1:6000")));
        assert!(imp.cut.contains(&addr("127.0.0.1:5001")));
        let peer = &imp.peers[&addr("127.0.0.1:5002")];
        assert_eq!(peer.loss, 0.5);
        assert_eq!(peer.delay, Duration::ZERO);
        // The override inherits the other default settings even though they came later.
        assert_eq!(peer.jitter, Duration::from_micros(250));
        assert_eq!(peer.direction, Direction::Outbound);
        assert_eq!(imp.queue_limit, 100);
        let printed = imp.to_string();
        println!("printed: {printed}");
        assert_eq!(Impairment::parse(&printed).expect("own output parses"), imp);
    }

    #[test]
    fn a_probability_below_the_printed_precision_is_none_and_reads_back_so() {
        // Found by `cargo fuzz run impairment`: it printed as `loss=0%`.
        let tiny = Impairment::parse("loss=.0000000000000000000001345881698%").expect("valid");
        assert!(tiny.is_none(), "{tiny:?}");
        assert_eq!(tiny.to_string(), "none");
        // The smallest step printed is kept exactly.
        let step = Impairment::parse("loss=0.000001%").expect("valid");
        assert_eq!(step.to_string(), "loss=0.000001%");
        assert_eq!(
            Impairment::parse(&step.to_string())
                .expect("valid")
                .to_string(),
            step.to_string()
        );
    }

    #[test]
    fn none_forms_mean_no_impairment() {
        for text in ["", "none", "OFF", "  "] {
            let imp = Impairment::parse(text).expect("valid");
            assert!(imp.is_none(), "{text:?}");
            assert_eq!(imp.to_string(), "none");
        }
        // A seed alone still configures no impairment.
        assert!(Impairment::parse("seed=3").expect("valid").is_none());
        assert!(
            !Impairment::parse("cut=127.0.0.1:1")
                .expect("valid")
                .is_none()
        );
    }

    #[test]
    fn bad_strings_are_rejected_naming_the_key() {
        let cases = [
            ("loss=abc", "`loss`"),
            ("loss=150%", "`loss`"),
            ("loss=20", "`loss`"),
            ("loss=-1%", "`loss`"),
            ("dup=NaN", "`dup`"),
            ("delay=30", "`delay`"),
            ("delay=30 parsecs", "`delay`"),
            ("jitter=2m", "`jitter`"),
            ("delay=120s", "`delay`"),
            ("burst=1%", "`burst`"),
            ("burst=1%/2%/3%/4%", "`burst`"),
            ("burst=1%/x", "`burst`"),
            ("dir=sideways", "`dir`"),
            ("seed=-4", "`seed`"),
            ("queue=0", "`queue`"),
            ("cut=localhost", "`cut`"),
            ("lose=20%", "`lose`"),
            ("loss=1%,loss=2%", "`loss`"),
            ("loss", "`loss`"),
            ("seed@127.0.0.1:1=4", "`seed`"),
            ("loss@nowhere=4%", "`loss@nowhere`"),
            ("loss@127.0.0.1:9=200%", "`loss@127.0.0.1:9`"),
        ];
        for (text, key) in cases {
            let error = Impairment::parse(text).expect_err(text);
            let message = error.to_string();
            println!("{text:>24} -> {message}");
            assert!(message.contains(key), "{text}: {message}");
        }
    }

    #[test]
    fn programmatic_values_are_validated() {
        let mut imp = Impairment::from(LinkImpairment {
            loss: 1.5,
            ..LinkImpairment::default()
        });
        let error = imp.validate().expect_err("loss out of range");
        assert!(matches!(&error, ImpairmentError::BadValue { key, .. } if key == "loss"));
        imp.link.loss = 0.1;
        imp.peers.insert(
            addr("127.0.0.1:7"),
            LinkImpairment {
                dup: f64::NAN,
                ..LinkImpairment::default()
            },
        );
        let error = imp.validate().expect_err("NaN dup");
        assert!(error.to_string().contains("dup@127.0.0.1:7"), "{error}");
    }

    /// Runs `n` datagrams from one peer through an engine and returns whether each was lost.
    fn losses(spec: &str, n: usize) -> Vec<bool> {
        let config = Impairment::parse(spec).expect("valid");
        let mut engine = Engine::new(Way::Out, config.seed.unwrap_or(1));
        let peer = addr("127.0.0.1:9");
        (0..n)
            .map(|_| matches!(engine.decide(&config, peer), Fate::Lost))
            .collect()
    }

    /// Mean length of the runs of consecutive losses.
    fn mean_run(lost: &[bool]) -> f64 {
        let mut runs = Vec::new();
        let mut current = 0;
        for &l in lost {
            if l {
                current += 1;
            } else if current > 0 {
                runs.push(current);
                current = 0;
            }
        }
        if current > 0 {
            runs.push(current);
        }
        runs.iter().sum::<usize>() as f64 / runs.len().max(1) as f64
    }

    #[test]
    fn gilbert_elliott_loses_in_runs_of_the_configured_length() {
        let spec = "burst=2%/25%,seed=21";
        let lost = losses(spec, 200_000);
        let rate = lost.iter().filter(|&&l| l).count() as f64 / lost.len() as f64;
        let run = mean_run(&lost);
        let ge = GilbertElliott::new(0.02, 0.25);
        println!(
            "{spec}: loss {:.2}% (expected {:.2}%), mean run {run:.2} (expected {:.2})",
            rate * 100.0,
            ge.mean_loss() * 100.0,
            ge.mean_burst_len()
        );
        assert!((rate - ge.mean_loss()).abs() < 0.01, "rate {rate}");
        assert!((run - ge.mean_burst_len()).abs() < 0.3, "run {run}");

        // Independent loss of a similar rate has much shorter runs: 1 / (1 - p).
        let lost = losses("loss=7.4%,seed=21", 200_000);
        let run = mean_run(&lost);
        println!("loss=7.4%: mean run {run:.2} (expected {:.2})", 1.0 / 0.926);
        assert!((run - 1.0 / 0.926).abs() < 0.05, "run {run}");
    }

    #[test]
    fn delays_duplicates_and_reorders_follow_the_settings() {
        let config =
            Impairment::parse("delay=30ms,jitter=10ms,dup=10%,reorder=5%,seed=3").expect("valid");
        let mut engine = Engine::new(Way::Out, 3);
        let peer = addr("127.0.0.1:9");
        let n = 100_000;
        let (mut dups, mut reorders, mut sum) = (0, 0, Duration::ZERO);
        for _ in 0..n {
            let Fate::Pass(plan) = engine.decide(&config, peer) else {
                panic!("nothing may be lost");
            };
            let base = if plan.reordered {
                reorders += 1;
                plan.first - DEFAULT_REORDER_GAP
            } else {
                plan.first
            };
            assert!(base >= Duration::from_millis(20) && base <= Duration::from_millis(40));
            sum += base;
            if let Some(copy) = plan.duplicate {
                dups += 1;
                assert!(copy >= Duration::from_millis(20) && copy <= Duration::from_millis(40));
            }
        }
        let mean = sum / n;
        println!("mean delay {mean:?}, dup {dups}/{n}, reordered {reorders}/{n}");
        assert!(mean > Duration::from_micros(29_800) && mean < Duration::from_micros(30_200));
        assert!((dups as f64 / n as f64 - 0.10).abs() < 0.005);
        assert!((reorders as f64 / n as f64 - 0.05).abs() < 0.005);
    }

    #[test]
    fn jitter_larger_than_delay_clamps_at_zero() {
        let config = Impairment::parse("delay=5ms,jitter=20ms,seed=1").expect("valid");
        let mut engine = Engine::new(Way::In, 1);
        for _ in 0..10_000 {
            let Fate::Pass(plan) = engine.decide(&config, addr("127.0.0.1:9")) else {
                panic!("nothing may be lost");
            };
            assert!(plan.first <= Duration::from_millis(25));
        }
    }

    #[test]
    fn same_seed_same_fates_and_directions_draw_independently() {
        let config = Impairment::parse("loss=30%,jitter=5ms,dup=5%").expect("valid");
        let peer = addr("127.0.0.1:9");
        let run = |way, seed| {
            let mut engine = Engine::new(way, seed);
            (0..1000)
                .map(|_| engine.decide(&config, peer))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(Way::Out, 9), run(Way::Out, 9));
        // A refused batch is undone, burst state included.
        let config = Impairment::parse("loss=30%,burst=5%/20%,jitter=5ms").expect("valid");
        let mut engine = Engine::new(Way::Out, 4);
        let checkpoint = engine.checkpoint(peer);
        let first: Vec<Fate> = (0..50).map(|_| engine.decide(&config, peer)).collect();
        engine.restore(peer, checkpoint);
        let again: Vec<Fate> = (0..50).map(|_| engine.decide(&config, peer)).collect();
        assert_eq!(first, again);
        assert_ne!(run(Way::Out, 9), run(Way::Out, 10));
        assert_ne!(run(Way::Out, 9), run(Way::In, 9));
    }

    #[test]
    fn direction_overrides_and_cuts_pick_the_right_settings() {
        let config =
            Impairment::parse("loss=100%,dir=out,loss@127.0.0.1:2=0%,cut=127.0.0.1:3,seed=1")
                .expect("valid");
        let mut out = Engine::new(Way::Out, 1);
        let mut inbound = Engine::new(Way::In, 1);
        assert_eq!(out.decide(&config, addr("127.0.0.1:1")), Fate::Lost);
        assert_eq!(
            inbound.decide(&config, addr("127.0.0.1:1")),
            Fate::Pass(Plan::NOW)
        );
        assert_eq!(
            out.decide(&config, addr("127.0.0.1:2")),
            Fate::Pass(Plan::NOW)
        );
        // A cut acts both ways whatever `dir` says.
        assert_eq!(out.decide(&config, addr("127.0.0.1:3")), Fate::Cut);
        assert_eq!(inbound.decide(&config, addr("127.0.0.1:3")), Fate::Cut);
    }

    #[test]
    fn one_way_cuts_parse_print_and_drop_one_direction_only() {
        let text =
            "cut=127.0.0.1:3,cut_out=127.0.0.1:4,cut_out=127.0.0.1:5,cut_in=127.0.0.1:6,seed=1";
        let config = Impairment::parse(text).expect("valid");
        assert_eq!(config.to_string(), text);
        assert!(!config.is_none());
        let mut out = Engine::new(Way::Out, 1);
        let mut inbound = Engine::new(Way::In, 1);
        for peer in ["127.0.0.1:4", "127.0.0.1:5"] {
            assert_eq!(out.decide(&config, addr(peer)), Fate::Cut, "{peer}");
            assert_eq!(
                inbound.decide(&config, addr(peer)),
                Fate::Pass(Plan::NOW),
                "{peer}"
            );
        }
        assert_eq!(
            out.decide(&config, addr("127.0.0.1:6")),
            Fate::Pass(Plan::NOW)
        );
        assert_eq!(inbound.decide(&config, addr("127.0.0.1:6")), Fate::Cut);
        // `cut` keeps meaning both directions.
        assert_eq!(out.decide(&config, addr("127.0.0.1:3")), Fate::Cut);
        assert_eq!(inbound.decide(&config, addr("127.0.0.1:3")), Fate::Cut);
        // A one-way cut is socket-wide, never per peer.
        assert_eq!(
            Impairment::parse("cut_out@127.0.0.1:2=127.0.0.1:3"),
            Err(ImpairmentError::NotPerPeer {
                key: "cut_out".into()
            })
        );
        assert!(matches!(
            Impairment::parse("cut_in=nowhere"),
            Err(ImpairmentError::BadValue { .. })
        ));
    }

    #[tokio::test]
    async fn handle_cuts_one_direction_and_heals_every_direction() {
        let (socket, handle) = bind(addr("127.0.0.1:0"), None).expect("bind");
        let peer = addr("127.0.0.1:9");
        let mapped = addr("[::ffff:127.0.0.1]:9");
        handle.cut_dir(peer, Direction::Outbound);
        assert!(handle.is_cut_dir(mapped, Direction::Outbound));
        assert!(!handle.is_cut_dir(peer, Direction::Inbound));
        assert!(!handle.is_cut_dir(peer, Direction::Both));
        assert!(!handle.is_cut(peer));
        // A cut socket leaves the fast path: datagrams to the peer are counted as cut.
        let transmit = Transmit {
            destination: peer,
            ecn: None,
            contents: b"x",
            segment_size: None,
            src_ip: None,
        };
        socket
            .try_send(&transmit)
            .expect("dropped datagrams count as sent");
        assert_eq!(handle.stats().outbound.cut, 1);
        handle.cut_dir(peer, Direction::Inbound);
        assert!(handle.is_cut_dir(peer, Direction::Both));
        handle.heal(peer);
        assert!(!handle.is_cut_dir(peer, Direction::Outbound));
        assert!(!handle.is_cut_dir(peer, Direction::Inbound));
        assert!(handle.impairment().is_none());
        handle.cut_dir(peer, Direction::Inbound);
        handle.cut_dir(addr("127.0.0.1:10"), Direction::Both);
        handle.heal_all();
        assert!(handle.impairment().is_none());
    }

    #[test]
    fn timed_queue_is_bounded_and_fifo_for_equal_due_times() {
        let mut queue = TimedQueue::default();
        let due = Instant::now();
        let datagram = |byte: u8| Delayed {
            due,
            seq: 0,
            peer: addr("127.0.0.1:1"),
            ecn: None,
            local_ip: None,
            data: vec![byte].into(),
        };
        for byte in 0..3 {
            assert!(queue.push(datagram(byte), 3).is_ok());
        }
        assert!(queue.push(datagram(9), 3).is_err());
        let order: Vec<u8> = std::iter::from_fn(|| queue.pop_due(due))
            .map(|d| d.data[0])
            .collect();
        assert_eq!(order, [0, 1, 2]);
    }

    /// Segment `id` of a synthetic receive buffer: `len` bytes of value `id`.
    fn segment(id: u8, len: usize) -> Vec<u8> {
        vec![id; len]
    }

    /// The datagrams quinn would read from the first `slots` slots.
    fn datagrams(storage: &[Vec<u8>], meta: &[RecvMeta], slots: usize) -> Vec<Vec<u8>> {
        meta.iter()
            .zip(storage)
            .take(slots)
            .flat_map(|(m, buf)| buf[..m.len].chunks(m.stride).map(<[u8]>::to_vec))
            .collect()
    }

    fn inbound(seed: u64) -> Inbound {
        Inbound {
            engine: Engine::new(Way::In, seed),
            queue: TimedQueue::default(),
            timer: None,
        }
    }

    #[test]
    fn gro_buffers_are_judged_per_datagram_and_packed() {
        // Many seeds, so some drop whole slots (packing moves datagrams across slots), some
        // drop the short last datagram, some keep everything.
        let mut slots_seen = BTreeSet::new();
        for seed in 0..64 {
            let slots = check_gro_packing(seed);
            slots_seen.insert(slots);
        }
        println!("slot counts seen over 64 seeds: {slots_seen:?}");
        assert!(slots_seen.len() > 2);
    }

    /// One round of [`gro_buffers_are_judged_per_datagram_and_packed`]; returns the slots used.
    fn check_gro_packing(seed: u64) -> usize {
        let config = Impairment::parse("loss=50%")
            .expect("valid")
            .with_seed(seed);
        let peer = addr("127.0.0.1:9");
        // Slot 0: a GRO buffer of five datagrams, stride 10, the last one short (4 bytes).
        // Slot 1: a single datagram. Slot 2: a GRO buffer of three full datagrams.
        let layout: [Vec<usize>; 3] = [vec![10, 10, 10, 10, 4], vec![7], vec![10, 10, 10]];
        let mut storage = vec![vec![0u8; 64]; 3];
        let mut meta = [RecvMeta::default(); 3];
        let mut all = Vec::new();
        let mut id = 1u8;
        for (slot, lens) in layout.iter().enumerate() {
            let mut bytes = Vec::new();
            for &len in lens {
                let seg = segment(id, len);
                bytes.extend_from_slice(&seg);
                all.push(seg);
                id += 1;
            }
            storage[slot][..bytes.len()].copy_from_slice(&bytes);
            meta[slot] = RecvMeta {
                addr: peer,
                len: bytes.len(),
                stride: lens[0],
                ecn: None,
                dst_ip: None,
            };
        }
        // What the same seed decides, datagram by datagram, in arrival order.
        let mut replay = Engine::new(Way::In, seed);
        let expected: Vec<Vec<u8>> = all
            .iter()
            .filter(|_| replay.decide(&config, peer) != Fate::Lost)
            .cloned()
            .collect();

        let mut tally = DirectionStats::default();
        let mut state = inbound(seed);
        let slots = {
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            state.filter_received(
                &config,
                Instant::now(),
                16,
                true,
                &mut bufs,
                &mut meta,
                0,
                3,
                &mut tally,
            )
        };
        let delivered = datagrams(&storage, &meta, slots);
        assert_eq!(delivered, expected, "seed {seed}");
        assert_eq!(tally.offered, 9);
        assert_eq!(tally.lost + tally.delivered, 9);
        assert_eq!(tally.delivered as usize, expected.len());
        slots
    }

    #[test]
    fn immediate_inbound_duplicates_follow_on_the_next_read() {
        let config = Impairment::parse("dup=100%,seed=1").expect("valid");
        let peer = addr("127.0.0.1:9");
        let mut storage = vec![vec![0u8; 16]; 2];
        let mut meta = [RecvMeta::default(); 2];
        for (slot, id) in [(0, 1u8), (1, 2u8)] {
            storage[slot][..3].copy_from_slice(&segment(id, 3));
            meta[slot] = RecvMeta {
                addr: peer,
                len: 3,
                stride: 3,
                ecn: None,
                dst_ip: None,
            };
        }
        let mut tally = DirectionStats::default();
        let mut state = inbound(1);
        let now = Instant::now();
        let slots = {
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            state.filter_received(
                &config, now, 16, true, &mut bufs, &mut meta, 0, 2, &mut tally,
            )
        };
        assert_eq!(slots, 2);
        assert_eq!(state.queue.len(), 2);
        storage.iter_mut().for_each(|b| b.fill(0));
        let copies = {
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            state.deliver_due(now, &mut bufs, &mut meta, &mut tally)
        };
        assert_eq!(copies, 2);
        assert_eq!(
            datagrams(&storage, &meta, copies),
            [segment(1, 3), segment(2, 3)]
        );
        assert_eq!(
            (tally.duplicated, tally.delivered, tally.delayed),
            (2, 4, 0)
        );
    }

    #[test]
    fn durations_and_probabilities_print_compactly() {
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(fmt_duration(Duration::from_secs(2)), "2s");
        assert_eq!(fmt_duration(Duration::from_micros(250)), "250us");
        assert_eq!(fmt_duration(Duration::from_nanos(7)), "7ns");
        assert_eq!(fmt_probability(0.2), "20%");
        assert_eq!(fmt_probability(0.001234), "0.1234%");
        assert_eq!(fmt_probability(1.0), "100%");
    }
}
