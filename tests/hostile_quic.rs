//! Hostile QUIC clients on a node's client port: clients that complete the
//! handshake and never open a stream, end their stream in the middle of a
//! line (FIN or RESET), open more streams than the server allows, stop the
//! server's sending side, never read while their room floods, vanish right
//! after `newidentity`, come twenty at once over `max_clients`, send a
//! handshake's first datagram and nothing more, or change address mid-session.
//!
//! Every case asserts that (a) nothing panics in the server and nothing
//! leaks: the hostile client's slot comes back and its name can be claimed
//! again; and (b) the other clients of its room, one on TCP and one on
//! QUIC, keep being served around it.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chatmesh::Node;
use chatmesh::config::Limits;
use chatmesh::listener::{QUIC_DROPPED, QUIC_SERVER_FULL};
use common::{
    DEADLINE, Raw, Via, certs, room_change, start_node_with, talk_until_slow_readers_leave,
    wait_for,
};
use serde_json::Value;

const HALL: &str = "MainHall-s1";

/// The two well-behaved clients of every case.
const TCP_NAME: &str = "Tessa";
const QUIC_NAME: &str = "Quinn";

/// Panics anywhere but in this test code (a server task, quinn): a panic in a
/// spawned server task does not fail a test by itself, so a hook counts them.
static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

