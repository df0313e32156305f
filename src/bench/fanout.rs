//! `bench fanout`: R rooms of M members; every member sends K messages of S
//! bytes with at most W of its own not yet delivered to every other member
//! (a closed loop). A message counts as delivered once every OTHER member of
//! its room has it. Latency is per recipient, from the send time written in
//! the content to its arrival.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore};

use super::procs::{self, ChatCluster, CpuMeter, Peers, Server, TempDir};
use super::report::{self, Plot, Report};
use super::wire::{self, Proto, Reader, Transport, Writer};
use super::{BenchOptions, Runs, progress, ticker};

/// One workload: rooms x members x messages.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Workload {
    /// "a" or "b".
    pub name: &'static str,
    /// Rooms.
    pub rooms: usize,
    /// Members per room.
    pub members: usize,
    /// Messages each member sends.
    pub messages: usize,
}

impl Workload {
    fn parse(name: &'static str, spec: &str) -> Result<Workload> {
        let parts: Vec<usize> = spec
            .split('x')
            .map(|p| p.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("workload {name} {spec:?} is not ROOMSxMEMBERSxMESSAGES"))?;
        match parts[..] {
            [rooms, members, messages] if rooms > 0 && members > 1 && messages > 0 => {
                Ok(Workload {
                    name,
                    rooms,
                    members,
                    messages,
                })
            }
            _ => bail!(
                "workload {name} {spec:?}: need ROOMSxMEMBERSxMESSAGES with at least 1 room, 2 members, 1 message"
            ),
        }
    }

    fn label(&self) -> String {
        format!(
            "({}) {}x{}x{}",
            self.name, self.rooms, self.members, self.messages
        )
    }
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Messages delivered to every other member, per second.
    pub msgs_per_s: f64,
    /// Single deliveries (one message to one member) per second.
    pub deliveries_per_s: f64,
    /// Latency percentiles over every delivery, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
    /// Wall time of the load.
    pub elapsed_s: f64,
    /// CPU seconds of the load generator (this process) during the run.
    pub bench_cpu_s: f64,
    /// CPU seconds of the servers during the run.
    pub server_cpu_s: f64,
    /// Load generator CPU microseconds per delivery.
    pub bench_us_per_delivery: f64,
    /// Server CPU microseconds per delivery.
    pub server_us_per_delivery: f64,
}

/// The median run of one system on one workload.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// System name ("chatmesh-tcp", "ngircd-3", ...).
    pub system: String,
    /// Workload name.
    pub workload: String,
    /// The median run by deliveries/s (None if every run failed).
    pub median: Option<RunResult>,
    /// Every run.
    pub runs: Vec<RunResult>,
    /// Why runs failed, if any did.
    pub errors: Vec<String>,
}

