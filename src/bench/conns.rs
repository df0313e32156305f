//! `bench conns`: N idle clients connected and logged in on ONE server: a
//! chatmesh server (over TCP, then over QUIC), and, as peers, one ngircd and
//! one nats-server. Measured: the server's resident memory (VmRSS) before the
//! first client and once all N are in and quiet, per connection.
//!
//! chatmesh clients sit in rooms of 100: the main hall announces every
//! arrival to everyone in it, N(N+1)/2 lines for N clients, which is a
//! measure of its own (the `chatmesh-tcp-hall` row), not of an idle server.
//!
//! Every system is started afresh for every run: memory freed by earlier
//! clients would otherwise be reused and hide the cost. The bench raises its
//! open-file limit before it starts anything, so the servers inherit it; the
//! QUIC clients share a few endpoints instead of one UDP socket each.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::sync::Semaphore;

use super::procs::{self, ChatCluster, CpuMeter, Peers, Server, TempDir};
use super::report::{self, Plot, Report};
use super::wire::{self, Proto, Reader, Transport, Writer};
use super::{BenchOptions, Runs, progress};

/// The targets, KiB of server memory per idle connection.
const TARGET_TCP_KIB: f64 = 16.0;
const TARGET_QUIC_KIB: f64 = 48.0;

/// Logins in flight at once: enough to connect thousands in seconds,
/// few enough not to overflow a listen backlog.
const LOGINS_IN_FLIGHT: usize = 64;

/// QUIC handshakes in flight: each is a few kilobytes of certificates in
/// UDP datagrams, and a burst of them overflows socket buffers.
const QUIC_LOGINS_IN_FLIGHT: usize = 16;

/// ngircd listens with a backlog of 10: a burst beyond it overflows the
/// accept queue and the kernel resets the connections that did not fit.
const NGIRCD_LOGINS_IN_FLIGHT: usize = 8;

/// Client endpoints (UDP sockets) the QUIC clients share.
const QUIC_ENDPOINTS: usize = 8;

/// Added to `--run-timeout-s` per client: thousands of logins take a while
/// on a loaded machine.
const PER_CLIENT: Duration = Duration::from_millis(10);

/// Open files kept free for everything but the clients (logs, listeners,
/// the mesh, the runtime).
const FD_MARGIN: usize = 256;

/// The systems measured, in table order.
#[derive(Clone)]
enum System {
    /// A single chatmesh server; QUIC clients when `quic`. Each client sits
    /// in a room of its own unless `hall`: then all of them in the main hall.
    Chat { quic: bool, hall: bool },
    /// One ngircd.
    Ngircd(PathBuf),
    /// One nats-server.
    Nats(PathBuf),
}

impl System {
    fn name(&self) -> &'static str {
        match self {
            System::Chat {
                quic: false,
                hall: false,
            } => "chatmesh-tcp",
            System::Chat {
                quic: true,
                hall: false,
            } => "chatmesh-quic",
            System::Chat {
                quic: false,
                hall: true,
            } => "chatmesh-tcp-hall",
            System::Chat {
                quic: true,
                hall: true,
            } => "chatmesh-quic-hall",
            System::Ngircd(_) => "ngircd",
            System::Nats(_) => "nats-server",
        }
    }
}

/// A started system; stops when dropped.
enum Running {
    /// A one-server chatmesh cluster.
    Chat(ChatCluster),
    /// A peer and its config dir (removed after the peer is killed).
    Peer { server: Server, _dir: TempDir },
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Chat(cluster) => cluster.pids().first().copied().unwrap_or(0),
            Running::Peer { server, .. } => server.pid(),
        }
    }

    fn log_tail(&self) -> String {
        match self {
            Running::Chat(cluster) => cluster
                .nodes
                .iter()
                .flatten()
                .map(Server::log_tail)
                .collect(),
            Running::Peer { server, .. } => server.log_tail(),
        }
    }
}

