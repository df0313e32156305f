//! Real `chatmesh node` processes, each in a network namespace of its own,
//! joined by veth pairs to a bridge in one more namespace (the hub, where the
//! test's clients connect from). nftables rules inside a node's namespace drop
//! mesh datagrams from chosen peers or at random, so partitions, one-way cuts
//! and loss come from the kernel, outside the program.
//!
//! Nothing touches the host's own network: every interface, address and rule
//! lives in a namespace made here, and dropping the [`NetLab`] (also while
//! panicking) kills the nodes and deletes the namespaces, which takes their
//! interfaces and rules with them. Needs root, `ip` (iproute2) and `nft`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::process::BIN;

/// Client port of every node (each node has its own namespace, so they can share it).
pub const CLIENT_PORT: u16 = 4444;
/// Mesh (QUIC between servers, UDP) port of every node: the port the rules act on.
pub const MESH_PORT: u16 = 5555;
/// Admin port, on the loopback of each node's namespace.
pub const ADMIN_PORT: u16 = 7001;
/// Prefix of every namespace this helper makes, followed by the test's pid.
const PREFIX: &str = "chatmesh-lab-";
/// The nftables table the rules live in, inside a node's namespace.
const TABLE: &str = "chatmesh_faults";

/// Why this machine cannot run namespace labs, or None if it can.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (network namespaces and nftables need it)".into());
    }
    let Some(ip) = tool("ip") else {
        return Some("no `ip` command (apt-get install iproute2)".into());
    };
    if tool("nft").is_none() {
        return Some("no `nft` command (apt-get install nftables)".into());
    }
    // Namespaces may still be refused (a container without CAP_SYS_ADMIN).
    let probe = format!("{PREFIX}{}-probe", std::process::id());
    if let Err(e) = run(&ip, &["netns", "add", &probe]) {
        return Some(format!("cannot make a network namespace: {e}"));
    }
    let nft_works = set_table(&probe, "");
    let _ = run(&ip, &["netns", "del", &probe]);
    if let Err(e) = nft_works {
        return Some(format!("nftables does not work in a namespace: {e}"));
    }
    None
}

/// Where a system tool is: PATH first, then the sbin directories a non-login
/// shell may leave out.
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Runs a command to completion; an error carries its stderr.
fn run(program: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", program.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} {}: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn netns_path(ns: &str) -> PathBuf {
    Path::new("/var/run/netns").join(ns)
}

