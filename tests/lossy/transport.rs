//! The mesh transport under stress: heavy loss on every link in both
//! directions, cuts shorter than the QUIC idle timeout, flapping partitions
//! and one-way cuts. Each test prints the quinn statistics of one link it
//! watches (congestion window, lost packets, datagram frames sent, free
//! datagram send buffer), so a stall shows where it comes from.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatmesh::mesh::wire::PeerMessage;
use chatmesh::mesh::{LinkStats, MeshCounters};
use chatmesh::netsim::Direction;
use chatmesh::registry::RegistryMessage;

use crate::common::inproc::{Cluster, seeded, start_cluster};
use crate::util::serial;

/// 30% loss and 40 +- 20 ms on every socket, both directions: a datagram
/// passes two impaired stages, so about 51% loss and 80 +- 40 ms per link.
const BAD_LAN_BOTH_WAYS: &str = "loss=30%,delay=40ms,jitter=20ms";

/// A clean LAN apart from the cuts the tests make.
const CLEAN: &str = "loss=0%";

/// On a loaded 2-core machine (other agents building) timers and tasks run
/// late; added to the ideal recovery time after a heal, said in the output.
const LOADED_MACHINE_MARGIN: Duration = Duration::from_millis(1000);

/// Logs to the test output when `RUST_LOG` is set (e.g. `RUST_LOG=chatmesh=info`
/// shows every `peer_down` with its reason and every mesh link event). Each
/// line names its thread: a node's mesh and cluster task run on its own
/// thread, `cluster-s1` for s1, so the thread says which node logged it.
fn trace_if_asked() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_thread_names(true)
            .with_test_writer()
            .try_init();
    }
}

/// Scheduling lateness beyond which a failure timeout (350 ms) cannot be met
/// by anyone: the test's own runtime did not run for that long.
const STARVED: Duration = Duration::from_millis(150);