/// Runs the scenario over every system.
pub async fn run(options: &BenchOptions) -> Result<Report> {
    if options.size < 40 {
        bail!(
            "--size {} is too small: the content carries a 40-byte header",
            options.size
        );
    }
    if options.window == 0 {
        bail!("--window must be at least 1");
    }
    let (a, b) = if options.quick {
        ("2x5x20", "1x20x10")
    } else {
        ("10x10x200", "1x100x50")
    };
    let workloads = [
        Workload::parse("a", options.workload_a.as_deref().unwrap_or(a))?,
        Workload::parse("b", options.workload_b.as_deref().unwrap_or(b))?,
    ];
    let mut cells = Vec::new();
    let spread = !options.no_spread;
    // The linked ngircd's members of one room sit on different servers, as
    // IRC users connect to any server of a network: messages cross the links
    // (room-local placement would make them 3 unlinked servers).
    // CHATMESH_BENCH_ROOM_LOCAL=1 puts each room's members on one server.
    let room_local = std::env::var_os("CHATMESH_BENCH_ROOM_LOCAL").is_some();
    let wanted = |system: &str| options.only.is_empty() || options.only.iter().any(|s| s == system);
    let mut notes = vec![
        "deliveries/s: one message reaching one member, per second (the headline); msgs/s: messages delivered to every other member of the room; latency per delivery".to_owned(),
        if spread {
            "placement: chatmesh (3 nodes): room i and all its members on server i mod 3; 3 linked ngircd: the members of each room round-robin over the 3 servers (messages cross the links); one server for ngircd-1 and nats-server"
        } else {
            "placement: every chatmesh room and its members on s1 (--no-spread); the 3 linked ngircd: each room's members round-robin over the 3 servers"
        }
        .to_owned(),
        "CPU/delivery: CPU microseconds per delivery of the load generator (this process) and of the servers (chatmesh: all 3 nodes); the generator is the same code for every system".to_owned(),
        format!(
            "generator: one write per window's worth of messages{}, reads of up to 64 KiB, TCP_NODELAY, {}",
            if coalesce_enabled() { "" } else { " (off: one write per message)" },
            if wire::quickack_enabled() {
                "TCP_QUICKACK after each read (as a mostly-reading client ACKs)"
            } else {
                "delayed ACKs (CHATMESH_BENCH_NO_QUICKACK)"
            }
        ),
    ];
    if room_local {
        notes.push("CHATMESH_BENCH_ROOM_LOCAL: the 3 linked ngircd get room i and all its members on server i mod 3".to_owned());
    }

    // chatmesh over TCP, then over QUIC, on one 3-node cluster.
    if wanted("chatmesh-tcp") || wanted("chatmesh-quic") {
        let mut cluster = ChatCluster::new(3, "fanout", None)?;
        progress("starting a 3-node chatmesh cluster");
        cluster.start_all().await?;
        let ports = if spread {
            cluster.client_ports.clone()
        } else {
            cluster.client_ports[..1].to_vec()
        };
        let pids = cluster.pids();
        for transport in [Transport::Tcp, Transport::quic(&cluster.ca())?] {
            let system = format!("chatmesh-{}", transport.name());
            if !wanted(&system) {
                continue;
            }
            for workload in &workloads {
                cells.push(
                    measure(
                        options,
                        &system,
                        &Proto::Chat(transport.clone()),
                        workload,
                        &ports,
                        &pids,
                        true,
                    )
                    .await,
                );
            }
        }
    }

    let peers = if ["ngircd-1", "ngircd-3", "nats-server"]
        .iter()
        .any(|s| wanted(s))
    {
        Peers::find(options, &mut notes)
    } else {
        Peers::default()
    };
    if let Some(program) = peers.ngircd {
        for n in [1, 3] {
            let system = format!("ngircd-{n}");
            if !wanted(&system) {
                continue;
            }
            let dir = TempDir::new(&format!("ngircd{n}"))?;
            progress(format!("starting {n} ngircd"));
            let (servers, ports) = procs::start_ngircd(&program, n, &dir.0).await?;
            let pids: Vec<u32> = servers.iter().map(Server::pid).collect();
            for workload in &workloads {
                cells.push(
                    measure(
                        options,
                        &system,
                        &Proto::Irc,
                        workload,
                        &ports,
                        &pids,
                        room_local,
                    )
                    .await,
                );
            }
            drop(servers);
        }
        notes.push("ngircd does not set TCP_NODELAY: its replies wait for the client's ACK of the previous ones (Nagle)".to_owned());
    }
    if let Some(program) = peers.nats.filter(|_| wanted("nats-server")) {
        let dir = TempDir::new("nats")?;
        progress("starting nats-server");
        let (server, port) = procs::start_nats(&program, &dir.0).await?;
        for workload in &workloads {
            cells.push(
                measure(
                    options,
                    "nats-server",
                    &Proto::Nats,
                    workload,
                    &[port],
                    &[server.pid()],
                    false,
                )
                .await,
            );
        }
        drop(server);
    }
    Ok(build_report(options, &workloads, cells, notes))
}

