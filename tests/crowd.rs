//! A crowd on one server of a real 3-node cluster (issue 11): 2,000 clients in
//! one room of s1 and 2,000 in its main hall, then the owner deletes the room,
//! which sends 2,000 `roomchange` lines to each of those 4,000 clients.
//!
//! The cluster's own work must not notice: no peer goes up or down, no
//! election starts, no leader changes on any node. Another client of s1 (in a
//! room of its own) is answered within 250 ms while the delete fans out, and
//! s1's resident memory grows by less than 200 MB.
//!
//! And whatever the chat side does, even blocking every thread of the runtime
//! its sessions run on, the cluster's own work (mesh, failure detector,
//! election) goes on on its own thread: no peer is seen down.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatmesh::client_proto::ServerMessage;
use chatmesh::{ClusterConfig, Node, NodeOptions};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use common::cluster::{ProcCluster, SETTLE};
use common::process::rss_kb;
use common::{Raw, Via, room_change};

/// Members of the crowded room, its owner included.
const ROOM_MEMBERS: usize = 2000;
/// Clients that stay in s1's main hall.
const HALL_MEMBERS: usize = 2000;
const ROOM: &str = "Crowded";
/// Joins the room last, so its move is the last line of the delete for everyone.
const LAST: &str = "Zlast";
/// Clients connecting (and claiming their identity from the leader) at once.
const IN_FLIGHT: usize = 64;
/// The longest any other client may wait for an answer during the delete.
const STALL_LIMIT: Duration = Duration::from_millis(250);
/// The most s1's resident memory may grow during the delete.
const RSS_GROWTH_LIMIT_KB: u64 = 200 * 1024;
/// Bound on the whole delete reaching every client.
const FAN_OUT_DEADLINE: Duration = Duration::from_secs(60);

