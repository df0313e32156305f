//! The processes the bench starts and what it reads about them from `/proc`.
//!
//! Every child writes its output to a log file in the bench's temp dir (no
//! pipe can fill up and stall it), is killed on drop, and is waited for by
//! condition (a log line, a port answering), never by a fixed sleep.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

/// How long a started server may take to be ready.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// A temp directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("chatmesh-bench-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot make the temp dir {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `n` loopback port numbers free for both TCP and UDP right now.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..n * 4 {
        if ports.len() == n {
            break;
        }
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a port")?;
        let port = tcp.local_addr()?.port();
        if let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", port)) {
            ports.push(port);
            held.push((tcp, udp));
        }
    }
    if ports.len() < n {
        bail!("found only {} of {n} free loopback ports", ports.len());
    }
    Ok(ports)
}

/// A child process the bench started.
pub struct Server {
    /// What it is, for messages ("s1", "ngircd-2").
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Starts `program args`, output to `<dir>/<name>.log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Result<Server> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        Ok(Server {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// The process id (0 once it has been reaped).
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// The tail of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Waits until its log contains `needle`.
    pub async fn wait_log(&mut self, needle: &str) -> Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if std::fs::read_to_string(&self.log)
                .unwrap_or_default()
                .contains(needle)
            {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{} did not log {needle:?} within {START_DEADLINE:?}; its log ends:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until 127.0.0.1:`port` accepts TCP connections.
    pub async fn wait_port(&mut self, port: u16) -> Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{} did not open port {port} within {START_DEADLINE:?}; its log ends:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log ends:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) -> Result<()> {
        self.child
            .kill()
            .await
            .with_context(|| format!("cannot kill {}", self.name))
    }

    /// CPU seconds (user + system) used so far, from `/proc/<pid>/stat`.
    pub fn cpu_seconds(&self) -> f64 {
        proc_cpu_seconds(self.pid()).unwrap_or(0.0)
    }

    /// Resident memory in bytes, from `/proc/<pid>/status`.
    pub fn rss_bytes(&self) -> Result<u64> {
        proc_rss_bytes(self.pid()).with_context(|| format!("cannot read {}'s VmRSS", self.name))
    }
}

/// CPU seconds (user + system) of process `pid`.
pub fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 14 (utime) and 15 (stime) overall; field 3 (state) is fields[0].
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks.max(1.0))
}

/// CPU seconds (user + system) of this process (the load generator).
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0;
    if !ok {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// VmRSS of process `pid`, in bytes.
pub fn proc_rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("empty VmRSS line")?
        .parse()
        .context("VmRSS is not a number")?;
    Ok(kb * 1024)
}

/// A chatmesh cluster of `n` node processes (s1..sN, ascending priority) on
/// free loopback ports, with its own config and CA in a temp dir.
pub struct ChatCluster {
    /// Config, certs and logs.
    pub dir: TempDir,
    /// Client port (TCP and QUIC) of each server.
    pub client_ports: Vec<u16>,
    /// Admin port of each server.
    pub admin_ports: Vec<u16>,
    /// Server ids.
    pub ids: Vec<String>,
    /// Running nodes (None: killed).
    pub nodes: Vec<Option<Server>>,
    config: PathBuf,
    certs: PathBuf,
    impair: Option<String>,
}

impl ChatCluster {
    /// Writes the config and certificates; starts nothing.
    pub fn new(n: usize, tag: &str, impair: Option<String>) -> Result<ChatCluster> {
        let dir = TempDir::new(tag)?;
        let ports = free_ports(3 * n)?;
        let ids: Vec<String> = (1..=n).map(|i| format!("s{i}")).collect();
        let config = dir.0.join("cluster.toml");
        std::fs::write(&config, crate::config::loopback_cluster_toml(&ports))
            .context("cannot write the bench config")?;
        let certs = dir.0.join("certs");
        let parsed = crate::ClusterConfig::load(&config)?;
        crate::tls::generate(&parsed, &certs, true)?;
        Ok(ChatCluster {
            client_ports: (0..n).map(|i| ports[3 * i]).collect(),
            admin_ports: (0..n).map(|i| ports[3 * i + 2]).collect(),
            nodes: (0..n).map(|_| None).collect(),
            ids,
            dir,
            config,
            certs,
            impair,
        })
    }

    /// The cluster CA certificate, for QUIC clients.
    pub fn ca(&self) -> PathBuf {
        crate::tls::ca_cert_path(&self.certs)
    }

    /// Starts node `i` (0-based) and waits until it serves clients.
    pub async fn start(&mut self, i: usize) -> Result<()> {
        let exe = std::env::current_exe().context("cannot find the chatmesh executable")?;
        let mut args = vec![
            "node".to_owned(),
            "--config".to_owned(),
            self.config.display().to_string(),
            "--id".to_owned(),
            self.ids[i].clone(),
            "--certs".to_owned(),
            self.certs.display().to_string(),
            // The nodes share this machine's cores, as `chatmesh up`'s do.
            "--workers".to_owned(),
            crate::up::workers_per_node(self.ids.len()).to_string(),
        ];
        if let Some(spec) = &self.impair {
            args.extend(["--impair".to_owned(), spec.clone()]);
        }
        let mut node = Server::spawn(&self.ids[i], &exe, &args, &self.dir.0)?;
        node.wait_log("serving clients").await?;
        self.nodes[i] = Some(node);
        Ok(())
    }

    /// Starts every node.
    pub async fn start_all(&mut self) -> Result<()> {
        for i in 0..self.ids.len() {
            self.start(i).await?;
        }
        Ok(())
    }

    /// Admin address of node `i`.
    pub fn admin(&self, i: usize) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.admin_ports[i]))
    }

    /// Pids of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().flatten().map(Server::pid).collect()
    }
}

/// Finds `program` on PATH (and in the sbin directories, where ngircd lives).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// The peers' programs, installing them with apt-get if allowed. Returns
/// (ngircd, nats-server); a missing one is None, with the reason printed.
pub fn ensure_peers(install: bool) -> (Option<PathBuf>, Option<PathBuf>) {
    let missing = || find_program("ngircd").is_none() || find_program("nats-server").is_none();
    if missing() {
        const CMD: &str = "apt-get update && apt-get install -y ngircd nats-server";
        if install {
            super::progress(format!("installing the peers: {CMD}"));
            let ok = std::process::Command::new("sh")
                .args(["-c", CMD])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                super::progress(format!(
                    "could not install the peers; run as root: {CMD} (measuring chatmesh alone)"
                ));
            }
        } else {
            super::progress(format!(
                "peers missing; install them with: {CMD} (measuring chatmesh alone)"
            ));
        }
    }
    (find_program("ngircd"), find_program("nats-server"))
}

/// `n` ngircd servers linked into one network (a chain: server i links to
/// server i-1), clients on the returned ports.
pub async fn start_ngircd(program: &Path, n: usize, dir: &Path) -> Result<(Vec<Server>, Vec<u16>)> {
    let ports = free_ports(n)?;
    let mut servers = Vec::new();
    for i in 0..n {
        let mut conf = format!(
            "[Global]\nName = irc{i}.bench\nInfo = chatmesh bench\nListen = 127.0.0.1\nPorts = {}\n\
             MotdPhrase = bench\nPidFile = {}/ngircd{i}.pid\n\
             [Limits]\nMaxConnections = 0\nMaxConnectionsIP = 0\nMaxJoins = 0\nMaxNickLength = 16\n\
             MaxPenaltyTime = 0\nPingTimeout = 600\nPongTimeout = 600\nConnectRetry = 1\n\
             [Options]\nDNS = no\nIdent = no\nPAM = no\n",
            ports[i],
            dir.display()
        );
        // Links: each server names its neighbours; the later one dials.
        for j in [i.wrapping_sub(1), i + 1] {
            if j < n {
                conf += &format!(
                    "[Server]\nName = irc{j}.bench\nHost = 127.0.0.1\nMyPassword = bench{}\nPeerPassword = bench{}\n{}",
                    i.min(j),
                    i.min(j),
                    if j < i {
                        format!("Port = {}\n", ports[j])
                    } else {
                        String::new()
                    }
                );
            }
        }
        let path = dir.join(format!("ngircd{i}.conf"));
        std::fs::write(&path, conf).context("cannot write the ngircd config")?;
        let name = format!("ngircd-{}", i + 1);
        let mut server = Server::spawn(
            &name,
            program,
            &["-n".to_owned(), "-f".to_owned(), path.display().to_string()],
            dir,
        )?;
        server.wait_port(ports[i]).await?;
        servers.push(server);
    }
    Ok((servers, ports))
}

/// One nats-server on a free loopback port.
pub async fn start_nats(program: &Path, dir: &Path) -> Result<(Server, u16)> {
    let port = free_ports(1)?[0];
    let conf = dir.join("nats.conf");
    std::fs::write(&conf, format!("listen: \"127.0.0.1:{port}\"\n"))
        .context("cannot write the nats config")?;
    let mut server = Server::spawn(
        "nats-server",
        program,
        &["-c".to_owned(), conf.display().to_string()],
        dir,
    )?;
    server.wait_port(port).await?;
    Ok((server, port))
}

/// CPU time of the load generator (this process) and of the servers over an
/// interval, so a table can show the load generator was not the bottleneck.
pub struct CpuMeter {
    bench: f64,
    /// (pid, CPU seconds at the start) of each server.
    servers: Vec<(u32, f64)>,
}

impl CpuMeter {
    /// Starts counting for this process and `server_pids`.
    pub fn start(server_pids: &[u32]) -> CpuMeter {
        CpuMeter {
            bench: self_cpu_seconds(),
            servers: server_pids
                .iter()
                .map(|&pid| (pid, proc_cpu_seconds(pid).unwrap_or(0.0)))
                .collect(),
        }
    }

    /// CPU seconds (bench, all servers) since [`CpuMeter::start`].
    pub fn read(&self) -> (f64, f64) {
        (
            self_cpu_seconds() - self.bench,
            self.per_server().iter().sum(),
        )
    }

    /// CPU seconds of each server since [`CpuMeter::start`], in the order given.
    pub fn per_server(&self) -> Vec<f64> {
        self.servers
            .iter()
            .map(|&(pid, start)| proc_cpu_seconds(pid).map_or(0.0, |now| now - start))
            .collect()
    }
}

/// Raises this process's soft limit on open files to its hard limit, so that
/// it and the children it starts afterwards (who inherit it) can hold many
/// connections. Returns the new soft limit.
pub fn raise_fd_limit() -> Result<u64> {
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
    }
    Ok(limit.rlim_cur as u64)
}

/// How many local ports the kernel hands out to outgoing connections
/// (`net.ipv4.ip_local_port_range`), if readable.
pub fn local_port_range() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut bounds = text.split_whitespace().map(|b| b.parse::<u64>());
    let (low, high) = (bounds.next()?.ok()?, bounds.next()?.ok()?);
    Some(high.saturating_sub(low) + 1)
}

/// The peers a scenario may measure beside chatmesh.
#[derive(Default)]
pub struct Peers {
    /// ngircd, if it is to be measured.
    pub ngircd: Option<PathBuf>,
    /// nats-server, if it is to be measured.
    pub nats: Option<PathBuf>,
}

impl Peers {
    /// The peers to measure (none with `--no-peers`; installed if missing
    /// unless `--no-install`), with a note for each one skipped and why.
    pub fn find(options: &super::BenchOptions, notes: &mut Vec<String>) -> Peers {
        if options.no_peers {
            notes.push("peers skipped (--no-peers)".to_owned());
            return Peers {
                ngircd: None,
                nats: None,
            };
        }
        let (ngircd, nats) = ensure_peers(!options.no_install);
        for (name, found) in [("ngircd", &ngircd), ("nats-server", &nats)] {
            if found.is_none() {
                notes.push(format!("{name} not installed: skipped"));
            }
        }
        Peers { ngircd, nats }
    }
}

impl ChatCluster {
    /// Polls each node's admin `/status` until every node in `nodes` follows
    /// `leader` at one term and sees exactly `nodes` alive; returns the time
    /// it took.
    pub async fn agreement(
        &self,
        nodes: &[usize],
        leader: usize,
        within: Duration,
    ) -> Result<Duration> {
        /// Poll interval of `/status`.
        const POLL: Duration = Duration::from_millis(5);
        let start = Instant::now();
        let want = self.ids[leader].as_str();
        loop {
            let mut terms = Vec::new();
            let mut last = String::new();
            for &i in nodes {
                match self.status(i).await {
                    Ok(s) => {
                        let alive_ok = s["members"].as_array().is_some_and(|members| {
                            members.len() == self.ids.len()
                                && members
                                    .iter()
                                    .enumerate()
                                    .all(|(j, m)| m["alive"] == nodes.contains(&j))
                        });
                        if s["leader"] == want && alive_ok {
                            if let Some(term) = s["term"].as_u64() {
                                terms.push(term);
                            }
                        } else {
                            last = format!("{}: {s}", self.ids[i]);
                        }
                    }
                    Err(e) => last = format!("{}: {e:#}", self.ids[i]),
                }
            }
            if terms.len() == nodes.len() && terms.windows(2).all(|w| w[0] == w[1]) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > within {
                bail!(
                    "no agreement on leader {want} within {within:?}; last disagreeing view: {last}"
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Node `i`'s admin `GET /status`, parsed.
    pub async fn status(&self, i: usize) -> Result<serde_json::Value> {
        let body = crate::admin::fetch(self.admin(i), "/status").await?;
        serde_json::from_str(&body).with_context(|| format!("/status is not JSON: {body:?}"))
    }
}