/// Runs one system on one workload `runs` times; keeps the median.
async fn measure(
    options: &BenchOptions,
    system: &str,
    proto: &Proto,
    workload: &Workload,
    ports: &[u16],
    server_pids: &[u32],
    room_per_server: bool,
) -> Cell {
    let runs = Runs::collect(
        options.runs(),
        |run| {
            progress(format!(
                "fanout {system} workload {} run {}/{}",
                workload.label(),
                run + 1,
                options.runs()
            ));
            // Names differ between systems and runs: a server may still be
            // tidying up the sessions of the previous run.
            let tag = format!("{}{}{run}", &system[system.len() - 1..], workload.name);
            async move {
                one_run(
                    options,
                    proto,
                    workload,
                    ports,
                    server_pids,
                    room_per_server,
                    &tag,
                )
                .await
            }
        },
        |r| {
            format!(
                "{:.0} deliveries/s ({:.0} msgs/s), p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, {:.2} s; CPU bench {:.2} s ({:.2} us/delivery), servers {:.2} s ({:.2} us/delivery)",
                r.deliveries_per_s,
                r.msgs_per_s,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.elapsed_s,
                r.bench_cpu_s,
                r.bench_us_per_delivery,
                r.server_cpu_s,
                r.server_us_per_delivery
            )
        },
    )
    .await;
    Cell {
        system: system.to_owned(),
        workload: workload.name.to_owned(),
        median: runs.median(|r| r.deliveries_per_s),
        runs: runs.ok,
        errors: runs.errors,
    }
}

/// What every reader and sender of one run shares.
struct Shared {
    /// Base of the timestamps in the content.
    base: Instant,
    /// Per room, per (sender, seq): how many members have it.
    counts: Vec<Vec<AtomicU32>>,
    /// Per room, per member: the sender's window.
    windows: Vec<Vec<Arc<Semaphore>>>,
    /// Messages delivered to every other member.
    delivered: AtomicU64,
    members: usize,
    messages: usize,
}

impl Shared {
    /// The first few messages not yet delivered to every other member, as
    /// "room/sender/seq had N of M", for error messages.
    fn undelivered(&self) -> String {
        let mut out = Vec::new();
        for (room, counts) in self.counts.iter().enumerate() {
            for (slot, count) in counts.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count + 1 < self.members as u32 && out.len() < 8 {
                    out.push(format!(
                        "room {room} member {} seq {} reached {count} of {}",
                        slot / self.messages,
                        slot % self.messages,
                        self.members - 1
                    ));
                }
            }
        }
        out.join("; ")
    }
}

/// A member connected and in its room.
struct Member {
    room: usize,
    index: usize,
    reader: Reader,
    writer: Arc<Mutex<Writer>>,
}

async fn one_run(
    options: &BenchOptions,
    proto: &Proto,
    workload: &Workload,
    ports: &[u16],
    server_pids: &[u32],
    room_per_server: bool,
    tag: &str,
) -> Result<RunResult> {
    let deadline = Duration::from_secs(options.run_timeout_s);
    let members = tokio::time::timeout(
        deadline,
        join_all(proto, workload, ports, room_per_server, tag),
    )
    .await
    .with_context(|| format!("members not all in their rooms within {deadline:?}"))??;

    let shared = Arc::new(Shared {
        base: Instant::now(),
        counts: (0..workload.rooms)
            .map(|_| {
                (0..workload.members * workload.messages)
                    .map(|_| AtomicU32::new(0))
                    .collect()
            })
            .collect(),
        windows: (0..workload.rooms)
            .map(|_| {
                (0..workload.members)
                    .map(|_| Arc::new(Semaphore::new(options.window)))
                    .collect()
            })
            .collect(),
        delivered: AtomicU64::new(0),
        members: workload.members,
        messages: workload.messages,
    });
    let total = (workload.rooms * workload.members * workload.messages) as u64;

    // Every connection stays open until the whole room has everything: a
    // member whose reader and sender are done may still have its last
    // messages in a QUIC send buffer, and dropping the connection discards
    // them (TCP would still deliver them after close).
    let open: Vec<Arc<Mutex<Writer>>> = members.iter().map(|m| m.writer.clone()).collect();
    let cpu = CpuMeter::start(server_pids);
    let start = Instant::now();
    let mut readers = tokio::task::JoinSet::new();
    let mut senders = tokio::task::JoinSet::new();
    for member in members {
        let expected = (workload.members - 1) * workload.messages;
        let shared2 = shared.clone();
        let proto2 = proto.clone();
        let writer = member.writer.clone();
        readers.spawn(read_loop(
            proto2,
            member.reader,
            writer,
            shared2,
            member.room,
            expected,
        ));
        let shared2 = shared.clone();
        let line_for = sender_encoder(proto, member.room, tag);
        senders.spawn(send_loop(
            member.writer,
            shared2,
            member.room,
            member.index,
            options.size,
            line_for,
        ));
    }
    let progress_task = {
        let shared = shared.clone();
        ticker(move || {
            format!(
                "  ... {}/{total} messages delivered",
                shared.delivered.load(Ordering::Relaxed)
            )
        })
    };
    let collect = async {
        let mut latencies: Vec<u32> = Vec::new();
        while let Some(joined) = readers.join_next().await {
            latencies.extend(joined.context("a reader task failed")??);
        }
        while let Some(joined) = senders.join_next().await {
            joined.context("a sender task failed")??;
        }
        anyhow::Ok(latencies)
    };
    let outcome = tokio::time::timeout(deadline, collect).await;
    progress_task.abort();
    let elapsed = start.elapsed().as_secs_f64();
    let (bench_cpu_s, server_cpu_s) = cpu.read();
    let latencies = match outcome {
        Ok(result) => result?,
        Err(_) => bail!(
            "timed out after {deadline:?} with {}/{total} messages delivered; short: {}",
            shared.delivered.load(Ordering::Relaxed),
            shared.undelivered()
        ),
    };
    // Dropping the connections closes every session.
    drop(open);
    let (p50_ms, p99_ms, max_ms) = report::latency_ms(&latencies);
    let deliveries = latencies.len() as f64;
    let per_delivery = |cpu_s: f64| cpu_s * 1e6 / deliveries.max(1.0);
    Ok(RunResult {
        bench_us_per_delivery: per_delivery(bench_cpu_s),
        server_us_per_delivery: per_delivery(server_cpu_s),
        msgs_per_s: total as f64 / elapsed,
        deliveries_per_s: deliveries / elapsed,
        p50_ms,
        p99_ms,
        max_ms,
        elapsed_s: elapsed,
        bench_cpu_s,
        server_cpu_s,
    })
}