/// Starts `system` afresh; returns it with its client port and protocol.
async fn start(system: &System) -> Result<(Running, u16, Proto)> {
    match system {
        System::Chat { quic, .. } => {
            let mut cluster = ChatCluster::new(1, "conns", None)?;
            cluster.start_all().await?;
            let transport = if *quic {
                Transport::quic_shared(&cluster.ca(), QUIC_ENDPOINTS)?
            } else {
                Transport::Tcp
            };
            let port = cluster.client_ports[0];
            Ok((Running::Chat(cluster), port, Proto::Chat(transport)))
        }
        System::Ngircd(program) => {
            let dir = TempDir::new("conns-ngircd")?;
            let (mut servers, ports) = procs::start_ngircd(program, 1, &dir.0).await?;
            let server = servers.pop().context("ngircd did not start")?;
            Ok((Running::Peer { server, _dir: dir }, ports[0], Proto::Irc))
        }
        System::Nats(program) => {
            let dir = TempDir::new("conns-nats")?;
            let (server, port) = procs::start_nats(program, &dir.0).await?;
            Ok((Running::Peer { server, _dir: dir }, port, Proto::Nats))
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Idle connections held.
    pub conns: usize,
    /// Server VmRSS before the first client, bytes.
    pub rss_before: u64,
    /// Server VmRSS with every client in and quiet, bytes.
    pub rss_after: u64,
    /// (after - before) / conns, KiB.
    pub kib_per_conn: f64,
    /// Time to connect and log in every client.
    pub connect_s: f64,
    /// Time from the last login until the traffic stopped (chatmesh: every
    /// arrival announced to the main hall).
    pub settle_s: f64,
    /// CPU seconds of the load generator while connecting and settling.
    pub bench_cpu_s: f64,
    /// CPU seconds of the server meanwhile.
    pub server_cpu_s: f64,
}

/// The median run of one system.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// System name.
    pub system: String,
    /// The median run by KiB per connection (None if every run failed).
    pub median: Option<RunResult>,
    /// Every run.
    pub runs: Vec<RunResult>,
    /// Why runs failed, if any did.
    pub errors: Vec<String>,
}

/// Runs the scenario over every system.
pub async fn run(options: &BenchOptions) -> Result<Report> {
    let mut notes = Vec::new();
    let wanted = options
        .conns
        .unwrap_or(if options.quick { 200 } else { 10_000 })
        .max(1);
    let conns = allowed_conns(wanted, &mut notes)?;
    let runs = options.runs.unwrap_or(1).max(1);

    let mut systems = vec![
        System::Chat {
            quic: false,
            hall: false,
        },
        System::Chat {
            quic: true,
            hall: false,
        },
        System::Chat {
            quic: false,
            hall: true,
        },
    ];
    let peers = Peers::find(options, &mut notes);
    systems.extend(peers.ngircd.map(System::Ngircd));
    systems.extend(peers.nats.map(System::Nats));
    let mut cells = Vec::new();
    for system in &systems {
        cells.push(measure(options, system, conns, runs).await);
    }
    Ok(build_report(options, conns, cells, notes))
}

/// Raises the open-file limit and returns how many clients fit under it and
/// in the local port range (`wanted` unless a limit is too low, said in a
/// note).
fn allowed_conns(wanted: usize, notes: &mut Vec<String>) -> Result<usize> {
    let fds = procs::raise_fd_limit()? as usize;
    // The bench holds one socket per TCP client and the server one per
    // client; each TCP client takes a local port.
    let limits = [
        (
            Some(fds),
            format!("the hard open-file limit ({fds}), raise it with `ulimit -Hn` or limits.conf,"),
        ),
        (
            procs::local_port_range().map(|n| n as usize),
            "the local port range (net.ipv4.ip_local_port_range)".to_owned(),
        ),
    ];
    let mut conns = wanted;
    for (limit, what) in limits {
        if let Some(limit) = limit.filter(|&l| l < conns + FD_MARGIN) {
            conns = limit.saturating_sub(FD_MARGIN).max(1);
            let note =
                format!("{what} ({limit}) is too low for {wanted} connections: measured {conns}");
            progress(&note);
            notes.push(note);
        }
    }
    Ok(conns)
}

/// Runs one system `runs` times; keeps the median.
async fn measure(options: &BenchOptions, system: &System, conns: usize, runs: usize) -> Cell {
    let results = Runs::collect(
        runs,
        |run| {
            progress(format!(
                "conns {}: {conns} idle clients, run {}/{runs}",
                system.name(),
                run + 1
            ));
            one_run(options, system, conns)
        },
        |r| {
            format!(
                "{:.1} KiB/conn (RSS {:.1} -> {:.1} MiB), logins {:.2} s, settled {:.2} s; CPU bench {:.2} s, server {:.2} s",
                r.kib_per_conn,
                mib(r.rss_before),
                mib(r.rss_after),
                r.connect_s,
                r.settle_s,
                r.bench_cpu_s,
                r.server_cpu_s
            )
        },
    )
    .await;
    Cell {
        system: system.name().to_owned(),
        median: results.median(|r| r.kib_per_conn),
        runs: results.ok,
        errors: results.errors,
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// What the idle clients of one run count together.
#[derive(Default)]
struct Traffic {
    /// Lines received after login, by every client.
    lines: AtomicU64,
    /// Clients whose connection ended.
    closed: AtomicU64,
    /// Clients logged in.
    logged_in: AtomicU64,
    /// The first login that failed, and why.
    first_failure: std::sync::Mutex<Option<String>>,
}

impl Traffic {
    fn fail(&self, why: String) {
        let mut first = self.first_failure.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(why);
    }

    fn failure(&self) -> Option<String> {
        self.first_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

async fn one_run(options: &BenchOptions, system: &System, conns: usize) -> Result<RunResult> {
    let deadline = Duration::from_secs(options.run_timeout_s) + PER_CLIENT * conns as u32;
    let (running, port, proto) = start(system).await?;
    let place = match system {
        System::Chat { hall: true, .. } => Place::MainHall,
        System::Chat { hall: false, .. } => Place::Rooms,
        System::Ngircd(_) | System::Nats(_) => Place::Nowhere,
    };
    let in_flight = match system {
        System::Ngircd(_) => NGIRCD_LOGINS_IN_FLIGHT,
        System::Chat { quic: true, .. } => QUIC_LOGINS_IN_FLIGHT,
        _ => LOGINS_IN_FLIGHT,
    };
    let load = Load {
        place,
        conns,
        in_flight,
    };
    let result = hold_idle(running.pid(), port, &proto, load, deadline).await;
    // A failure says what the server logged last.
    result.with_context(|| format!("{} log ends:\n{}", system.name(), running.log_tail()))
}

/// Where the idle clients sit once logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Peers: logged in, no channel or subscription.
    Nowhere,
    /// chatmesh: all in the main hall (every arrival is announced to all).
    MainHall,
    /// chatmesh: in rooms of [`ROOM_SIZE`], the first member of each its owner.
    Rooms,
}

/// Members of each room in [`Place::Rooms`].
const ROOM_SIZE: usize = 100;

/// Connects client `i` and puts it in its place.
async fn login(proto: &Proto, port: u16, place: Place, i: usize) -> Result<(Reader, Writer)> {
    // A burst of handshakes can lose packets to full socket buffers on a busy
    // machine, and a handshake that backs off past the server's 10 s is
    // closed: like any client, log in again (under another name, in case the
    // server still holds the first).
    const ATTEMPTS: usize = 3;
    let mut attempt = 0;
    loop {
        let name = match attempt {
            0 => format!("idle{i}"),
            n => format!("idle{i}r{n}"),
        };
        match login_as(proto, port, place, i, &name).await {
            Ok(pair) => return Ok(pair),
            Err(e) if attempt + 1 < ATTEMPTS => {
                progress(format!(
                    "  client {i}: login failed ({e:#}); logging in again"
                ));
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn login_as(
    proto: &Proto,
    port: u16,
    place: Place,
    i: usize,
    name: &str,
) -> Result<(Reader, Writer)> {
    let (mut reader, mut writer) = proto.login(port, name, &[]).await?;
    if place == Place::Rooms {
        let room = format!("idleroom{}", i / ROOM_SIZE);
        let owner = i.is_multiple_of(ROOM_SIZE);
        wire::chat_enter_room(&mut reader, &mut writer, name, &room, owner).await?;
    }
    Ok((reader, writer))
}

/// How many clients go where, how fast.
#[derive(Clone, Copy)]
struct Load {
    place: Place,
    conns: usize,
    /// Logins in flight at once.
    in_flight: usize,
}

/// Connects `load.conns` clients to the server `pid` on `port` and puts them
/// in their place, waits until they are all in and quiet, measures, and
/// hangs up.
async fn hold_idle(
    pid: u32,
    port: u16,
    proto: &Proto,
    load: Load,
    deadline: Duration,
) -> Result<RunResult> {
    let Load {
        place,
        conns,
        in_flight,
    } = load;
    let rss_before = procs::proc_rss_bytes(pid)?;
    let traffic = Arc::new(Traffic::default());
    let cpu = CpuMeter::start(&[pid]);
    let start = Instant::now();

    // Room owners first: a room must exist before anyone joins it.
    let waves: Vec<Vec<usize>> = match place {
        Place::Rooms => {
            let (owners, members) = (0..conns).partition(|i| i.is_multiple_of(ROOM_SIZE));
            vec![owners, members]
        }
        Place::Nowhere | Place::MainHall => vec![(0..conns).collect()],
    };
    let mut clients = tokio::task::JoinSet::new();
    let permits = Arc::new(Semaphore::new(in_flight));
    for wave in waves {
        for i in wave {
            let permit = permits.clone().acquire_owned().await?;
            let (proto, counts) = (proto.clone(), traffic.clone());
            clients.spawn(async move {
                let login = login(&proto, port, place, i).await;
                match &login {
                    Ok(_) => counts.logged_in.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        counts.fail(format!("client {i}: {e:#}"));
                        0
                    }
                };
                drop(permit);
                let (mut reader, mut writer) = login?;
                // Idle: count what arrives, answer keep-alives, hold the line open.
                while let Ok(Some(line)) = reader.next_line().await {
                    counts.lines.fetch_add(1, Ordering::Relaxed);
                    if let Some(pong) = proto.pong(line) {
                        writer.send(&pong).await?;
                    }
                }
                counts.closed.fetch_add(1, Ordering::Relaxed);
                anyhow::Ok(())
            });
            if let Some(failure) = traffic.failure() {
                bail!("{failure}");
            }
            if start.elapsed() > deadline {
                bail!(
                    "only {} of {conns} clients logged in within {deadline:?}",
                    traffic.logged_in.load(Ordering::Relaxed)
                );
            }
        }
        // Every login of the wave done (or failed).
        let all = permits
            .acquire_many(in_flight as u32)
            .await
            .context("login permits closed")?;
        drop(all);
    }
    let connect_s = start.elapsed().as_secs_f64();
    let logged_in = traffic.logged_in.load(Ordering::Relaxed) as usize;
    if logged_in < conns {
        bail!(
            "only {logged_in} of {conns} clients logged in; first failure: {}",
            traffic.failure().unwrap_or_default()
        );
    }

    // chatmesh announces every arrival to everyone in the main hall, the
    // newcomer included: 1 + 2 + ... + N lines in all when nobody leaves.
    let expected = match place {
        Place::MainHall => (conns as u64) * (conns as u64 + 1) / 2,
        Place::Rooms | Place::Nowhere => 0,
    };
    let settled = settle(&traffic, expected, start, deadline).await?;
    let settle_s = (settled.duration_since(start).as_secs_f64() - connect_s).max(0.0);
    let rss_after = procs::proc_rss_bytes(pid)?;
    let (bench_cpu_s, server_cpu_s) = cpu.read();
    let closed = traffic.closed.load(Ordering::Relaxed);
    if closed > 0 {
        bail!("the server closed {closed} of {conns} idle clients");
    }
    // Hang up every client before the server stops.
    clients.shutdown().await;
    Ok(RunResult {
        conns,
        rss_before,
        rss_after,
        kib_per_conn: (rss_after as f64 - rss_before as f64) / 1024.0 / conns as f64,
        connect_s,
        settle_s,
        bench_cpu_s,
        server_cpu_s,
    })
}

/// Waits until the clients got `expected` lines and then nothing for a
/// while: the server is idle and so is its memory. Returns when the last
/// line arrived.
async fn settle(
    traffic: &Traffic,
    expected: u64,
    start: Instant,
    deadline: Duration,
) -> Result<Instant> {
    const QUIET: Duration = Duration::from_millis(500);
    let mut last = (traffic.lines.load(Ordering::Relaxed), Instant::now());
    let mut reported = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let lines = traffic.lines.load(Ordering::Relaxed);
        if lines != last.0 {
            last = (lines, Instant::now());
        } else if lines >= expected && last.1.elapsed() >= QUIET {
            return Ok(last.1);
        }
        let closed = traffic.closed.load(Ordering::Relaxed);
        if closed > 0 {
            bail!("the server closed {closed} idle clients ({lines}/{expected} lines delivered)");
        }
        if reported.elapsed() >= Duration::from_secs(1) {
            progress(format!("  ... {lines}/{expected} lines delivered"));
            reported = Instant::now();
        }
        if start.elapsed() > deadline {
            bail!("still {lines}/{expected} lines delivered after {deadline:?}");
        }
    }
}

fn build_report(
    options: &BenchOptions,
    conns: usize,
    cells: Vec<Cell>,
    notes: Vec<String>,
) -> Report {
    let kib = |system: &str| {
        cells
            .iter()
            .find(|c| c.system == system)
            .and_then(|c| c.median.as_ref())
            .map(|r| r.kib_per_conn)
    };
    let (tcp, quic) = (kib("chatmesh-tcp"), kib("chatmesh-quic"));
    let mut rows = Vec::new();
    let mut bars = Vec::new();
    for cell in &cells {
        let Some(r) = &cell.median else {
            rows.push(vec![
                cell.system.clone(),
                format!(
                    "failed: {}",
                    cell.errors.first().cloned().unwrap_or_default()
                ),
            ]);
            continue;
        };
        let peer = !cell.system.starts_with("chatmesh");
        let versus = |chat: Option<f64>| match (chat, peer) {
            (Some(c), true) => report::ratio(c, r.kib_per_conn),
            _ => String::new(),
        };
        rows.push(vec![
            cell.system.clone(),
            r.conns.to_string(),
            format!("{:.1}", mib(r.rss_before)),
            format!("{:.1}", mib(r.rss_after)),
            format!("{:.1}", r.kib_per_conn),
            format!("{:.2}", r.connect_s),
            format!("{:.2}", r.settle_s),
            format!("{:.2} s", r.bench_cpu_s),
            format!("{:.2} s", r.server_cpu_s),
            versus(tcp),
            versus(quic),
        ]);
        bars.push((cell.system.clone(), r.kib_per_conn));
    }
    let mut targets = Vec::new();
    for (system, value, limit) in [
        ("chatmesh-tcp", tcp, TARGET_TCP_KIB),
        ("chatmesh-quic", quic, TARGET_QUIC_KIB),
    ] {
        if let Some(v) = value {
            targets.push(report::target(
                format!("{system} under {limit:.0} KiB per idle connection"),
                v < limit,
                format!("{v:.1} KiB"),
            ));
        }
    }
    let mut all_notes = vec![
        format!(
            "KiB/conn: growth of the server's VmRSS from before the first client to {conns} idle logged-in clients, divided by {conns}; kernel socket buffers are not in VmRSS"
        ),
        format!("chatmesh: one server; clients identified, then in rooms of {ROOM_SIZE} (the first member creates the room), so that nobody stays in the main hall; QUIC clients share {QUIC_ENDPOINTS} client endpoints"),
        "chatmesh-tcp-hall: every client stays in the main hall, which announces each arrival to everyone there (N(N+1)/2 lines in all); measured once all are delivered; TCP only".to_owned(),
        format!("ngircd: NICK/USER, welcomed (001), no channel, {NGIRCD_LOGINS_IN_FLIGHT} logins in flight (it listens with a backlog of 10); nats-server: CONNECT, PING/PONG, no subscription; both answer the server's PINGs"),
    ];
    all_notes.extend(notes);
    all_notes.extend(report::target_notes(&targets));
    let kib_json: serde_json::Map<String, serde_json::Value> = cells
        .iter()
        .filter_map(|c| {
            let r = c.median.as_ref()?;
            let key = c.system.strip_prefix("chatmesh-").unwrap_or(&c.system);
            Some((key.to_owned(), serde_json::json!(r.kib_per_conn)))
        })
        .collect();
    let json = serde_json::json!({
        "scenario": "conns",
        "quick": options.quick,
        "conns": conns,
        "kib_per_conn": kib_json,
        "cells": cells,
        "targets": targets,
        "notes": all_notes,
        "duplicates": 0,
    });
    Report {
        scenario: "conns".to_owned(),
        header: [
            "system",
            "conns",
            "RSS before MiB",
            "RSS after MiB",
            "KiB/conn",
            "logins s",
            "settle s",
            "CPU bench",
            "CPU server",
            "tcp/this KiB",
            "quic/this KiB",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows,
        notes: all_notes,
        json,
        plot: Plot {
            title: format!("conns: server memory per idle connection ({conns} clients)"),
            unit: "KiB".to_owned(),
            bars,
        },
    }
}
