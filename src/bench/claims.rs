//! `bench claims`: many clients on every server of a 3-node cluster claim
//! identities and room ids at once. Measured: granted claims per second and
//! the latency of each claim, from sending `newidentity` or `createroom` to
//! its reply. A refused identity closes the connection, so every identity is
//! claimed on a fresh connection, made before the clock starts; an approved
//! one then claims one room id and hangs up, which frees both names.
//!
//! Clients come in triples, one on each server. In a fraction of the rounds a
//! triple contends on purpose: its three clients claim the same identity, or
//! (with identities of their own) the same room id, at the same moment, and
//! hold what they got until all three have their answers. Every contested
//! name must be granted exactly once cluster-wide; each extra grant is a
//! duplicate.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::sync::Barrier;

use super::procs::{ChatCluster, CpuMeter, Server, free_ports};
use super::report::{self, Plot, Report};
use super::wire::{self, Reader, Writer};
use super::{BenchOptions, Runs, progress, ticker};

/// Servers in the cluster.
const SERVERS: usize = 3;

/// The target: granted claims per second on 3 servers...
const TARGET_PER_S: f64 = 20_000.0;
/// ...with a claim latency p99 under this many milliseconds.
const TARGET_P99_MS: f64 = 5.0;

/// Triples and rounds are written in base 36 in names of at most 16
/// characters: three digits each.
const MAX_INDEX: usize = 36 * 36 * 36;

/// What a triple does in one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// Each client claims an identity and a room id of its own.
    Plain,
    /// The three claim one identity; the winner then a room id of its own.
    ContestIdentity,
    /// Each claims an identity of its own, then the three claim one room id.
    ContestRoom,
}

/// The rounds contended are spread evenly over all (triple, round) pairs, a
/// `fraction` of them, alternately on identities and on room ids.
fn round_kind(triple: usize, round: usize, triples: usize, fraction: f64) -> Round {
    let k = (round * triples + triple) as f64;
    let (before, after) = ((k * fraction).floor(), ((k + 1.0) * fraction).floor());
    if after == before {
        Round::Plain
    } else if (before as u64).is_multiple_of(2) {
        Round::ContestIdentity
    } else {
        Round::ContestRoom
    }
}

/// A name valid for the protocol (`^[A-Za-z][A-Za-z0-9]{2,15}$`): `kind`
/// ('i' or 'r'), the run's tag, triple and round in base 36, and the server
/// (or 'c' for the name all three contend for).
fn claim_name(kind: char, tag: char, triple: usize, round: usize, server: Option<usize>) -> String {
    let owner = server.map_or('c', |s| char::from(b'0' + s as u8));
    format!("{kind}{tag}{}x{}s{owner}", base36(triple), base36(round))
}

