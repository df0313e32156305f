//! What each fuzz target checks, one function per decoder that takes bytes
//! from outside. The `cargo fuzz` targets (fuzz/fuzz_targets/) call these on
//! generated inputs; the main crate's tests/fuzz_corpus.rs includes this file
//! and replays every committed corpus file through them on stable Rust.
//!
//! Each check panics when a property fails, not only when the decoder panics:
//! a decoded value encodes and decodes back to itself, a parsed config prints
//! as a config that parses to the same value, and so on.

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::http::{Method, Uri};
use chatmesh::admin;
use chatmesh::client_proto::{Request, ServerMessage, valid_name};
use chatmesh::config::{ClusterConfig, ConfigError, Limits, Quorum, Timing};
use chatmesh::lines::{LineError, LineReader};
use chatmesh::mesh::wire::{self, MAX_FRAME, WIRE_VERSION, WireError};
use chatmesh::netsim::{Impairment, LinkImpairment};
use tokio::io::{AsyncRead, ReadBuf};
use tower::ServiceExt;

/// Line limit of the `client_lines` target: small enough that inputs of a
/// few KiB reach it.
pub const LINE_MAX: usize = 512;

/// Client bytes as a session reads them: split into lines by
/// [`LineReader`] (fed in uneven chunks, with `Pending` in between), each
/// line parsed as a client [`Request`] and as a [`ServerMessage`] (what the
/// bundled client parses from a server).
pub fn client_lines(data: &[u8]) {
    let got = read_lines(data, LINE_MAX);
    assert_eq!(got, expected_lines(data, LINE_MAX), "LineReader split");
    for line in got.iter().filter_map(|l| l.as_ref().ok()) {
        request_line(line);
        server_line(line);
    }
}

/// What [`LineReader`] must return: every `\n`-terminated line and a last
/// unterminated one, each without one trailing `\r`, until the first line
/// longer than `max` (counted after that `\r` is dropped: a CRLF client's
/// longest line is as long as an LF client's), which is an error.
fn expected_lines(data: &[u8], max: usize) -> Vec<Result<Vec<u8>, usize>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (line, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > max {
            out.push(Err(max));
            return out;
        }
        out.push(Ok(line.to_vec()));
        rest = next;
    }
    out
}

/// Drives a [`LineReader`] over `data` to its end or first error.
fn read_lines(data: &[u8], max: usize) -> Vec<Result<Vec<u8>, usize>> {
    let mut reader = LineReader::new(Chunked::new(data), max);
    let mut out = Vec::new();
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        let mut next = std::pin::pin!(reader.next_line());
        // Chunked wakes itself before every Pending, so polling again is right.
        let polled = loop {
            if let Poll::Ready(r) = next.as_mut().poll(&mut cx) {
                break r;
            }
        };
        match polled {
            Ok(Some(line)) => out.push(Ok(line.to_vec())),
            Ok(None) => return out,
            Err(LineError::TooLong(n)) => {
                out.push(Err(n));
                return out;
            }
            Err(LineError::Io(e)) => panic!("in-memory reader failed: {e}"),
        }
    }
}

/// An in-memory transport that hands out its bytes in uneven chunks (sizes
/// from a generator seeded by the data, so a run is reproducible) and says
/// `Pending` every third read, as a slow client does.
struct Chunked {
    data: Vec<u8>,
    pos: usize,
    rng: u64,
    reads: u64,
}

