//! Bad input loses nothing: error replies, size and time limits, mass connects
//! and drops, and slow readers, while the other clients keep being served.

mod common;

use std::time::Duration;

use chatmesh::config::Limits;
use common::process::{single_node_config, spawn_node};
use common::{
    DEADLINE, Raw, Via, expect_slow_readers_reset_and_freed, expect_the_room_goes_on,
    kernel_socket, room_change, start_node, start_node_with, talk_until_slow_readers_leave,
    talk_until_slow_readers_leave_watching, tcp_state, wait_for, wait_for_within,
};

const HALL: &str = "MainHall-s1";

#[tokio::test]
async fn garbage_unknown_type_and_missing_fields_get_errors_and_keep_the_session() {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut adel = Raw::join(Via::Tcp, addr, "Adel", HALL).await;
    let mut bob = Raw::join(Via::Tcp, addr, "Bob", HALL).await;
    adel.expect(&room_change("Bob", "", HALL)).await;

    let cases = [
        ("not json at all", "not a JSON object"),
        ("{\"type\":", "not a JSON object"),
        ("[1,2,3]", "invalid type"),
        (r#"{"type":"dance"}"#, "unknown type"),
        (r#"{"roomid":"jokes"}"#, "missing field `type`"),
        (r#"{"type":"joinroom"}"#, "missing field `roomid`"),
        (r#"{"type":"message","content":42}"#, "invalid type"),
        (r#"{"type":"createroom","roomid":null}"#, "invalid type"),
    ];
    for (line, reason) in cases {
        bob.send(line).await;
        let got = bob.expect_error().await;
        assert!(
            got.contains(reason),
            "{line:?}: reason {got:?} should mention {reason:?}"
        );
    }
    // Invalid UTF-8 is not JSON either.
    bob.send_raw(b"\xff\xfe{\"type\":\"list\"}\n").await;
    bob.expect_error().await;

    // Bob's session is intact and so is everyone else's.
    bob.send(r#"{"type":"message","content":"still here"}"#)
        .await;
    adel.expect(r#"{"type":"message","identity":"Bob","content":"still here"}"#)
        .await;
    bob.expect_nothing_more().await;
    node.stop().await;
}

#[tokio::test]
async fn an_oversize_line_closes_only_that_connection() {
    let node = start_node_with(Limits {
        max_line_bytes: 1024,
        ..Limits::default()
    })
    .await;
    let addr = node.client_addr();
    let mut adel = Raw::join(Via::Tcp, addr, "Adel", HALL).await;
    let mut bob = Raw::join(Via::Tcp, addr, "Bob", HALL).await;
    adel.expect(&room_change("Bob", "", HALL)).await;

    // Well over the limit, and no newline: the server must not wait for one.
    bob.send_raw(&vec![b'x'; 64 * 1024]).await;
    let reason = bob.expect_error().await;
    assert!(reason.contains("longer than 1024"), "{reason}");
    bob.expect_closed().await;
    adel.expect(&room_change("Bob", HALL, "")).await;

    // A line just under the limit is fine.
    let content = "y".repeat(900);
    adel.send(&format!(r#"{{"type":"message","content":"{content}"}}"#))
        .await;
    adel.expect_nothing_more().await;
    node.stop().await;
}

#[tokio::test]
async fn no_handshake_times_out_with_an_error() {
    let node = start_node_with(Limits {
        handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let addr = node.client_addr();
    let mut silent = Raw::connect(Via::Tcp, addr, "silent").await;
    let reason = silent.expect_error().await;
    assert!(reason.contains("within 300 ms"), "{reason}");
    silent.expect_closed().await;
    // A QUIC stream is invisible to the server until the client writes on it,
    // so there is nothing to answer on: the connection is just closed.
    let mut silent = Raw::connect(Via::Quic, addr, "silent").await;
    silent.expect_closed().await;
    // Errors do not extend the deadline: a client that only sends junk is closed too.
    let mut junk = Raw::connect(Via::Tcp, addr, "junk").await;
    junk.send(r#"{"type":"list"}"#).await;
    junk.expect_error().await;
    junk.expect_error().await;
    junk.expect_closed().await;
    // Identified clients are not subject to it.
    let mut adel = Raw::join(Via::Tcp, addr, "Adel", HALL).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // longer than the handshake timeout, on purpose
    adel.expect_nothing_more().await;
    node.stop().await;
}

#[tokio::test]
async fn two_hundred_clients_connecting_and_dropping_at_once() {
    let node = start_node().await;
    let addr = node.client_addr();
    let mut adel = Raw::join(Via::Tcp, addr, "Adel", HALL).await;

    let mut tasks = Vec::new();
    for i in 0..200 {
        tasks.push(tokio::spawn(async move {
            let name = format!("User{i}");
            let via = if i % 4 == 0 { Via::Quic } else { Via::Tcp };
            let mut c = Raw::connect(via, addr, &name).await;
            match i % 3 {
                // Identify and vanish.
                0 => {
                    c.send(&format!(r#"{{"type":"newidentity","identity":"{name}"}}"#))
                        .await;
                    c.expect(r#"{"type":"newidentity","approved":"true"}"#)
                        .await;
                }
                // Send half a line and vanish.
                1 => c.send_raw(b"{\"type\":\"newident").await,
                // Connect and vanish.
                _ => {}
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    // Every identified one arrived and left; drain Adel's view of it.
    let chat = node.chat().clone();
    wait_for("every dropped client to be gone", || {
        chat.counts().sessions == 1
    })
    .await;
    let mut arrivals = 0;
    let mut departures = 0;
    while arrivals < 67 || departures < 67 {
        let line = adel.next().await.expect("Adel is still connected");
        assert_eq!(line["type"], "roomchange", "{line}");
        if line["former"] == "" {
            arrivals += 1;
        } else {
            assert_eq!(line["roomid"], "", "{line}");
            departures += 1;
        }
    }
    assert_eq!((arrivals, departures), (67, 67));
    adel.expect_nothing_more().await;
    // And the server still takes new clients.
    let _late = Raw::join(Via::Quic, addr, "Late", HALL).await;
    adel.expect(&room_change("Late", "", HALL)).await;
    node.stop().await;
}

#[tokio::test]
async fn a_slow_reader_is_dropped_and_does_not_stall_the_room() {
    let node = start_node_with(Limits {
        outbox_bytes: 64 * 1024,
        ..Limits::default()
    })
    .await;
    let addr = node.client_addr();
    let mut talker = Raw::join(Via::Tcp, addr, "Talker", HALL).await;
    let mut listener = Raw::join(Via::Tcp, addr, "Listener", HALL).await;
    talker.expect(&room_change("Listener", "", HALL)).await;
    // The slow one identifies, then never reads again.
    let slow = Raw::join(Via::Tcp, addr, "Slow", HALL).await;
    talker.expect(&room_change("Slow", "", HALL)).await;
    listener.expect(&room_change("Slow", "", HALL)).await;

    // Far more than the outbox plus the kernel's socket buffers can hold.
    let content = "z".repeat(4000);
    let line = format!(r#"{{"type":"message","content":"{content}"}}"#);
    let total = 4000;
    // The talker keeps at most WINDOW messages in flight to the listener (a
    // reader that keeps up), while the slow one falls ever further behind.
    const WINDOW: usize = 8;
    let window = std::sync::Arc::new(tokio::sync::Semaphore::new(WINDOW));
    let credit = window.clone();
    let reader = tokio::spawn(async move {
        let mut got = 0;
        let mut slow_left = false;
        while got < total || !slow_left {
            let msg = listener.next().await.expect("listener stays connected");
            match msg["type"].as_str() {
                Some("message") => {
                    got += 1;
                    credit.add_permits(1);
                }
                Some("roomchange") => {
                    assert_eq!(
                        msg,
                        serde_json::from_str::<serde_json::Value>(&room_change("Slow", HALL, ""))
                            .unwrap()
                    );
                    slow_left = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        got
    });
    for _ in 0..total {
        window.acquire().await.expect("window open").forget();
        talker.send(&line).await;
    }
    let got = tokio::time::timeout(DEADLINE * 3, reader)
        .await
        .expect("the listener got everything in time")
        .expect("listener task");
    assert_eq!(got, total);
    let chat = node.chat().clone();
    wait_for("the slow session to be dropped", || {
        chat.counts().sessions == 2
    })
    .await;
    drop(slow);
    talker.expect(&room_change("Slow", HALL, "")).await;
    node.stop().await;
}

/// One write of many chat lines (an adversary's 6 MB burst once dropped
/// every member of the room): the readers, who read as fast as they can,
/// are not dropped; the sender is slowed to their pace instead.
#[tokio::test]
async fn a_burst_from_one_sender_does_not_drop_readers_that_keep_up() {
    let node = start_node_with(Limits {
        outbox_bytes: 64 * 1024,
        ..Limits::default()
    })
    .await;
    let addr = node.client_addr();
    let mut talker = Raw::join(Via::Tcp, addr, "Talker", HALL).await;
    let mut readers = Vec::new();
    for name in ["Reader1", "Reader2", "Reader3"] {
        let reader = Raw::join(Via::Tcp, addr, name, HALL).await;
        talker.expect(&room_change(name, "", HALL)).await;
        readers.push(reader);
    }
    // 400 lines of 4 KB, 25 times the outbox, in one write.
    const LINES: usize = 400;
    let line = format!(r#"{{"type":"message","content":"{}"}}"#, "z".repeat(4000)) + "\n";
    let reading: Vec<_> = readers
        .into_iter()
        .map(|mut reader| {
            tokio::spawn(async move {
                let mut got = 0;
                while got < LINES {
                    match reader.next().await {
                        Some(msg) if msg["type"] == "message" => got += 1,
                        Some(_) => {}
                        None => break,
                    }
                }
                (got, reader)
            })
        })
        .collect();
    talker.send_raw(line.repeat(LINES).as_bytes()).await;
    let mut still_here = Vec::new();
    for reading in reading {
        let (got, reader) = tokio::time::timeout(DEADLINE * 3, reading)
            .await
            .expect("every reader got the burst in time")
            .expect("reader task");
        assert_eq!(
            got, LINES,
            "a reader was dropped after {got} of {LINES} lines"
        );
        still_here.push(reader);
    }
    // Nobody left: the server dropped no one.
    assert_eq!(node.chat().counts().sessions, 4);
    node.stop().await;
}

/// Many clients that never read are dropped once all the server's outboxes
/// together hold `outbox_total_bytes`, long before each fills its own
/// outbox; a reader that keeps up stays, and the budget gets back every byte.
#[tokio::test]
async fn many_clients_that_never_read_are_dropped_at_the_servers_outbox_budget() {
    const SLOW: usize = 100;
    // Once their kernel buffers are full, the 100 slow readers spend the
    // 512 KiB budget in about 50 messages of 4 KB each (a message is one
    // buffer their queues share, counted once, plus a slot in each queue),
    // and would fill their own 2 MiB outboxes in about 500: each is dropped
    // at its first message after its output has waited a second with no
    // write finished.
    let limits = Limits {
        outbox_bytes: 2 << 20,
        outbox_total_bytes: 512 << 10,
        send_buffer_bytes: 4096,
        ..Limits::default()
    };
    let SlowRoom {
        node,
        mut talker,
        mut listener,
        slow,
    } = slow_room(limits, SLOW).await;
    let chat = node.chat().clone();
    let budget = chat.outbox_budget();
    // The talker talks until all are dropped; the listener keeps up.
    // The message is in every outbox by the time the listener has it.
    let mut peak = 0;
    let sent = talk_until_slow_readers_leave_watching(&mut talker, &mut listener, SLOW, || {
        peak = peak.max(budget.used());
    })
    .await;
    println!(
        "{SLOW} slow readers dropped after {sent} messages of 4 KB, {} of them for the budget; \
         at most {peak} bytes queued",
        budget.drops()
    );
    // Without the budget none would be dropped for it (each would go at
    // its own limit, after 250 times the output).
    assert!(
        budget.drops() >= SLOW / 2,
        "{} dropped for the budget",
        budget.drops()
    );
    assert_eq!(chat.counts().sessions, 2);
    let leavers: Vec<String> = (0..SLOW).map(|i| format!("Slow{i}")).collect();
    expect_the_room_goes_on(&mut talker, &mut listener, HALL, &leavers).await;
    // Everything queued was written or discarded: nothing is still charged.
    wait_for("the outbox budget to be all free", || budget.used() == 0).await;
    drop(slow);
    node.stop().await;
}

#[tokio::test]
async fn clients_that_never_read_are_reset_at_their_drop_and_the_room_goes_on() {
    const SLOW: usize = 10;
    let limits = Limits {
        outbox_bytes: 64 * 1024,
        ..Limits::default()
    };
    let SlowRoom {
        node,
        mut talker,
        mut listener,
        slow,
    } = slow_room(limits, SLOW).await;
    let addr = node.client_addr();
    let slow: Vec<_> = slow
        .into_iter()
        .map(|stream| {
            let client_end = stream.local_addr().unwrap();
            (stream, client_end)
        })
        .collect();

    // The talker talks until all ten are dropped, while the listener keeps up.
    let chat = node.chat().clone();
    let sent = talk_until_slow_readers_leave(&mut talker, &mut listener, SLOW).await;
    let dropped_at = std::time::Instant::now();
    assert_eq!(chat.counts().sessions, 2);
    // Each connection reset, the server's end of it gone, within 10 s; and
    // their client slots free again.
    let ends: Vec<_> = slow.iter().map(|(stream, end)| (stream, *end)).collect();
    expect_slow_readers_reset_and_freed("slow reader", &node, addr, &ends, 2).await;
    println!(
        "{SLOW} slow readers dropped after {sent} messages of 4 KB; reset and freed within {:?}",
        dropped_at.elapsed()
    );
    // And the room goes on.
    let leavers: Vec<String> = (0..SLOW).map(|i| format!("Slow{i}")).collect();
    expect_the_room_goes_on(&mut talker, &mut listener, HALL, &leavers).await;
    listener.expect_nothing_more().await;
    node.stop().await;
}

/// A node, a talker and a listener in its main hall, and clients that
/// never read.
struct SlowRoom {
    node: chatmesh::Node,
    talker: Raw,
    listener: Raw,
    slow: Vec<tokio::net::TcpStream>,
}

/// A node with `limits`, a talker and a listener in its main hall, and
/// `count` clients (`Slow0`, `Slow1`, ...) that identify, take their
/// approval, are seen arriving by both, then never read again.
async fn slow_room(limits: Limits, count: usize) -> SlowRoom {
    let node = start_node_with(limits).await;
    let addr = node.client_addr();
    let mut talker = Raw::join(Via::Tcp, addr, "Talker", HALL).await;
    let mut listener = Raw::join(Via::Tcp, addr, "Listener", HALL).await;
    talker.expect(&room_change("Listener", "", HALL)).await;
    let mut slow = Vec::new();
    for i in 0..count {
        let name = format!("Slow{i}");
        let (stream, got) = identify_raw(addr, &name).await;
        assert!(
            got.starts_with(br#"{"type":"newidentity","approved":"true"}"#),
            "{}",
            String::from_utf8_lossy(&got)
        );
        talker.expect(&room_change(&name, "", HALL)).await;
        listener.expect(&room_change(&name, "", HALL)).await;
        slow.push(stream);
    }
    SlowRoom {
        node,
        talker,
        listener,
        slow,
    }
}

/// A plain TCP client that sends `newidentity` for `name` and reads the
/// first line back a byte at a time (nothing beyond it is taken from the
/// socket, so the server's later output stays unread); the stream and that
/// line.
async fn identify_raw(addr: std::net::SocketAddr, name: &str) -> (tokio::net::TcpStream, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let hello = format!("{{\"type\":\"newidentity\",\"identity\":\"{name}\"}}\n");
    stream.write_all(hello.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\n") {
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "open");
        got.push(byte[0]);
    }
    (stream, got)
}

/// A client `name` that identifies and never reads again, with output from
/// `talker` stuck in its connection (on the server's side of it).
async fn stuck_client(
    addr: std::net::SocketAddr,
    name: &str,
    talker: &mut Raw,
) -> tokio::net::TcpStream {
    let (stream, _approval) = identify_raw(addr, name).await;
    talker.expect(&room_change(name, "", HALL)).await;
    let client_end = stream.local_addr().unwrap();
    // Output piles up in the connection, well below the outbox limit.
    let line = format!(r#"{{"type":"message","content":"{}"}}"#, "q".repeat(4000));
    for _ in 0..100 {
        talker.send(&line).await;
    }
    // Every message handled (the answer to `who` comes after them) ...
    talker.expect_nothing_more().await;
    // ... and more of them written than the client's side takes.
    wait_for("output stuck in the connection", || {
        kernel_socket(addr, client_end).unwrap_or(0) > 0
    })
    .await;
    stream
}

/// A node whose grace for a closed connection's unread output (its
/// handshake timeout) is `grace`, a talker in the main hall, and a client
/// `name` stuck as [`stuck_client`] leaves it.
async fn node_with_a_stuck_client(
    grace: Duration,
    name: &str,
) -> (chatmesh::Node, Raw, tokio::net::TcpStream) {
    let node = start_node_with(Limits {
        handshake_timeout: grace,
        ..Limits::default()
    })
    .await;
    let addr = node.client_addr();
    let mut talker = Raw::join(Via::Tcp, addr, "Talker", HALL).await;
    let stuck = stuck_client(addr, name, &mut talker).await;
    (node, talker, stuck)
}

/// Waits until the stuck client `who`'s connection is reset (within `grace`
/// and 5 s), then until its slot is free (the talker's alone in use);
/// returns how long the reset took.
async fn expect_stuck_reset_and_freed(
    node: &chatmesh::Node,
    who: &str,
    stream: &tokio::net::TcpStream,
    grace: Duration,
) -> Duration {
    let since = std::time::Instant::now();
    wait_for_within(
        &format!("the {who}'s connection reset"),
        grace + Duration::from_secs(5),
        || tcp_state(stream) == 7,
    )
    .await;
    let took = since.elapsed();
    let slots = node.client_slots().clone();
    wait_for(&format!("the {who}'s slot to be free"), || {
        slots.in_use() == 1
    })
    .await;
    took
}

#[tokio::test]
async fn a_client_that_quits_and_never_reads_its_last_lines_is_reset() {
    let grace = Duration::from_millis(1000);
    let (node, mut talker, mut quitter) = node_with_a_stuck_client(grace, "Quitter").await;
    {
        use tokio::io::AsyncWriteExt;
        quitter.write_all(b"{\"type\":\"quit\"}\n").await.unwrap();
    }
    talker.expect(&room_change("Quitter", HALL, "")).await;
    let took = expect_stuck_reset_and_freed(&node, "quitter", &quitter, grace).await;
    println!("quit with 100 messages of 4 KB unread; reset after {took:?} (grace {grace:?})");
    assert!(took >= grace / 2, "reset before the grace");
    talker.expect_nothing_more().await;
    node.stop().await;
}

#[tokio::test]
async fn an_evicted_client_that_never_reads_is_reset() {
    let grace = Duration::from_millis(1000);
    let (node, mut talker, evicted) = node_with_a_stuck_client(grace, "Evicted").await;
    // As after a heal that found the name granted elsewhere too.
    node.chat().evict(&["Evicted".to_owned()], &[]);
    talker.expect(&room_change("Evicted", HALL, "")).await;
    let took = expect_stuck_reset_and_freed(&node, "evicted client", &evicted, grace).await;
    println!("evicted with 100 messages of 4 KB unread; reset after {took:?}");
    talker.expect_nothing_more().await;
    node.stop().await;
}

/// Sends one line to a fresh TCP connection of the node at `addr`.
fn send_line(addr: &str, line: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.write_all(format!("{line}\n").as_bytes()).expect("send");
    s
}

/// A client's identity is logged escaped: before, anyone could put terminal
/// escape sequences in the operator's log before login, and forge whole log
/// lines (a raw CR LF ends the real line). Found by the s12 hostile-client
/// review.
#[test]
fn client_text_is_logged_without_raw_control_characters() {
    let config = single_node_config("s12-log-escape");
    let (mut node, addr) = spawn_node(&config);
    let evil = r#"{"type":"newidentity","identity":"Ev\u001b[31mRED\u001b[0m\r\n2026-11-27T00:00:00.000000Z  INFO chatmesh::node: FORGED"}"#;
    let _s = send_line(&addr, evil);
    let line = node.wait_line("claim_denied");
    assert!(
        !line.contains('\u{1b}') && !line.contains('\r'),
        "raw control characters from a client in the log: {line:?}"
    );
    node.signal(libc::SIGTERM);
}

/// A logged-in client's refused `createroom` logs the room id cut short:
/// it logged the whole id, one log line of 60 KB per request with a 60 KB
/// id, and one connection grew the log by 126 MB a second (s12 hostile-client
/// review).
#[test]
fn a_refused_room_id_is_logged_bounded() {
    let config = single_node_config("s12-log-bound");
    let (mut node, addr) = spawn_node(&config);
    let long = "r".to_owned() + &"-".repeat(60_000);
    let mut s = send_line(&addr, r#"{"type":"newidentity","identity":"Logger"}"#);
    {
        use std::io::Write;
        let line = format!("{{\"type\":\"createroom\",\"roomid\":\"{long}\"}}\n");
        s.write_all(line.as_bytes()).expect("send");
    }
    let line = node.wait_line("claim_denied: room refused");
    assert!(
        line.len() < 4096,
        "one refused createroom wrote a log line of {} bytes",
        line.len()
    );
    // Repeated: the first 16 refusals at info, then a note, then nothing
    // more at info however many follow. The room created last is the
    // marker that the session handled every earlier line; the node's
    // "stopped", logged last, that every line it logged is out.
    {
        use std::io::Write;
        let refused = r#"{"type":"createroom","roomid":"x"}"#;
        for _ in 0..100 {
            s.write_all(format!("{refused}\n").as_bytes())
                .expect("send");
        }
        s.write_all(b"{\"type\":\"createroom\",\"roomid\":\"Marker\"}\n")
            .expect("send");
    }
    {
        use std::io::BufRead;
        s.set_read_timeout(Some(common::DEADLINE)).expect("timeout");
        let mut replies = std::io::BufReader::new(&s);
        let mut reply = String::new();
        while !(reply.contains(r#""roomid":"Marker""#) && reply.contains(r#""approved":"true""#)) {
            reply.clear();
            let read = replies
                .read_line(&mut reply)
                .expect("the Marker room's answer");
            assert!(
                read > 0,
                "the node closed the connection before creating Marker"
            );
        }
    }
    node.signal(libc::SIGTERM);
    node.wait_line("stopped");
    assert_eq!(node.count_seen("claim_denied: room refused"), 16);
    assert_eq!(node.count_seen("further refusals are logged at debug"), 1);
}

/// A flood of short connections that each send a `movejoin` nobody is
/// moving for (with a former room this server does not know) logs at most
/// 20 lines a second of each kind (the refusal, the odd former room), and
/// the next line logged says how many were left out: each logged two lines
/// at info, and a hostile-client tester's script grew the log by 1.8 MB a
/// second.
#[test]
fn a_flood_of_refused_movejoins_logs_at_most_20_lines_a_second_of_each_kind() {
    use std::io::{BufRead, BufReader};
    const FLOOD: usize = 300;
    let config = single_node_config("movejoin-log-flood");
    let (mut node, addr) = spawn_node(&config);
    let movejoin = |i: usize| {
        let request = format!(
            r#"{{"type":"movejoin","former":"x","roomid":"MainHall-s1","identity":"Nobody{i}"}}"#
        );
        let s = send_line(&addr, &request);
        s.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply).expect("a reply");
        assert!(reply.contains(r#""approved":"false""#), "{reply}");
    };
    let started = std::time::Instant::now();
    for i in 0..FLOOD {
        movejoin(i);
    }
    let took = started.elapsed();
    // Once the budget's second is over, one more: logged, with the count
    // of the lines left out.
    std::thread::sleep(Duration::from_millis(1100));
    movejoin(FLOOD);
    node.signal(libc::SIGTERM);
    node.wait_line("stopped");
    let mut lines = node.seen_with("movejoin refused");
    lines.extend(node.seen_with("movejoin with an invalid former room"));
    let left_out: usize = lines
        .iter()
        .filter_map(|line| line.split("left_out=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<usize>().ok())
        .sum();
    println!(
        "{} movejoins in {took:?}: {} lines logged, {left_out} left out",
        FLOOD + 1,
        lines.len()
    );
    // Two kinds of line, each at most 20 a second.
    let seconds = took.as_secs() as usize + 2;
    assert!(
        lines.len() <= 2 * 20 * seconds,
        "{} lines for {FLOOD} refusals in {took:?}",
        lines.len()
    );
    assert_eq!(
        lines.len() + left_out,
        2 * (FLOOD + 1),
        "every line counted"
    );
}

/// A first line that starts with a UTF-8 byte order mark (what a .NET
/// client writing through `Encoding.UTF8` sends) logs in: it was refused
/// as not JSON, and the client waited for the handshake timeout.
#[test]
fn a_byte_order_mark_before_the_first_line_is_skipped() {
    use std::io::{BufRead, BufReader};
    let config = single_node_config("bom");
    let (mut node, addr) = spawn_node(&config);
    let s = send_line(
        &addr,
        "\u{feff}{\"type\":\"newidentity\",\"identity\":\"Bomm\"}",
    );
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).expect("a reply");
    assert_eq!(reply, "{\"type\":\"newidentity\",\"approved\":\"true\"}\n");
    node.signal(libc::SIGTERM);
    node.wait_line("stopped");
}