/// Builds the line one member sends, from its content.
type Encoder = Arc<dyn Fn(&str) -> Vec<u8> + Send + Sync>;

fn room_name(room: usize, tag: &str) -> String {
    format!("r{tag}x{room}")
}

fn member_name(room: usize, index: usize, tag: &str) -> String {
    format!("u{tag}r{room}m{index}")
}

fn sender_encoder(proto: &Proto, room: usize, tag: &str) -> Encoder {
    let room = room_name(room, tag);
    match proto {
        Proto::Chat(_) => Arc::new(|content| {
            format!("{{\"type\":\"message\",\"content\":\"{content}\"}}\n").into_bytes()
        }),
        Proto::Irc => {
            Arc::new(move |content| format!("PRIVMSG #{room} :{content}\r\n").into_bytes())
        }
        Proto::Nats => Arc::new(move |content| {
            format!("PUB {room} {}\r\n{content}\r\n", content.len()).into_bytes()
        }),
    }
}

/// Whether a sender writes every message its window allows in one write
/// (one syscall, one segment) instead of one write per message.
/// `CHATMESH_BENCH_NO_COALESCE=1` turns it off, to show the difference.
fn coalesce_enabled() -> bool {
    std::env::var_os("CHATMESH_BENCH_NO_COALESCE").is_none()
}

async fn send_loop(
    writer: Arc<Mutex<Writer>>,
    shared: Arc<Shared>,
    room: usize,
    index: usize,
    size: usize,
    encode: Encoder,
) -> Result<()> {
    let window = shared.windows[room][index].clone();
    let coalesce = coalesce_enabled();
    let mut seq = 0;
    let mut batch = Vec::new();
    while seq < shared.messages {
        window.acquire().await.context("window closed")?.forget();
        // Every other slot the window has free right now goes in the same
        // write: the window is the same, the syscalls fewer.
        let mut count = 1;
        while coalesce && seq + count < shared.messages {
            match window.try_acquire() {
                Ok(permit) => {
                    permit.forget();
                    count += 1;
                }
                Err(_) => break,
            }
        }
        let micros = shared.base.elapsed().as_micros() as u64;
        batch.clear();
        for s in seq..seq + count {
            let mut content = format!("{index}:{s}:{micros}:");
            while content.len() < size {
                content.push('x');
            }
            batch.extend_from_slice(&encode(&content));
        }
        seq += count;
        writer.lock().await.send(&batch).await?;
    }
    Ok(())
}

