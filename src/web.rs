//! The web port (issue 13): `GET /` serves the web client, one self-contained
//! page; `GET /chat` upgraded to a WebSocket is one chat session, run by the
//! same session logic as TCP and QUIC ([`run_session_on`]); `GET /servers`
//! lists the cluster's web addresses (the page reconnects through them).
//!
//! A WebSocket session is adapted to the byte streams the session takes: each
//! text frame becomes one line (a trailing newline tolerated, inner ones read
//! as the JSON whitespace they are), each line the session writes goes out
//! as one text frame. The session logic enforces the
//! handshake timeout, the line size and the error replies; here a binary
//! frame, a frame over the size limit or a broken connection ends the input,
//! which ends that session.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::chat::{ChatServer, Logged, SessionEnd, Transport, run_session_on};
use crate::config::ClusterConfig;
use crate::http;
use crate::lines::{LineError, LineReader};
use crate::listener::ClientSlots;
use crate::logging::LogBudget;

/// The web client: HTML, CSS and JavaScript in one file, nothing loaded from
/// elsewhere.
pub const PAGE: &str = include_str!("web/index.html");

/// What the page may do: run only its own inline script and style, named by
/// their SHA-256 (a `<script>` that got into the page some other way does
/// not run), and open WebSocket connections (to any server of the cluster,
/// which the page finds through `/servers`). Defence in depth: the page never
/// inserts peer text as HTML anyway.
static PAGE_POLICY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        inline_hash(PAGE, "script"),
        inline_hash(PAGE, "style"),
    )
});

/// The CSP source (`'sha256-...'`) of the first `<tag>` element's text in
/// `page`: exactly the characters between `<tag>` and `</tag>`.
fn inline_hash(page: &str, tag: &str) -> String {
    use base64::Engine;
    let open = format!("<{tag}>");
    let text = page
        .split_once(&open)
        .and_then(|(_, rest)| rest.split_once(&format!("</{tag}>")))
        .map_or("", |(text, _)| text);
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    )
}

/// Bytes buffered between a session and its WebSocket. The session's
/// outbox is the real queue (counted against its limit and the server's
/// budget); this only decouples the two tasks, so it is small: a client
/// that does not read holds it full, at 64 KiB a thousand of them held
/// 64 MB outside their outboxes.
const PIPE_BYTES: usize = 4 * 1024;

/// The longest line a WebSocket session is written, as one frame: twice
/// the outbox limit, at least 1 MiB. Its output is its own JSON, bounded by
/// the outbox but for one block a server event makes (a `list` of a very
/// large cluster); a longer line ends the session. It also bounds what the
/// WebSocket layer holds for a client that does not read: the line being
/// sent, or the pongs it owes (see `chat_upgrade`).
fn max_output_line(outbox_bytes: usize) -> usize {
    outbox_bytes.saturating_mul(2).max(1024 * 1024)
}

/// Room for a frame's header and a close frame beyond the longest line in
/// the WebSocket layer's write buffer.
const WS_FRAME_ROOM: usize = 4 * 1024;

