//! `chatmesh up`: every server of a config on this machine, each as a child
//! process (so one can be `kill -9`ed to watch failover), with their logs
//! prefixed by server id. Ctrl-C or SIGTERM stops them all.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::task::JoinSet;

use crate::config::ClusterConfig;

/// What `up` needs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The config file every node reads.
    pub config_path: PathBuf,
    /// The certs directory (made if missing).
    pub certs: PathBuf,
    /// Extra arguments for every `chatmesh node` (e.g. `--log-format json`).
    pub node_args: Vec<String>,
}

/// Session threads (`chatmesh node --workers`) for each of `nodes` nodes
/// sharing this machine: its cores split between them, at least one each.
/// More would only have the nodes' threads take turns on the same cores:
/// in `bench claims` (3 nodes, 2 cores) one thread per node did the same
/// work with 17% less CPU than two.
pub fn workers_per_node(nodes: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (cores / nodes.max(1)).max(1)
}

/// Runs the cluster until a signal, or until every node has exited.
pub async fn run(options: UpOptions) -> Result<()> {
    let config = ClusterConfig::load(&options.config_path)?;
    let written = crate::tls::ensure(&config, &options.certs)?;
    if !written.is_empty() {
        println!(
            "up: made {} certificate file(s) in {}",
            written.len(),
            options.certs.display()
        );
    }
    let exe = std::env::current_exe().context("cannot find the chatmesh executable")?;
    let workers = workers_per_node(config.servers.len()).to_string();
    // One task per node waits for it and says when it exits, as it happens.
    let mut running = JoinSet::new();
    let mut pids = Vec::new();
    for server in &config.servers {
        let mut command = Command::new(&exe);
        command
            .arg("node")
            .arg("--config")
            .arg(&options.config_path)
            .arg("--id")
            .arg(&server.id)
            .arg("--certs")
            .arg(&options.certs)
            .args(["--workers", &workers])
            .args(&options.node_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        die_with_parent(&mut command);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start node {}", server.id))?;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(prefix_lines(server.id.clone(), out));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(prefix_lines(server.id.clone(), err));
        }
        let pid = child.id().unwrap_or(0);
        let web = match server.web_port {
            Some(port) => format!("; web client at {}", web_url(&server.host, port)),
            None => String::new(),
        };
        println!(
            "up: started {} (pid {pid}): clients on {}:{} over TCP and QUIC{web}",
            server.id, server.host, server.client_port
        );
        pids.push((server.id.clone(), pid));
        let id = server.id.clone();
        running.spawn(async move {
            let status = child.wait().await;
            println!("up: node {id} exited: {}", describe(status));
            id
        });
    }
    println!("up: {} nodes running; Ctrl-C stops them all", pids.len());

    tokio::select! {
        signal = crate::node::shutdown_signal() => signal?,
        _ = wait_all(&mut running, &mut pids) => return Ok(()),
    }
    println!("up: stopping every node");
    for (_, pid) in &pids {
        // SAFETY: kill(2) of a child we spawned and have not yet reaped.
        unsafe { libc::kill(*pid as libc::pid_t, libc::SIGTERM) };
    }
    let stopped = tokio::time::timeout(Duration::from_secs(10), wait_all(&mut running, &mut pids));
    if stopped.await.is_err() {
        for (id, _) in &pids {
            println!("up: node {id} did not stop within 10 s; killing it");
        }
        // Dropping a waiting task drops its child, which kills it.
        running.shutdown().await;
    }
    Ok(())
}

/// Waits for every node to exit, crossing each off `pids` as it goes.
/// The web client's URL on `host:port` (an IPv6 literal in brackets).
pub fn web_url(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("http://[{host}]:{port}/")
    } else {
        format!("http://{host}:{port}/")
    }
}

async fn wait_all(running: &mut JoinSet<String>, pids: &mut Vec<(String, u32)>) {
    while let Some(exited) = running.join_next().await {
        if let Ok(id) = exited {
            pids.retain(|(running, _)| *running != id);
        }
    }
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

async fn prefix_lines(id: String, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        println!("{id:>4} | {line}");
    }
}

/// Makes the child get SIGTERM if `up` itself dies (even by SIGKILL), so no
/// orphaned nodes keep the ports.
fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
