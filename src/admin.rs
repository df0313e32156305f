//! The admin endpoint, loopback HTTP: an axum router served by
//! [`crate::http::serve`], like the web port. Deliberately tiny: one request
//! per connection (every answer says `Connection: close`), bodies of at most
//! [`MAX_BODY`] bytes (`413` past it), a connection lives at most
//! [`REQUEST_TIMEOUT`] (a request not sent and answered by then is dropped),
//! and at most [`MAX_CONNECTIONS`] connections are open at once (one more is
//! answered `503` and closed), so that idle connections cannot take the
//! descriptors kept for the mesh.
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
//! Any other path is a `404` naming these; any other method a `405`.
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
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{self, get};
use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::ServerId;
use crate::chat::ChatServer;
use crate::cluster::{ClusterView, MemberStatus, SharedView};
use crate::http;
use crate::listener::ClientSlots;
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
        let budget = self.chat.outbox_budget();
        metric(
            "outbox_queued_bytes",
            "gauge",
            "Output queued for clients, all sessions together, a line sent to many counted once, plus a slot in each queue (limits.outbox_total_bytes bounds it).",
            budget.used() as u64,
        );
        metric(
            "outbox_budget_drops_total",
            "counter",
            "Sessions dropped as too slow, their client taking no output for 1 s (given a line) or 10 s (given none) while all outboxes together held limits.outbox_total_bytes.",
            budget.drops() as u64,
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

/// Longest request body the admin endpoint takes (an impairment spec is a
/// line); a longer one is answered `413`.
pub const MAX_BODY: usize = 16 * 1024;

/// How long an admin connection lives: the request must be sent and its
/// answer taken by then, or the connection is dropped.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Admin connections open at once; one more is answered `503` and closed.
/// A request takes milliseconds, so this is plenty for tools and scrapers,
/// and it keeps the endpoint well inside the descriptors kept for
/// everything but clients ([`crate::listener::FD_RESERVE`]).
pub const MAX_CONNECTIONS: usize = 16;

/// What a connection over [`MAX_CONNECTIONS`] is told.
pub fn busy() -> String {
    format!("admin endpoint busy: {MAX_CONNECTIONS} connections are open (its limit); try again\n")
}

/// Serves admin requests on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    // The port pages of this endpoint's own origin name (see `is_own_origin`).
    let own_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let listener = http::Listener::new(listener, "admin endpoint")
        .slots_telling(ClientSlots::new(MAX_CONNECTIONS), busy())
        .lifetime(REQUEST_TIMEOUT);
    http::serve(listener, router(state, own_port), shutdown).await;
}

/// The admin endpoint's routes on `state`, for an endpoint listening on
/// `own_port` (its own pages' origin). Public so that the fuzz target can
/// drive it without a socket.
pub fn router(state: AdminState, own_port: u16) -> Router {
    let admin = Arc::new(Admin { state, own_port });
    Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/impair", get(impairment).post(set_impairment))
        .route("/heal", routing::post(heal_all))
        .route("/cut/{id}", routing::post(cut))
        .route("/heal/{id}", routing::post(heal))
        .fallback(unknown)
        .method_not_allowed_fallback(unknown)
        // After the fallbacks: the guard runs for every request.
        .layer(middleware::from_fn_with_state(admin.clone(), guard))
        .with_state(admin)
}

struct Admin {
    state: AdminState,
    own_port: u16,
}

type Shared = State<Arc<Admin>>;

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

/// Answer to a `POST` on a node started without `--testing-aids`.
pub const AIDS_OFF: &str = "testing aids are off: this node was started without --testing-aids (POST /impair, /cut/<id>, /heal need it)\n";

/// Answer to a `POST` from a page of another origin.
pub const FOREIGN_ORIGIN: &str = "refused: a POST from a web page of another origin (testing aids take requests from local tools only)\n";

/// Answer to a path that is no route.
pub const UNKNOWN: &str =
    "try GET /status, /metrics, /impair or POST /impair, /cut/<id>, /heal/<id>, /heal\n";

fn text(code: StatusCode, body: impl Into<String>) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

fn ok(body: String) -> Response {
    text(StatusCode::OK, body)
}

fn bad(reason: String) -> Response {
    text(StatusCode::BAD_REQUEST, reason + "\n")
}

/// At most the first 100 characters of `text`, for logs.
fn clip(text: &str) -> String {
    text.chars().take(100).collect()
}

/// Runs before every route (and the fallbacks), in this order: methods
/// other than `GET` and `POST` are refused; a `POST` needs the testing aids
/// and, if it names an `Origin`, this endpoint's own; the body is read, at
/// most [`MAX_BODY`] bytes of it. Every answer closes the connection.
async fn guard(State(admin): Shared, request: Request, next: Next) -> Response {
    let mut response = match admit(&admin, request).await {
        Ok(request) => next.run(request).await,
        Err(refusal) => refusal,
    };
    // One request per connection: hyper closes it after this answer.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

async fn admit(admin: &Admin, request: Request) -> Result<Request, Response> {
    match *request.method() {
        Method::GET => {}
        Method::POST => {
            if !admin.state.testing_aids {
                return Err(text(StatusCode::NOT_FOUND, AIDS_OFF));
            }
            if let Some(origin) = request.headers().get(header::ORIGIN) {
                // Not text at all is not this endpoint's origin either.
                let own = origin
                    .to_str()
                    .is_ok_and(|origin| is_own_origin(origin, admin.own_port));
                if !own {
                    warn!(
                        origin = %clip(&String::from_utf8_lossy(origin.as_bytes())),
                        path = %clip(request.uri().path()),
                        "admin POST with a foreign Origin refused"
                    );
                    return Err(text(StatusCode::FORBIDDEN, FOREIGN_ORIGIN));
                }
            }
        }
        _ => {
            return Err(text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST only\n"));
        }
    }
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes\n"),
        )
    };
    let (parts, body) = request.into_parts();
    // A declared length over the limit is refused before reading any of it.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    // Chunked bodies have no declared length: counted as they come.
    let mut chunks = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let Ok(chunk) = chunk else {
            return Err(bad("the request body could not be read".into()));
        };
        if bytes.len() + chunk.len() > MAX_BODY {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

async fn status(State(admin): Shared) -> Response {
    let body = serde_json::to_string_pretty(&admin.state.status()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body + "\n").into_response()
}

async fn metrics(State(admin): Shared) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        admin.state.metrics(),
    )
        .into_response()
}