/// Everything a web request needs.
struct WebState {
    chat: Arc<ChatServer>,
    /// Origins whose pages may open `/chat`.
    origins: Vec<String>,
    /// The `/servers` answer.
    servers_json: String,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// The origins of the cluster's own pages: `http://HOST:WEB_PORT` of every
/// server with a web port, and for a loopback host the same port on
/// `127.0.0.1`, `localhost` and `[::1]` (one machine, any of its names).
pub fn allowed_origins(config: &ClusterConfig) -> Vec<String> {
    let mut origins = Vec::new();
    for server in &config.servers {
        let Some(port) = server.web_port else {
            continue;
        };
        origins.push(format!("http://{}:{port}", server.host));
        let loopback = server.host == "localhost"
            || server
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback {
            for host in ["127.0.0.1", "localhost", "[::1]"] {
                origins.push(format!("http://{host}:{port}"));
            }
        }
    }
    origins.sort();
    origins.dedup();
    origins
}

/// The `/servers` answer: each server with a web port, as
/// `{"id","host","port","url","ws"}`.
pub fn servers_json(config: &ClusterConfig) -> String {
    let servers: Vec<serde_json::Value> = config
        .servers
        .iter()
        .filter_map(|s| {
            let port = s.web_port?;
            let authority = if s.host.contains(':') {
                format!("[{}]:{port}", s.host)
            } else {
                format!("{}:{port}", s.host)
            };
            Some(serde_json::json!({
                "id": s.id,
                "host": s.host,
                "port": port.to_string(),
                "url": format!("http://{authority}/"),
                "ws": format!("ws://{authority}/chat"),
            }))
        })
        .collect();
    serde_json::Value::Array(servers).to_string()
}

/// Serves the web port on `listener` until `shutdown`; sessions are tracked
/// by `tasks`, and every connection holds one of the client `slots` shared
/// with TCP and QUIC.
pub async fn serve(
    listener: TcpListener,
    config: &ClusterConfig,
    chat: Arc<ChatServer>,
    slots: ClientSlots,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let first_request_within = chat.limits().handshake_timeout;
    let state = Arc::new(WebState {
        chat,
        origins: allowed_origins(config),
        servers_json: servers_json(config),
        shutdown: shutdown.clone(),
        tasks,
    });
    let app = Router::new()
        .route("/", get(page))
        // Browsers ask for an icon on every page load; the page has none,
        // and "no content" keeps that out of the error logs and consoles.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/servers", get(servers))
        .route("/chat", get(chat_upgrade))
        .with_state(state);
    // Every connection holds a client slot (shared with TCP and QUIC) for as
    // long as it is open, a WebSocket session included, and has the client
    // port's socket options from the listener (keepalive finds a vanished
    // client, the send buffer is capped: `listener::listen_for_clients`). One that sends nothing within the handshake timeout
    // is closed, as for TCP clients, and so is one not upgraded to a
    // WebSocket by then: the page and `/servers` are answered at once, so
    // this only cuts clients dribbling a request, or idle between two,
    // which would otherwise hold a slot for ever.
    let listener = http::Listener::new(listener, "web port")
        .slots(slots)
        .first_byte_within(first_request_within)
        .upgrade_within(first_request_within);
    http::serve(listener, app, shutdown).await;
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, PAGE_POLICY.as_str()),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

async fn servers(State(web): State<Arc<WebState>>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        web.servers_json.clone(),
    )
        .into_response()
}

/// Whether a request with these headers may open a session: a browser
/// always sends `Origin` with a WebSocket upgrade, so a request without one
/// is not a page's (a program, which no page can make speak for a user).
fn origin_allowed(headers: &HeaderMap, origins: &[String]) -> bool {
    match headers.get(header::ORIGIN).map(HeaderValue::to_str) {
        None => true,
        Some(Ok(origin)) => origins.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        Some(Err(_)) => false,
    }
}

/// The second (of the Unix clock) a refused origin was last logged at info.
static ORIGIN_REFUSAL_LOGGED: AtomicU64 = AtomicU64::new(u64::MAX);

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether `now_s` is a second `last` has not seen yet (and notes it): one
/// event a second goes to the log at info. Anyone who reaches the web port
/// can be refused as fast as it asks, without logging in.
fn first_this_second(last: &AtomicU64, now_s: u64) -> bool {
    last.swap(now_s, Ordering::Relaxed) != now_s
}

/// A request's `Origin` as a log field: escaped and cut short, since it is
/// the client's own text (a 350 KB one, logged whole, grew the log by
/// 200 MB a second).
fn origin_for_log(headers: &HeaderMap) -> String {
    let origin = headers
        .get(header::ORIGIN)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    Logged(&origin).to_string()
}

async fn chat_upgrade(
    State(web): State<Arc<WebState>>,
    ConnectInfo(connection): ConnectInfo<http::Peer>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let peer = connection.addr;
    if !origin_allowed(&headers, &web.origins) {
        let origin = origin_for_log(&headers);
        if first_this_second(&ORIGIN_REFUSAL_LOGGED, unix_seconds()) {
            info!(%peer, %origin, "WebSocket refused: foreign origin (more this second at debug)");
        } else {
            debug!(%peer, %origin, "WebSocket refused: foreign origin");
        }
        return (
            StatusCode::FORBIDDEN,
            "this page's origin may not open chat sessions here\n",
        )
            .into_response();
    }
    let max = web.chat.limits().max_line_bytes;
    // Two bytes more than a line may hold: a frame of max_line_bytes and its
    // line ending (LF or CRLF, as on the client port) passes, a longer one
    // reaches the session's own check (error reply, then close); far longer
    // ones are refused by the WebSocket layer before they are buffered,
    // which ends the session too.
    let frame_max = max.saturating_add(2);
    let line_max = max_output_line(web.chat.limits().outbox_bytes);
    let chat = web.chat.clone();
    let shutdown = web.shutdown.clone();
    let tasks = web.tasks.clone();
    connection.upgraded();
    upgrade
        .max_message_size(frame_max)
        .max_frame_size(frame_max)
        // The WebSocket layer allocates its read buffer up front (128 KiB by
        // default, about 30 times what a TCP session holds), and anyone may
        // open sessions without logging in: small reads, grown only for a
        // frame that needs it.
        .read_buffer_size(WS_READ_BUFFER)
        // Frames go to the socket as they are made, and what it has not
        // taken is bounded: the library answers every ping with a pong
        // queued in its write buffer, and by default that buffer is
        // unbounded, so a client sending pings and never reading grew the
        // server by a byte per byte of pings (a hostile-client tester: 45 MB
        // for 45 MB of pings, held while connected). Past the bound a pong
        // owed waits as the one pending pong, replaced by the next (RFC 6455
        // allows answering only the latest ping); a line of ours that does
        // not fit ends the session, as for a client that does not read.
        .write_buffer_size(0)
        .max_write_buffer_size(line_max + WS_FRAME_ROOM)
        .on_upgrade(move |socket| {
            tasks.track_future(
                ws_session(socket, connection, chat, shutdown, line_max)
                    .instrument(info_span!("client", transport = "ws", %peer)),
            )
        })
}

