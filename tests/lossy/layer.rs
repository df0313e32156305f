//! The impairment layer over real loopback UDP, driven through quinn's `AsyncUdpSocket` trait
//! (`try_send` / `poll_recv`) with two sockets. Seeds are fixed and printed with the figures.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::util::{Collector, DATAGRAM_LEN, Node, node, serial, stamp, wait_for};
use anyhow::{Result, ensure};
use chatmesh::netsim::{ImpairHandle, Impairment};
use quinn::udp::Transmit;

/// Generous bound for "everything in flight has arrived" on a loaded 2-core machine.
const SETTLE: Duration = Duration::from_secs(10);

/// Sends `count` datagrams from an outbound-impaired `sender` to a plain receiver and waits
/// until everything the layer put on the wire has arrived.
async fn run_outbound(sender: &Node, receiver: &Node, count: u64) -> Result<Collector> {
    let collector = Collector::start(receiver);
    let handle = sender.handle.clone();
    // Count the layer's delay queue too: delayed datagrams leave it in bursts when due.
    let in_flight = |_| {
        (handle.stats().sent() + handle.queued().0 as u64).saturating_sub(collector.count() as u64)
    };
    sender.send_flow(receiver.addr, 0..count, in_flight).await?;
    let settled = wait_for(SETTLE, || outbound_settled(&handle, &collector)).await;
    ensure!(
        settled,
        "not everything sent arrived: {} (kernel drops?)",
        handle.stats()
    );
    Ok(collector)
}

/// Whether the layer has accounted for every datagram offered to send (one
/// taken off its delay queue is not counted delivered at once: waiting for an
/// empty queue alone once read 1985 of 2000 under load) and every one it
/// handed to the OS has arrived.
fn outbound_settled(handle: &ImpairHandle, collector: &Collector) -> bool {
    let stats = handle.stats();
    handle.queued().0 == 0
        && stats.outbound.delivered + stats.outbound.dropped() >= stats.outbound.offered
        && collector.count() as u64 >= stats.sent()
}

/// Sends `count` datagrams from a plain sender to an inbound-impaired `receiver` and waits
/// until the layer has seen all of them and handed over everything it kept.
async fn run_inbound(sender: &Node, receiver: &Node, count: u64) -> Result<Collector> {
    let collector = Collector::start(receiver);
    let handle = receiver.handle.clone();
    let in_kernel = |sent: u64| sent.saturating_sub(handle.stats().inbound.offered);
    sender.send_flow(receiver.addr, 0..count, in_kernel).await?;
    let settled = wait_for(SETTLE, || {
        let stats = handle.stats();
        stats.inbound.offered >= count
            && handle.queued().1 == 0
            && collector.count() as u64 >= stats.received()
    })
    .await;
    ensure!(settled, "inbound did not settle: {}", handle.stats());
    Ok(collector)
}

fn distinct(arrivals: &[crate::util::Arrival]) -> BTreeSet<u64> {
    arrivals.iter().map(|a| a.seq).collect()
}

