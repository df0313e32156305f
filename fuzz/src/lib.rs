//! What each fuzz target checks, one function per decoder that takes bytes
//! from outside. The `cargo fuzz` targets (fuzz/fuzz_targets/) call these on
//! generated inputs; the main crate's tests/fuzz_corpus.rs includes this file
//! and replays every committed corpus file through them on stable Rust.
//!
//! Each check panics when a property fails, not only when the decoder panics:
//! a decoded value encodes and decodes back to itself, a parsed config prints
//! as a config that parses to the same value, and so on.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use chatmesh::client_proto::{Request, ServerMessage, valid_name};
use chatmesh::config::{ClusterConfig, ConfigError, Limits, Quorum, Timing};
use chatmesh::lines::{LineError, LineReader};
use chatmesh::mesh::wire::{self, MAX_FRAME, WIRE_VERSION, WireError};
use chatmesh::netsim::{Impairment, LinkImpairment};
use tokio::io::{AsyncRead, ReadBuf};

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
/// longer than `max` (counted before the `\r` is dropped), which is an error.
fn expected_lines(data: &[u8], max: usize) -> Vec<Result<Vec<u8>, usize>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (line, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        if line.len() > max {
            out.push(Err(max));
            return out;
        }
        out.push(Ok(line.strip_suffix(b"\r").unwrap_or(line).to_vec()));
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
        claim_timeout,
        move_timeout,
        max_clients,
        send_buffer_bytes,
    } = &config.limits;
    let mut limits: toml::Table = [
        ("max_line_bytes", int(*max_line_bytes)),
        ("handshake_timeout_ms", ms(*handshake_timeout)),
        ("outbox_bytes", int(*outbox_bytes)),
        ("claim_timeout_ms", ms(*claim_timeout)),
        ("move_timeout_ms", ms(*move_timeout)),
        ("send_buffer_bytes", int(*send_buffer_bytes)),
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

/// Largest request the admin endpoint reads (`admin::MAX_REQUEST`).
const ADMIN_MAX_REQUEST: usize = 16 * 1024;

/// Raw bytes sent to a running node's admin endpoint over loopback TCP (the
/// parser is inside the connection handler, so the target goes through the
/// socket: the node runs in this process, so its code is what is fuzzed).
/// Whatever came, the answer is nothing or one well-formed HTTP response
/// whose `Content-Length` is its body's; a complete request head always gets
/// one; a plain `GET /status` gets the status document.
pub fn admin_request(data: &[u8]) {
    let addr = admin_addr();
    let mut stream = TcpStream::connect(addr).expect("connect to the admin endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    // The server may answer and close before reading everything: a refused
    // write is not an error here (std sends with MSG_NOSIGNAL: no SIGPIPE).
    let _ = stream.write_all(data);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut response = Vec::new();
    if let Err(e) = stream.read_to_end(&mut response) {
        // A reset: the server closed with request bytes it did not read (over
        // its limit, or past Content-Length), and the reset may have cut its
        // answer short. Anything else (a timeout) is a hang.
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "no answer from the admin endpoint: {e}"
        );
        return;
    }
    // The endpoint reads 1 KiB at a time and gives up past its limit, so a
    // head is surely seen only if it ends a read's length before the limit.
    let head_complete =
        find(data, b"\r\n\r\n").is_some_and(|at| at + 4 + 1024 <= ADMIN_MAX_REQUEST);
    if response.is_empty() {
        assert!(
            !head_complete,
            "a complete request head got no answer: {:?}",
            String::from_utf8_lossy(data)
        );
        return;
    }
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("answer without a head: {text:?}"));
    let status_line = head.lines().next().unwrap_or("");
    let code = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    assert!((200..600).contains(&code), "{status_line}");
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"));
    let body_bytes = response.len() - (head.len() + 4);
    assert_eq!(length, body_bytes, "Content-Length of {head:?}");
    assert!(
        code < 500,
        "server error for {:?}",
        String::from_utf8_lossy(data)
    );
    if plain_status_request(data) {
        assert_eq!(code, 200, "GET /status: {status_line}");
        let doc: serde_json::Value = serde_json::from_str(body).expect("status is JSON");
        assert_eq!(doc["id"], "s1", "{body}");
    }
}

/// `GET /status HTTP/1.1` with a complete head and no header that a stricter
/// endpoint might refuse it for (`Origin`, `Host`).
fn plain_status_request(data: &[u8]) -> bool {
    let Some(end) = find(data, b"\r\n\r\n") else {
        return false;
    };
    let Some(headers) = data[..end].strip_prefix(b"GET /status HTTP/1.1") else {
        return false;
    };
    let headers = String::from_utf8_lossy(headers).to_ascii_lowercase();
    (headers.is_empty() || headers.starts_with("\r\n"))
        && !headers.split("\r\n").any(|h| {
            let h = h.trim_start();
            h.starts_with("origin") || h.starts_with("host")
        })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The admin address of one node (s1 alone, every port ephemeral) started
/// once per process on a runtime of its own; both live until the process ends.
fn admin_addr() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
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
        let addr = node.admin_addr().expect("admin port configured");
        // Both serve the endpoint for the rest of the process.
        std::mem::forget(node);
        std::mem::forget(runtime);
        addr
    })
}