/// Bytes a WebSocket session reads at a time (see `chat_upgrade`).
const WS_READ_BUFFER: usize = 4 * 1024;

/// Why the server closes a WebSocket, sent in its close frame (RFC 6455 7.4.1).
#[derive(Clone, Copy, PartialEq, Eq)]
enum CloseWhy {
    /// The session ended (1000).
    Done,
    /// The client sent a binary frame (1003: unsupported data).
    Binary,
    /// A text frame that is not UTF-8 (1007).
    NotUtf8,
    /// A frame or message over the size limit (1009).
    TooBig,
    /// A framing violation: unmasked or fragmented control frames, reserved
    /// bits or opcodes, a stray continuation (1002).
    Protocol,
    /// A line for the client over what a web session is sent (1011).
    OutputTooLong,
}

impl CloseWhy {
    /// Why to close after `error` from the WebSocket layer. Errors of the
    /// connection itself (a reset, an I/O error) leave nothing to tell.
    fn for_error(error: &axum::Error) -> CloseWhy {
        use std::error::Error as _;
        match error
            .source()
            .and_then(|e| e.downcast_ref::<tungstenite::Error>())
        {
            Some(tungstenite::Error::Utf8(_)) => CloseWhy::NotUtf8,
            Some(tungstenite::Error::Capacity(_)) => CloseWhy::TooBig,
            Some(tungstenite::Error::Protocol(_)) => CloseWhy::Protocol,
            _ => CloseWhy::Done,
        }
    }

    fn frame(self) -> CloseFrame {
        let (code, reason) = match self {
            CloseWhy::Done => (1000, "session ended"),
            CloseWhy::Binary => (1003, "binary frames are not taken; send text"),
            CloseWhy::NotUtf8 => (1007, "text frames must be UTF-8"),
            CloseWhy::TooBig => (1009, "frame over the line size limit"),
            CloseWhy::Protocol => (1002, "WebSocket protocol violation"),
            CloseWhy::OutputTooLong => (1011, "an answer over the server's line limit"),
        };
        CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }
    }
}