async fn impairment(State(admin): Shared) -> Response {
    let impair = &admin.state.impair;
    ok(format!(
        "impairment: {}\n{}\n",
        impair.impairment(),
        impair.stats()
    ))
}

async fn set_impairment(State(admin): Shared, body: Bytes) -> Response {
    let impair = &admin.state.impair;
    let spec = String::from_utf8_lossy(&body);
    let impairment = match spec.trim().parse::<Impairment>() {
        Ok(impairment) => impairment,
        Err(e) => return bad(e.to_string()),
    };
    if let Err(e) = impair.set(impairment) {
        return bad(e.to_string());
    }
    warn!(impairment = %impair.impairment(), "mesh impairment changed (testing aid)");
    ok(format!("impairment: {}\n", impair.impairment()))
}

async fn heal_all(State(admin): Shared) -> Response {
    admin.state.impair.heal_all();
    warn!("every mesh link healed (testing aid)");
    ok("healed every link\n".into())
}

async fn cut(State(admin): Shared, id: Result<Path<String>, PathRejection>) -> Response {
    link(&admin, "cut", id)
}

async fn heal(State(admin): Shared, id: Result<Path<String>, PathRejection>) -> Response {
    link(&admin, "heal", id)
}

/// Cuts or heals the link to one peer.
fn link(admin: &Admin, verb: &str, id: Result<Path<String>, PathRejection>) -> Response {
    let Ok(Path(id)) = id else {
        // A percent-encoding that is no UTF-8: no server has that id.
        return bad("no peer server with that id".into());
    };
    let Some((_, addr)) = admin.state.peers.iter().find(|(peer, _)| *peer == id) else {
        return bad(format!("no peer server {id:?}"));
    };
    if verb == "cut" {
        admin.state.impair.cut(*addr);
    } else {
        admin.state.impair.heal(*addr);
    }
    warn!(peer = %id, action = verb, "mesh link impairment changed (testing aid)");
    ok(format!("{verb} {id}\n"))
}

/// Every path that is no route, and a route's other method (only `GET` and
/// `POST` get here).
async fn unknown() -> Response {
    text(StatusCode::NOT_FOUND, UNKNOWN)
}

/// Longest answer the client functions below take (a `/status` of a large
/// cluster is some KiB).
const MAX_ANSWER: usize = 16 * 1024 * 1024;

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
    let mut request = Request::post(path).header(header::CONTENT_TYPE, "text/plain");
    if let Some(origin) = origin {
        request = request.header(header::ORIGIN, origin);
    }
    let request = request
        .body(Body::from(body.to_owned()))
        .with_context(|| format!("not a request: POST {path:?}"))?;
    send(addr, request).await
}

/// Fetches `path` from an admin endpoint (for `chatmesh status` and tests).
pub async fn fetch(addr: SocketAddr, path: &str) -> Result<String> {
    let request = Request::get(path)
        .body(Body::empty())
        .with_context(|| format!("not a request: GET {path:?}"))?;
    send(addr, request).await
}

/// One request on a connection of its own (hyper's HTTP/1 client); the
/// answer's body if its status is `200`, else an error with status and body.
async fn send(addr: SocketAddr, mut request: Request) -> Result<String> {
    let headers = request.headers_mut();
    headers.insert(
        header::HOST,
        HeaderValue::from_str(&addr.to_string()).context("host header")?,
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .with_context(|| format!("admin endpoint {addr} did not answer"))?
        .with_context(|| {
            format!("cannot connect to the admin endpoint {addr} (is the node running?)")
        })?;
    let exchange = async move {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream)).await?;
        let answer = async move {
            let response = sender.send_request(request).await?;
            // No second request: the connection ends after this answer.
            drop(sender);
            let head = format!("{:?} {}", response.version(), response.status());
            let ok = response.status() == StatusCode::OK;
            let body = axum::body::to_bytes(Body::new(response.into_body()), MAX_ANSWER).await?;
            anyhow::Ok((head, ok, body))
        };
        // The connection future does the I/O for both halves.
        let (answer, _) = tokio::join!(answer, connection);
        answer
    };
    let (head, ok, body) = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .with_context(|| format!("admin endpoint {addr} did not finish its answer"))?
        .with_context(|| format!("admin endpoint {addr} sent no HTTP response"))?;
    let body = String::from_utf8_lossy(&body).into_owned();
    if !ok {
        anyhow::bail!("admin endpoint {addr}: {head}: {}", body.trim());
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

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