/// One test at a time: the crowd loads both cores, and the other test
/// times a failure detector.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_crowded_room_stalls_no_one_and_downs_no_peer() {
    let _serial = SERIAL.lock().await;
    raise_open_files_limit();
    let started = Instant::now();
    let mut cluster = ProcCluster::new(3, "crowd");
    cluster.start_all();
    cluster.wait_agreement(2, SETTLE).await;
    let addr = SocketAddr::from(([127, 0, 0, 1], cluster.client_ports[0]));
    let s1 = cluster.nodes[0].as_mut().expect("s1 runs");
    // A node raises its own open files limit for its crowd, and says so.
    println!("s1: {}", s1.wait_line("open files limit"));
    let pid = s1.child.id();
    let hall = "MainHall-s1";
    let rss_start = rss_kb(pid);

    // The owner creates the room, then sees every member join.
    let mut owner = Raw::join(Via::Tcp, addr, "Owner", hall).await;
    owner
        .send(&format!(r#"{{"type":"createroom","roomid":"{ROOM}"}}"#))
        .await;
    owner
        .expect(&format!(
            r#"{{"type":"createroom","roomid":"{ROOM}","approved":"true"}}"#
        ))
        .await;
    owner.expect(&room_change("Owner", hall, ROOM)).await;

    let sentinel: Arc<[u8]> = ServerMessage::room_change(LAST, ROOM, hall)
        .encode()
        .to_vec()
        .into();
    let crowd = Arc::new(Crowd::default());
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let members: Vec<String> = (1..ROOM_MEMBERS - 1).map(|i| format!("Room{i}")).collect();
    for name in &members {
        let permit = slots.clone().acquire_owned().await.expect("open semaphore");
        crowd.spawn(addr, name.clone(), true, sentinel.clone(), permit);
    }
    owner_sees_joins(&mut owner, members.len(), hall).await;
    let permit = slots.clone().acquire_owned().await.expect("open semaphore");
    crowd.spawn(addr, LAST.to_owned(), true, sentinel.clone(), permit);
    owner_sees_joins(&mut owner, 1, hall).await;
    println!(
        "{ROOM_MEMBERS} clients in room {ROOM} of s1 after {:?}",
        started.elapsed()
    );

    // The probe lives in a quiet room of its own: nothing of the delete is
    // queued to it, so any delay in its answers is a stall of the server.
    let mut probe = tokio::task::spawn_blocking(move || Probe::connect(addr, hall))
        .await
        .expect("the probe connects");

    for i in 1..=HALL_MEMBERS {
        let permit = slots.clone().acquire_owned().await.expect("open semaphore");
        crowd.spawn(addr, format!("Hall{i}"), false, sentinel.clone(), permit);
    }
    let crowd_size = ROOM_MEMBERS - 1 + HALL_MEMBERS;
    crowd
        .wait_until("every client approved", || {
            crowd.approved.load(Ordering::Relaxed) == crowd_size
        })
        .await;
    crowd.wait_quiet().await;
    println!(
        "{crowd_size} clients on s1 ({HALL_MEMBERS} in its main hall) and quiet after {:?}",
        started.elapsed()
    );

    let metrics_before = cluster_metrics(&cluster).await;
    let rss_before = rss_kb(pid);
    let sampler = RssSampler::start(pid);
    let probing = Arc::new(AtomicBool::new(true));
    let deleted = Instant::now();
    let prober = {
        let probing = probing.clone();
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            while probing.load(Ordering::Relaxed) {
                for (kind, request, answer) in [
                    ("list", r#"{"type":"list"}"#, "roomlist"),
                    ("who", r#"{"type":"who"}"#, "roomcontents"),
                ] {
                    let at = deleted.elapsed();
                    answers.push((kind, at, probe.ask(request, answer)));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            answers
        })
    };

    owner
        .send(&format!(r#"{{"type":"deleteroom","roomid":"{ROOM}"}}"#))
        .await;
    owner
        .expect(&format!(
            r#"{{"type":"deleteroom","roomid":"{ROOM}","approved":"true"}}"#
        ))
        .await;
    // Every member moves, the owner first (it made the room), LAST last.
    owner.expect(&room_change("Owner", ROOM, hall)).await;
    for _ in 1..ROOM_MEMBERS - 1 {
        let line = owner.next().await.expect("the owner stays connected");
        assert_eq!(line["type"], "roomchange", "owner got {line}");
        assert_eq!(line["former"], ROOM, "owner got {line}");
        assert_eq!(line["roomid"], hall, "owner got {line}");
    }
    owner.expect(&room_change(LAST, ROOM, hall)).await;
    let deadline = deleted + FAN_OUT_DEADLINE;
    while crowd.done.load(Ordering::Relaxed) < crowd_size {
        assert!(
            Instant::now() < deadline,
            "only {} of {crowd_size} clients got the whole delete within {FAN_OUT_DEADLINE:?}; ended early: {:?}",
            crowd.done.load(Ordering::Relaxed),
            crowd.ended()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fanned_out = deleted.elapsed();
    // Probe a little past the end, then give the failure detector more than
    // its timeout to notice anything the delete may have caused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    probing.store(false, Ordering::Relaxed);
    let answers = prober.join().expect("the probe thread");
    let (rss_peak, rss_after) = sampler.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let metrics_after = cluster_metrics(&cluster).await;

    let growth = rss_peak.saturating_sub(rss_before);
    println!(
        "delete of a room of {ROOM_MEMBERS} with {HALL_MEMBERS} in the hall: {} lines reached all {crowd_size} clients in {fanned_out:?}",
        ROOM_MEMBERS * (ROOM_MEMBERS + HALL_MEMBERS)
    );
    println!(
        "s1 RSS: {} MB at start, {} MB before the delete, peak {} MB during it (+{} MB), {} MB after",
        rss_start / 1024,
        rss_before / 1024,
        rss_peak / 1024,
        growth / 1024,
        rss_after / 1024
    );
    for kind in ["list", "who"] {
        let times: Vec<Duration> = answers
            .iter()
            .filter(|(k, _, _)| *k == kind)
            .map(|(_, _, t)| *t)
            .collect();
        let worst = times.iter().max().copied().unwrap_or_default();
        println!(
            "another client's {kind}: {} answers during the delete, slowest {worst:?}",
            times.len()
        );
    }
    for (kind, at, took) in answers.iter().filter(|(_, _, t)| *t > STALL_LIMIT / 5) {
        println!("  slow {kind}: sent {at:?} after the delete, answered in {took:?}");
    }
    for (i, (before, after)) in metrics_before.iter().zip(&metrics_after).enumerate() {
        println!("s{}: before {before:?}, after {after:?}", i + 1);
    }
    println!("whole test {:?}", started.elapsed());

    for (i, (before, after)) in metrics_before.iter().zip(&metrics_after).enumerate() {
        assert_eq!(
            before,
            after,
            "s{}: the delete changed the cluster's state (peer up/down, election, leader)",
            i + 1
        );
    }
    let (kind, at, worst) = answers
        .iter()
        .max_by_key(|(_, _, t)| *t)
        .copied()
        .expect("at least one probe");
    assert!(
        worst < STALL_LIMIT,
        "another client waited {worst:?} for its {kind} sent {at:?} after the delete"
    );
    assert!(
        growth < RSS_GROWTH_LIMIT_KB,
        "s1 grew by {} MB during the delete",
        growth / 1024
    );
    drop(owner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_chat_runtime_does_not_stop_the_cluster() {
    let _serial = SERIAL.lock().await;
    // In-process nodes that bind their own mesh sockets (so the sockets, too,
    // belong to the cluster threads); their client sessions, admin endpoints
    // and evictions run on this test's runtime.
    let ports = common::free_ports(9);
    let toml = chatmesh::config::loopback_cluster_toml(&ports);
    let config = ClusterConfig::parse(&toml, "blocked chat runtime").expect("config");
    let mut nodes = Vec::new();
    for id in ["s1", "s2", "s3"] {
        let options = NodeOptions::new(config.clone(), id, common::certs());
        nodes.push(Node::start(options).await.expect("node starts"));
    }
    let agreed = |nodes: &[Node]| {
        nodes.iter().all(|node| {
            let view = node.view();
            view.leader.as_deref() == Some("s3") && view.members.iter().all(|m| m.alive)
        })
    };
    let deadline = Instant::now() + SETTLE;
    while !agreed(&nodes) {
        assert!(
            Instant::now() < deadline,
            "no agreement on s3 within {SETTLE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let counters = |nodes: &[Node]| -> Vec<(u64, u64, u64)> {
        nodes
            .iter()
            .map(|node| {
                let view = node.view();
                (view.term, view.peer_state_changes, view.elections_started)
            })
            .collect()
    };
    let before = counters(&nodes);

    // Both workers of this runtime stuck (a barrier makes sure each holds
    // one) for three failure timeouts, as a chat side gone wrong would be.
    let stall = config.timing.failure_timeout * 3;
    let both = Arc::new(std::sync::Barrier::new(2));
    let blockers: Vec<_> = (0..2)
        .map(|_| {
            let both = both.clone();
            tokio::spawn(async move {
                both.wait();
                std::thread::sleep(stall);
            })
        })
        .collect();
    for blocker in blockers {
        blocker.await.expect("the blocker ends");
    }
    // Time for a detector to judge what it missed (views refresh every
    // heartbeat interval).
    tokio::time::sleep(config.timing.failure_timeout * 2).await;
    let after = counters(&nodes);
    println!(
        "(term, peer up/down changes, elections started) per node: before {before:?}, after a {stall:?} stall of the chat runtime {after:?}"
    );
    assert_eq!(
        before, after,
        "the cluster noticed the chat runtime's stall"
    );
    for node in nodes {
        node.stop().await;
    }
}

/// Reads the owner's lines until `count` more members joined the room.
async fn owner_sees_joins(owner: &mut Raw, count: usize, hall: &str) {
    for _ in 0..count {
        let line = owner.next().await.expect("the owner stays connected");
        assert_eq!(line["type"], "roomchange", "owner got {line}");
        assert_eq!(line["former"], hall, "owner got {line}");
        assert_eq!(line["roomid"], ROOM, "owner got {line}");
    }
}

/// The crowd's clients: cheap readers that only count bytes and look for the
/// last line of the delete at the end of what they read.
#[derive(Default)]
struct Crowd {
    approved: AtomicUsize,
    /// Clients whose stream ended with the sentinel line.
    done: AtomicUsize,
    bytes: AtomicU64,
    /// Clients that ended early, and why.
    ended: Mutex<Vec<String>>,
}

impl Crowd {
    fn spawn(
        self: &Arc<Self>,
        addr: SocketAddr,
        name: String,
        join: bool,
        sentinel: Arc<[u8]>,
        permit: OwnedSemaphorePermit,
    ) {
        let crowd = self.clone();
        tokio::spawn(async move {
            if let Err(e) = crowd.client(addr, &name, join, &sentinel, permit).await {
                crowd.ended.lock().unwrap().push(format!("{name}: {e:#}"));
            }
        });
    }

    async fn client(
        &self,
        addr: SocketAddr,
        name: &str,
        join: bool,
        sentinel: &[u8],
        permit: OwnedSemaphorePermit,
    ) -> anyhow::Result<()> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut hello = format!("{{\"type\":\"newidentity\",\"identity\":\"{name}\"}}\n");
        if join {
            hello.push_str(&format!(
                "{{\"type\":\"joinroom\",\"roomid\":\"{ROOM}\"}}\n"
            ));
        }
        stream.write_all(hello.as_bytes()).await?;
        let mut buf = vec![0u8; 8 * 1024];
        let mut tail: Vec<u8> = Vec::new();
        let approval = b"{\"type\":\"newidentity\",\"approved\":\"true\"}\n";
        let mut approved = false;
        let mut done = false;
        let mut _permit = Some(permit);
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                anyhow::bail!("closed by the server (approved: {approved})");
            }
            self.bytes.fetch_add(n as u64, Ordering::Relaxed);
            tail.extend_from_slice(&buf[..n]);
            if !approved && tail.len() >= approval.len() {
                anyhow::ensure!(
                    tail.starts_with(approval),
                    "not approved: {}",
                    String::from_utf8_lossy(&tail)
                );
                approved = true;
                self.approved.fetch_add(1, Ordering::Relaxed);
                _permit = None;
            }
            if approved && !done && tail.ends_with(sentinel) {
                done = true;
                self.done.fetch_add(1, Ordering::Relaxed);
            }
            // Keep only what a sentinel split across reads needs.
            if approved && tail.len() > sentinel.len() {
                tail.drain(..tail.len() - sentinel.len());
            }
        }
    }

    fn ended(&self) -> Vec<String> {
        self.ended.lock().unwrap().clone()
    }

    async fn wait_until(&self, what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !condition() {
            let ended = self.ended();
            assert!(
                ended.is_empty(),
                "waiting for {what}: clients ended: {ended:?}"
            );
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until no client has read anything for a while: the setup's
    /// arrivals and joins have all been delivered.
    async fn wait_quiet(&self) {
        let mut last = self.bytes.load(Ordering::Relaxed);
        let mut since = Instant::now();
        self.wait_until("the crowd to go quiet", || {
            let now = self.bytes.load(Ordering::Relaxed);
            if now != last {
                last = now;
                since = Instant::now();
            }
            since.elapsed() > Duration::from_millis(500)
        })
        .await;
    }
}

/// A client on its own OS thread with blocking I/O, so that its timings do
/// not depend on this test's own busy runtime.
struct Probe {
    reader: BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
}

impl Probe {
    /// Identifies as `Probe` and moves to a room of its own.
    fn connect(addr: SocketAddr, hall: &str) -> Probe {
        let stream = std::net::TcpStream::connect(addr).expect("probe connects");
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut probe = Probe {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        probe.ask(
            r#"{"type":"newidentity","identity":"Probe"}"#,
            "newidentity",
        );
        probe.ask(r#"{"type":"createroom","roomid":"Quiet"}"#, "createroom");
        let moved = probe.next();
        assert_eq!(moved["roomid"], "Quiet", "probe got {moved}");
        assert_eq!(moved["former"], hall, "probe got {moved}");
        probe
    }

    fn next(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("probe reads");
        assert!(n > 0, "the server closed the probe's connection");
        serde_json::from_str(&line).expect("a JSON line")
    }

    /// Sends `request` and times the answer of type `answer` (lines of other
    /// types before it are skipped).
    fn ask(&mut self, request: &str, answer: &str) -> Duration {
        let sent = Instant::now();
        writeln!(self.writer, "{request}").expect("probe writes");
        loop {
            let line = self.next();
            if line["type"] == answer {
                assert_ne!(line["approved"], "false", "probe refused: {line}");
                return sent.elapsed();
            }
        }
    }
}

/// Samples a process's resident memory every few milliseconds.
struct RssSampler {
    running: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
    pid: u32,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let running = Arc::new(AtomicBool::new(true));
        let thread = std::thread::spawn({
            let running = running.clone();
            move || {
                let mut peak = 0;
                while running.load(Ordering::Relaxed) {
                    peak = peak.max(rss_kb(pid));
                    std::thread::sleep(Duration::from_millis(5));
                }
                peak
            }
        });
        RssSampler {
            running,
            thread,
            pid,
        }
    }

    /// Stops sampling; returns the peak and the current RSS, in KiB.
    fn stop(self) -> (u64, u64) {
        self.running.store(false, Ordering::Relaxed);
        let now = rss_kb(self.pid);
        let peak = self.thread.join().expect("the sampler thread");
        (peak.max(now), now)
    }
}

/// What the cluster's own state machines did, per node: peer up/down
/// transitions, elections started, leader changes, and the term.
async fn cluster_metrics(cluster: &ProcCluster) -> Vec<Vec<(String, u64)>> {
    let mut all = Vec::new();
    for port in &cluster.admin_ports {
        let admin = SocketAddr::from(([127, 0, 0, 1], *port));
        let text = chatmesh::admin::fetch(admin, "/metrics")
            .await
            .expect("/metrics answers");
        let wanted = [
            "peer_state_changes_total",
            "elections_started_total",
            "leader_changes_total",
            "term",
        ];
        let values = wanted
            .iter()
            .map(|name| {
                let prefix = format!("chatmesh_{name}{{");
                let value = text
                    .lines()
                    .find(|line| line.starts_with(&prefix))
                    .and_then(|line| line.rsplit(' ').next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"));
                (name.to_string(), value)
            })
            .collect();
        all.push(values);
    }
    all
}

/// Raises this process's soft limit of open files to its hard limit: the
/// crowd needs more than 4,000 sockets.
fn raise_open_files_limit() {
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