/// Mean length of the runs of missing sequence numbers in `0..count`.
fn mean_loss_run(received: &BTreeSet<u64>, count: u64) -> f64 {
    let (mut runs, mut total, mut current) = (0u64, 0u64, 0u64);
    for seq in 0..count {
        if received.contains(&seq) {
            if current > 0 {
                runs += 1;
                total += current;
                current = 0;
            }
        } else {
            current += 1;
        }
    }
    if current > 0 {
        runs += 1;
        total += current;
    }
    total as f64 / runs.max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_loss_rate_matches_setting() -> Result<()> {
    let _serial = serial().await;
    let spec = "loss=20%,dir=out,seed=11";
    let (sender, receiver) = (node(spec)?, node("")?);
    let count = 10_000;
    let collector = run_outbound(&sender, &receiver, count).await?;
    let stats = sender.handle.stats();
    let measured = 1.0 - distinct(&collector.arrivals()).len() as f64 / count as f64;
    let applied = stats.outbound.lost as f64 / stats.outbound.offered as f64;
    println!(
        "[{spec}] set 20.00%, applied {:.2}%, measured at receiver {:.2}% over {count}; {stats}",
        applied * 100.0,
        measured * 100.0
    );
    ensure!(stats.outbound.offered == count);
    ensure!((measured - 0.20).abs() < 0.015, "measured loss {measured}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_loss_rate_matches_setting() -> Result<()> {
    let _serial = serial().await;
    let spec = "loss=20%,dir=in,seed=12";
    let (sender, receiver) = (node("")?, node(spec)?);
    let count = 10_000;
    let collector = run_inbound(&sender, &receiver, count).await?;
    let stats = receiver.handle.stats();
    let measured = 1.0 - distinct(&collector.arrivals()).len() as f64 / count as f64;
    println!(
        "[{spec}] set 20.00%, measured {:.2}% over {count}; {stats}",
        measured * 100.0
    );
    ensure!(collector.count() as u64 == stats.received());
    ensure!((measured - 0.20).abs() < 0.015, "measured loss {measured}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_loss_comes_in_runs() -> Result<()> {
    let _serial = serial().await;
    let spec = "burst=2%/25%,dir=out,seed=13";
    let (sender, receiver) = (node(spec)?, node("")?);
    let count = 10_000;
    let collector = run_outbound(&sender, &receiver, count).await?;
    let received = distinct(&collector.arrivals());
    let measured = 1.0 - received.len() as f64 / count as f64;
    let run = mean_loss_run(&received, count);
    println!(
        "[{spec}] loss {:.2}% (expected 7.41%), mean loss run {run:.2} (expected 4.00)",
        measured * 100.0
    );
    ensure!((measured - 0.0741).abs() < 0.025, "loss {measured}");
    ensure!((run - 4.0).abs() < 1.0, "mean run {run}");
    Ok(())
}

/// Latency figures of a run: (min, mean, max).
fn latency_summary(arrivals: &[crate::util::Arrival]) -> (Duration, Duration, Duration) {
    let min = arrivals.iter().map(|a| a.latency).min().unwrap_or_default();
    let max = arrivals.iter().map(|a| a.latency).max().unwrap_or_default();
    let sum: Duration = arrivals.iter().map(|a| a.latency).sum();
    (min, sum / arrivals.len().max(1) as u32, max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_stay_within_delay_plus_minus_jitter() -> Result<()> {
    let _serial = serial().await;
    // Timers never fire early, so the lower bound is exact; the upper one allows scheduling.
    let slack = Duration::from_millis(40);

    let spec = "delay=30ms,jitter=10ms,dir=out,seed=14";
    let (sender, receiver) = (node(spec)?, node("")?);
    let collector = run_outbound(&sender, &receiver, 1000).await?;
    let arrivals = collector.arrivals();
    let (min, mean, max) = latency_summary(&arrivals);
    println!(
        "[{spec}] outbound latency min {min:?} mean {mean:?} max {max:?} over {}; {}",
        arrivals.len(),
        sender.handle.stats()
    );
    ensure!(arrivals.len() == 1000);
    ensure!(min >= Duration::from_millis(20), "min {min:?}");
    ensure!(max <= Duration::from_millis(40) + slack, "max {max:?}");
    ensure!(
        mean >= Duration::from_millis(28) && mean <= Duration::from_millis(40),
        "mean {mean:?}"
    );

    // The same on receive: exercises the waker-driven inbound queue of poll_recv.
    let spec = "delay=25ms,jitter=5ms,dir=in,seed=15";
    let (sender, receiver) = (node("")?, node(spec)?);
    let collector = run_inbound(&sender, &receiver, 1000).await?;
    let arrivals = collector.arrivals();
    let (min, mean, max) = latency_summary(&arrivals);
    println!(
        "[{spec}] inbound latency min {min:?} mean {mean:?} max {max:?} over {}; {}",
        arrivals.len(),
        receiver.handle.stats()
    );
    ensure!(arrivals.len() == 1000);
    ensure!(min >= Duration::from_millis(20), "min {min:?}");
    ensure!(max <= Duration::from_millis(30) + slack, "max {max:?}");
    Ok(())
}

/// Extra copies per sequence number.
fn duplicates(arrivals: &[crate::util::Arrival]) -> u64 {
    let mut seen: HashMap<u64, u64> = HashMap::new();
    for a in arrivals {
        *seen.entry(a.seq).or_default() += 1;
    }
    seen.values().map(|n| n - 1).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_arrive_at_the_set_rate() -> Result<()> {
    let _serial = serial().await;
    let count = 5000;

    let spec = "dup=10%,dir=out,seed=16";
    let (sender, receiver) = (node(spec)?, node("")?);
    let collector = run_outbound(&sender, &receiver, count).await?;
    let extra = duplicates(&collector.arrivals());
    let stats = sender.handle.stats();
    println!(
        "[{spec}] {extra} duplicates observed over {count} ({:.2}%); {stats}",
        extra as f64 * 100.0 / count as f64
    );
    ensure!(extra == stats.outbound.duplicated);
    ensure!((extra as f64 / count as f64 - 0.10).abs() < 0.015);

    let spec = "dup=10%,delay=2ms,jitter=2ms,dir=in,seed=17";
    let (sender, receiver) = (node("")?, node(spec)?);
    let collector = run_inbound(&sender, &receiver, count).await?;
    let extra = duplicates(&collector.arrivals());
    let stats = receiver.handle.stats();
    println!(
        "[{spec}] {extra} duplicates observed over {count} ({:.2}%); {stats}",
        extra as f64 * 100.0 / count as f64
    );
    ensure!(extra == stats.inbound.duplicated);
    ensure!((extra as f64 / count as f64 - 0.10).abs() < 0.015);
    Ok(())
}

/// Arrivals with a lower sequence number than one that arrived before them.
fn inversions(arrivals: &[crate::util::Arrival]) -> usize {
    let mut highest = None;
    let mut late = 0;
    for a in arrivals {
        match highest {
            Some(h) if a.seq < h => late += 1,
            _ => highest = Some(a.seq),
        }
    }
    late
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter_and_reorder_reorder_datagrams() -> Result<()> {
    let _serial = serial().await;
    let count = 2000;

    let spec = "delay=20ms,jitter=15ms,dir=out,seed=18";
    let (sender, receiver) = (node(spec)?, node("")?);
    let collector = run_outbound(&sender, &receiver, count).await?;
    let arrivals = collector.arrivals();
    let late = inversions(&arrivals);
    let stats = sender.handle.stats();
    println!(
        "[{spec}] {late} of {} arrived out of order; {stats}",
        arrivals.len()
    );
    // The layer delays, never drops, here; the jitter releases datagrams in
    // bunches, and the kernel may drop one on a full loopback receive buffer
    // (seen once in a CI run: 1999 of 2000), which is not the layer's doing.
    ensure!(stats.outbound.lost == 0 && stats.outbound.overflow == 0);
    ensure!(
        arrivals.len() as u64 + 2 >= count,
        "{} of {count} arrived",
        arrivals.len()
    );
    ensure!(late > count as usize / 10, "only {late} reordered");

    // Without any delay, plain sending keeps the order; `reorder` alone breaks it.
    let spec = "reorder=10%,reorder_gap=5ms,dir=out,seed=19";
    let (sender, receiver) = (node(spec)?, node("")?);
    let collector = run_outbound(&sender, &receiver, count).await?;
    let arrivals = collector.arrivals();
    let late = inversions(&arrivals);
    let stats = sender.handle.stats();
    println!(
        "[{spec}] {late} of {} arrived out of order; {stats}",
        arrivals.len()
    );
    ensure!(arrivals.len() as u64 == count);
    ensure!(late > 0 && late as u64 <= stats.outbound.reordered);
    ensure!((stats.outbound.reordered as f64 / count as f64 - 0.10).abs() < 0.02);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_drops_both_ways_and_heal_restores() -> Result<()> {
    let _serial = serial().await;
    let (a, b) = (node("seed=20")?, node("")?);
    let (at_a, at_b) = (Collector::start(&a), Collector::start(&b));
    a.handle.cut(b.addr);
    ensure!(a.handle.is_cut(b.addr));

    for seq in 0..100 {
        a.send_seq(b.addr, seq).await?;
        b.send_seq(a.addr, seq).await?;
    }
    // A drops its own sends at once and B's when they arrive; wait until all 100 were seen.
    let all_cut = wait_for(SETTLE, || {
        let s = a.handle.stats();
        s.outbound.cut == 100 && s.inbound.cut == 100
    })
    .await;
    println!("while cut: {}", a.handle.stats());
    ensure!(all_cut, "cut did not see everything: {}", a.handle.stats());
    ensure!(at_a.count() == 0 && at_b.count() == 0, "a cut leaked");

    a.handle.heal(b.addr);
    ensure!(!a.handle.is_cut(b.addr));
    for seq in 100..200 {
        a.send_seq(b.addr, seq).await?;
        b.send_seq(a.addr, seq).await?;
    }
    let healed = wait_for(SETTLE, || at_a.count() == 100 && at_b.count() == 100).await;
    println!("after heal: {}", a.handle.stats());
    ensure!(healed, "a={} b={}", at_a.count(), at_b.count());
    ensure!(
        at_a.arrivals()
            .iter()
            .chain(&at_b.arrivals())
            .all(|x| x.seq >= 100),
        "a datagram sent while cut arrived"
    );

    // heal_all after cutting again, and the cut given in the CLI string.
    a.handle.cut(b.addr);
    a.handle.heal_all();
    ensure!(!a.handle.is_cut(b.addr));
    let c = node(&format!("cut={}", b.addr))?;
    ensure!(c.handle.is_cut(b.addr));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_delay_queue_drops_and_counts() -> Result<()> {
    let _serial = serial().await;
    let spec = "delay=100ms,queue=16,dir=out,seed=21";
    let (sender, receiver) = (node(spec)?, node("")?);
    let collector = Collector::start(&receiver);
    for seq in 0..100 {
        sender.send_seq(receiver.addr, seq).await?;
    }
    let settled = wait_for(SETTLE, || outbound_settled(&sender.handle, &collector)).await;
    let stats = sender.handle.stats();
    println!("[{spec}] {stats}");
    ensure!(settled);
    // Sending 100 takes far less than 100 ms, so only the first 16 fit in the queue.
    ensure!(stats.outbound.overflow >= 84 - 16 && stats.outbound.delayed >= 16);
    ensure!(stats.outbound.delayed + stats.outbound.overflow == 100);
    ensure!(collector.count() as u64 == stats.outbound.delayed);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gso_batches_are_split_into_single_datagrams() -> Result<()> {
    let _serial = serial().await;
    let spec = "loss=50%,dir=out,seed=22";
    let (sender, receiver) = (node(spec)?, node("")?);
    let collector = Collector::start(&receiver);
    let (batches, per_batch) = (40, 10);
    for batch in 0..batches {
        let contents: Vec<u8> = (0..per_batch)
            .flat_map(|i| stamp(batch * per_batch + i))
            .collect();
        sender
            .send_transmit(&Transmit {
                destination: receiver.addr,
                ecn: None,
                contents: &contents,
                segment_size: Some(DATAGRAM_LEN),
                src_ip: None,
            })
            .await?;
    }
    let total = batches * per_batch;
    let settled = wait_for(SETTLE, || {
        collector.count() as u64 >= sender.handle.stats().sent()
    })
    .await;
    let stats = sender.handle.stats();
    let arrivals = collector.arrivals();
    println!(
        "[{spec}] {batches} GSO batches of {per_batch}: {} datagrams arrived; {stats}",
        arrivals.len()
    );
    ensure!(settled);
    ensure!(
        stats.outbound.offered == total,
        "loss must hit single datagrams"
    );
    ensure!(arrivals.iter().all(|a| a.len == DATAGRAM_LEN));
    ensure!(distinct(&arrivals).len() == arrivals.len());
    let rate = stats.outbound.lost as f64 / total as f64;
    ensure!((rate - 0.5).abs() < 0.1, "loss {rate}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gro_buffers_are_split_on_receive() -> Result<()> {
    let _serial = serial().await;
    // A plain sender uses real GSO where the kernel has it, so the receiver may get GRO
    // buffers of several datagrams; the inbound layer must judge each one.
    let spec = "loss=30%,dir=in,seed=23";
    let (sender, receiver) = (node("")?, node(spec)?);
    let collector = Collector::start(&receiver);
    let per_batch = sender.socket.max_transmit_segments().clamp(1, 10) as u64;
    let batches = 400 / per_batch;
    for batch in 0..batches {
        let contents: Vec<u8> = (0..per_batch)
            .flat_map(|i| stamp(batch * per_batch + i))
            .collect();
        sender
            .send_transmit(&Transmit {
                destination: receiver.addr,
                ecn: None,
                contents: &contents,
                segment_size: (per_batch > 1).then_some(DATAGRAM_LEN),
                src_ip: None,
            })
            .await?;
        if batch % 8 == 7 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let total = batches * per_batch;
    let settled = wait_for(SETTLE, || {
        let s = receiver.handle.stats();
        s.inbound.offered >= total && collector.count() as u64 >= s.received()
    })
    .await;
    let stats = receiver.handle.stats();
    let arrivals = collector.arrivals();
    println!(
        "[{spec}] {total} datagrams in batches of {per_batch} (GSO segments {}, GRO segments {}): \
         {} arrived; {stats}",
        sender.socket.max_transmit_segments(),
        receiver.socket.max_receive_segments(),
        arrivals.len()
    );
    ensure!(settled, "{stats}");
    ensure!(arrivals.iter().all(|a| a.len == DATAGRAM_LEN));
    ensure!(arrivals.len() as u64 == stats.received());
    ensure!(distinct(&arrivals).len() == arrivals.len());
    let rate = stats.inbound.lost as f64 / total as f64;
    ensure!((rate - 0.3).abs() < 0.08, "loss {rate}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_when_off_and_changes_at_run_time() -> Result<()> {
    let _serial = serial().await;
    let (a, b) = (node("")?, node("")?);
    let at_b = Collector::start(&b);
    for seq in 0..100 {
        a.send_seq(b.addr, seq).await?;
    }
    ensure!(wait_for(SETTLE, || at_b.count() == 100).await);
    // The fast path goes straight to the inner socket: nothing is counted.
    ensure!(a.handle.stats() == Default::default());

    a.handle.set(Impairment::parse("loss=100%,seed=24")?)?;
    for seq in 100..150 {
        a.send_seq(b.addr, seq).await?;
    }
    ensure!(a.handle.stats().outbound.lost == 50);
    println!("with loss=100%: {}", a.handle.stats());

    a.handle.clear();
    ensure!(a.handle.impairment().is_none());
    for seq in 150..200 {
        a.send_seq(b.addr, seq).await?;
    }
    ensure!(wait_for(SETTLE, || at_b.count() == 150).await);
    ensure!(at_b.arrivals().iter().all(|x| !(100..150).contains(&x.seq)));
    ensure!(a.handle.stats().outbound.offered == 50);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_loses_the_same_datagrams() -> Result<()> {
    let _serial = serial().await;
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (sender, receiver) = (node("loss=30%,dir=out,seed=25")?, node("")?);
        let collector = run_outbound(&sender, &receiver, 2000).await?;
        runs.push(distinct(&collector.arrivals()));
    }
    println!("seed 25: {} of 2000 kept, both runs", runs[0].len());
    ensure!(runs[0] == runs[1], "runs differ");
    Ok(())
}