impl Chunked {
    fn new(data: &[u8]) -> Self {
        // FNV-1a of the data: a seed that changes with the input.
        let seed = data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Chunked {
            data: data.to_vec(),
            pos: 0,
            rng: seed | 1,
            reads: 0,
        }
    }
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.reads += 1;
        if self.reads.is_multiple_of(3) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        // xorshift64
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        let want = 1 + (x % 700) as usize;
        let n = want.min(buf.remaining()).min(self.data.len() - self.pos);
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// One line as the server parses it: a request encodes and parses back to
/// itself; a refusal's reason makes a valid `error` line.
fn request_line(line: &[u8]) {
    match Request::parse(line) {
        Ok(request) => {
            let encoded = request.encode();
            assert_one_line(&encoded);
            assert_eq!(
                Request::parse(&encoded[..encoded.len() - 1]).as_ref(),
                Ok(&request),
                "request re-encoded as {:?}",
                String::from_utf8_lossy(&encoded)
            );
            // The name rules take any string the client sent.
            match &request {
                Request::NewIdentity { identity } => {
                    valid_name(identity);
                }
                Request::CreateRoom { roomid }
                | Request::JoinRoom { roomid }
                | Request::DeleteRoom { roomid } => {
                    valid_name(roomid);
                }
                _ => {}
            }
        }
        Err(reason) => {
            assert!(!reason.is_empty(), "a refusal has a reason");
            let reply = ServerMessage::error(reason.clone());
            let encoded = reply.encode();
            assert_one_line(&encoded);
            assert_eq!(
                ServerMessage::parse(&encoded[..encoded.len() - 1]).ok(),
                Some(reply),
                "error reply {reason:?}"
            );
        }
    }
}

/// One line as the bundled client parses it from a server.
fn server_line(line: &[u8]) {
    if let Ok(message) = ServerMessage::parse(line) {
        let encoded = message.encode();
        assert_one_line(&encoded);
        assert_eq!(
            ServerMessage::parse(&encoded[..encoded.len() - 1]).ok(),
            Some(message),
            "server line re-encoded as {:?}",
            String::from_utf8_lossy(&encoded)
        );
    }
}

/// An encoded protocol line is exactly one line: whatever the strings held
/// is escaped.
fn assert_one_line(encoded: &[u8]) {
    assert_eq!(encoded.last(), Some(&b'\n'), "ends with a newline");
    assert_eq!(
        encoded.iter().filter(|&&b| b == b'\n').count(),
        1,
        "one newline: {:?}",
        String::from_utf8_lossy(encoded)
    );
}

/// A mesh stream as `read_frames` takes it: `u32` length prefixes checked by
/// [`wire::frame_len`] before the body is read, bodies decoded by
/// [`wire::decode_frame`]. The whole input is also tried as one body.
pub fn mesh_frames(data: &[u8]) {
    frame_body(data);
    let mut rest = data;
    while let Some((prefix, after)) = rest.split_first_chunk::<4>() {
        let len = match wire::frame_len(*prefix) {
            Ok(len) => len,
            Err(WireError::TooLarge(n)) => {
                assert!(n > MAX_FRAME, "{n} refused as too large");
                return;
            }
            Err(e) => panic!("frame_len can only refuse a size: {e}"),
        };
        assert!(len <= MAX_FRAME);
        if after.len() < len {
            return;
        }
        frame_body(&after[..len]);
        rest = &after[len..];
    }
}

/// A decoded frame encodes (no longer than it came: postcard's encoding is
/// the shortest) and decodes back to itself.
fn frame_body(body: &[u8]) {
    let Ok(message) = wire::decode_frame(body) else {
        return;
    };
    let frame = wire::encode_frame(&message);
    let prefix: [u8; 4] = frame[..4].try_into().expect("a frame has a prefix");
    assert_eq!(wire::frame_len(prefix), Ok(frame.len() - 4), "prefix");
    assert!(
        frame.len() - 4 <= body.len(),
        "{message:?} re-encoded in {} bytes, came in {}",
        frame.len() - 4,
        body.len()
    );
    assert_eq!(wire::decode_frame(&frame[4..]).as_ref(), Ok(&message));
}

/// A heartbeat datagram: decoded ones encode (no longer) and decode back to
/// themselves; another version byte is reported as such.
pub fn heartbeat(data: &[u8]) {
    match wire::decode_heartbeat(data) {
        Ok(heartbeat) => {
            assert_eq!(data.first(), Some(&WIRE_VERSION));
            let datagram = wire::encode_heartbeat(&heartbeat);
            assert_eq!(datagram.first(), Some(&WIRE_VERSION));
            assert!(datagram.len() <= data.len(), "{heartbeat:?}");
            assert_eq!(wire::decode_heartbeat(&datagram).as_ref(), Ok(&heartbeat));
        }
        Err(WireError::Version(v)) => {
            assert_ne!(v, WIRE_VERSION);
            assert_eq!(data.first(), Some(&v));
        }
        Err(e @ WireError::TooLarge(_)) => panic!("a datagram has no length prefix: {e}"),
        Err(_) => {}
    }
}

/// Config text, either format. An accepted config holds its invariants and
/// prints as TOML (and, where it can be said in it, as the line format) that
/// parses to the same config; a refusal names a line that exists.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        // `ClusterConfig::load` refuses a file that is not UTF-8 before parsing.
        return;
    };
    let config = match ClusterConfig::parse(text, "fuzz") {
        Ok(config) => config,
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("fuzz"), "{message}");
            if let ConfigError::Invalid {
                line: Some(line), ..
            } = e
            {
                assert!(
                    // At most one past the last line: an error at the end of the text.
                    line >= 1 && line <= text.lines().count() + 1,
                    "line {line} of {}: {message}",
                    text.lines().count()
                );
            }
            return;
        }
    };
    config_invariants(&config);
    let toml = to_toml(&config);
    let again = ClusterConfig::parse(&toml, "printed")
        .unwrap_or_else(|e| panic!("printed config refused: {e}\n{toml}"));
    assert_eq!(again, config, "printed as\n{toml}");
    if let Some(lines) = to_line_format(&config) {
        let again = ClusterConfig::parse(&lines, "printed")
            .unwrap_or_else(|e| panic!("printed line config refused: {e}\n{lines}"));
        assert_eq!(again, config, "printed as\n{lines}");
    }
}