/// The session's input from a WebSocket's frames, one line per text frame,
/// and the pump that feeds it, which notes in `why` why to close before the
/// session can see the end. A close frame is the end of input; a connection
/// that failed without one (a reset) is a read error, as on the client
/// port, so that a request waiting for the cluster is given up. At most
/// three frames are held: one in the channel, one being read, one waiting
/// to be sent.
///
/// Input that ends the session (a bad frame, a reset) is logged within
/// `log`, the server's budget of per-connection lines.
fn frames_to_lines<S>(
    mut frames: S,
    why: Arc<std::sync::Mutex<CloseWhy>>,
    log: Arc<LogBudget>,
) -> (
    impl tokio::io::AsyncRead + Unpin + Send + use<S>,
    impl Future<Output = ()> + Send + use<S>,
)
where
    S: futures_util::Stream<Item = Result<Message, axum::Error>> + Unpin + Send,
{
    let (to_session, mut frames_in) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(1);
    let session_in = tokio_util::io::StreamReader::new(futures_util::stream::poll_fn(move |cx| {
        frames_in.poll_recv(cx)
    }));
    let pump = async move {
        while let Some(frame) = frames.next().await {
            let text = match frame {
                Ok(Message::Text(text)) => text,
                Ok(Message::Binary(_)) => {
                    log.log(|left_out| info!(left_out, "binary frame; closing the session"));
                    *why.lock().unwrap_or_else(|e| e.into_inner()) = CloseWhy::Binary;
                    break;
                }
                // Pings are answered by the WebSocket layer.
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(Message::Close(_)) => break,
                Err(e) => {
                    // Oversize frames, protocol violations, resets.
                    log.log(|left_out| {
                        info!(error = %e, left_out, "WebSocket input failed; closing the session");
                    });
                    let close = CloseWhy::for_error(&e);
                    *why.lock().unwrap_or_else(|e| e.into_inner()) = close;
                    // The connection failed: the client is gone. A bad frame
                    // from a live client ends its input (as a line too long
                    // does on the client port, read only after the request
                    // before it is answered).
                    if close == CloseWhy::Done {
                        let _ = to_session.send(Err(std::io::Error::other(e))).await;
                    }
                    break;
                }
            };
            let line = text.as_str();
            let line = line.strip_suffix('\n').unwrap_or(line);
            let line = line.strip_suffix('\r').unwrap_or(line);
            // One frame is one line: a newline inside a JSON object can
            // only be whitespace between tokens (strings hold `\n`
            // escaped), so it becomes a space rather than a line break.
            let mut bytes = Vec::with_capacity(line.len() + 1);
            bytes.extend_from_slice(line.as_bytes());
            for byte in &mut bytes {
                if matches!(byte, b'\n' | b'\r') {
                    *byte = b' ';
                }
            }
            bytes.push(b'\n');
            if to_session.send(Ok(Bytes::from(bytes))).await.is_err() {
                break;
            }
        }
        // Dropping `to_session` here is the session's end of input.
    };
    (session_in, pump)
}