/// Measures how late a 10 ms timer fires in this runtime: how starved the
/// in-process nodes were (they share it).
struct LagProbe {
    worst_us: std::sync::Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LagProbe {
    fn start() -> LagProbe {
        let worst_us = std::sync::Arc::new(AtomicU64::new(0));
        let sink = worst_us.clone();
        let task = tokio::spawn(async move {
            loop {
                let asked = Instant::now();
                tokio::time::sleep(Duration::from_millis(10)).await;
                let late = asked.elapsed().saturating_sub(Duration::from_millis(10));
                sink.fetch_max(late.as_micros() as u64, Ordering::Relaxed);
            }
        });
        LagProbe { worst_us, task }
    }

    fn worst(&self) -> Duration {
        Duration::from_micros(self.worst_us.load(Ordering::Relaxed))
    }
}

impl Drop for LagProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Failure detections, counted from every node's view of its peers.
fn peer_state_changes(cluster: &Cluster) -> u64 {
    cluster
        .running()
        .iter()
        .map(|&i| cluster.node(i).view().peer_state_changes)
        .sum()
}

/// Whether every node of `group` sees every node of `group` alive.
fn all_alive(cluster: &Cluster, group: &[usize]) -> bool {
    group.iter().all(|&i| {
        let view = cluster.node(i).view();
        group
            .iter()
            .all(|&j| view.members.get(j).is_some_and(|m| m.alive))
    })
}

/// One of node `i`'s mesh counters.
fn counter(cluster: &Cluster, i: usize, pick: impl Fn(&MeshCounters) -> &AtomicU64) -> u64 {
    pick(cluster.node(i).mesh().counters()).load(Ordering::Relaxed)
}

/// One line of a link's transport state.
fn describe(stats: Option<LinkStats>) -> String {
    match stats {
        None => "no live link".to_owned(),
        Some(s) => format!(
            "cwnd={} rtt={:?} sent_packets={} lost_packets={} congestion_events={} \
             datagram_frames_tx={} datagram_frames_rx={} udp_tx={} udp_rx={} datagram_send_space={}",
            s.quic.path.cwnd,
            s.quic.path.rtt,
            s.quic.path.sent_packets,
            s.quic.path.lost_packets,
            s.quic.path.congestion_events,
            s.quic.frame_tx.datagram,
            s.quic.frame_rx.datagram,
            s.quic.udp_tx.datagrams,
            s.quic.udp_rx.datagrams,
            s.datagram_send_space,
        ),
    }
}

/// The link from node `from` to node `to`, described.
fn link(cluster: &Cluster, from: usize, to: usize) -> String {
    describe(
        cluster
            .node(from)
            .mesh()
            .link_stats(&format!("s{}", to + 1)),
    )
}

/// Cuts every link between the two groups, both directions (no journal mark:
/// these tests claim no names).
fn cut(cluster: &Cluster, left: &[usize], right: &[usize]) {
    for &a in left {
        for &b in right {
            cluster.impair(a).cut(cluster.mesh_addrs[b]);
            cluster.impair(b).cut(cluster.mesh_addrs[a]);
        }
    }
}

/// How often each node sends a ballast frame to each peer across a cut.
const BALLAST_EVERY: Duration = Duration::from_millis(5);

/// Sends one stream frame from every node of each group to every node of
/// the other, like the election and registry messages a server sends to a
/// peer it cannot reach yet: they fill the congestion window while the cut
/// lasts, which is what starved heartbeats after a heal. The frame is an
/// eviction of nothing at term 0, which every registry ignores as stale.
fn send_ballast(cluster: &Cluster, left: &[usize], right: &[usize]) {
    let ballast = PeerMessage::Registry(RegistryMessage::Evict {
        term: 0,
        seq: 0,
        identities: Vec::new(),
        rooms: Vec::new(),
    });
    for (from, to) in left
        .iter()
        .flat_map(|&a| right.iter().flat_map(move |&b| [(a, b), (b, a)]))
    {
        cluster
            .node(from)
            .mesh()
            .send(&format!("s{}", to + 1), &ballast);
    }
}

/// Waits until every node of `group` sees the whole group alive; returns when.
async fn wait_all_alive(cluster: &Cluster, group: &[usize], within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if all_alive(cluster, group) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_servers_at_51_percent_loss_per_link_keep_one_leader_for_60_s() {
    let _serial = serial().await;
    trace_if_asked();
    let seed = 6000;
    println!(
        "scenario heavy loss: 5 servers, {BAD_LAN_BOTH_WAYS} on every socket (dir=both: ~51% loss, 80 +- 40 ms per link), seeds {seed}..{}",
        seed + 4
    );
    let (cluster, term) = heavy_loss_cluster("heavy loss", seed).await;
    let all = [0, 1, 2, 3, 4];
    let baseline = peer_state_changes(&cluster);
    let replaced_before: u64 = all
        .iter()
        .map(|&i| counter(&cluster, i, |c| &c.links_replaced))
        .sum();
    println!("heavy loss: s1->s5 at start: {}", link(&cluster, 0, 4));

    let lag = LagProbe::start();
    let soak = Duration::from_secs(
        std::env::var("SOAK_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let start = Instant::now();
    let mut checks = 0;
    let mut leaderless = Vec::new();
    while start.elapsed() < soak {
        if cluster.agree(&all, 4) != Some(term) {
            leaderless.push(start.elapsed());
        }
        checks += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let false_downs = peer_state_changes(&cluster) - baseline;
    let stats = cluster.impair(0).stats();
    let counters = cluster.node(0).mesh().counters();
    println!(
        "heavy loss: {soak:?}, {checks} checks, {} without one agreed leader, false downs {false_downs}",
        leaderless.len()
    );
    println!("heavy loss: s1->s5 at end: {}", link(&cluster, 0, 4));
    let sum = |pick: fn(&MeshCounters) -> &AtomicU64| -> u64 {
        all.iter().map(|&i| counter(&cluster, i, pick)).sum()
    };
    println!(
        "heavy loss: links replaced during the soak (both ends counted) {}; since the start: silent-link redials {}, links down {}",
        sum(|c| &c.links_replaced) - replaced_before,
        sum(|c| &c.silent_link_redials),
        sum(|c| &c.links_down),
    );
    println!(
        "heavy loss: s1 heartbeats sent {} received {} (4 peers, 50/s each); s1 mesh socket: {stats}",
        counters
            .heartbeats_sent
            .load(std::sync::atomic::Ordering::Relaxed),
        counters
            .heartbeats_received
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    let worst_lag = lag.worst();
    println!(
        "heavy loss: worst lateness of a 10 ms timer in this runtime during the soak: {worst_lag:?}"
    );
    // A timer hundreds of ms late means the machine starved every node's
    // tasks (other builds on 2 cores): heartbeats then stop at the source,
    // which no transport setting can help. Only then is a down excused.
    // (About 1 run in 8 used to see a peer down and up again here, unstarved:
    // a connection dialed during formation replaced a link just after the
    // cluster was stable, and the acceptor's heartbeats went out on the new
    // connection only while its Hello answer to the dialer was still being
    // retransmitted, 483 ms; see `Mesh::send_heartbeat`. A replacement whose
    // dialer gave up waiting for that answer was a false down at both ends:
    // see `links_replaced_at_51_percent_loss_cause_no_false_down`.)
    expect_one_leader_and_no_false_down("heavy loss", worst_lag, false_downs, term, &leaderless);
    cluster.stop().await;
}

/// Five servers with about 51% loss per link (seeds `seed`..`seed + 4`),
/// once they have agreed on s5 for 2 s; with its term.
async fn heavy_loss_cluster(what: &str, seed: u64) -> (Cluster, u64) {
    let cluster = start_cluster(5, |i| Some(seeded(BAD_LAN_BOTH_WAYS, seed, i))).await;
    let (took, term) = cluster
        .wait_stable(
            &[0, 1, 2, 3, 4],
            4,
            Duration::from_secs(2),
            Duration::from_secs(40),
        )
        .await;
    println!("{what}: agreed on s5 at term {term}, stable for 2 s, after {took:?}");
    (cluster, term)
}

/// No peer was falsely seen down (unless the machine starved the test: a
/// timer `worst_lag` late means heartbeats stopped at the source), and s5
/// led at `term` at every check.
fn expect_one_leader_and_no_false_down(
    what: &str,
    worst_lag: Duration,
    false_downs: u64,
    term: u64,
    leaderless: &[Duration],
) {
    if worst_lag < STARVED {
        assert_eq!(false_downs, 0, "{what}: no false peer down");
    } else {
        println!("{what}: the machine starved the test for {worst_lag:?}; downs excused");
    }
    assert!(
        leaderless.is_empty(),
        "{what}: one leader s5 at term {term} throughout; not at {leaderless:?}"
    );
}

/// The hard case of a link's life under heavy loss, made to happen: every
/// second one server dials a replacement of its live link to another (as it
/// does when a link goes silent, or when a dial made during formation
/// completes late), at ~51% loss per link. Each replacement's `Hello`
/// exchange takes several retransmissions; neither end may stop hearing the
/// other meanwhile. Before the heartbeats went out on the old connection too
/// during a handover, the acceptor's went to the new one only, which the
/// dialer reads only once the answer arrives: a false down whenever that
/// took longer than the failure timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_replaced_at_51_percent_loss_cause_no_false_down() {
    let _serial = serial().await;
    trace_if_asked();
    let seed = 6100;
    let rounds = 30;
    println!(
        "scenario replacements under heavy loss: 5 servers, {BAD_LAN_BOTH_WAYS} on every socket (seeds {seed}..{}), one link replaced every second, {rounds} times",
        seed + 4
    );
    let (cluster, term) = heavy_loss_cluster("replacements", seed).await;
    let all = [0, 1, 2, 3, 4];
    let sum = |pick: fn(&MeshCounters) -> &AtomicU64| -> u64 {
        all.iter().map(|&i| counter(&cluster, i, pick)).sum()
    };
    let baseline = peer_state_changes(&cluster);
    let replaced_before = sum(|c| &c.links_replaced);
    let lag = LagProbe::start();
    let start = Instant::now();
    let mut leaderless = Vec::new();
    for round in 0..rounds {
        // Every ordered pair of servers in turn.
        let from = round % 5;
        let to = (from + 1 + (round / 5) % 4) % 5;
        assert!(cluster.node(from).mesh().redial(&format!("s{}", to + 1)));
        let next = Duration::from_secs(round as u64 + 1);
        while start.elapsed() < next {
            if cluster.agree(&all, 4) != Some(term) {
                leaderless.push(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The last replacements finish (a Hello exchange may take seconds, more
    // on a busy machine: in CI, 14 of 30 had finished after 5 s): at least
    // 5 s, then until most have, for at most 30 s.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(5)
        || (sum(|c| &c.links_replaced) - replaced_before < rounds as u64
            && settle.elapsed() < Duration::from_secs(30))
    {
        if cluster.agree(&all, 4) != Some(term) {
            leaderless.push(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let false_downs = peer_state_changes(&cluster) - baseline;
    let replaced = sum(|c| &c.links_replaced) - replaced_before;
    let worst_lag = lag.worst();
    println!(
        "replacements: {rounds} asked, links replaced (both ends counted) {replaced}, false downs (peer state changes) {false_downs}, {} checks without one agreed leader; worst lateness of a 10 ms timer in this runtime {worst_lag:?}",
        leaderless.len()
    );
    assert!(
        replaced >= rounds as u64,
        "most asked replacements happened (each counts at both ends): {replaced}"
    );
    expect_one_leader_and_no_false_down("replacements", worst_lag, false_downs, term, &leaderless);
    cluster.stop().await;
}

/// Cuts `steps` one after the other (each: left group, right group, how
/// long), heals, and returns how long after the heal every server saw every
/// other alive again. Prints the s1->s3 link's transport state along the way.
async fn cut_and_heal(seed: u64, steps: &[(&[usize], &[usize], Duration)]) -> Duration {
    let cluster = start_cluster(5, |i| Some(seeded(CLEAN, seed, i))).await;
    let all = [0, 1, 2, 3, 4];
    cluster
        .wait_stable(&all, 4, Duration::from_secs(1), Duration::from_secs(20))
        .await;
    let timing = cluster.config.timing.clone();
    println!("before the cut: s1->s3 {}", link(&cluster, 0, 2));
    for (left, right, how_long) in steps {
        for i in all {
            cluster.impair(i).heal_all();
        }
        cut(&cluster, left, right);
        println!(
            "cut {left:?} | {right:?} (0-based) for {how_long:?}, with ballast frames across it"
        );
        let cut_at = Instant::now();
        while cut_at.elapsed() < *how_long {
            send_ballast(&cluster, left, right);
            tokio::time::sleep(BALLAST_EVERY).await;
        }
        println!("end of that cut: s1->s3 {}", link(&cluster, 0, 2));
    }
    let healed = Instant::now();
    for i in all {
        cluster.impair(i).heal_all();
    }
    let took = wait_all_alive(&cluster, &all, Duration::from_secs(10)).await;
    let after = healed.elapsed();
    println!(
        "after the heal ({after:?}): s1->s3 {}",
        link(&cluster, 0, 2)
    );
    let took = took.unwrap_or_else(|| {
        let views: Vec<_> = all.iter().map(|&i| cluster.node(i).view()).collect();
        panic!("not every server saw every other alive within 10 s of the heal: {views:#?}")
    });
    let replaced: u64 = all
        .iter()
        .map(|&i| counter(&cluster, i, |c| &c.links_replaced))
        .sum();
    let redials: u64 = all
        .iter()
        .map(|&i| counter(&cluster, i, |c| &c.silent_link_redials))
        .sum();
    println!(
        "links replaced (both ends counted): {replaced}, replacements dialed for silent links: {redials}"
    );
    let bound = timing.failure_timeout + timing.heartbeat_interval + LOADED_MACHINE_MARGIN;
    println!(
        "every server sees every other alive {took:?} after the heal (bound: failure timeout {:?} + heartbeat {:?} + margin for a loaded machine {LOADED_MACHINE_MARGIN:?})",
        timing.failure_timeout, timing.heartbeat_interval
    );
    // The election settles too (leadership is what the cluster uses).
    let (agreed, term) = cluster.wait_agree(&all, 4, Duration::from_secs(10)).await;
    println!("one leader s5 at term {term}, {agreed:?} after all were alive");
    cluster.stop().await;
    assert!(took <= bound, "alive again after {took:?}, bound {bound:?}");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_shorter_than_the_idle_timeout_heals_within_the_failure_timeout() {
    let _serial = serial().await;
    trace_if_asked();
    println!("scenario short cut: 5 servers, {{s1,s2}} | {{s3,s4,s5}} for 2.5 s, then healed");
    cut_and_heal(7000, &[(&[0, 1], &[2, 3, 4], Duration::from_millis(2500))]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_partition_heals_within_the_failure_timeout() {
    let _serial = serial().await;
    trace_if_asked();
    println!(
        "scenario flap: 5 servers, {{s1,s2}} | {{s3,s4,s5}} for 1 s, then {{s1,s3}} | {{s2,s4,s5}} for 1 s, then healed"
    );
    cut_and_heal(
        7100,
        &[
            (&[0, 1], &[2, 3, 4], Duration::from_secs(1)),
            (&[0, 2], &[1, 3, 4], Duration::from_secs(1)),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_cut_keeps_the_election_usable_and_heals_into_one_leader() {
    let _serial = serial().await;
    trace_if_asked();
    let seed = 7200;
    println!("scenario one-way cut: 5 servers, s5 stops hearing s1 (s1 still hears s5) for 3 s");
    let cluster = start_cluster(5, |i| Some(seeded(CLEAN, seed, i))).await;
    let all = [0, 1, 2, 3, 4];
    let (_, term) = cluster
        .wait_stable(&all, 4, Duration::from_secs(1), Duration::from_secs(20))
        .await;
    let baseline = peer_state_changes(&cluster);
    // On s1's socket: nothing it sends reaches s5; what s5 sends arrives.
    cluster
        .impair(0)
        .cut_dir(cluster.mesh_addrs[4], Direction::Outbound);
    let cut_at = Instant::now();
    let mut seen = Vec::new();
    let mut other_leaders = Vec::new();
    while cut_at.elapsed() < Duration::from_secs(3) {
        for i in all {
            let view = cluster.node(i).view();
            if view.leader.as_deref() != Some("s5") || view.term != term {
                other_leaders.push((i + 1, view.leader, view.term, cut_at.elapsed()));
            }
        }
        let s1 = cluster.node(0).view();
        let s5 = cluster.node(4).view();
        let line = format!(
            "s1: leader {:?} term {} sees s5 alive {}; s5: leader {:?} term {} sees s1 alive {}",
            s1.leader, s1.term, s1.members[4].alive, s5.leader, s5.term, s5.members[0].alive
        );
        if seen.last() != Some(&line) {
            println!("{:>5} ms  {line}", cut_at.elapsed().as_millis());
            seen.push(line);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // s5 must have noticed s1's silence (the cut is real) ...
    let s5 = cluster.node(4).view();
    println!("during the cut: s5 sees s1 alive: {}", s5.members[0].alive);
    println!(
        "during the cut: peer transitions {}, links replaced {}, silent-link redials {}",
        peer_state_changes(&cluster) - baseline,
        all.iter()
            .map(|&i| counter(&cluster, i, |c| &c.links_replaced))
            .sum::<u64>(),
        all.iter()
            .map(|&i| counter(&cluster, i, |c| &c.silent_link_redials))
            .sum::<u64>()
    );
    assert!(
        peer_state_changes(&cluster) > baseline,
        "s5 stopped hearing s1, so someone saw a change"
    );
    // ... and nobody needed an election: s1 still hears its leader, s5 leads.
    assert!(
        other_leaders.is_empty(),
        "every server kept s5 at term {term} through the one-way cut; not at {other_leaders:?}"
    );
    cluster.impair(0).heal_all();
    let healed = Instant::now();
    let (took, new_term) = cluster.wait_agree(&all, 4, Duration::from_secs(10)).await;
    println!(
        "one-way cut healed: all agree on s5 at term {new_term} (was {term}) {took:?} after the heal ({:?})",
        healed.elapsed()
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_hears_nobody_is_replaced_before_its_links_idle_out() {
    let _serial = serial().await;
    trace_if_asked();
    let seed = 7250;
    println!(
        "scenario deaf leader: 5 servers, s5 (the leader) hears nothing from anyone for 6 s, everyone still hears s5"
    );
    let cluster = start_cluster(5, |i| Some(seeded(CLEAN, seed, i))).await;
    let all = [0, 1, 2, 3, 4];
    let others = [0, 1, 2, 3];
    let timing = cluster.config.timing.clone();
    cluster
        .wait_stable(&all, 4, Duration::from_secs(1), Duration::from_secs(20))
        .await;
    for peer in others {
        cluster
            .impair(4)
            .cut_dir(cluster.mesh_addrs[peer], Direction::Inbound);
    }
    let cut_at = Instant::now();
    // s5 refuses every claim ("no majority") and, while the others hear its
    // heartbeats, nobody elects another leader: without s5 closing its links,
    // that lasts until QUIC's idle timeout (at least 3 s) closes them.
    let within = Duration::from_millis(2500);
    let (took, term) = cluster.wait_agree(&others, 3, within).await;
    println!(
        "s1-s4 agree on s4 at term {term} {took:?} after s5 went deaf (failure timeout {:?}; idle timeout at least 3 s)",
        timing.failure_timeout
    );
    let s1 = cluster.node(0).view();
    assert!(
        !s1.members[4].alive,
        "s1 sees the deaf s5 down: {:?}",
        s1.members[4]
    );
    // While s5 stays deaf no link to it comes back: s4 keeps the lead.
    while cut_at.elapsed() < Duration::from_secs(6) {
        assert!(
            cluster.agree(&others, 3) == Some(term),
            "s1-s4 kept s4 at term {term} while s5 stayed deaf; at {:?}: {:?}",
            cut_at.elapsed(),
            others.map(|i| cluster.node(i).view())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.impair(4).heal_all();
    let (took, new_term) = cluster.wait_agree(&all, 4, Duration::from_secs(10)).await;
    println!("healed: all agree on s5 at term {new_term} {took:?} later");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_link_is_replaced_and_both_ends_say_so() {
    let _serial = serial().await;
    trace_if_asked();
    println!(
        "scenario silent link: 3 servers, s1 and s2 cut from each other both ways for 1 s (over the failure timeout, under the idle timeout), then healed"
    );
    // Both ends still hear s3, so each keeps a majority and its link open
    // (a server in a minority closes its silent links instead: see
    // `a_leader_that_hears_nobody_is_replaced_before_its_links_idle_out`).
    let cluster = start_cluster(3, |i| Some(seeded(CLEAN, 7300, i))).await;
    let both = [0, 1];
    let all = [0, 1, 2];
    cluster
        .wait_stable(&all, 2, Duration::from_secs(1), Duration::from_secs(20))
        .await;
    cut(&cluster, &[0], &[1]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let redials: Vec<u64> = both
        .iter()
        .map(|&i| counter(&cluster, i, |c| &c.silent_link_redials))
        .collect();
    println!("during the cut: replacements dialed for the silent link, per server: {redials:?}");
    assert!(redials.iter().any(|&n| n >= 1), "a silent link is redialed");
    let healed = Instant::now();
    cluster.impair(0).heal_all();
    cluster.impair(1).heal_all();
    // The old connection survives the cut; the replacement dialed during it
    // completes after the heal and takes over: LinkReplaced on both ends.
    let mut replaced = [0, 0];
    while healed.elapsed() < Duration::from_secs(10) {
        replaced = [0, 1].map(|i| counter(&cluster, i, |c| &c.links_replaced));
        if replaced.iter().all(|&n| n >= 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "links replaced per server {replaced:?}, {:?} after the heal",
        healed.elapsed()
    );
    assert!(
        replaced.iter().all(|&n| n >= 1),
        "both ends saw the link replaced"
    );
    let (took, _) = cluster.wait_agree(&all, 2, Duration::from_secs(10)).await;
    println!(
        "all alive with one leader {took:?} later; s1->s2 {}",
        link(&cluster, 0, 1)
    );
    // The old connection outlives the cut (idle timeout), so no end ever
    // sees its link go down: a replacement is never a down then an up.
    // Watched for a second more, while the unused connections are closed.
    let watch = Instant::now();
    let mut downs = [0, 0];
    while watch.elapsed() < Duration::from_secs(1) && downs == [0, 0] {
        downs = [0, 1].map(|i| counter(&cluster, i, |c| &c.links_down));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("links down per server {downs:?} (from the cut to 1 s after agreeing)");
    assert_eq!(downs, [0, 0], "no link went down on either end");
    cluster.stop().await;
}

/// A QUIC connection to node `to`'s mesh port made with server `key`'s
/// (valid) cluster certificate, from outside that server's mesh: what a
/// holder of one node's key can do.
async fn intruder(cluster: &Cluster, key: &str, to: usize) -> (quinn::Endpoint, quinn::Connection) {
    let identity = chatmesh::tls::ServerIdentity::load(crate::common::certs(), key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(identity.ca.clone()).unwrap();
    let mut crypto = rustls::ClientConfig::builder_with_provider(chatmesh::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain, identity.key)
        .unwrap();
    crypto.alpn_protocols = vec![chatmesh::mesh::MESH_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
    let connecting = endpoint
        .connect(cluster.mesh_addrs[to], &format!("s{}", to + 1))
        .unwrap();
    let connection = tokio::time::timeout(Duration::from_secs(20), connecting)
        .await
        .expect("handshake within 20 s")
        .expect("a valid cluster certificate passes the TLS handshake");
    (endpoint, connection)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_a_valid_cert_but_no_good_hello_never_replaces_a_live_link() {
    use chatmesh::mesh::wire::{PeerMessage, WIRE_VERSION, encode_frame};
    let _serial = serial().await;
    trace_if_asked();
    println!(
        "scenario intruder: 3 servers linked; connections to s2 with a valid certificate (s1's or s3's key) but no good Hello"
    );
    let cluster = start_cluster(3, |i| Some(seeded(CLEAN, 7400, i))).await;
    let all = [0, 1, 2];
    let (_, term) = cluster
        .wait_stable(&all, 2, Duration::from_secs(1), Duration::from_secs(20))
        .await;
    let hello = |version, id: &str| {
        encode_frame(&PeerMessage::Hello {
            version,
            id: id.to_owned(),
            incarnation: u64::MAX,
        })
    };
    // (certificate of, what goes on the intruder's stream; None: no stream at all)
    let attempts: Vec<(&str, &str, Option<bytes::Bytes>)> = vec![
        ("claims to be s3", "s1", Some(hello(WIRE_VERSION, "s3"))),
        (
            "claims to be s2 itself",
            "s1",
            Some(hello(WIRE_VERSION, "s2")),
        ),
        (
            "another wire version",
            "s1",
            Some(hello(WIRE_VERSION + 1, "s1")),
        ),
        (
            "garbage",
            "s1",
            Some(bytes::Bytes::from_static(b"\0\0\0\x05\xff\xff\xff\xff\xff")),
        ),
        ("never sends a Hello", "s1", None),
        ("never sends a Hello", "s3", None),
    ];
    let s2 = |pick: fn(&MeshCounters) -> &AtomicU64| counter(&cluster, 1, pick);
    let replaced_before: Vec<u64> = all
        .iter()
        .map(|&i| counter(&cluster, i, |c| &c.links_replaced))
        .collect();
    let changes_before = peer_state_changes(&cluster);
    let redials_before = s2(|c| &c.silent_link_redials);
    for (what, key, first) in attempts {
        let refused_before = s2(|c| &c.links_refused);
        let heartbeats_before = s2(|c| &c.heartbeats_received);
        let start = Instant::now();
        let (endpoint, connection) = intruder(&cluster, key, 1).await;
        // Kept until s2 decides, so that an unfinished stream is not ended.
        let _stream = match &first {
            Some(bytes) => {
                let mut stream = connection.open_uni().await.unwrap();
                stream.write_all(bytes).await.unwrap();
                Some(stream)
            }
            None => None,
        };
        // Watched until s2 closes the connection: every server sees every
        // other alive and s3 as leader at the same term all along.
        let mut disturbed = Vec::new();
        let closed = loop {
            if let Some(reason) = connection.close_reason() {
                break Some(reason);
            }
            if start.elapsed() > Duration::from_secs(20) {
                break None;
            }
            if !all_alive(&cluster, &all) || cluster.agree(&all, 2) != Some(term) {
                disturbed.push(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let heartbeats = s2(|c| &c.heartbeats_received) - heartbeats_before;
        println!(
            "{what} (with {key}'s key): closed by s2 after {:?}: {closed:?}; s2 received {heartbeats} heartbeats meanwhile",
            start.elapsed()
        );
        endpoint.close(0u8.into(), b"");
        let replaced: Vec<u64> = all
            .iter()
            .map(|&i| counter(&cluster, i, |c| &c.links_replaced))
            .collect();
        println!(
            "  links replaced per server {replaced:?} (before: {replaced_before:?}); peer state changes {}; s2's silent-link redials {}",
            peer_state_changes(&cluster) - changes_before,
            s2(|c| &c.silent_link_redials) - redials_before
        );
        assert_eq!(replaced, replaced_before, "{what}: no link was replaced");
        assert_eq!(
            peer_state_changes(&cluster),
            changes_before,
            "{what}: no peer down"
        );
        assert!(
            disturbed.is_empty(),
            "{what}: all alive with leader s3 at term {term} throughout; not at {disturbed:?}"
        );
        assert_eq!(
            s2(|c| &c.silent_link_redials),
            redials_before,
            "{what}: no link of s2 went silent"
        );
        assert!(heartbeats > 0, "{what}: heartbeats kept coming to s2");
        match closed {
            Some(quinn::ConnectionError::ApplicationClosed(close)) => assert_eq!(
                String::from_utf8_lossy(&close.reason),
                "bad hello",
                "{what}: closed as a bad Hello"
            ),
            other => panic!("{what}: s2 closes the connection, got {other:?}"),
        }
        assert_eq!(
            s2(|c| &c.links_refused),
            refused_before + 1,
            "{what}: counted as refused"
        );
    }
    assert_eq!(cluster.node(1).mesh().linked_peers().len(), 2);
    cluster.stop().await;
}