fn watch_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // HOSTILE_QUIC_LOG=<tracing filter> (e.g. `info`) prints the
        // nodes' logs, to read a failure.
        if let Ok(filter) = std::env::var("HOSTILE_QUIC_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Test assertions and unwraps are located in tests/ (track_caller).
            let in_tests = info
                .location()
                .is_some_and(|l| l.file().starts_with("tests"));
            if !in_tests {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// A node with `limits`, its two bystanders joined (the TCP one saw the
/// QUIC one arrive).
async fn start(limits: Limits) -> (Node, Raw, Raw) {
    watch_panics();
    let node = start_node_with(limits).await;
    let addr = node.client_addr();
    let mut tcp = Raw::join(Via::Tcp, addr, TCP_NAME, HALL).await;
    let quic = Raw::join(Via::Quic, addr, QUIC_NAME, HALL).await;
    tcp.expect(&room_change(QUIC_NAME, "", HALL)).await;
    (node, tcp, quic)
}

/// Both bystanders get `line`.
async fn both_expect(tcp: &mut Raw, quic: &mut Raw, line: &str) {
    tcp.expect(line).await;
    quic.expect(line).await;
}

/// The bystanders chat around the hostile client: each hears the other,
/// and nothing else is queued for either.
async fn chat_around(tcp: &mut Raw, quic: &mut Raw, tag: &str) {
    tcp.send(&format!(r#"{{"type":"message","content":"tcp {tag}"}}"#))
        .await;
    quic.expect(&format!(
        r#"{{"type":"message","identity":"{TCP_NAME}","content":"tcp {tag}"}}"#
    ))
    .await;
    quic.send(&format!(r#"{{"type":"message","content":"quic {tag}"}}"#))
        .await;
    tcp.expect(&format!(
        r#"{{"type":"message","identity":"{QUIC_NAME}","content":"quic {tag}"}}"#
    ))
    .await;
    tcp.expect_nothing_more().await;
    quic.expect_nothing_more().await;
}

/// The end of every case: only the two bystanders hold slots and sessions,
/// they still chat, and no server task panicked.
async fn finish(node: Node, mut tcp: Raw, mut quic: Raw, tag: &str) {
    let slots = node.client_slots().clone();
    wait_for("only the bystanders' slots in use", || slots.in_use() == 2).await;
    let chat = node.chat().clone();
    wait_for("only the bystanders' sessions", || {
        chat.counts().sessions == 2
    })
    .await;
    chat_around(&mut tcp, &mut quic, tag).await;
    assert_eq!(
        SERVER_PANICS.load(Ordering::SeqCst),
        0,
        "a panic outside the test code (see the output above)"
    );
    node.stop().await;
}

/// Claims `name` over `via` until the server approves it (a name freed by a
/// vanished client may take until its connection times out), within
/// `within`; the bystanders see it arrive and speak, then it quits and they
/// see it leave. Before that arrival the bystanders may see `name` (the
/// hostile client) arrive and leave any number of times, each arrival
/// followed by its departure; returns how many times it did.
async fn reclaim(
    via: Via,
    addr: SocketAddr,
    name: &str,
    within: Duration,
    tcp: &mut Raw,
    quic: &mut Raw,
) -> usize {
    let start = Instant::now();
    let mut attempts = 0;
    let mut c = loop {
        attempts += 1;
        assert!(
            start.elapsed() < within && attempts < 10_000,
            "{name} never became free again ({attempts} attempts in {:?})",
            start.elapsed()
        );
        let mut c = Raw::connect(via, addr, name).await;
        c.send(&format!(r#"{{"type":"newidentity","identity":"{name}"}}"#))
            .await;
        let got = c.next().await.expect("an answer to newidentity");
        match got["approved"].as_str() {
            Some("true") => break c,
            Some("false") => {
                c.expect_closed().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => panic!("{name}: unexpected answer {got}"),
        }
    };
    c.expect(&room_change(name, "", HALL)).await;
    // The arrival lines of the hostile client and of this one are the same:
    // a message tells this one's apart.
    c.send(r#"{"type":"message","content":"reclaimed"}"#).await;
    let said = format!(r#"{{"type":"message","identity":"{name}","content":"reclaimed"}}"#);
    let mut visits = Vec::new();
    for bystander in [&mut *tcp, &mut *quic] {
        visits.push(visits_before(bystander, name, &said).await);
    }
    assert_eq!(visits[0], visits[1], "both bystanders see the same visits");
    c.send(r#"{"type":"quit"}"#).await;
    c.expect(&room_change(name, HALL, "")).await;
    c.expect_closed().await;
    both_expect(tcp, quic, &room_change(name, HALL, "")).await;
    visits[0]
}

/// Reads `c`'s lines until `said` (a message of the reclaimer `name`),
/// which must follow arrivals and departures of `name` alternating, the
/// last arrival the reclaimer's own; how many visits came before it.
async fn visits_before(c: &mut Raw, name: &str, said: &str) -> usize {
    let said: Value = serde_json::from_str(said).unwrap();
    let arrival: Value = serde_json::from_str(&room_change(name, "", HALL)).unwrap();
    let departure: Value = serde_json::from_str(&room_change(name, HALL, "")).unwrap();
    let mut arrivals = 0;
    let mut inside = false;
    for _ in 0..10_000 {
        let got = c
            .next()
            .await
            .unwrap_or_else(|| panic!("{}: closed", c.name));
        if got == said && inside {
            return arrivals - 1;
        } else if got == arrival && !inside {
            inside = true;
            arrivals += 1;
        } else if got == departure && inside {
            inside = false;
        } else {
            panic!("{}: unexpected {got} (waiting for {said})", c.name);
        }
    }
    panic!("{}: never got {said}", c.name);
}

/// A QUIC client of its own (its own UDP socket), with `transport` if given.
struct Hostile {
    /// The socket the connection lives on.
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
}

fn clientendpoint(transport: Option<quinn::TransportConfig>) -> quinn::Endpoint {
    let crypto = chatmesh::tls::chat_client_config(&certs().join("ca.pem")).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    if let Some(transport) = transport {
        config.transport_config(Arc::new(transport));
    }
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

impl Hostile {
    async fn connect(addr: SocketAddr) -> Hostile {
        Hostile::connect_with(addr, None).await
    }

    async fn connect_with(addr: SocketAddr, transport: Option<quinn::TransportConfig>) -> Hostile {
        let endpoint = clientendpoint(transport);
        let connection =
            tokio::time::timeout(DEADLINE, endpoint.connect(addr, "localhost").unwrap())
                .await
                .expect("handshake in time")
                .expect("handshake");
        Hostile {
            endpoint,
            connection,
        }
    }

    /// Opens the session stream and identifies as `name`, reading the
    /// approval and its own arrival; the bystanders see it arrive.
    async fn login(&self, name: &str, tcp: &mut Raw, quic: &mut Raw) -> Stream {
        let (send, recv) = self.connection.open_bi().await.expect("a stream");
        let mut stream = Stream::new(send, recv, name);
        stream
            .send(&format!(r#"{{"type":"newidentity","identity":"{name}"}}"#))
            .await;
        stream
            .expect(r#"{"type":"newidentity","approved":"true"}"#)
            .await;
        let arrival = room_change(name, "", HALL);
        stream.expect(&arrival).await;
        both_expect(tcp, quic, &arrival).await;
        stream
    }

    /// How the server closed the connection, within `within`.
    async fn closed_within(&self, within: Duration) -> quinn::ConnectionError {
        tokio::time::timeout(within, self.connection.closed())
            .await
            .expect("the server closes the connection in time")
    }
}

/// A hostile client's stream, read as lines.
struct Stream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// Bytes read and not yet returned as lines.
    buf: Vec<u8>,
    name: String,
}

/// What the server's side of a stream ended with.
#[derive(Debug)]
enum Ended {
    /// A clean FIN.
    Fin,
    /// A stream or connection error (shown in failure messages).
    Error(#[allow(dead_code)] String),
}

impl Stream {
    async fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes()).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.expect("send");
    }

    fn new(send: quinn::SendStream, recv: quinn::RecvStream, name: &str) -> Stream {
        Stream {
            send,
            recv,
            buf: Vec::new(),
            name: name.to_owned(),
        }
    }

    /// The next line, or how the stream ended (a partial last line is
    /// dropped: the server ends every line).
    async fn next(&mut self) -> Result<Value, Ended> {
        let start = Instant::now();
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                return Ok(serde_json::from_slice(&line)
                    .unwrap_or_else(|e| panic!("{}: a non-JSON line {line:?}: {e}", self.name)));
            }
            let left = DEADLINE.saturating_sub(start.elapsed());
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout(left, self.recv.read(&mut chunk))
                .await
                .unwrap_or_else(|_| panic!("{}: nothing from the server in time", self.name));
            match read {
                Ok(Some(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(None) => return Err(Ended::Fin),
                Err(e) => return Err(Ended::Error(e.to_string())),
            }
        }
    }

    async fn expect(&mut self, expected: &str) {
        let want: Value = serde_json::from_str(expected).unwrap();
        let got = self.next().await;
        assert_eq!(got.ok(), Some(want), "{}: expected {expected}", self.name);
    }
}

/// Case 1: a client that completes the QUIC handshake and then opens no
/// stream (or opens one it never writes to, which the server cannot see)
/// holds its slot only until the handshake timeout; a client that writes
/// half a line and stalls is told why and closed at the same timeout.
#[tokio::test]
async fn a_connection_that_opens_no_stream_is_closed_at_the_handshake_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(1500);
    let (node, mut tcp, mut quic) = start(Limits {
        handshake_timeout: TIMEOUT,
        ..Limits::default()
    })
    .await;
    let addr = node.client_addr();
    let slots = node.client_slots().clone();

    // No stream at all.
    let silent = Hostile::connect(addr).await;
    let connected = Instant::now();
    wait_for("the silent client's slot taken", || slots.in_use() == 3).await;
    // A stream opened but never written to.
    let mute = Hostile::connect(addr).await;
    let (_mute_send, _mute_recv) = mute.connection.open_bi().await.unwrap();
    wait_for("the mute client's slot taken", || slots.in_use() == 4).await;
    // Half a line, then nothing.
    let stalled = Hostile::connect(addr).await;
    let (send, recv) = stalled.connection.open_bi().await.unwrap();
    let mut half = Stream::new(send, recv, "stalled");
    half.send_raw(br#"{"type":"newidentity","iden"#).await;
    wait_for("the stalled client's slot taken", || slots.in_use() == 5).await;

    // The bystanders are served meanwhile.
    chat_around(&mut tcp, &mut quic, "during").await;

    for (what, hostile) in [("silent", &silent), ("mute", &mute)] {
        match hostile.closed_within(DEADLINE).await {
            quinn::ConnectionError::ApplicationClosed(_) => {}
            other => panic!("{what}: expected the server to close, got {other:?}"),
        }
    }
    assert!(
        connected.elapsed() >= TIMEOUT / 2,
        "closed after {:?}, long before the handshake timeout",
        connected.elapsed()
    );
    let reason = match half.next().await {
        Ok(got) if got["type"] == "error" => got["reason"].as_str().unwrap().to_owned(),
        other => panic!("stalled: expected an error, got {other:?}"),
    };
    assert!(reason.contains("no newidentity"), "{reason}");
    assert!(
        matches!(half.next().await, Err(Ended::Fin)),
        "stalled: the stream ends after the error"
    );
    stalled.closed_within(DEADLINE).await;
    finish(node, tcp, quic, "after").await;
}

/// Case 2: an identified client ends its stream in the middle of a line,
/// with a FIN or with a RESET. The half line is never relayed as a
/// message; the client leaves its room as on any disconnect and its name is
/// free again.
#[tokio::test]
async fn a_stream_finished_mid_line_ends_the_session_cleanly() {
    stream_ended_mid_line(false).await;
}

#[tokio::test]
async fn a_stream_reset_mid_line_ends_the_session_cleanly() {
    stream_ended_mid_line(true).await;
}

async fn stream_ended_mid_line(reset: bool) {
    let (node, mut tcp, mut quic) = start(Limits::default()).await;
    let addr = node.client_addr();
    let name = if reset { "Resetter" } else { "Finisher" };
    let hostile = Hostile::connect(addr).await;
    let mut stream = hostile.login(name, &mut tcp, &mut quic).await;
    stream
        .send_raw(br#"{"type":"message","content":"half a mess"#)
        .await;
    if reset {
        stream.send.reset(7u32.into()).unwrap();
    } else {
        stream.send.finish().unwrap();
    }
    // The others see it leave, and no message.
    both_expect(&mut tcp, &mut quic, &room_change(name, HALL, "")).await;
    if reset {
        // Nothing to answer: the server's side just ends.
        assert!(matches!(stream.next().await, Err(Ended::Fin)));
    } else {
        // A FIN makes the half line the last line (as on TCP): not JSON,
        // so an error, and then the end.
        let got = stream.next().await;
        assert!(
            matches!(&got, Ok(v) if v["type"] == "error"),
            "expected an error for the half line, got {got:?}"
        );
        assert!(matches!(stream.next().await, Err(Ended::Fin)));
    }
    hostile.closed_within(DEADLINE).await;
    finish_with_reclaims(node, tcp, quic, &[name]).await;
}

/// Case 3: a client that opens a second bidirectional stream, or a
/// unidirectional one, while its session runs. The server allows one and
/// none: neither opens, the session goes on on its one stream, and a second
/// stream opened once the session is over starts no second session.
#[tokio::test]
async fn extra_streams_start_no_second_session() {
    let (node, mut tcp, mut quic) = start(Limits::default()).await;
    let addr = node.client_addr();
    let hostile = Hostile::connect(addr).await;
    let mut stream = hostile.login("Greedy", &mut tcp, &mut quic).await;

    // Waiting for stream credit the server never gives while the session
    // runs. (A fixed wait: there is no event to wait for when nothing
    // happens.)
    let no_uni =
        tokio::time::timeout(Duration::from_millis(500), hostile.connection.open_uni()).await;
    assert!(
        no_uni.is_err(),
        "a unidirectional stream opened: {no_uni:?}"
    );
    let second = tokio::spawn({
        let connection = hostile.connection.clone();
        async move { connection.open_bi().await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "a second bidirectional stream opened"
    );

    // The session goes on, on its stream.
    stream
        .send(r#"{"type":"message","content":"still one session"}"#)
        .await;
    both_expect(
        &mut tcp,
        &mut quic,
        r#"{"type":"message","identity":"Greedy","content":"still one session"}"#,
    )
    .await;
    tcp.send(r#"{"type":"message","content":"hello Greedy"}"#)
        .await;
    let said = format!(r#"{{"type":"message","identity":"{TCP_NAME}","content":"hello Greedy"}}"#);
    stream.expect(&said).await;
    quic.expect(&said).await;
    assert_eq!(node.chat().counts().sessions, 3);
    assert_eq!(node.client_slots().in_use(), 3);

    // It quits; the stream credit it frees may let the second stream open
    // now. Whatever is sent on it is never read as a new session.
    stream.send(r#"{"type":"quit"}"#).await;
    stream.expect(&room_change("Greedy", HALL, "")).await;
    assert!(matches!(stream.next().await, Err(Ended::Fin)));
    both_expect(&mut tcp, &mut quic, &room_change("Greedy", HALL, "")).await;
    let second = tokio::time::timeout(DEADLINE, second)
        .await
        .expect("the second open ends one way or the other")
        .unwrap();
    if let Ok((send, recv)) = second {
        let mut sneaky = Stream::new(send, recv, "Sneaky");
        let _ = sneaky
            .send
            .write_all(b"{\"type\":\"newidentity\",\"identity\":\"Sneaky\"}\n")
            .await;
        let got = sneaky.next().await;
        assert!(got.is_err(), "a second session answered: {got:?}");
    }
    hostile.closed_within(DEADLINE).await;
    // Sneaky never arrived (finish proves nothing else reached the
    // bystanders) and is free.
    finish_with_reclaims(node, tcp, quic, &["Greedy", "Sneaky"]).await;
}

/// Reclaims each name over QUIC (each must be free at once), then [`finish`].
async fn finish_with_reclaims(node: Node, mut tcp: Raw, mut quic: Raw, names: &[&str]) {
    let addr = node.client_addr();
    for name in names {
        let visits = reclaim(Via::Quic, addr, name, DEADLINE, &mut tcp, &mut quic).await;
        assert_eq!(visits, 0, "{name}");
    }
    finish(node, tcp, quic, "after").await;
}

/// Case 4: a client that stops the server's sending side (STOP_SENDING)
/// while the others talk in its room: the next write to it fails, its
/// session ends, and its name is free. Also before its approval: the reply
/// cannot be written, and the name it claimed is freed all the same.
#[tokio::test]
async fn stop_sending_ends_the_session_and_frees_the_name() {
    let (node, mut tcp, mut quic) = start(Limits::default()).await;
    let addr = node.client_addr();
    let hostile = Hostile::connect(addr).await;
    let mut stream = hostile.login("Stopper", &mut tcp, &mut quic).await;
    stream.recv.stop(5u32.into()).unwrap();

    // The others talk until the server finds the stopped stream.
    let departure: Value = serde_json::from_str(&room_change("Stopper", HALL, "")).unwrap();
    let mut left = false;
    for i in 0..200 {
        if left {
            break;
        }
        tcp.send(&format!(r#"{{"type":"message","content":"m{i}"}}"#))
            .await;
        let said: Value = serde_json::from_str(&format!(
            r#"{{"type":"message","identity":"{TCP_NAME}","content":"m{i}"}}"#
        ))
        .unwrap();
        loop {
            let got = quic.next().await.expect("Quinn stays connected");
            if got == said {
                break;
            }
            assert_eq!(got, departure, "Quinn: unexpected line");
            left = true;
        }
    }
    assert!(left, "the stopped client never left");
    tcp.expect(&room_change("Stopper", HALL, "")).await;
    // Output for it could not be written: the server closes the connection.
    match hostile.closed_within(DEADLINE).await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, QUIC_DROPPED, "{close:?}")
        }
        other => panic!("expected the server to close, got {other:?}"),
    }
    drop(stream);

    // Before its approval: newidentity, then STOP_SENDING at once.
    let early = Hostile::connect(addr).await;
    let (mut send, mut recv) = early.connection.open_bi().await.unwrap();
    send.write_all(b"{\"type\":\"newidentity\",\"identity\":\"Early\"}\n")
        .await
        .unwrap();
    recv.stop(5u32.into()).unwrap();
    // Its sending side is intact, so the server reads the line and lets it
    // in; its reply cannot be written, so the session ends, the connection
    // is closed, and Early leaves and is free again.
    match early.closed_within(DEADLINE).await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, QUIC_DROPPED, "{close:?}")
        }
        other => panic!("expected the server to close, got {other:?}"),
    }
    let visits = reclaim(Via::Quic, addr, "Early", DEADLINE, &mut tcp, &mut quic).await;
    assert_eq!(visits, 1, "Early was let in, then left");
    finish_with_reclaims(node, tcp, quic, &["Stopper"]).await;
}

/// Case 5: a QUIC client that stops reading while its room floods. QUIC
/// flow control stops the server's writes to it, its outbox fills, and it
/// is dropped as too slow (as a TCP slow reader is): its connection closed
/// with [`QUIC_DROPPED`], its slot and name free, the room unharmed. Once
/// with an 8 KiB stream window, once with quinn's default (1.25 MB more to
/// fill before the outbox does).
#[tokio::test]
async fn a_quic_client_that_never_reads_is_dropped_and_the_room_goes_on() {
    let (node, mut tcp, mut quic) = start(Limits {
        outbox_bytes: 64 * 1024,
        ..Limits::default()
    })
    .await;
    let addr = node.client_addr();
    let mut small = quinn::TransportConfig::default();
    small.stream_receive_window(quinn::VarInt::from_u32(8 * 1024));
    small.receive_window(quinn::VarInt::from_u32(16 * 1024));
    let mut hostiles = Vec::new();
    for (name, transport) in [("Deaf", Some(small)), ("Deafer", None)] {
        let hostile = Hostile::connect_with(addr, transport).await;
        // Identifies, takes its approval and arrival, then never reads again.
        let stream = hostile.login(name, &mut tcp, &mut quic).await;
        hostiles.push((hostile, stream));
    }
    // Tessa talks until both are dropped, while Quinn reads every line.
    let sent = talk_until_slow_readers_leave(&mut tcp, &mut quic, 2).await;
    println!("2 QUIC clients that never read dropped after {sent} messages of 4 KB");
    for (hostile, stream) in &hostiles {
        match hostile.closed_within(DEADLINE).await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, QUIC_DROPPED, "{}: {close:?}", stream.name)
            }
            other => panic!("{}: expected a close, got {other:?}", stream.name),
        }
    }
    let slots = node.client_slots().clone();
    wait_for("the dropped clients' slots free", || slots.in_use() == 2).await;
    // Tessa, who did not read while talking, sees both leave.
    let mut left = Vec::new();
    for _ in 0..2 {
        let got = tcp.next().await.expect("Tessa connected");
        assert_eq!(
            (got["type"].as_str(), got["roomid"].as_str()),
            (Some("roomchange"), Some("")),
            "{got}"
        );
        left.push(got["identity"].as_str().unwrap().to_owned());
    }
    left.sort();
    assert_eq!(left, ["Deaf", "Deafer"]);
    drop(hostiles);
    finish_with_reclaims(node, tcp, quic, &["Deaf", "Deafer"]).await;
}

/// Case 6: a client that sends `newidentity` and is gone before the reply:
/// closing its connection with an application error code (at a few delays
/// after the line, so that the server reads it or not, claims the name or
/// is still claiming it), or dropping its endpoint and connection (quinn's
/// implicit close). However far the server got, the name is free again.
#[tokio::test]
async fn a_client_gone_right_after_newidentity_leaves_its_name_free() {
    let (node, mut tcp, mut quic) = start(Limits::default()).await;
    let addr = node.client_addr();
    let mut visits = 0;
    // Fixed delays, not a search: each run tries the same spread.
    for (attempt, delay_us) in [0u64, 0, 100, 300, 1000, 3000, 10_000]
        .into_iter()
        .enumerate()
    {
        let hostile = Hostile::connect(addr).await;
        let (mut send, recv) = hostile.connection.open_bi().await.unwrap();
        send.write_all(b"{\"type\":\"newidentity\",\"identity\":\"Ghost\"}\n")
            .await
            .unwrap();
        if delay_us > 0 {
            tokio::time::sleep(Duration::from_micros(delay_us)).await;
        }
        if attempt % 2 == 0 {
            hostile.connection.close(42u32.into(), b"gone");
        } else {
            drop(send);
            drop(recv);
            drop(hostile);
        }
        let via = if attempt % 2 == 0 {
            Via::Tcp
        } else {
            Via::Quic
        };
        visits += reclaim(via, addr, "Ghost", DEADLINE, &mut tcp, &mut quic).await;
    }
    println!("the server had let Ghost in before it vanished {visits} of 7 times");
    finish(node, tcp, quic, "after").await;
}

/// Case 6, the silent way: a client that sends `newidentity` and, once the
/// server has let it in, vanishes without reading the reply or closing
/// anything (its process, here its runtime, gone): the server learns of it
/// only from its QUIC idle timeout (30 s; the client asked for none, so the
/// server's own is in force), and then it leaves its room and its name is
/// free again.
#[tokio::test]
async fn a_client_that_vanishes_after_newidentity_is_freed_at_the_idle_timeout() {
    const IDLE: Duration = Duration::from_secs(30);
    let (node, mut tcp, mut quic) = start(Limits::default()).await;
    let addr = node.client_addr();
    let (vanish, vanish_now) = tokio::sync::oneshot::channel::<()>();
    // On a thread and runtime of its own (the node runs on this test's
    // thread), so that it can stop dead.
    let client = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let held = runtime.block_on(async move {
            // It asks for no idle timeout at all, so the server's own one
            // is the one in force.
            let mut forever = quinn::TransportConfig::default();
            forever.max_idle_timeout(None);
            let hostile = Hostile::connect_with(addr, Some(forever)).await;
            let (mut send, recv) = hostile.connection.open_bi().await.unwrap();
            send.write_all(b"{\"type\":\"newidentity\",\"identity\":\"Vanisher\"}\n")
                .await
                .unwrap();
            let _ = vanish_now.await;
            (hostile, send, recv)
        });
        // The drivers stop without sending anything more: no close, no ack.
        runtime.shutdown_background();
        drop(held);
    });
    both_expect(&mut tcp, &mut quic, &room_change("Vanisher", "", HALL)).await;
    vanish.send(()).unwrap();
    let vanished = Instant::now();
    client.await.unwrap();
    // Meanwhile the others are served; Quinn asks for the room list every
    // few seconds, as a real client's keep-alive would (it would time out
    // itself else), and so sees Vanisher leave.
    let departure: Value = serde_json::from_str(&room_change("Vanisher", HALL, "")).unwrap();
    let mut left = None;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        quic.send(r#"{"type":"list"}"#).await;
        loop {
            let got = quic.next().await.expect("Quinn connected");
            if got["type"] == "roomlist" {
                break;
            }
            assert_eq!(got, departure, "Quinn: unexpected line");
            left = Some(vanished.elapsed());
        }
        if left.is_some() {
            break;
        }
    }
    let took = left.expect("Vanisher never left");
    println!("Vanisher left {took:?} after it vanished");
    assert!(
        took >= IDLE - Duration::from_secs(2),
        "left after {took:?}: not by the idle timeout?"
    );
    tcp.expect(&room_change("Vanisher", HALL, "")).await;
    finish_with_reclaims(node, tcp, quic, &["Vanisher"]).await;
}

/// Case 7: twenty QUIC clients at once at a server that takes 5 clients,
/// 2 of them taken: exactly 3 are served, 17 refused with the reason, and
/// once the 3 are gone their slots are taken again (and the limit still
/// holds).
#[tokio::test]
async fn a_crowd_of_quic_clients_over_max_clients_is_refused_and_slots_come_back() {
    const CROWD: usize = 20;
    let (node, mut tcp, mut quic) = start(Limits {
        max_clients: Some(5),
        ..Limits::default()
    })
    .await;
    let addr = node.client_addr();
    let endpoint = clientendpoint(None);
    let mut tries = tokio::task::JoinSet::new();
    for i in 0..CROWD {
        let endpoint = endpoint.clone();
        tries.spawn(async move { try_identify(&endpoint, addr, &format!("Crowd{i}")).await });
    }
    let mut served = Vec::new();
    let mut refused = 0;
    while let Some(outcome) = tries.join_next().await {
        match outcome.expect("no panic in a client") {
            Attempt::Served(connection, stream) => served.push((connection, stream)),
            Attempt::Refused(close) => {
                assert_eq!(close.error_code, QUIC_SERVER_FULL, "{close:?}");
                let reason = String::from_utf8_lossy(&close.reason);
                assert!(reason.contains("max_clients (5)"), "{reason}");
                refused += 1;
            }
        }
    }
    assert_eq!((served.len(), refused), (3, CROWD - 3));
    let mut names: Vec<String> = served.iter().map(|(_, s)| s.name.clone()).collect();
    names.sort();
    // The bystanders see the three arrive, in any order.
    for bystander in [&mut tcp, &mut quic] {
        let mut arrived = Vec::new();
        for _ in 0..3 {
            let got = bystander.next().await.expect("connected");
            assert_eq!(
                (got["former"].as_str(), got["roomid"].as_str()),
                (Some(""), Some(HALL)),
                "{got}"
            );
            arrived.push(got["identity"].as_str().unwrap().to_owned());
        }
        arrived.sort();
        assert_eq!(arrived, names);
    }
    chat_around(&mut tcp, &mut quic, "full").await;

    // The three go abruptly; their slots and names come back.
    for (connection, _) in &served {
        connection.close(9u32.into(), b"bye");
    }
    for bystander in [&mut tcp, &mut quic] {
        let mut left = Vec::new();
        for _ in 0..3 {
            let got = bystander.next().await.expect("connected");
            assert_eq!(
                (got["former"].as_str(), got["roomid"].as_str()),
                (Some(HALL), Some("")),
                "{got}"
            );
            left.push(got["identity"].as_str().unwrap().to_owned());
        }
        left.sort();
        assert_eq!(left, names);
    }
    let slots = node.client_slots().clone();
    wait_for("the crowd's slots free", || slots.in_use() == 2).await;
    drop(served);
    // The same three names, over QUIC: served at once; a fourth refused.
    let mut again = Vec::new();
    for name in &names {
        let c = Raw::join(Via::Quic, addr, name, HALL).await;
        both_expect(&mut tcp, &mut quic, &room_change(name, "", HALL)).await;
        again.push(c);
    }
    match try_identify(&endpoint, addr, "Late").await {
        Attempt::Refused(close) => assert_eq!(close.error_code, QUIC_SERVER_FULL),
        Attempt::Served(..) => panic!("a sixth client served at max_clients 5"),
    }
    for mut c in again {
        c.send(r#"{"type":"quit"}"#).await;
        let name = c.name.clone();
        // Before its own departure, the arrivals and departures of the others.
        let own: Value = serde_json::from_str(&room_change(&name, HALL, "")).unwrap();
        for _ in 0..10 {
            let got = c.next().await.expect("open until its quit is answered");
            if got == own {
                break;
            }
            assert_eq!(got["type"], "roomchange", "{name}: {got}");
        }
        c.expect_closed().await;
        both_expect(&mut tcp, &mut quic, &room_change(&name, HALL, "")).await;
    }
    finish(node, tcp, quic, "after").await;
}

/// How one client of a crowd fared.
enum Attempt {
    /// Identified: its connection and stream, approval and arrival read.
    Served(quinn::Connection, Stream),
    /// Closed by the server.
    Refused(quinn::ApplicationClose),
}

/// Connects on `endpoint` and identifies as `name`.
async fn try_identify(endpoint: &quinn::Endpoint, addr: SocketAddr, name: &str) -> Attempt {
    let refused = |e: quinn::ConnectionError| match e {
        quinn::ConnectionError::ApplicationClosed(close) => Attempt::Refused(close),
        other => panic!("{name}: expected served or refused, got {other:?}"),
    };
    let connecting = endpoint.connect(addr, "localhost").unwrap();
    let connection = match tokio::time::timeout(DEADLINE, connecting)
        .await
        .expect("handshake in time")
    {
        Ok(connection) => connection,
        Err(e) => return refused(e),
    };
    let (send, recv) = match connection.open_bi().await {
        Ok(pair) => pair,
        Err(e) => return refused(e),
    };
    let mut stream = Stream::new(send, recv, name);
    let hello = format!("{{\"type\":\"newidentity\",\"identity\":\"{name}\"}}\n");
    if stream.send.write_all(hello.as_bytes()).await.is_err() {
        return refused(connection.closed().await);
    }
    match stream.next().await {
        Ok(got) => {
            assert_eq!(got["approved"], "true", "{name}: {got}");
            stream.expect(&room_change(name, "", HALL)).await;
            Attempt::Served(connection, stream)
        }
        Err(_) => refused(
            tokio::time::timeout(DEADLINE, connection.closed())
                .await
                .unwrap(),
        ),
    }
}

/// Sends the first datagram of a QUIC handshake (a client Initial) to
/// `addr` from a fresh UDP socket and nothing after it: a client that never
/// finishes its handshake, or one whose source address is forged (it never
/// gets the server's answer). Returns the socket and the first datagram the
/// server answered with (within [`DEADLINE`]).
async fn bare_initial(addr: SocketAddr) -> (tokio::net::UdpSocket, Vec<u8>) {
    let crypto = chatmesh::tls::chat_client_config(&certs().join("ca.pem")).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn::EndpointConfig::default()),
        None,
        false,
        Some([7; 32]),
    );
    let now = std::time::Instant::now();
    let (_, mut connection) = endpoint.connect(now, config, addr, "localhost").unwrap();
    let mut initial = Vec::new();
    let transmit = connection
        .poll_transmit(now, 1, &mut initial)
        .expect("a client Initial to send");
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(&initial[..transmit.size], addr)
        .await
        .unwrap();
    let mut answer = vec![0u8; 65536];
    let (got, from) = tokio::time::timeout(DEADLINE, socket.recv_from(&mut answer))
        .await
        .expect("the server answers the Initial")
        .unwrap();
    assert_eq!(from, addr);
    answer.truncate(got);
    (socket, answer)
}

/// Case 8: a QUIC Initial whose sender never goes on (a client that stalls
/// its handshake, or anyone forging the source address of a single UDP
/// datagram) takes no client slot: the slots are shared with TCP, so
/// `max_clients` such datagrams every handshake timeout would otherwise keep
/// every new client out. The server answers with a Retry, and a client
/// that gets it (quinn does this itself) is served as usual.
#[tokio::test]
async fn a_handshake_that_never_finishes_takes_no_client_slot() {
    let (node, mut tcp, mut quic) = start(Limits {
        max_clients: Some(3),
        ..Limits::default()
    })
    .await;
    let addr = node.client_addr();
    let slots = node.client_slots().clone();
    let mut stalled = Vec::new();
    for _ in 0..5 {
        stalled.push(bare_initial(addr).await);
    }
    // The server has answered each: whatever it holds for them, it holds now.
    assert_eq!(slots.in_use(), 2, "half-open handshakes hold client slots");
    for (_, answer) in &stalled {
        // A long-header packet of type Retry (RFC 9000, 17.2.5; the fixed
        // bit, 0x40, may be greased).
        assert_eq!(answer[0] & 0xb0, 0xb0, "not a Retry: {:02x?}", &answer[..8]);
    }
    // The third slot is free for a real client, over TCP or over QUIC.
    for via in [Via::Tcp, Via::Quic] {
        let mut c = Raw::join(via, addr, "Newcomer", HALL).await;
        both_expect(&mut tcp, &mut quic, &room_change("Newcomer", "", HALL)).await;
        c.send(r#"{"type":"quit"}"#).await;
        c.expect(&room_change("Newcomer", HALL, "")).await;
        both_expect(&mut tcp, &mut quic, &room_change("Newcomer", HALL, "")).await;
        drop(c);
        wait_for("Newcomer's slot free", || slots.in_use() == 2).await;
    }
    drop(stalled);
    finish(node, tcp, quic, "after").await;
}

/// Case 9: a client that changes its address in the middle of its session
/// (QUIC connection migration: a new UDP socket, as a phone moving from
/// Wi-Fi to mobile data). The session goes on over the new path, in both
/// directions, on its one slot; then it quits and its name is free.
#[tokio::test]
async fn a_client_that_migrates_keeps_its_session_and_one_slot() {
    let (node, mut tcp, mut quic) = start(Limits::default()).await;
    let addr = node.client_addr();
    let hostile = Hostile::connect(addr).await;
    let mut stream = hostile.login("Roamer", &mut tcp, &mut quic).await;
    let before = hostile.endpoint.local_addr().unwrap();
    hostile
        .endpoint
        .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    assert_ne!(hostile.endpoint.local_addr().unwrap(), before);
    stream
        .send(r#"{"type":"message","content":"from my new address"}"#)
        .await;
    both_expect(
        &mut tcp,
        &mut quic,
        r#"{"type":"message","identity":"Roamer","content":"from my new address"}"#,
    )
    .await;
    quic.send(r#"{"type":"message","content":"heard you"}"#)
        .await;
    let said = format!(r#"{{"type":"message","identity":"{QUIC_NAME}","content":"heard you"}}"#);
    stream.expect(&said).await;
    tcp.expect(&said).await;
    assert_eq!(node.client_slots().in_use(), 3);
    assert_eq!(node.chat().counts().sessions, 3);
    stream.send(r#"{"type":"quit"}"#).await;
    stream.expect(&room_change("Roamer", HALL, "")).await;
    assert!(matches!(stream.next().await, Err(Ended::Fin)));
    both_expect(&mut tcp, &mut quic, &room_change("Roamer", HALL, "")).await;
    drop(stream);
    drop(hostile);
    finish_with_reclaims(node, tcp, quic, &["Roamer"]).await;
}
