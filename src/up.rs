//! `chatmesh up`: every server of a config on this machine, each as a child
//! process (so one can be `kill -9`ed to watch failover), with their logs
//! prefixed by server id. Ctrl-C or SIGTERM stops them all.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

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
    let mut children = Vec::new();
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
        println!(
            "up: started {} (pid {}): clients on {}:{} over TCP and QUIC",
            server.id,
            child.id().unwrap_or(0),
            server.host,
            server.client_port
        );
        children.push((server.id.clone(), child));
    }
    println!(
        "up: {} nodes running; Ctrl-C stops them all",
        children.len()
    );

    let all_exited = async {
        for (id, child) in children.iter_mut() {
            let status = child.wait().await;
            println!("up: node {id} exited: {}", describe(status));
        }
    };
    tokio::select! {
        signal = crate::node::shutdown_signal() => signal?,
        _ = all_exited => return Ok(()),
    }
    println!("up: stopping every node");
    for (_, child) in &children {
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) with a pid we spawned and still hold the handle of.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }
    for (id, child) in children.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(status) => println!("up: node {id} exited: {}", describe(status)),
            Err(_) => {
                println!("up: node {id} did not stop within 10 s; killing it");
                let _ = child.kill().await;
            }
        }
    }
    Ok(())
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
