//! The admin endpoint, loopback HTTP. Deliberately tiny: one request per
//! connection, bounded request size and time, no keep-alive.
//!
//! | request | does |
//! | --- | --- |
//! | `GET /status` | JSON: id, term, leader, members (alive, last heartbeat), counts |
//! | `GET /metrics` | Prometheus text |
//! | `GET /impair` | the mesh impairment in force and its counters |
//! | `POST /impair` | body: an impairment (`loss=20%,delay=30ms,...`, see `netsim`); replaces it |
//! | `POST /cut/<id>` | drop every mesh datagram to and from server `<id>` |
//! | `POST /heal/<id>`, `POST /heal` | undo one cut, or every cut |
//!
//! The impairment calls are testing aids (partitions in process tests).

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

use crate::ServerId;
use crate::chat::ChatServer;
use crate::cluster::{ClusterView, MemberStatus, SharedView};
use crate::mesh::Mesh;
use crate::netsim::{ImpairHandle, Impairment};

/// Everything `/status` and `/metrics` read.
#[derive(Clone)]
pub struct AdminState {
    /// This server's chat.
    pub chat: Arc<ChatServer>,
    /// The cluster view kept by the cluster task.
    pub view: SharedView,
    /// The mesh, for transport counters.
    pub mesh: Mesh,
    /// The impairment of the mesh socket.
    pub impair: ImpairHandle,
    /// Mesh address of every peer, for cuts by server id.
    pub peers: Vec<(ServerId, SocketAddr)>,
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
            identities: view.identities,
            rooms: view.rooms,
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

/// Longest request (head and body) the admin endpoint reads.
const MAX_REQUEST: usize = 16 * 1024;

async fn handle(mut stream: TcpStream, state: AdminState) {
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let head_end = loop {
        if let Some(at) = find(&request, b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
        if request.len() > MAX_REQUEST {
            return;
        }
    };
    let head = String::from_utf8_lossy(&request[..head_end]).into_owned();
    let content_length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_REQUEST);
    while request.len() < head_end + content_length {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let end = request.len().min(head_end + content_length);
    let body = String::from_utf8_lossy(&request[head_end..end])
        .trim()
        .to_owned();
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (code, content_type, body) = route(&state, method, path, &body);
    let response = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

type Response = (&'static str, &'static str, String);

fn route(state: &AdminState, method: &str, path: &str, body: &str) -> Response {
    let ok = |text: String| ("200 OK", "text/plain", text);
    let bad = |text: String| ("400 Bad Request", "text/plain", text + "\n");
    match (method, path) {
        ("GET", "/status") => {
            let body = serde_json::to_string_pretty(&state.status()).unwrap_or_default();
            ("200 OK", "application/json", body + "\n")
        }
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", state.metrics()),
        ("GET", "/impair") => ok(format!(
            "impairment: {}\n{}\n",
            state.impair.impairment(),
            state.impair.stats()
        )),
        ("POST", "/impair") => match body.parse::<Impairment>() {
            Ok(impairment) => match state.impair.set(impairment) {
                Ok(()) => {
                    tracing::warn!(impairment = %state.impair.impairment(), "mesh impairment changed (testing aid)");
                    ok(format!("impairment: {}\n", state.impair.impairment()))
                }
                Err(e) => bad(e.to_string()),
            },
            Err(e) => bad(e.to_string()),
        },
        ("POST", "/heal") => {
            state.impair.heal_all();
            tracing::warn!("every mesh link healed (testing aid)");
            ok("healed every link\n".into())
        }
        ("POST", path) if path.starts_with("/cut/") || path.starts_with("/heal/") => {
            let (verb, id) = path[1..].split_once('/').unwrap_or(("", ""));
            let Some((_, addr)) = state.peers.iter().find(|(peer, _)| peer == id) else {
                return bad(format!("no peer server {id:?}"));
            };
            if verb == "cut" {
                state.impair.cut(*addr);
            } else {
                state.impair.heal(*addr);
            }
            tracing::warn!(peer = %id, action = verb, "mesh link impairment changed (testing aid)");
            ok(format!("{verb} {id}\n"))
        }
        ("GET", _) | ("POST", _) => (
            "404 Not Found",
            "text/plain",
            "try GET /status, /metrics, /impair or POST /impair, /cut/<id>, /heal/<id>, /heal\n"
                .to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET or POST only\n".to_owned(),
        ),
    }
}

/// Sends `POST path` with `body` to an admin endpoint; returns the answer.
pub async fn post(addr: SocketAddr, path: &str, body: &str) -> Result<String> {
    request(addr, &format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ))
    .await
}

/// Fetches `path` from an admin endpoint (for `chatmesh status` and tests).
pub async fn fetch(addr: SocketAddr, path: &str) -> Result<String> {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

async fn request(addr: SocketAddr, request: &str) -> Result<String> {
    let mut stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .with_context(|| format!("admin endpoint {addr} did not answer"))?
        .with_context(|| {
            format!("cannot connect to the admin endpoint {addr} (is the node running?)")
        })?;
    stream.write_all(request.as_bytes()).await?;
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
            "admin endpoint {addr}: {}: {}",
            head.lines().next().unwrap_or(""),
            body.trim()
        );
    }
    Ok(body.to_owned())
}