/// Reads until `expected` messages arrived; returns their latencies (µs).
async fn read_loop(
    proto: Proto,
    mut reader: Reader,
    writer: Arc<Mutex<Writer>>,
    shared: Arc<Shared>,
    room: usize,
    expected: usize,
) -> Result<Vec<u32>> {
    let mut latencies = Vec::with_capacity(expected);
    let mut nats_payload_next = false;
    while latencies.len() < expected {
        let line = match reader.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => bail!(
                "the server closed a member's connection after {} of {expected} messages",
                latencies.len()
            ),
            Err(e) => return Err(e).context("cannot read a member's messages"),
        };
        if let Some(pong) = proto.pong(line) {
            writer.lock().await.send(&pong).await?;
            continue;
        }
        let content: Option<&[u8]> = match proto {
            Proto::Chat(_) => chat_content(line),
            Proto::Irc => irc_privmsg(line),
            Proto::Nats => {
                if nats_payload_next {
                    nats_payload_next = false;
                    Some(line)
                } else {
                    nats_payload_next = line.starts_with(b"MSG ");
                    None
                }
            }
        };
        let Some(content) = content else { continue };
        let Some((sender, seq, micros)) = parse_content(content) else {
            bail!(
                "a message whose content is not the bench's: {:?}",
                String::from_utf8_lossy(content)
            );
        };
        if sender >= shared.members || seq >= shared.messages {
            bail!("a message from member {sender} seq {seq}, outside the workload");
        }
        let now = shared.base.elapsed().as_micros() as u64;
        latencies.push(now.saturating_sub(micros).min(u32::MAX as u64) as u32);
        let slot = &shared.counts[room][sender * shared.messages + seq];
        if slot.fetch_add(1, Ordering::AcqRel) + 1 == (shared.members - 1) as u32 {
            shared.windows[room][sender].add_permits(1);
            shared.delivered.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(latencies)
}

/// The content of a chatmesh `message` line.
fn chat_content(line: &[u8]) -> Option<&[u8]> {
    // Scanned, not parsed: the load generator must stay cheaper than the
    // servers it loads. The server writes `type` first and the bench's
    // contents have no characters JSON escapes.
    const MESSAGE: &[u8] = br#"{"type":"message","#;
    const CONTENT: &[u8] = br#""content":""#;
    if !line.starts_with(MESSAGE) {
        return None;
    }
    let start = line.windows(CONTENT.len()).position(|w| w == CONTENT)? + CONTENT.len();
    let len = line[start..].iter().position(|&b| b == b'"')?;
    Some(&line[start..start + len])
}

/// The text of `:nick!user@host PRIVMSG #chan :text`.
fn irc_privmsg(line: &[u8]) -> Option<&[u8]> {
    // Scanned byte by byte like chatmesh's lines: no UTF-8 check, no split.
    let mut words = line.splitn(4, |&b| b == b' ');
    let _prefix = words.next()?;
    if words.next()? != b"PRIVMSG" {
        return None;
    }
    let _target = words.next()?;
    words.next()?.strip_prefix(b":")
}

/// `sender:seq:micros:padding`.
fn parse_content(content: &[u8]) -> Option<(usize, usize, u64)> {
    let text = std::str::from_utf8(content).ok()?;
    let mut parts = text.splitn(4, ':');
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    ))
}

