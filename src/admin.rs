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
//! The `POST` calls are testing aids (partitions in process tests): they
//! exist only on a node started with `--testing-aids` (implied by `--impair`),
//! and answer `404` otherwise. Even then a `POST` carrying a foreign `Origin`
//! header (anything but this endpoint's own `http://127.0.0.1:<port>` or
//! `http://localhost:<port>`) is refused with `403`: a web page open in a
//! browser on the host can send a form `POST` to loopback, and its browser
//! always names the page's origin. Tools such as `curl` send no `Origin`.

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
    /// Whether the node was started with `--testing-aids`: without it no
    /// `POST` route exists.
    pub testing_aids: bool,
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
        let (datagrams, bytes) = self.impair.sent();
        metric(
            "mesh_udp_datagrams_sent_total",
            "counter",
            "UDP datagrams the mesh socket sent (heartbeats, stream frames, ACKs).",
            datagrams,
        );
        metric(
            "mesh_udp_bytes_sent_total",
            "counter",
            "UDP payload bytes the mesh socket sent.",
            bytes,
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
pub const MAX_REQUEST: usize = 16 * 1024;

/// One parsed admin request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ... as sent.
    pub method: String,
    /// The request target, e.g. `/status`.
    pub path: String,
    /// The `Origin` header, if any (browsers send it on every `POST`).
    pub origin: Option<String>,
    /// The body, trimmed, as text (lossy UTF-8).
    pub body: String,
}

/// What [`parse_request`] makes of the bytes read so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed: the head is not complete, or the body is
    /// shorter than its `Content-Length` (capped at [`MAX_REQUEST`]).
    Incomplete,
    /// A whole request.
    Done(Request),
}

/// Parses an HTTP/1.1 request from the bytes received so far (any bytes: a
/// fuzz target feeds it garbage). With `eof`, the peer sent all it will and
/// a short body is taken as it is.
pub fn parse_request(bytes: &[u8], eof: bool) -> Parsed {
    let Some(at) = find(bytes, b"\r\n\r\n") else {
        return Parsed::Incomplete;
    };
    let head_end = at + 4;
    let head = String::from_utf8_lossy(&bytes[..head_end]);
    let header = |name: &str| {
        head.lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
    };
    let content_length = header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_REQUEST);
    if bytes.len() < head_end.saturating_add(content_length) && !eof {
        return Parsed::Incomplete;
    }
    let end = bytes.len().min(head_end.saturating_add(content_length));
    let body = String::from_utf8_lossy(&bytes[head_end..end])
        .trim()
        .to_owned();
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("").to_owned();
    let path = words.next().unwrap_or("").to_owned();
    Parsed::Done(Request {
        method,
        path,
        origin: header("origin"),
        body,
    })
}

async fn handle(mut stream: TcpStream, state: AdminState) {
    let mut bytes = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let request = loop {
        let eof = match stream.read(&mut buf).await {
            Ok(0) => true,
            Ok(n) => {
                bytes.extend_from_slice(&buf[..n]);
                false
            }
            Err(_) => return,
        };
        match parse_request(&bytes, eof) {
            Parsed::Done(request) => break request,
            Parsed::Incomplete if eof || bytes.len() > 2 * MAX_REQUEST => return,
            Parsed::Incomplete => {}
        }
    };
    let own_port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let (code, content_type, body) = route(&state, &request, own_port);
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

/// Whether `origin` is this endpoint's own (`http://127.0.0.1:<port>` or
/// `http://localhost:<port>`); any other, `null` included, is foreign.
pub fn is_own_origin(origin: &str, port: u16) -> bool {
    let origin = origin.trim().trim_end_matches('/');
    [
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
    ]
    .iter()
    .any(|own| origin.eq_ignore_ascii_case(own))
}

type Response = (&'static str, &'static str, String);

/// Answer to a `POST` on a node started without `--testing-aids`.
pub const AIDS_OFF: &str = "testing aids are off: this node was started without --testing-aids (POST /impair, /cut/<id>, /heal need it)\n";

fn route(state: &AdminState, request: &Request, own_port: u16) -> Response {
    let ok = |text: String| ("200 OK", "text/plain", text);
    let bad = |text: String| ("400 Bad Request", "text/plain", text + "\n");
    let (method, path, body) = (
        request.method.as_str(),
        request.path.as_str(),
        request.body.as_str(),
    );
    if method == "POST" {
        if !state.testing_aids {
            return ("404 Not Found", "text/plain", AIDS_OFF.to_owned());
        }
        if let Some(origin) = &request.origin
            && !is_own_origin(origin, own_port)
        {
            tracing::warn!(origin = %origin.chars().take(100).collect::<String>(), path = %path.chars().take(100).collect::<String>(), "admin POST with a foreign Origin refused");
            return (
                "403 Forbidden",
                "text/plain",
                "refused: a POST from a web page of another origin (testing aids take requests from local tools only)\n".to_owned(),
            );
        }
    }
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
    post_from(addr, path, body, None).await
}

/// Sends `POST path` with `body` and, if given, an `Origin` header (as a
/// browser would); returns the answer, or an error naming the status.
pub async fn post_from(
    addr: SocketAddr,
    path: &str,
    body: &str,
    origin: Option<&str>,
) -> Result<String> {
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    request(addr, &format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{origin}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn done(bytes: &[u8], eof: bool) -> Request {
        match parse_request(bytes, eof) {
            Parsed::Done(request) => request,
            Parsed::Incomplete => panic!("incomplete: {:?}", String::from_utf8_lossy(bytes)),
        }
    }

    #[test]
    fn requests_parse_with_origin_and_body() {
        let request = done(
            b"POST /impair HTTP/1.1\r\nHost: x\r\norigin:  http://evil.example \r\nContent-Length: 9\r\n\r\nloss=100%",
            false,
        );
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/impair");
        assert_eq!(request.origin.as_deref(), Some("http://evil.example"));
        assert_eq!(request.body, "loss=100%");
        // A body not all there yet waits, unless the peer is done sending.
        let short = b"POST /impair HTTP/1.1\r\nContent-Length: 9\r\n\r\nloss";
        assert_eq!(parse_request(short, false), Parsed::Incomplete);
        assert_eq!(done(short, true).body, "loss");
        assert_eq!(
            parse_request(b"GET /status HTTP/1.1\r\n", false),
            Parsed::Incomplete
        );
        // The request line is no header: "Origin:" in the path is not one.
        let request = done(b"GET /Origin:x HTTP/1.1\r\n\r\n", false);
        assert_eq!(request.origin, None);
        // Garbage is a request that no route matches, not a panic.
        let request = done(b"\xff\xfe\r\n\r\n", true);
        assert_eq!(request.path, "");
        let huge = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", u64::MAX);
        assert_eq!(parse_request(huge.as_bytes(), false), Parsed::Incomplete);
    }

    #[test]
    fn only_the_endpoints_own_origin_is_local() {
        assert!(is_own_origin("http://127.0.0.1:7001", 7001));
        assert!(is_own_origin("http://localhost:7001/", 7001));
        assert!(is_own_origin("HTTP://LOCALHOST:7001", 7001));
        for foreign in [
            "http://evil.example",
            "null",
            "",
            "http://127.0.0.1:7002",
            "http://127.0.0.1",
            "https://127.0.0.1:7001",
            "http://localhost.evil.example:7001",
            "http://127.0.0.1:7001.evil.example",
        ] {
            assert!(!is_own_origin(foreign, 7001), "{foreign:?}");
        }
    }
}