fn config_invariants(config: &ClusterConfig) {
    assert!(!config.servers.is_empty());
    for pair in config.servers.windows(2) {
        assert!(
            pair[0].priority < pair[1].priority,
            "ascending, distinct priorities"
        );
    }
    let mut ids: Vec<&str> = config.servers.iter().map(|s| s.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), config.servers.len(), "distinct ids");
    for server in &config.servers {
        let id = &server.id;
        assert!((1..=32).contains(&id.len()), "{id:?}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{id:?}"
        );
        assert!(!server.host.is_empty() && !server.host.contains(char::is_whitespace));
    }
    let t = &config.timing;
    assert!(t.failure_timeout > t.heartbeat_interval * 2);
    for d in [
        t.heartbeat_interval,
        t.failure_timeout,
        t.election_t1,
        t.election_t2,
        t.election_t3,
        t.election_t4,
    ] {
        assert!(!d.is_zero());
    }
    let l = &config.limits;
    assert!(l.max_line_bytes >= 256 && l.outbox_bytes >= 4096);
    assert!(l.outbox_total_bytes >= l.outbox_bytes);
    for d in [l.handshake_timeout, l.claim_timeout, l.move_timeout] {
        assert!(!d.is_zero());
    }
}

/// A TOML integer (an `i64`: every value the parser took came from one).
fn int(value: impl TryInto<i64>) -> toml::Value {
    toml::Value::Integer(
        value
            .try_into()
            .unwrap_or_else(|_| panic!("a parsed TOML value fits an i64")),
    )
}

fn ms(d: Duration) -> toml::Value {
    int(d.as_millis())
}