/// Connects every member and puts it in its room; returns once everyone can
/// hear everyone.
async fn join_all(
    proto: &Proto,
    workload: &Workload,
    ports: &[u16],
    room_per_server: bool,
    tag: &str,
) -> Result<Vec<Member>> {
    let port_of = |room: usize, index: usize| {
        if room_per_server {
            ports[room % ports.len()]
        } else {
            ports[(room * workload.members + index) % ports.len()]
        }
    };
    // Room owners first (chatmesh rooms must exist before anyone joins).
    let mut members = Vec::new();
    for index_group in [0..1, 1..workload.members] {
        let mut joins = tokio::task::JoinSet::new();
        for room in 0..workload.rooms {
            for index in index_group.clone() {
                let proto = proto.clone();
                let port = port_of(room, index);
                let tag = tag.to_owned();
                joins.spawn(async move {
                    join_one(&proto, port, room, index, &tag)
                        .await
                        .with_context(|| format!("member {index} of room {room} on port {port}"))
                });
            }
        }
        while let Some(joined) = joins.join_next().await {
            members.push(joined.context("a join task failed")??);
        }
    }
    if let Proto::Irc = proto {
        // Linked servers learn of joins a moment later: wait until every
        // member has seen every other in its channel.
        let mut waits = tokio::task::JoinSet::new();
        for mut member in members {
            let want = workload.members;
            let tag = tag.to_owned();
            waits.spawn(async move {
                irc_wait_members(&mut member, want, &tag).await?;
                anyhow::Ok(member)
            });
        }
        let mut ready = Vec::new();
        while let Some(joined) = waits.join_next().await {
            ready.push(joined.context("a wait task failed")??);
        }
        members = ready;
    }
    Ok(members)
}

async fn join_one(
    proto: &Proto,
    port: u16,
    room: usize,
    index: usize,
    tag: &str,
) -> Result<Member> {
    let name = member_name(room, index, tag);
    let room_id = room_name(room, tag);
    let subjects = [room_id.clone()];
    let (mut reader, mut writer) = proto.login(port, &name, &subjects).await?;
    match proto {
        Proto::Chat(_) => {
            wire::chat_enter_room(&mut reader, &mut writer, &name, &room_id, index == 0).await?;
        }
        Proto::Irc => {
            writer
                .send(format!("JOIN #{room_id}\r\n").as_bytes())
                .await?;
        }
        // Subscribed at login.
        Proto::Nats => {}
    }
    Ok(Member {
        room,
        index,
        reader,
        writer: Arc::new(Mutex::new(writer)),
    })
}

