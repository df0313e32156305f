//! The admin endpoint, loopback HTTP: `GET /status` (JSON) and `GET /metrics`
//! (Prometheus text). Deliberately tiny: one request per connection, bounded
//! request size and time, no keep-alive.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::chat::ChatServer;
use crate::cluster::{ClusterView, MemberStatus, SharedView};
use crate::mesh::Mesh;

/// Everything `/status` and `/metrics` read.
#[derive(Clone)]
pub struct AdminState {
    /// This server's chat.
    pub chat: Arc<ChatServer>,
    /// The cluster view kept by the cluster task.
    pub view: SharedView,
    /// The mesh, for transport counters.
    pub mesh: Mesh,
}

/// The `/status` document.
#[derive(Debug, Serialize)]
pub struct Status {
    /// This server's id.
    pub id: String,
    /// The leader's term.
    pub term: u64,
    /// The leader this server follows (`null` during an election).
    pub leader: Option<String>,
    /// Fast Bully phase.
    pub phase: String,
    /// Every configured server.
    pub members: Vec<MemberStatus>,
    /// Identified client sessions on this server.
    pub sessions: usize,
    /// Identities held by clients of this server.
    pub identities: usize,
    /// Rooms on this server, main hall included.
    pub rooms: usize,
}

impl AdminState {
    /// The current `/status` document.
    pub fn status(&self) -> Status {
        let view = self.view();
        let counts = self.chat.counts();
        Status {
            id: self.chat.id().to_owned(),
            term: view.term,
            leader: view.leader,
            phase: view.phase,
            members: view.members,
            sessions: counts.sessions,
            identities: counts.sessions,
            rooms: counts.rooms,
        }
    }

    fn view(&self) -> ClusterView {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        let view = self.view();
        let counts = self.chat.counts();
        let mesh = self.mesh.counters();
        let id = self.chat.id();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP chatmesh_{name} {help}");
            let _ = writeln!(out, "# TYPE chatmesh_{name} {kind}");
            let _ = writeln!(out, "chatmesh_{name}{{server=\"{id}\"}} {value}");
        };
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        metric(
            "heartbeats_sent_total",
            "counter",
            "Heartbeat datagrams sent.",
            load(&mesh.heartbeats_sent),
        );
        metric(
            "heartbeats_received_total",
            "counter",
            "Heartbeat datagrams received.",
            load(&mesh.heartbeats_received),
        );
        metric(
            "peer_messages_sent_total",
            "counter",
            "Mesh stream frames sent.",
            load(&mesh.messages_sent),
        );
        metric(
            "peer_messages_received_total",
            "counter",
            "Mesh stream frames received.",
            load(&mesh.messages_received),
        );
        metric(
            "mesh_links_refused_total",
            "counter",
            "Mesh connections refused.",
            load(&mesh.links_refused),
        );
        metric(
            "elections_started_total",
            "counter",
            "Elections this server started.",
            view.elections_started,
        );
        metric(
            "leader_changes_total",
            "counter",
            "Times the followed leader changed.",
            view.leader_changes,
        );
        metric(
            "peer_state_changes_total",
            "counter",
            "Peer up/down transitions.",
            view.peer_state_changes,
        );
        metric("term", "gauge", "Term of the current leader.", view.term);
        let alive = view.members.iter().filter(|m| m.alive).count() as u64;
        metric(
            "members_alive",
            "gauge",
            "Servers believed alive, this one included.",
            alive,
        );
        metric(
            "sessions",
            "gauge",
            "Identified client sessions.",
            counts.sessions as u64,
        );
        metric(
            "rooms",
            "gauge",
            "Rooms on this server.",
            counts.rooms as u64,
        );
        out
    }
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on TCP {addr} for the admin endpoint"))
}

/// Serves admin requests until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tasks.spawn(async move {
            if let Err(e) =
                tokio::time::timeout(Duration::from_secs(5), handle(stream, state)).await
            {
                debug!(error = %e, "admin request timed out");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, state: AdminState) {
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    // Read the request head only; bodies are not used.
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && !request.windows(2).any(|w| w == b"\n\n")
    {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
        if request.len() > 8 * 1024 {
            break;
        }
    }
    let head = String::from_utf8_lossy(&request);
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (code, content_type, body) = match (method, path) {
        ("GET", "/status") => {
            let body = serde_json::to_string_pretty(&state.status()).unwrap_or_default();
            ("200 OK", "application/json", body + "\n")
        }
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", state.metrics()),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /status or /metrics\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Fetches `path` from an admin endpoint (for `chatmesh status` and tests).
pub async fn fetch(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .with_context(|| format!("admin endpoint {addr} did not answer"))?
        .with_context(|| {
            format!("cannot connect to the admin endpoint {addr} (is the node running?)")
        })?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .with_context(|| format!("admin endpoint {addr} did not finish its answer"))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("admin endpoint {addr} sent no HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!(
            "admin endpoint {addr}: {}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(body.to_owned())
}