/// Every field of `config` as TOML, written out even where it is the default.
pub fn to_toml(config: &ClusterConfig) -> String {
    let servers = config
        .servers
        .iter()
        .map(|s| {
            let mut t = toml::Table::new();
            t.insert("id".into(), toml::Value::String(s.id.clone()));
            t.insert("host".into(), toml::Value::String(s.host.clone()));
            t.insert("client_port".into(), int(s.client_port));
            t.insert("mesh_port".into(), int(s.mesh_port));
            if let Some(port) = s.admin_port {
                t.insert("admin_port".into(), int(port));
            }
            if let Some(port) = s.web_port {
                t.insert("web_port".into(), int(port));
            }
            t.insert("priority".into(), int(s.priority));
            toml::Value::Table(t)
        })
        .collect();
    let Timing {
        heartbeat_interval,
        failure_timeout,
        election_t1,
        election_t2,
        election_t3,
        election_t4,
    } = &config.timing;
    let timing: toml::Table = [
        ("heartbeat_interval_ms", ms(*heartbeat_interval)),
        ("failure_timeout_ms", ms(*failure_timeout)),
        ("election_t1_ms", ms(*election_t1)),
        ("election_t2_ms", ms(*election_t2)),
        ("election_t3_ms", ms(*election_t3)),
        ("election_t4_ms", ms(*election_t4)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    // Destructured in full: a new setting does not compile until it is printed here.
    let Limits {
        max_line_bytes,
        handshake_timeout,
        outbox_bytes,
        outbox_total_bytes,
        claim_timeout,
        move_timeout,
        max_clients,
        send_buffer_bytes,
        event_pace,
    } = &config.limits;
    let mut limits: toml::Table = [
        ("max_line_bytes", int(*max_line_bytes)),
        ("handshake_timeout_ms", ms(*handshake_timeout)),
        ("outbox_bytes", int(*outbox_bytes)),
        ("outbox_total_bytes", int(*outbox_total_bytes)),
        ("claim_timeout_ms", ms(*claim_timeout)),
        ("move_timeout_ms", ms(*move_timeout)),
        ("send_buffer_bytes", int(*send_buffer_bytes)),
        ("event_pace_ms", ms(*event_pace)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if let Some(max) = max_clients {
        limits.insert("max_clients".into(), int(*max));
    }
    let quorum = match config.quorum {
        Quorum::Majority => "majority",
        Quorum::None => "none",
    };
    let mut top = toml::Table::new();
    top.insert("quorum".into(), toml::Value::String(quorum.into()));
    top.insert("server".into(), toml::Value::Array(servers));
    top.insert("timing".into(), toml::Value::Table(timing));
    top.insert("limits".into(), toml::Value::Table(limits));
    toml::to_string(&top).expect("a TOML table prints")
}

/// The config in the assignment's line format, if that format can say it:
/// default settings, no admin ports, priorities by position, and hosts that
/// the format can carry (no `#`, which starts a comment; no `=`, which makes
/// the text read as TOML).
pub fn to_line_format(config: &ClusterConfig) -> Option<String> {
    let plain = config.timing == Timing::default()
        && config.limits == Limits::default()
        && config.quorum == Quorum::default()
        && config.servers.iter().enumerate().all(|(i, s)| {
            s.admin_port.is_none()
                && s.web_port.is_none()
                && s.priority as usize == i
                && !s.host.contains(['#', '='])
        });
    plain.then(|| {
        config
            .servers
            .iter()
            .map(|s| format!("{} {} {} {}\n", s.id, s.host, s.client_port, s.mesh_port))
            .collect()
    })
}

/// An impairment spec (`--impair`, `POST /impair`). An accepted one prints as
/// a spec that parses; that one prints the same (probabilities print with
/// six decimals of a percent, so the first print may round); and the print
/// keeps every duration, address, direction, seed and queue exactly.
pub fn impairment(data: &[u8]) {
    let Ok(spec) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(first) = Impairment::parse(spec) else {
        return;
    };
    assert_eq!(first.validate(), Ok(()));
    let printed = first.to_string();
    let second = Impairment::parse(&printed)
        .unwrap_or_else(|e| panic!("{spec:?} printed as {printed:?}, which is refused: {e}"));
    assert_eq!(second.to_string(), printed, "printing is stable");
    assert_eq!(second.cut, first.cut);
    assert_eq!(second.cut_out, first.cut_out);
    assert_eq!(second.cut_in, first.cut_in);
    assert_eq!(second.seed, first.seed);
    assert_eq!(second.queue_limit, first.queue_limit);
    assert_eq!(
        second.peers.keys().collect::<Vec<_>>(),
        first.peers.keys().collect::<Vec<_>>()
    );
    same_link(&second.link, &first.link, &printed);
    for (addr, link) in &first.peers {
        same_link(&second.peers[addr], link, &printed);
    }
}

fn same_link(a: &LinkImpairment, b: &LinkImpairment, printed: &str) {
    // Half of the last printed digit: 1e-6 % = 1e-8 as a fraction.
    let close = |x: f64, y: f64| (x - y).abs() <= 0.5e-8 + f64::EPSILON;
    assert!(close(a.loss, b.loss), "loss in {printed:?}");
    assert!(close(a.dup, b.dup), "dup in {printed:?}");
    assert!(close(a.reorder, b.reorder), "reorder in {printed:?}");
    match (&a.burst, &b.burst) {
        (None, None) => {}
        (Some(x), Some(y)) => assert!(
            close(x.p_enter, y.p_enter)
                && close(x.p_exit, y.p_exit)
                && close(x.bad_loss, y.bad_loss),
            "burst in {printed:?}"
        ),
        _ => panic!("burst lost or made up in {printed:?}"),
    }
    assert_eq!(
        (a.delay, a.jitter, a.reorder_gap, a.direction),
        (b.delay, b.jitter, b.reorder_gap, b.direction),
        "{printed:?}"
    );
}

/// Bytes read as an HTTP request, liberally (a request line, header lines
/// up to a blank line, the rest as the body; see [`loose_request`]), sent
/// through the admin endpoint's router in this process (no socket: hyper's
/// own parser is fuzzed upstream; this fuzzes what the admin endpoint decides),
/// once with the testing aids off and once on. The answer must be the one
/// the admin endpoint's rules give ([`expected_admin`]): the method checked
/// first, then the testing aids, the `Origin` of a `POST`, the body limit,
/// the route. Every answer closes the connection, names its content type,
/// and has a text body ending in a newline (none for `HEAD`); no answer is
/// a 5xx.
pub fn admin_request(data: &[u8]) {
    let Some(loose) = loose_request(data) else {
        return;
    };
    let admin = admin_routers();
    for (aids, router) in [(false, &admin.aids_off), (true, &admin.aids_on)] {
        let request = loose.request();
        let response = admin
            .runtime
            .block_on(router.clone().oneshot(request))
            .unwrap_or_else(|e| match e {});
        let code = response.status().as_u16();
        let header = |name: header::HeaderName| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(
            header(header::CONNECTION).as_deref(),
            Some("close"),
            "{code}"
        );
        let content_type = header(header::CONTENT_TYPE).expect("a content type");
        let body = admin
            .runtime
            .block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
            .expect("an in-memory body");
        let body = std::str::from_utf8(&body).expect("a text answer");
        if loose.method == Method::HEAD {
            // axum answers HEAD with the head of what GET would get.
            assert_eq!(body, "", "{code}");
        } else {
            assert!(body.ends_with('\n'), "{code} {body:?}");
        }
        let expected = expected_admin(&loose, aids);
        let what = format!(
            "{} {:?} (aids {aids}): {code} {body:?}",
            loose.method, loose.target
        );
        match expected {
            Expected::Exactly(want, text) => {
                assert_eq!(code, want, "{what}");
                if let Some(text) = text
                    && loose.method != Method::HEAD
                {
                    assert_eq!(body, text, "{what}");
                }
            }
            Expected::Status => {
                assert_eq!(code, 200, "{what}");
                assert_eq!(content_type, "application/json", "{what}");
                let doc: serde_json::Value = serde_json::from_str(body).expect("status is JSON");
                assert_eq!(doc["id"], "s1", "{body}");
            }
            Expected::Metrics => {
                assert_eq!(code, 200, "{what}");
                assert!(body.contains("\nchatmesh_term{server=\"s1\"} "), "{what}");
            }
            Expected::Impairment => {
                assert_eq!(code, 200, "{what}");
                assert!(body.starts_with("impairment: "), "{what}");
            }
            Expected::SetImpairment { valid } => {
                // A spec that parses may still be refused by the socket.
                assert!(code == 200 || (code == 400 && !valid), "{what}");
                if code == 200 {
                    assert!(body.starts_with("impairment: "), "{what}");
                }
            }
        }
    }
}

/// A request as [`loose_request`] reads it.
pub struct LooseRequest {
    method: Method,
    target: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Vec<u8>,
}

impl LooseRequest {
    fn request(&self) -> axum::extract::Request {
        let mut request = axum::extract::Request::new(axum::body::Body::from(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.target.clone();
        for (name, value) in &self.headers {
            request.headers_mut().append(name.clone(), value.clone());
        }
        request
    }

    /// The first value of header `name`, as hyper would hand it on.
    fn header(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// `METHOD TARGET ...` on the first line (`\n` or `\r\n`), then `name: value`
/// lines up to a blank line (lines that are no valid header are skipped), and
/// the rest as the body, whatever `Content-Length` says. None if there is no
/// valid method, or the target is not a path (`/...`) or an absolute URI.
pub fn loose_request(data: &[u8]) -> Option<LooseRequest> {
    let (head, body) = match find(data, b"\r\n\r\n") {
        Some(at) => (&data[..at], &data[at + 4..]),
        None => match find(data, b"\n\n") {
            Some(at) => (&data[..at], &data[at + 2..]),
            None => (data, &data[data.len()..]),
        },
    };
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let mut words = lines
        .next()?
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty());
    let method = Method::from_bytes(words.next()?).ok()?;
    let target = Uri::try_from(words.next()?).ok()?;
    if !target.path().starts_with('/') {
        return None;
    }
    let headers = lines
        .filter_map(|line| {
            let at = line.iter().position(|&b| b == b':')?;
            let name = HeaderName::from_bytes(line[..at].trim_ascii()).ok()?;
            let value = HeaderValue::from_bytes(line[at + 1..].trim_ascii()).ok()?;
            Some((name, value))
        })
        .collect();
    Some(LooseRequest {
        method,
        target,
        headers,
        body: body.to_vec(),
    })
}

/// What the admin endpoint must answer.
enum Expected {
    /// This status, and if given this body.
    Exactly(u16, Option<&'static str>),
    /// The status document of s1.
    Status,
    /// The metrics of s1.
    Metrics,
    /// The impairment in force.
    Impairment,
    /// A new impairment (`200`), or a refusal (`400`) if `!valid`.
    SetImpairment { valid: bool },
}

/// The admin endpoint's rules, written out apart from its code.
fn expected_admin(request: &LooseRequest, aids: bool) -> Expected {
    use Expected::*;
    let post = match request.method {
        Method::GET => false,
        Method::POST => true,
        _ => return Exactly(405, Some("GET or POST only\n")),
    };
    if post && !aids {
        return Exactly(404, Some(admin::AIDS_OFF));
    }
    if post
        && request.header(&header::ORIGIN).is_some_and(|o| {
            !o.to_str()
                .is_ok_and(|o| admin::is_own_origin(o, ADMIN_PORT))
        })
    {
        return Exactly(403, Some(admin::FOREIGN_ORIGIN));
    }
    let declared = request
        .header(&header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > admin::MAX_BODY as u64) || request.body.len() > admin::MAX_BODY
    {
        return Exactly(413, None);
    }
    let path = request.target.path();
    let peer_route = ["/cut/", "/heal/"].iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|id| !id.is_empty() && !id.contains('/'))
    });
    match (post, path) {
        (false, "/status") => Status,
        (false, "/metrics") => Metrics,
        (false, "/impair") => Impairment,
        (true, "/impair") => SetImpairment {
            valid: chatmesh::netsim::Impairment::parse(
                String::from_utf8_lossy(&request.body).trim(),
            )
            .is_ok(),
        },
        (true, "/heal") => Exactly(200, Some("healed every link\n")),
        // The fuzz node has no peers.
        (true, _) if peer_route => Exactly(400, None),
        _ => Exactly(404, Some(admin::UNKNOWN)),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The port the fuzz routers take as their own (for `Origin` checks).
const ADMIN_PORT: u16 = 7001;

/// The admin routers of one node (s1 alone, every port ephemeral) started
/// once per process on a runtime of its own, which also runs the requests;
/// all live until the process ends.
struct AdminRouters {
    runtime: tokio::runtime::Runtime,
    aids_off: Router,
    aids_on: Router,
}

fn admin_routers() -> &'static AdminRouters {
    static ROUTERS: OnceLock<AdminRouters> = OnceLock::new();
    ROUTERS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("chatmesh-fuzz-admin-{}", std::process::id()));
        let config = ClusterConfig::parse(
            "[[server]]\nid = \"s1\"\nhost = \"127.0.0.1\"\nclient_port = 0\nmesh_port = 0\nadmin_port = 0\n",
            "fuzz",
        )
        .expect("fuzz node config");
        chatmesh::tls::generate(&config, &dir, true).expect("certificates for the fuzz node");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let node = runtime
            .block_on(chatmesh::Node::start(chatmesh::NodeOptions::new(
                config, "s1", &dir,
            )))
            .expect("fuzz node starts");
        // The node has read its certificates.
        let _ = std::fs::remove_dir_all(&dir);
        let mut state = node.admin_state().expect("admin port configured").clone();
        state.testing_aids = false;
        let aids_off = admin::router(state.clone(), ADMIN_PORT);
        state.testing_aids = true;
        let aids_on = admin::router(state, ADMIN_PORT);
        // The node serves the routers' state for the rest of the process.
        std::mem::forget(node);
        AdminRouters {
            runtime,
            aids_off,
            aids_on,
        }
    })
}