/// One WebSocket chat session: the session logic on two pipes, and two
/// pumps between the pipes and the socket. A connection with output stuck
/// in it is reset when the session ends (as on the client port), so that
/// neither the socket nor its kernel buffer outlives the session.
async fn ws_session(
    socket: WebSocket,
    connection: http::Peer,
    chat: Arc<ChatServer>,
    shutdown: CancellationToken,
    line_max: usize,
) {
    debug!("connected");
    let handshake = chat.limits().handshake_timeout;
    let (mut sink, frames) = socket.split();
    let why = Arc::new(std::sync::Mutex::new(CloseWhy::Done));
    let lines_budget = chat.connection_lines.clone();
    let (session_in, inbound) = frames_to_lines(frames, why.clone(), lines_budget.clone());
    let (session_out, from_session) = tokio::io::duplex(PIPE_BYTES);
    let outbound = {
        let why = why.clone();
        async move {
            let mut lines = LineReader::new(from_session, line_max);
            loop {
                let line = match lines.next_line().await {
                    Ok(Some(line)) => line,
                    Ok(None) | Err(LineError::Io(_)) => break,
                    Err(LineError::TooLong(_)) => {
                        // A line of ours over the bound (a `list` of a very
                        // large cluster): the session cannot go on, and says
                        // why rather than closing as if all were well.
                        warn!(
                            line_max,
                            "a line for this WebSocket session is over the limit; closing it"
                        );
                        *why.lock().unwrap_or_else(|e| e.into_inner()) = CloseWhy::OutputTooLong;
                        break;
                    }
                };
                // The session writes its own JSON: always UTF-8.
                let text = String::from_utf8_lossy(line).into_owned();
                if sink
                    .send(Message::Text(Utf8Bytes::from(text)))
                    .await
                    .is_err()
                {
                    // Closed by the client (its close frame may still wait
                    // for an answer), or the connection failed.
                    break;
                }
            }
            let frame = why.lock().unwrap_or_else(|e| e.into_inner()).frame();
            if sink.send(Message::Close(Some(frame))).await.is_err() {
                // Closed by the client first: its close is answered instead.
                let _ = sink.close().await;
            }
        }
    };
    let session = run_session_on(
        Transport::Web,
        chat,
        session_in,
        session_out,
        connection.addr.ip(),
        shutdown,
    );
    let mut inbound = std::pin::pin!(inbound);
    let mut outbound = std::pin::pin!(outbound);
    let mut session = std::pin::pin!(session);
    let (mut inbound_done, mut outbound_done) = (false, false);
    let end = loop {
        tokio::select! {
            end = &mut session => break end,
            () = &mut inbound, if !inbound_done => inbound_done = true,
            () = &mut outbound, if !outbound_done => outbound_done = true,
        }
    };
    if end == SessionEnd::Closed && !outbound_done {
        // The last lines and the close frame, given as long as the session
        // gives them (a client that does not read is dropped).
        if tokio::time::timeout(handshake, &mut outbound)
            .await
            .is_err()
        {
            connection.reset_on_close();
            lines_budget.log(|left_out| {
                info!(
                    left_out,
                    "client did not take its last frames; resetting the connection"
                );
            });
        }
    } else if end == SessionEnd::Abort {
        connection.reset_on_close();
        debug!("connection reset: output not taken");
    }
    // The WebSocket, and with it the connection, is dropped on return.
    debug!("closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each text frame is one line for the session (line breaks in it become
    /// spaces); a close frame is the end of its input, a connection that
    /// fails without one a read error, so that the session gives a waiting
    /// request up, as it does for a reset on the client port.
    #[tokio::test]
    async fn frames_become_lines_and_a_failed_connection_a_read_error() {
        let read_all = |frames: Vec<Result<Message, axum::Error>>| async move {
            let why = Arc::new(std::sync::Mutex::new(CloseWhy::Done));
            let frames = futures_util::stream::iter(frames);
            let (input, pump) = frames_to_lines(frames, why, Arc::new(LogBudget::new(20)));
            tokio::spawn(pump);
            let mut lines = LineReader::new(input, 1024);
            let mut got = Vec::new();
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) => got.push(String::from_utf8(line.to_vec()).unwrap()),
                    Ok(None) => return (got, "end"),
                    Err(_) => return (got, "error"),
                }
            }
        };
        let text = |t: &str| Ok(Message::Text(t.into()));
        let (lines, end) = read_all(vec![
            text("{\"type\":\"who\"}"),
            Ok(Message::Ping(Bytes::new())),
            text("{\"type\":\r\n\"list\"}\r\n"),
            Ok(Message::Close(None)),
            text("after the close"),
        ])
        .await;
        assert_eq!(lines, ["{\"type\":\"who\"}", "{\"type\":  \"list\"}"]);
        assert_eq!(end, "end");
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let (lines, end) = read_all(vec![
            text("{\"type\":\"who\"}"),
            Err(axum::Error::new(reset)),
        ])
        .await;
        assert_eq!(lines, ["{\"type\":\"who\"}"]);
        assert_eq!(end, "error");
        // A bad frame from a live client ends its input, and says why.
        let too_big =
            tungstenite::Error::Capacity(tungstenite::error::CapacityError::MessageTooLong {
                size: 70_000,
                max_size: 65_536,
            });
        let why = Arc::new(std::sync::Mutex::new(CloseWhy::Done));
        let frames = futures_util::stream::iter(vec![Err(axum::Error::new(too_big))]);
        let (input, pump) = frames_to_lines(frames, why.clone(), Arc::new(LogBudget::new(20)));
        tokio::spawn(pump);
        let mut lines = LineReader::new(input, 1024);
        assert!(matches!(lines.next_line().await, Ok(None)));
        assert!(*why.lock().unwrap() == CloseWhy::TooBig);
    }

    #[test]
    fn a_refused_origin_is_logged_short_and_once_a_second() {
        let mut headers = HeaderMap::new();
        let long = format!("http://e{}", "A".repeat(350_000));
        headers.insert(header::ORIGIN, HeaderValue::from_str(&long).unwrap());
        let logged = origin_for_log(&headers);
        assert!(logged.len() < 100, "{logged}");
        assert!(logged.ends_with("bytes)"), "{logged}");
        assert_eq!(origin_for_log(&HeaderMap::new()), "");

        let last = AtomicU64::new(u64::MAX);
        assert!(first_this_second(&last, 100));
        assert!(!first_this_second(&last, 100));
        assert!(!first_this_second(&last, 100));
        assert!(first_this_second(&last, 101));
    }

    #[test]
    fn the_page_policy_allows_only_the_pages_own_script_and_style() {
        // A second inline element would be blocked by the browser: one each.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert!(!PAGE_POLICY.contains("unsafe-inline"), "{}", *PAGE_POLICY);
        let script = inline_hash(PAGE, "script");
        assert!(PAGE_POLICY.contains(&format!("script-src {script};")));
        // The hash is of the exact text: one more character changes it.
        let changed = PAGE.replacen("<script>", "<script> ", 1);
        assert_ne!(inline_hash(&changed, "script"), script);
        // Known value: SHA-256 of "abc", base64.
        assert_eq!(
            inline_hash("<style>abc</style>", "style"),
            "'sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0='"
        );
    }
}