/// Makes `command` run inside namespace `ns` (setns between fork and exec).
fn enter_on_spawn(command: &mut Command, ns: &File) {
    let fd = ns.as_raw_fd();
    // SAFETY: only setns(2), async-signal-safe, runs between fork and exec;
    // `ns` outlives the spawn (the caller holds it), so `fd` is open.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Replaces the rules of namespace `ns` with `chain_rules` (input chain
/// statements, one a line; empty removes the table), atomically.
fn set_table(ns: &str, chain_rules: &str) -> Result<(), String> {
    let nft = tool("nft").ok_or("no nft")?;
    let handle = File::open(netns_path(ns)).map_err(|e| format!("namespace {ns}: {e}"))?;
    // Declaring then deleting makes the delete safe when the table is absent;
    // `nft -f` applies the whole text as one transaction.
    let mut text = format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n");
    if !chain_rules.is_empty() {
        text.push_str(&format!(
            "table inet {TABLE} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n{chain_rules}  }}\n}}\n"
        ));
    }
    let mut command = Command::new(nft);
    command
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    enter_on_spawn(&mut command, &handle);
    let mut child = command.spawn().map_err(|e| format!("nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| format!("nft stdin: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft in {ns}: {}; rules were:\n{text}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `f` on a thread of its own inside namespace `ns`: every socket it
/// makes (a tokio runtime built inside included) lives in that namespace.
pub fn spawn_in_netns<R: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> std::thread::JoinHandle<Result<R, String>> {
    let path = netns_path(ns);
    let ns = ns.to_owned();
    std::thread::Builder::new()
        .name(format!("in {ns}"))
        .spawn(move || {
            let handle = File::open(&path).map_err(|e| format!("namespace {ns}: {e}"))?;
            // SAFETY: setns on this thread only (the network namespace is a
            // per-thread attribute); the fd is open for the call.
            if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        })
        .expect("spawn a thread")
}

/// [`spawn_in_netns`], waiting for the result.
pub fn in_netns<R: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, String> {
    spawn_in_netns(ns, f)
        .join()
        .map_err(|_| "a thread inside a namespace panicked".to_owned())?
}

/// What the kernel does to mesh datagrams arriving in one node's namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshRules {
    /// Peers (0-based node indices) whose mesh datagrams are dropped.
    pub drop_from: Vec<usize>,
    /// Percentage of all arriving mesh datagrams dropped at random.
    pub loss_percent: u8,
}

/// Servers s1..sN, each in its own namespace with address `10.213.X.i`.
pub struct NetLab {
    /// Files of this lab: config, certs, one log per node start.
    pub dir: PathBuf,
    pub config: PathBuf,
    pub certs: PathBuf,
    /// The namespace of the bridge, where clients connect from.
    pub hub: String,
    nodes_ns: Vec<String>,
    subnet: [u8; 3],
    children: Vec<Option<Child>>,
    starts: Vec<u32>,
    ip: PathBuf,
    /// Namespaces made so far, deleted on drop.
    made: Vec<String>,
    keep_dir: bool,
}

impl NetLab {
    /// Makes the namespaces, the bridge, config and certificates for `n`
    /// servers; starts none. Namespaces left by an earlier run of a test
    /// process that no longer exists are removed first.
    pub fn new(n: usize, tag: &str) -> Result<NetLab, String> {
        static LABS: AtomicUsize = AtomicUsize::new(0);
        remove_stale_namespaces();
        let ip = tool("ip").ok_or("no ip command")?;
        let pid = std::process::id();
        let lab = LABS.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{pid}-{lab}");
        // Every address lives inside these namespaces, so the subnet could be
        // fixed; deriving it from the pid just makes logs of parallel runs distinct.
        let subnet = [10, 213, 20 + (pid % 200) as u8];
        let dir = super::temp_dir(tag);
        let mut lab = NetLab {
            config: dir.join("cluster.toml"),
            certs: dir.join("certs"),
            dir,
            hub: format!("{name}-hub"),
            nodes_ns: (1..=n).map(|i| format!("{name}-s{i}")).collect(),
            subnet,
            children: (0..n).map(|_| None).collect(),
            starts: vec![0; n],
            ip,
            made: Vec::new(),
            keep_dir: false,
        };
        lab.build_network()?;
        lab.write_config()?;
        Ok(lab)
    }

    fn ip(&self, args: &[&str]) -> Result<(), String> {
        run(&self.ip, args)
    }

    fn build_network(&mut self) -> Result<(), String> {
        let hub = self.hub.clone();
        self.ip(&["netns", "add", &hub])?;
        self.made.push(hub.clone());
        self.ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        self.ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        let hub_addr = format!("{}/24", self.address(253));
        self.ip(&["-n", &hub, "addr", "add", &hub_addr, "dev", "br0"])?;
        self.ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for i in 0..self.nodes_ns.len() {
            let ns = self.nodes_ns[i].clone();
            self.ip(&["netns", "add", &ns])?;
            self.made.push(ns.clone());
            let veth = format!("v{}", i + 1);
            self.ip(&[
                "-n", &hub, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            self.ip(&["-n", &hub, "link", "set", &veth, "master", "br0", "up"])?;
            self.ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let addr = format!("{}/24", self.node_ip(i));
            self.ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            self.ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    fn address(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], host)
    }

    /// Node `i`'s (0-based) address.
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        self.address(i as u8 + 1)
    }

    /// Node `i`'s client address (reachable from the hub namespace).
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.node_ip(i), CLIENT_PORT))
    }

    /// Server id of node `i`.
    pub fn id(&self, i: usize) -> String {
        format!("s{}", i + 1)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes_ns.len()
    }

    fn write_config(&self) -> Result<(), String> {
        let servers: String = (0..self.len())
            .map(|i| {
                format!(
                    "[[server]]\nid = \"{}\"\nhost = \"{}\"\nclient_port = {CLIENT_PORT}\nmesh_port = {MESH_PORT}\nadmin_port = {ADMIN_PORT}\n\n",
                    self.id(i),
                    self.node_ip(i)
                )
            })
            .collect();
        std::fs::write(&self.config, servers).map_err(|e| format!("config: {e}"))?;
        // The real command, so that IP-address hosts get certificates that verify.
        let out = Command::new(BIN)
            .args(["certs", "--config"])
            .arg(&self.config)
            .arg("--out")
            .arg(&self.certs)
            .output()
            .map_err(|e| format!("chatmesh certs: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "chatmesh certs: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// Starts node `i` in its namespace (logs to `<dir>/s<i>.<start>.log`);
    /// does not wait for it to serve.
    pub fn start(&mut self, i: usize) -> Result<(), String> {
        assert!(self.children[i].is_none(), "{} already running", self.id(i));
        self.starts[i] += 1;
        let log_path = self
            .dir
            .join(format!("{}.{}.log", self.id(i), self.starts[i]));
        let log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let err = log.try_clone().map_err(|e| format!("log: {e}"))?;
        let handle = File::open(netns_path(&self.nodes_ns[i]))
            .map_err(|e| format!("namespace of {}: {e}", self.id(i)))?;
        let mut command = Command::new(BIN);
        command
            .args(["node", "--id", &self.id(i), "--config"])
            .arg(&self.config)
            .arg("--certs")
            .arg(&self.certs)
            // claim_granted (debug) names which server each grant went to.
            .env("RUST_LOG", "info,chatmesh::cluster=debug")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        enter_on_spawn(&mut command, &handle);
        let child = command
            .spawn()
            .map_err(|e| format!("start {}: {e}", self.id(i)))?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// `kill -9` of node `i`, waiting for it to be gone.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`stop`) or SIGCONT to node `i`: a stopped process keeps its
    /// sockets open and does nothing, as a server starved or swapped out.
    pub fn pause(&self, i: usize, stop: bool) -> Result<(), String> {
        let child = self.children[i]
            .as_ref()
            .ok_or_else(|| format!("{} is not running", self.id(i)))?;
        let signal = if stop { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) on our own child, which has not been reaped (we
        // hold its Child and only wait in kill9), so the pid is still its.
        if unsafe { libc::kill(child.id() as libc::pid_t, signal) } != 0 {
            return Err(format!(
                "signal {signal} to {}: {}",
                self.id(i),
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Whether node `i` was started and not killed.
    pub fn is_running(&self, i: usize) -> bool {
        self.children[i].is_some()
    }

    /// Node `i`'s `/status`, or None if it does not answer within ~2 s.
    pub fn status(&self, i: usize) -> Option<Value> {
        in_netns(&self.nodes_ns[i], || admin_get("/status"))
            .ok()
            .flatten()
            .and_then(|body| serde_json::from_str(&body).ok())
    }

    /// Polls node `i`'s `/status` until it answers; false after `within`.
    pub fn wait_serving(&self, i: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.status(i).is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The leader that every running node follows, each seeing exactly the
    /// running nodes alive, or None.
    pub fn agreed_leader(&self) -> Option<usize> {
        let running: Vec<usize> = (0..self.len()).filter(|&i| self.is_running(i)).collect();
        let mut leader = None;
        for &i in &running {
            let status = self.status(i)?;
            let all_seen = status["members"].as_array().is_some_and(|members| {
                members.len() == self.len()
                    && members
                        .iter()
                        .enumerate()
                        .all(|(j, m)| m["alive"] == running.contains(&j))
            });
            let this = status["leader"].as_str()?.to_owned();
            if !all_seen || leader.as_ref().is_some_and(|l| *l != this) {
                return None;
            }
            leader = Some(this);
        }
        let leader = leader?;
        (0..self.len()).find(|&i| self.id(i) == leader)
    }

    /// The leader most running nodes name, if any (a quick look, no agreement needed).
    pub fn likely_leader(&self) -> Option<usize> {
        let mut votes = vec![0; self.len()];
        for i in (0..self.len()).filter(|&i| self.is_running(i)) {
            if let Some(leader) = self
                .status(i)
                .and_then(|s| s["leader"].as_str().map(str::to_owned))
                && let Some(j) = (0..self.len()).find(|&j| self.id(j) == leader)
            {
                votes[j] += 1;
            }
        }
        (0..self.len())
            .filter(|&j| votes[j] > 0 && self.is_running(j))
            .max_by_key(|&j| votes[j])
    }

    /// Replaces what the kernel of node `i`'s namespace does to arriving mesh datagrams.
    pub fn set_rules(&self, i: usize, rules: &MeshRules) -> Result<(), String> {
        let mut text = String::new();
        if !rules.drop_from.is_empty() {
            let from: Vec<String> = rules
                .drop_from
                .iter()
                .map(|&j| self.node_ip(j).to_string())
                .collect();
            text.push_str(&format!(
                "    ip saddr {{ {} }} udp dport {MESH_PORT} drop\n",
                from.join(", ")
            ));
        }
        if rules.loss_percent > 0 {
            text.push_str(&format!(
                "    udp dport {MESH_PORT} numgen random mod 100 < {} drop\n",
                rules.loss_percent
            ));
        }
        set_table(&self.nodes_ns[i], &text)
    }

    /// Keeps the lab's directory (logs, config) after the drop, for a failure report.
    pub fn keep_dir(&mut self) {
        self.keep_dir = true;
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill9(i);
        }
        // Deleting a namespace deletes its interfaces (the veth pairs with it)
        // and its nftables rules.
        for ns in self.made.iter().rev() {
            if let Err(e) = run(&self.ip, &["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
        if self.keep_dir || std::thread::panicking() {
            // Marked, so that later test processes do not sweep it away.
            let _ = std::fs::write(self.dir.join(super::KEPT), "");
            eprintln!("lab files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes namespaces of this helper whose test process is gone (one killed
/// before its drop ran).
fn remove_stale_namespaces() {
    let Some(ip) = tool("ip") else { return };
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = run(&ip, &["netns", "del", &name]);
        }
    }
}

/// GET `path` from the admin endpoint on this thread's namespace's loopback.
fn admin_get(path: &str) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(1)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}