fn base36(mut n: usize) -> String {
    let mut digits = Vec::new();
    loop {
        digits.push(char::from_digit((n % 36) as u32, 36).unwrap_or('0'));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.iter().rev().collect()
}

/// One answered claim.
struct Outcome {
    name: String,
    room: bool,
    contested: bool,
    server: usize,
    granted: bool,
    micros: u32,
}

/// Latency and counts of one group of claims.
#[derive(Debug, Clone, Serialize)]
pub struct ClaimStats {
    /// Claims granted.
    pub granted: usize,
    /// Claims refused (expected for the losers of a contest).
    pub refused: usize,
    /// Granted claims per second of the run's wall time.
    pub granted_per_s: f64,
    /// Latency from request to reply over every claim, granted or not.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

impl ClaimStats {
    fn of<'a>(outcomes: impl Iterator<Item = &'a Outcome>, elapsed: f64) -> ClaimStats {
        let (mut granted, mut refused, mut micros) = (0, 0, Vec::new());
        for outcome in outcomes {
            if outcome.granted {
                granted += 1;
            } else {
                refused += 1;
            }
            micros.push(outcome.micros);
        }
        let (p50_ms, p99_ms, max_ms) = report::latency_ms(&micros);
        ClaimStats {
            granted,
            refused,
            granted_per_s: granted as f64 / elapsed.max(1e-9),
            p50_ms,
            p99_ms,
            max_ms,
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Identity claims.
    pub identities: ClaimStats,
    /// Room id claims.
    pub rooms: ClaimStats,
    /// Both.
    pub all: ClaimStats,
    /// Both, per server the clients were on (s1, s2, s3).
    pub per_server: Vec<ClaimStats>,
    /// Names claimed by one client on each server at once.
    pub contested_names: usize,
    /// Grants beyond the first of a contested name (must be 0).
    pub duplicates: usize,
    /// Contested names nobody was granted.
    pub contested_unclaimed: usize,
    /// Uncontested claims refused (a free name refused: no leader, busy).
    pub uncontested_refused: usize,
    /// Wall time of the load.
    pub elapsed_s: f64,
    /// CPU seconds of the load generator (this process) during the run.
    pub bench_cpu_s: f64,
    /// CPU seconds of each server during the run.
    pub server_cpu_s: Vec<f64>,
}

/// The shape of the load.
#[derive(Debug, Clone, Copy, Serialize)]
struct Load {
    /// Client triples (one client on each server).
    triples: usize,
    /// Identities each client claims, one after the other.
    rounds: usize,
    /// Fraction of rounds contended.
    contested: f64,
}

/// Runs the scenario: chatmesh, and its floor unless `--no-peers`.
pub async fn run(options: &BenchOptions) -> Result<Report> {
    let clients = options
        .clients
        .unwrap_or(if options.quick { 24 } else { 48 });
    let load = Load {
        triples: clients.div_ceil(SERVERS).max(1),
        rounds: options
            .claims
            .unwrap_or(if options.quick { 10 } else { 400 })
            .max(1),
        contested: options.contested,
    };
    if !(0.0..=1.0).contains(&load.contested) {
        bail!("--contested {} is not a fraction in 0..=1", load.contested);
    }
    if load.triples >= MAX_INDEX || load.rounds >= MAX_INDEX {
        bail!(
            "--clients and --claims must each stay under {MAX_INDEX} (names are at most 16 characters)"
        );
    }
    let deadline = Duration::from_secs(options.run_timeout_s);
    let mut cluster = ChatCluster::new(SERVERS, "claims", None)?;
    progress(format!("starting {SERVERS} chatmesh nodes"));
    cluster.start_all().await?;
    let all: Vec<usize> = (0..SERVERS).collect();
    cluster
        .agreement(&all, SERVERS - 1, deadline)
        .await
        .context("the cluster never agreed on a leader")?;
    for server in 0..SERVERS {
        until_granted(cluster.client_ports[server], server, deadline).await?;
    }

    // The floor's runs, or why it has none (`None`: skipped).
    let mut floor_runs = (!options.no_peers).then(Runs::default);
    let floor = match &mut floor_runs {
        None => None,
        Some(failures) => match start_floor(&cluster.dir.0, deadline).await {
            Ok(floor) => Some(floor),
            Err(e) => {
                let why = format!("the floor did not start: {e:#}");
                progress(why.clone());
                failures.errors.push(why);
                None
            }
        },
    };

    let pids = cluster.pids();
    let describe = |r: &RunResult| {
        format!(
            "{:.0} granted/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms; {} duplicates; CPU bench {:.2} s, servers {:.2} s",
            r.all.granted_per_s,
            r.all.p50_ms,
            r.all.p99_ms,
            r.all.max_ms,
            r.duplicates,
            r.bench_cpu_s,
            r.server_cpu_s.iter().sum::<f64>()
        )
    };
    // The floor's runs alternate with chatmesh's, so a machine that slows
    // down or speeds up mid-bench weighs on both alike.
    let mut runs = Runs::default();
    for run in 0..options.runs() {
        let tag = char::from(b'a' + (run % 26) as u8);
        progress(format!(
            "claims: {} clients x {} identities (+ a room each), {:.0}% contested, run {}/{}",
            load.triples * SERVERS,
            load.rounds,
            load.contested * 100.0,
            run + 1,
            options.runs()
        ));
        // Which goes first alternates too: neither always starts right
        // after the other's connections close.
        for floor_turn in [run % 2 == 1, run % 2 == 0] {
            if !floor_turn {
                runs.absorb(
                    Runs::collect(
                        1,
                        |_| one_run(&cluster.client_ports, &pids, load, tag, deadline),
                        describe,
                    )
                    .await,
                );
            } else if let (Some((server, ports)), Some(floor_runs)) = (&floor, &mut floor_runs) {
                let pid = [server.pid()];
                progress(format!(
                    "claims floor (no cluster), run {}/{}",
                    run + 1,
                    options.runs()
                ));
                floor_runs.absorb(
                    Runs::collect(1, |_| one_run(ports, &pid, load, tag, deadline), describe).await,
                );
            }
        }
    }
    drop(cluster);
    drop(floor);
    if runs.ok.is_empty() {
        bail!("every claims run failed: {}", runs.errors.join("; "));
    }
    Ok(build_report(options, load, runs, floor_runs))
}

/// Starts the floor (`chatmesh claims-floor`) on three free loopback ports,
/// its log in `dir`, and waits until it listens.
async fn start_floor(dir: &std::path::Path, within: Duration) -> Result<(Server, Vec<u16>)> {
    let ports = free_ports(SERVERS)?;
    let exe = std::env::current_exe().context("cannot find the chatmesh executable")?;
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    let args = [
        "claims-floor".to_owned(),
        "--ports".to_owned(),
        list.join(","),
    ];
    let mut server = Server::spawn("claims-floor", &exe, &args, dir)?;
    server.wait_log("claims floor listening").await?;
    for (i, &port) in ports.iter().enumerate() {
        until_granted(port, i, within).await?;
    }
    Ok((server, ports))
}

/// Claims a probe identity on `server` until one is granted: the leader is
/// elected and has the holdings of every server.
async fn until_granted(port: u16, server: usize, within: Duration) -> Result<()> {
    let start = Instant::now();
    for attempt in 0.. {
        let (mut reader, mut writer) = wire::connect_plain(port).await?;
        let name = format!("probe{server}x{attempt}");
        if wire::chat_claim(&mut reader, &mut writer, "newidentity", "identity", &name).await? {
            return Ok(());
        }
        if start.elapsed() > within {
            bail!("s{} granted no identity within {within:?}", server + 1);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!("the probe loop returns or fails")
}

async fn one_run(
    ports: &[u16],
    server_pids: &[u32],
    load: Load,
    tag: char,
    deadline: Duration,
) -> Result<RunResult> {
    let granted = Arc::new(AtomicU64::new(0));
    let cpu = CpuMeter::start(server_pids);
    let start = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for triple in 0..load.triples {
        let barrier = Arc::new(Barrier::new(SERVERS));
        for (server, &port) in ports.iter().enumerate() {
            let (barrier, granted) = (barrier.clone(), granted.clone());
            clients.spawn(async move {
                claim_loop(port, triple, server, load, tag, &barrier, &granted)
                    .await
                    .with_context(|| format!("client {triple} on s{}", server + 1))
            });
        }
    }
    let progress_task = {
        let granted = granted.clone();
        ticker(move || format!("  ... {} claims granted", granted.load(Ordering::Relaxed)))
    };
    let collect = async {
        let mut outcomes = Vec::new();
        while let Some(joined) = clients.join_next().await {
            outcomes.extend(joined.context("a client task failed")??);
        }
        anyhow::Ok(outcomes)
    };
    let outcome = tokio::time::timeout(deadline, collect).await;
    progress_task.abort();
    let elapsed = start.elapsed().as_secs_f64();
    let (bench_cpu_s, _) = cpu.read();
    let server_cpu_s = cpu.per_server();
    let outcomes = match outcome {
        Ok(result) => result?,
        Err(_) => bail!(
            "timed out after {deadline:?} with {} claims granted",
            granted.load(Ordering::Relaxed)
        ),
    };

    let mut grants: HashMap<&str, usize> = HashMap::new();
    let mut uncontested_refused = 0;
    for outcome in &outcomes {
        if outcome.contested {
            *grants.entry(&outcome.name).or_default() += usize::from(outcome.granted);
        } else if !outcome.granted {
            uncontested_refused += 1;
        }
    }
    Ok(RunResult {
        identities: ClaimStats::of(outcomes.iter().filter(|o| !o.room), elapsed),
        rooms: ClaimStats::of(outcomes.iter().filter(|o| o.room), elapsed),
        all: ClaimStats::of(outcomes.iter(), elapsed),
        per_server: (0..ports.len())
            .map(|s| ClaimStats::of(outcomes.iter().filter(|o| o.server == s), elapsed))
            .collect(),
        contested_names: grants.len(),
        duplicates: grants.values().map(|&n| n.saturating_sub(1)).sum(),
        contested_unclaimed: grants.values().filter(|&&n| n == 0).count(),
        uncontested_refused,
        elapsed_s: elapsed,
        bench_cpu_s,
        server_cpu_s,
    })
}

/// One client of a triple: `load.rounds` identities, each on a fresh
/// connection, each followed (when granted) by one room id.
async fn claim_loop(
    port: u16,
    triple: usize,
    server: usize,
    load: Load,
    tag: char,
    barrier: &Barrier,
    granted: &AtomicU64,
) -> Result<Vec<Outcome>> {
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(2 * load.rounds);
    for round in 0..load.rounds {
        let kind = round_kind(triple, round, load.triples, load.contested);
        let (mut reader, mut writer) = wire::connect_plain(port).await?;
        // The identity, then (once granted) one room id.
        for room in [false, true] {
            let contested = kind
                == if room {
                    Round::ContestRoom
                } else {
                    Round::ContestIdentity
                };
            let barrier = contested.then_some(barrier);
            if room && !outcomes.last().is_some_and(|o| o.granted) {
                // Refused an identity of its own (no leader, too busy): it
                // has no room to claim, but a contest still waits for it twice.
                if let Some(barrier) = barrier {
                    barrier.wait().await;
                    barrier.wait().await;
                }
                break;
            }
            let kind = if room { 'r' } else { 'i' };
            let name = claim_name(kind, tag, triple, round, (!contested).then_some(server));
            let (ok, micros) = claim(&mut reader, &mut writer, room, &name, barrier).await?;
            granted.fetch_add(u64::from(ok), Ordering::Relaxed);
            outcomes.push(Outcome {
                name,
                room,
                contested,
                server,
                granted: ok,
                micros,
            });
        }
        // Hanging up frees the identity and the room.
    }
    Ok(outcomes)
}

/// Claims `name`, a room id if `room` else an identity, and waits for the
/// answer; returns whether it was granted and the latency in microseconds.
/// With `barrier` (a contest), the three contenders send together and each
/// keeps what it got until all three have their answers.
async fn claim(
    reader: &mut Reader,
    writer: &mut Writer,
    room: bool,
    name: &str,
    barrier: Option<&Barrier>,
) -> Result<(bool, u32)> {
    let (kind, field) = if room {
        ("createroom", "roomid")
    } else {
        ("newidentity", "identity")
    };
    let request = wire::chat_request(kind, field, name);
    if let Some(barrier) = barrier {
        barrier.wait().await;
    }
    let sent = Instant::now();
    writer.send(&request).await?;
    let reply = wire::chat_reply(reader, kind, &format!("claiming {name}")).await;
    let micros = sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
    if let Some(barrier) = barrier {
        barrier.wait().await;
    }
    Ok((wire::approved(&reply?), micros))
}

fn build_report(
    options: &BenchOptions,
    load: Load,
    runs: Runs<RunResult>,
    floor: Option<Runs<RunResult>>,
) -> Report {
    let Some(median) = runs.median(|r| r.all.granted_per_s) else {
        unreachable!("build_report is called with at least one run");
    };
    let Runs { ok: runs, errors } = runs;
    let duplicates: usize = runs.iter().map(|r| r.duplicates).sum();
    let contested: usize = runs.iter().map(|r| r.contested_names).sum();
    let unclaimed: usize = runs.iter().map(|r| r.contested_unclaimed).sum();
    let uncontested_refused: usize = runs.iter().map(|r| r.uncontested_refused).sum();

    // CPU is per process: the load generator's on the "all" row, each
    // server's on its own row.
    let seconds = |s: f64| format!("{s:.2} s");
    let row = |label: String, stats: &ClaimStats, cpu: [String; 2]| {
        let [bench, servers] = cpu;
        vec![
            label,
            stats.granted.to_string(),
            stats.refused.to_string(),
            format!("{:.0}", stats.granted_per_s),
            format!("{:.2}", stats.p50_ms),
            format!("{:.2}", stats.p99_ms),
            format!("{:.1}", stats.max_ms),
            bench,
            servers,
        ]
    };
    let total_cpu: f64 = median.server_cpu_s.iter().sum();
    let mut rows = vec![
        row(
            "identities".to_owned(),
            &median.identities,
            Default::default(),
        ),
        row("room ids".to_owned(), &median.rooms, Default::default()),
        row(
            "all".to_owned(),
            &median.all,
            [seconds(median.bench_cpu_s), seconds(total_cpu)],
        ),
    ];
    let leader = SERVERS - 1;
    for (s, stats) in median.per_server.iter().enumerate() {
        let role = if s == leader { " (leader)" } else { "" };
        let cpu = median.server_cpu_s.get(s).copied().unwrap_or(0.0);
        rows.push(row(
            format!("clients on s{}{role}", s + 1),
            stats,
            [String::new(), seconds(cpu)],
        ));
    }

    let floor_median = floor
        .as_ref()
        .and_then(|f| f.median(|r| r.all.granted_per_s));
    if let Some(f) = &floor_median {
        rows.push(row(
            "floor (no cluster)".to_owned(),
            &f.all,
            [seconds(f.bench_cpu_s), seconds(f.server_cpu_s.iter().sum())],
        ));
    }

    let all = &median.all;
    let met = all.granted_per_s >= TARGET_PER_S && all.p99_ms < TARGET_P99_MS;
    let targets = vec![report::target(
        format!(
            "{TARGET_PER_S:.0} granted claims/s on {SERVERS} servers with p99 under {TARGET_P99_MS} ms"
        ),
        met,
        format!(
            "{:.0} granted/s, p99 {:.2} ms",
            all.granted_per_s, all.p99_ms
        ),
    )];
    let mut notes = vec![
        format!(
            "{} clients ({} per server, TCP) x {} identities, each on a fresh connection made before the clock starts, then one room id; latency from sending newidentity/createroom to its reply; granted/s over the run's wall time ({:.2} s, connects and hang-ups included); median of {} run(s) by granted/s",
            load.triples * SERVERS,
            load.triples,
            load.rounds,
            median.elapsed_s,
            runs.len()
        ),
        format!(
            "contested: {:.0}% of rounds, each name claimed at once by one client on each server: {contested} names over all runs, duplicates {duplicates} (must be 0), granted to nobody {unclaimed}; uncontested claims refused {uncontested_refused}",
            load.contested * 100.0
        ),
        format!(
            "CPU over the median run: bench (load generator) {:.2} s, servers {:.2} s, wall {:.2} s on {} cores",
            median.bench_cpu_s,
            total_cpu,
            median.elapsed_s,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
    ];
    let floor_json = match (&floor, &floor_median) {
        (Some(floor), Some(f)) => {
            let per_grant = |cpu_s: f64| cpu_s * 1e6 / f.all.granted.max(1) as f64;
            let rates =
                |runs: &[RunResult]| runs.iter().map(|r| r.all.granted_per_s).collect::<Vec<_>>();
            let (lo, hi) = report::ratio_range(&rates(&runs), &rates(&floor.ok));
            let floor_duplicates: usize = floor.ok.iter().map(|r| r.duplicates).sum();
            notes.push(format!(
                "floor: one process with no cluster, {SERVERS} ports with a main hall each, every claim checked against one hash set, the main hall's roomchanges sent as the protocol says, no logging or limits; driven by the same load generator: {:.0} granted/s, p99 {:.2} ms, CPU per granted claim: server {:.0} us, bench {:.0} us; duplicates {floor_duplicates}",
                f.all.granted_per_s,
                f.all.p99_ms,
                per_grant(f.server_cpu_s.iter().sum()),
                per_grant(f.bench_cpu_s),
            ));
            let meaningful = !options.quick && f.all.granted_per_s > 0.0;
            notes.push(if options.quick {
                "chatmesh / floor: not meaningful with --quick (runs of milliseconds measure start-up, not throughput)".to_owned()
            } else {
                format!(
                    "chatmesh / floor: {} of the floor's granted/s (from {lo:.2}x to {hi:.2}x over any chatmesh run against any floor run): what the cluster, and chatmesh's other work (logging, pacing, limits), cost against the same requests answered by one process",
                    report::ratio(all.granted_per_s, f.all.granted_per_s),
                )
            });
            for error in &floor.errors {
                notes.push(format!("a floor run failed: {error}"));
            }
            serde_json::json!({
                "median": f,
                "runs": floor.ok,
                "errors": floor.errors,
                "duplicates": floor_duplicates,
                "ratios_meaningful": meaningful,
                "ratio": meaningful.then(|| all.granted_per_s / f.all.granted_per_s),
                "ratio_min": meaningful.then_some(lo),
                "ratio_max": meaningful.then_some(hi),
            })
        }
        (Some(floor), None) => {
            notes.push(format!(
                "every floor run failed: {}",
                floor.errors.join("; ")
            ));
            serde_json::Value::Null
        }
        (None, _) => {
            notes.push("floor skipped (--no-peers)".to_owned());
            serde_json::Value::Null
        }
    };
    if all.granted > 0 {
        let per_grant = |cpu_s: f64| cpu_s * 1e6 / all.granted as f64;
        let (servers_us, bench_us) = (per_grant(total_cpu), per_grant(median.bench_cpu_s));
        notes.push(format!(
            "CPU per granted claim: servers {servers_us:.0} us, bench {bench_us:.0} us; {TARGET_PER_S:.0}/s takes {:.2} cores of servers and {:.2} of bench at that cost",
            servers_us * TARGET_PER_S / 1e6,
            bench_us * TARGET_PER_S / 1e6,
        ));
    }
    // Little's law: every client has one claim outstanding at a time.
    let clients = (load.triples * SERVERS) as f64;
    notes.push(format!(
        "closed loop: each client waits for its reply before its next claim, so the mean latency is at least clients / rate (Little's law): {clients:.0} clients at {TARGET_PER_S:.0}/s wait {:.1} ms on average, so p99 under {TARGET_P99_MS} ms at that rate needs fewer than {:.0} clients (--clients)",
        clients * 1e3 / TARGET_PER_S,
        TARGET_P99_MS * TARGET_PER_S / 1e3,
    ));
    if duplicates > 0 {
        notes.push(format!(
            "DUPLICATES: {duplicates} contested names were granted more than once"
        ));
    }
    for error in &errors {
        notes.push(format!("a run failed: {error}"));
    }
    notes.extend(report::target_notes(&targets));
    let json = serde_json::json!({
        "scenario": "claims",
        "quick": options.quick,
        "servers": SERVERS,
        "clients": load.triples * SERVERS,
        "claims_per_client": load.rounds,
        "contested_fraction": load.contested,
        "granted": all.granted,
        "granted_per_s": all.granted_per_s,
        "p50_ms": all.p50_ms,
        "p99_ms": all.p99_ms,
        "max_ms": all.max_ms,
        "contested_names": contested,
        "contested_unclaimed": unclaimed,
        "uncontested_refused": uncontested_refused,
        "duplicates": duplicates,
        "median": median,
        "runs": runs,
        "errors": errors,
        "floor": floor_json,
        "targets": targets,
        "notes": notes,
    });
    let mut bars = vec![
        (
            "chatmesh identities".to_owned(),
            median.identities.granted_per_s,
        ),
        ("chatmesh room ids".to_owned(), median.rooms.granted_per_s),
        ("chatmesh all".to_owned(), all.granted_per_s),
    ];
    if let Some(f) = &floor_median {
        bars.push(("floor (no cluster)".to_owned(), f.all.granted_per_s));
    }
    bars.push(("target".to_owned(), TARGET_PER_S));
    Report {
        scenario: "claims".to_owned(),
        header: [
            "claims",
            "granted",
            "refused",
            "granted/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "CPU bench",
            "CPU servers",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows,
        notes,
        json,
        plot: Plot {
            title: if options.quick {
                "claims --quick: a smoke test, NOT a measurement (runs of milliseconds)".to_owned()
            } else {
                "claims: granted claims per second on 3 servers (median run)".to_owned()
            },
            unit: "claims/s".to_owned(),
            bars,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_and_distinct() {
        let valid = |n: &str| crate::client_proto::valid_name(n);
        let max = MAX_INDEX - 1;
        for name in [
            claim_name('i', 'z', max, max, Some(2)),
            claim_name('r', 'a', 0, 0, None),
        ] {
            assert!(valid(&name), "{name}");
        }
        assert_ne!(
            claim_name('i', 'a', 1, 11, Some(0)),
            claim_name('i', 'a', 11, 1, Some(0))
        );
    }

    #[test]
    fn contests_are_the_asked_fraction_and_alternate() {
        let triples = 64;
        let kinds: Vec<Round> = (0..100)
            .flat_map(|r| (0..triples).map(move |t| round_kind(t, r, triples, 0.1)))
            .collect();
        let contested = kinds.iter().filter(|&&k| k != Round::Plain).count();
        assert_eq!(contested, 640);
        let identity = kinds
            .iter()
            .filter(|&&k| k == Round::ContestIdentity)
            .count();
        assert_eq!(identity, 320);
        assert!((0..10).all(|t| round_kind(t, 0, 10, 0.0) == Round::Plain));
        assert!((0..10).all(|t| round_kind(t, 0, 10, 1.0) != Round::Plain));
    }
}
