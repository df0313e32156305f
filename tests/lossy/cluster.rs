//! Clusters of in-process nodes on impaired mesh sockets. Impairment is
//! applied outbound on every node (`dir=out`), so each one-way link sees
//! exactly the configured loss and delay.

use std::time::{Duration, Instant};

use crate::common::inproc::{Cluster, seeded, start_cluster};
use crate::util::serial;

/// The brief's bad LAN: 30% loss, 40 ms +- 20 ms one-way delay.
const BAD_LAN: &str = "loss=30%,delay=40ms,jitter=20ms,dir=out";

/// Failure detections, counted from every node's view of its peers.
fn peer_state_changes(cluster: &Cluster) -> u64 {
    cluster
        .running()
        .iter()
        .map(|&i| cluster.node(i).view().peer_state_changes)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_servers_at_30_percent_loss_keep_one_leader_for_60_s() {
    let _serial = serial().await;
    let seed = 1000;
    println!(
        "scenario soak: 5 servers, {BAD_LAN}, seeds {seed}..{}",
        seed + 4
    );
    let cluster = start_cluster(5, |i| Some(seeded(BAD_LAN, seed, i))).await;
    let all = [0, 1, 2, 3, 4];
    let (took, term) = cluster
        .wait_stable(&all, 4, Duration::from_secs(2), Duration::from_secs(30))
        .await;
    println!("soak: agreed on s5 at term {term}, stable for 2 s, after {took:?}");
    // At least each node saw each peer come up: 5 x 4 transitions.
    let baseline = peer_state_changes(&cluster);
    println!("soak: {baseline} peer transitions while the cluster formed (20 is the minimum)");
    assert!(baseline >= 20);

    let soak = Duration::from_secs(60);
    let start = Instant::now();
    let mut checks = 0;
    while start.elapsed() < soak {
        assert_eq!(
            cluster.agree(&all, 4),
            Some(term),
            "one leader, same term, all alive, at {:?}",
            start.elapsed()
        );
        checks += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let false_downs = peer_state_changes(&cluster) - baseline;
    let stats = cluster.impair(0).stats();
    println!("soak: 60 s, {checks} checks, false downs {false_downs}, s1 mesh socket: {stats}");
    assert_eq!(false_downs, 0);
    let applied = stats.outbound.lost as f64 / stats.outbound.offered.max(1) as f64;
    println!("soak: loss applied on s1 outbound {:.1}%", applied * 100.0);
    assert!((0.25..0.35).contains(&applied), "loss applied {applied}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_at_30_percent_loss_elects_a_new_one() {
    let _serial = serial().await;
    let seed = 2000;
    println!(
        "scenario failover: 5 servers, {BAD_LAN}, seeds {seed}..{}",
        seed + 4
    );
    let mut cluster = start_cluster(5, |i| Some(seeded(BAD_LAN, seed, i))).await;
    let (_, term) = cluster
        .wait_agree(&[0, 1, 2, 3, 4], 4, Duration::from_secs(20))
        .await;
    let mut samples = Vec::new();
    for round in 0..3 {
        let crashed = Instant::now();
        cluster.crash(4).await;
        let (_, new_term) = cluster
            .wait_agree(&[0, 1, 2, 3], 3, Duration::from_secs(10))
            .await;
        let took = crashed.elapsed();
        println!(
            "failover {round}: s4 agreed by all survivors {took:?} after the crash (term {new_term})"
        );
        assert!(new_term > term);
        samples.push(took);
        cluster.restart(4).await;
        cluster
            .wait_agree(&[0, 1, 2, 3, 4], 4, Duration::from_secs(20))
            .await;
    }
    samples.sort();
    println!(
        "failover at 30% loss: median {:?}, worst {:?}",
        samples[1], samples[2]
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursty_loss_below_the_failure_timeout_causes_no_false_down() {
    let _serial = serial().await;
    let seed = 3000;
    // Gilbert-Elliott: 5% chance per datagram to enter a burst, 50% to leave
    // it (mean burst 2 datagrams), plus 5% independent loss.
    let spec = "loss=5%,burst=5%/50%,dir=out";
    println!(
        "scenario bursts: 5 servers, {spec}, seeds {seed}..{}",
        seed + 4
    );
    let cluster = start_cluster(5, |i| Some(seeded(spec, seed, i))).await;
    let all = [0, 1, 2, 3, 4];
    let (_, term) = cluster
        .wait_stable(&all, 4, Duration::from_secs(2), Duration::from_secs(30))
        .await;
    let baseline = peer_state_changes(&cluster);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        assert_eq!(cluster.agree(&all, 4), Some(term));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let false_downs = peer_state_changes(&cluster) - baseline;
    let stats = cluster.impair(0).stats();
    println!("bursts: 20 s, false downs {false_downs}, s1 mesh socket: {stats}");
    assert_eq!(false_downs, 0);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_heals_into_one_leader() {
    let _serial = serial().await;
    let seed = 4000;
    let spec = "loss=5%,delay=5ms,jitter=2ms,dir=out";
    println!(
        "scenario partition: 5 servers, {spec}, seeds {seed}..{}",
        seed + 4
    );
    let cluster = start_cluster(5, |i| Some(seeded(spec, seed, i))).await;
    let (minority, majority) = ([0, 1], [2, 3, 4]);
    let all = [0, 1, 2, 3, 4];
    cluster.wait_agree(&all, 4, Duration::from_secs(20)).await;

    cluster.partition(&minority, &majority);
    let cut = Instant::now();
    // The majority keeps its leader; the minority sees it gone and elects s2
    // (leadership only: names and their quorum rule come with the registry).
    let (_, majority_term) = cluster
        .wait_agree(&majority, 4, Duration::from_secs(10))
        .await;
    let (_, minority_term) = cluster
        .wait_agree(&minority, 1, Duration::from_secs(10))
        .await;
    println!(
        "partition: majority keeps s5 (term {majority_term}), minority elects s2 (term {minority_term}) within {:?}",
        cut.elapsed()
    );

    cluster.heal();
    let (took, term) = cluster.wait_agree(&all, 4, Duration::from_secs(10)).await;
    println!("partition healed: one leader s5 at term {term} after {took:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_fit_in_one_datagram() {
    let _serial = serial().await;
    let cluster = start_cluster(2, |_| None).await;
    cluster
        .wait_agree(&[0, 1], 1, Duration::from_secs(10))
        .await;
    let max = cluster
        .node(0)
        .mesh()
        .max_datagram_size("s2")
        .expect("link up with datagrams");
    let heartbeat = chatmesh::mesh::wire::encode_heartbeat(&chatmesh::mesh::wire::Heartbeat {
        from: "s".repeat(32),
        term: u64::MAX,
        leader: Some("s".repeat(32)),
        seq: u64::MAX,
        sent_at_ms: u64::MAX,
    });
    println!(
        "largest heartbeat {} bytes, path allows {max}",
        heartbeat.len()
    );
    assert!(heartbeat.len() <= max);
    let errors = cluster
        .node(0)
        .mesh()
        .counters()
        .heartbeat_send_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(errors, 0, "no heartbeat was refused by the transport");
    cluster.stop().await;
}