/// Reads NAMES and JOIN lines until `want` members are in the channel.
async fn irc_wait_members(member: &mut Member, want: usize, tag: &str) -> Result<()> {
    let channel = format!("#{}", room_name(member.room, tag));
    let mut names: HashSet<String> = HashSet::new();
    while names.len() < want {
        let line = wire::next_line(
            &mut member.reader,
            &format!(
                "waiting for {want} members in {channel} (have {})",
                names.len()
            ),
        )
        .await?;
        let words: Vec<&str> = line.split(' ').collect();
        match words.get(1).copied() {
            Some("353") => {
                if let Some(at) = line[1..].find(" :") {
                    for name in line[at + 3..].split(' ') {
                        let name = name.trim_start_matches(['@', '+']);
                        if !name.is_empty() {
                            names.insert(name.to_owned());
                        }
                    }
                }
            }
            Some("JOIN") => {
                let nick = words[0]
                    .trim_start_matches(':')
                    .split('!')
                    .next()
                    .unwrap_or_default();
                names.insert(nick.to_owned());
            }
            _ if line.starts_with("PING") => {
                if let Some(pong) = Proto::Irc.pong(line.as_bytes()) {
                    member.writer.lock().await.send(&pong).await?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn build_report(
    options: &BenchOptions,
    workloads: &[Workload],
    cells: Vec<Cell>,
    notes: Vec<String>,
) -> Report {
    let find = |system: &str, workload: &str| {
        cells
            .iter()
            .find(|c| c.system == system && c.workload == workload)
            .and_then(|c| c.median.clone())
    };
    let header = [
        "workload",
        "system",
        "deliveries/s",
        "msgs/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "gen CPU us/dlv",
        "srv CPU us/dlv",
        "tcp/this dlv/s (min-max)",
        "this/tcp p99",
        "quic/this dlv/s",
    ]
    .map(str::to_owned)
    .to_vec();
    let runs_of = |system: &str, workload: &str| -> Vec<RunResult> {
        cells
            .iter()
            .find(|c| c.system == system && c.workload == workload)
            .map(|c| c.runs.clone())
            .unwrap_or_default()
    };
    let mut rows = Vec::new();
    let mut bars = Vec::new();
    let ratio = |x: f64, y: f64| {
        if options.quick {
            "n/m (--quick)".to_owned()
        } else {
            report::ratio(x, y)
        }
    };
    for workload in workloads {
        let tcp = find("chatmesh-tcp", workload.name);
        let quic = find("chatmesh-quic", workload.name);
        let tcp_runs = runs_of("chatmesh-tcp", workload.name);
        for cell in cells.iter().filter(|c| c.workload == workload.name) {
            let label = workload.label();
            match &cell.median {
                Some(r) => {
                    let peer = !cell.system.starts_with("chatmesh");
                    rows.push(vec![
                        label,
                        cell.system.clone(),
                        format!("{:.0}", r.deliveries_per_s),
                        format!("{:.0}", r.msgs_per_s),
                        format!("{:.2}", r.p50_ms),
                        format!("{:.2}", r.p99_ms),
                        format!("{:.1}", r.max_ms),
                        format!("{:.2}", r.bench_us_per_delivery),
                        format!("{:.2}", r.server_us_per_delivery),
                        match (&tcp, peer) {
                            (Some(t), true) if options.quick => {
                                ratio(t.deliveries_per_s, r.deliveries_per_s)
                            }
                            (Some(t), true) => {
                                let (lo, hi) = ratio_range(&tcp_runs, &cell.runs);
                                format!(
                                    "{} ({lo:.2}-{hi:.2})",
                                    ratio(t.deliveries_per_s, r.deliveries_per_s)
                                )
                            }
                            _ => "".to_owned(),
                        },
                        match (&tcp, peer) {
                            (Some(t), true) => ratio(r.p99_ms, t.p99_ms),
                            _ => "".to_owned(),
                        },
                        match (&quic, peer) {
                            (Some(q), true) => ratio(q.deliveries_per_s, r.deliveries_per_s),
                            _ => "".to_owned(),
                        },
                    ]);
                    bars.push((
                        format!("{} {}", workload.name, cell.system),
                        r.deliveries_per_s,
                    ));
                }
                None => rows.push(vec![
                    label,
                    cell.system.clone(),
                    format!(
                        "failed: {}",
                        cell.errors.first().cloned().unwrap_or_default()
                    ),
                ]),
            }
        }
    }
    let targets = fanout_targets(&cells, workloads);
    let json = serde_json::json!({
        "scenario": "fanout",
        "quick": options.quick,
        "runs_per_cell": options.runs(),
        "size_bytes": options.size,
        "window": options.window,
        "workloads": workloads,
        "cells": cells,
        "targets": if options.quick { serde_json::Value::Null } else { serde_json::json!(targets) },
        "ratios_meaningful": !options.quick,
        "spread": !options.no_spread,
        "notes": notes,
        "duplicates": 0,
    });
    let mut all_notes = notes;
    if options.quick {
        all_notes.push("--quick: runs of milliseconds measure start-up and ACK timing, not throughput; ratios and targets are not meaningful".to_owned());
    } else {
        all_notes.push(format!(
            "ratios: of the medians over {} runs; in brackets the lowest and highest ratio any pair of runs gives",
            options.runs()
        ));
        all_notes.extend(report::target_notes(&targets));
    }
    Report {
        scenario: "fanout".to_owned(),
        header,
        rows,
        notes: all_notes,
        json,
        plot: Plot {
            title: if options.quick {
                "fanout --quick: a smoke test, NOT a measurement (runs of milliseconds)".to_owned()
            } else {
                format!(
                    "fanout: deliveries per second (median of {} runs)",
                    options.runs()
                )
            },
            unit: "deliveries/s".to_owned(),
            bars,
        },
    }
}

/// The lowest and highest ratio of chatmesh's deliveries/s to a peer's over
/// every pair of runs ((0, 0) when either has none).
fn ratio_range(chatmesh: &[RunResult], peer: &[RunResult]) -> (f64, f64) {
    let rates = |runs: &[RunResult]| runs.iter().map(|r| r.deliveries_per_s).collect::<Vec<_>>();
    report::ratio_range(&rates(chatmesh), &rates(peer))
}

/// The issue's targets, checked against the medians.
fn fanout_targets(cells: &[Cell], workloads: &[Workload]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for workload in workloads {
        let get = |s: &str| {
            cells
                .iter()
                .find(|c| c.system == s && c.workload == workload.name)
                .and_then(|c| c.median.clone())
        };
        let Some(tcp) = get("chatmesh-tcp") else {
            continue;
        };
        for peer in ["ngircd-1", "ngircd-3"] {
            if let Some(p) = get(peer) {
                let ok = tcp.msgs_per_s >= 2.0 * p.msgs_per_s && tcp.p99_ms * 2.0 <= p.p99_ms;
                out.push(report::target(
                    format!(
                        "({}) chatmesh-tcp at least 2x {peer} (msgs/s and p99)",
                        workload.name
                    ),
                    ok,
                    format!(
                        "{:.2}x msgs/s, {:.2}x p99",
                        tcp.msgs_per_s / p.msgs_per_s.max(1e-9),
                        p.p99_ms / tcp.p99_ms.max(1e-9)
                    ),
                ));
            }
        }
        if let Some(p) = get("nats-server") {
            let ok = tcp.msgs_per_s >= p.msgs_per_s;
            out.push(report::target(
                format!(
                    "({}) chatmesh-tcp at least 1x nats-server msgs/s",
                    workload.name
                ),
                ok,
                format!("{:.2}x", tcp.msgs_per_s / p.msgs_per_s.max(1e-9)),
            ));
        }
        if workload.name == "b" {
            let peers: Vec<(String, f64)> = ["ngircd-1", "ngircd-3", "nats-server"]
                .iter()
                .filter_map(|&peer| get(peer).map(|p| (peer.to_owned(), p.p99_ms)))
                .collect();
            if !peers.is_empty() {
                let lowest = peers
                    .iter()
                    .map(|(_, p99)| *p99)
                    .fold(f64::INFINITY, f64::min);
                let ok = tcp.p99_ms < lowest;
                out.push(serde_json::json!({
                    "target": "(b) chatmesh-tcp p99 below every peer's",
                    "met": ok,
                    "verdict": format!("{} (p99 {:.2} ms, lowest peer {:.2} ms)", if ok {"met"} else {"NOT met"}, tcp.p99_ms, lowest),
                }));
            }
        }
        if workload.name == "a" {
            let ok = tcp.p99_ms < 10.0;
            out.push(report::target(
                "(a) chatmesh-tcp p99 under 10 ms",
                ok,
                format!("p99 {:.2} ms", tcp.p99_ms),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workloads_and_contents() {
        let w = Workload::parse("a", "10x10x200").unwrap();
        assert_eq!((w.rooms, w.members, w.messages), (10, 10, 200));
        assert!(Workload::parse("a", "10x1x200").is_err());
        assert!(Workload::parse("a", "10x10").is_err());
        assert_eq!(parse_content(b"3:17:123456:xxxx"), Some((3, 17, 123456)));
        assert_eq!(parse_content(b"garbage"), None);
        assert_eq!(
            irc_privmsg(b":a!b@c PRIVMSG #r :1:2:3:x x"),
            Some(&b"1:2:3:x x"[..])
        );
        assert_eq!(
            chat_content(br#"{"type":"message","identity":"a","content":"1:2:3:x"}"#),
            Some(&b"1:2:3:x"[..])
        );
        assert_eq!(irc_privmsg(b":a!b@c NOTICE #r :1:2:3:x"), None);
        assert_eq!(irc_privmsg(b":a!b@c PRIVMSG #r"), None);
    }

    #[test]
    fn ratio_range_spans_every_pair_of_runs() {
        let run = |d: f64| RunResult {
            msgs_per_s: 0.0,
            deliveries_per_s: d,
            p50_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
            elapsed_s: 0.0,
            bench_cpu_s: 0.0,
            server_cpu_s: 0.0,
            bench_us_per_delivery: 0.0,
            server_us_per_delivery: 0.0,
        };
        let (lo, hi) = ratio_range(&[run(100.0), run(300.0)], &[run(50.0), run(200.0)]);
        assert_eq!((lo, hi), (0.5, 6.0));
        assert_eq!(ratio_range(&[], &[run(1.0)]), (0.0, 0.0));
    }
}
