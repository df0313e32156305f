//! Helpers shared by the integration tests: certificates in a temp dir, nodes
//! on 127.0.0.1 port 0, and raw protocol clients over TCP and QUIC that assert
//! exact lines.
#![allow(dead_code)] // each test binary uses a different subset

pub mod cluster;
pub mod inproc;
pub mod netns;
pub mod process;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chatmesh::config::{ClusterConfig, Limits};
use chatmesh::lines::LineReader;
use chatmesh::{Node, NodeOptions};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Generous bound for anything a test waits for: CI machines are slow and noisy.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A fresh temp directory for one test: `<tmp>/chatmesh-tests/<pid>-<tag>-<n>`.
/// A test process cannot clean up when it ends (statics are never dropped,
/// and a failed test leaves its files for a look), so the first call in each
/// test binary removes the directories of processes that no longer run.
pub fn temp_dir(tag: &str) -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let root = ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join("chatmesh-tests");
        sweep_dead(&root);
        root
    });
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = root.join(format!("{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A file in a test's temporary directory that keeps it from the sweep of
/// dead processes' directories (a failed run's logs, kept for reading).
pub const KEPT: &str = "KEPT";

/// Removes the entries of `root` named `<pid>-...` whose process is gone
/// (unless marked [`KEPT`]). Where `/proc` is missing, no process can be
/// told alive, so none is removed.
fn sweep_dead(root: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_string_lossy()
            .split('-')
            .next()
            .unwrap_or("")
            .to_owned();
        if !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(&pid).exists()
            && !entry.path().join(KEPT).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// One config of `n` servers on 127.0.0.1, port 0 everywhere.
pub fn local_config(n: usize) -> ClusterConfig {
    let text: String = (1..=n).map(|i| format!("s{i} 127.0.0.1 0 0\n")).collect();
    ClusterConfig::parse(&text, "test").expect("test config")
}

/// Certificates for servers s1..s5 on 127.0.0.1, made once per test binary.
pub fn certs() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = temp_dir("certs");
        chatmesh::tls::generate(&local_config(5), &dir, true).expect("certs");
        dir
    })
}

/// Starts server s1 alone, with `limits`, and a web port (any free one) for
/// [`Via::Ws`] clients.
pub async fn start_node_with(limits: Limits) -> Node {
    let mut config = local_config(1);
    config.limits = limits;
    config.servers[0].web_port = Some(0);
    let node = Node::start(NodeOptions::new(config, "s1", certs()))
        .await
        .expect("node starts");
    register_web(&node);
    node
}

/// Client address -> web address of the nodes started here, so that a
/// [`Via::Ws`] client given a node's client address (as every scenario
/// written for TCP and QUIC passes) finds the same node's web port.
fn web_addrs() -> &'static std::sync::Mutex<std::collections::HashMap<SocketAddr, SocketAddr>> {
    static MAP: OnceLock<std::sync::Mutex<std::collections::HashMap<SocketAddr, SocketAddr>>> =
        OnceLock::new();
    MAP.get_or_init(Default::default)
}

/// Records `node`'s web address (if it has one) for [`Via::Ws`] clients.
pub fn register_web(node: &Node) {
    if let Some(web) = node.web_addr() {
        web_addrs().lock().unwrap().insert(node.client_addr(), web);
    }
}

/// The web address of the node whose client address is `client`.
pub fn web_addr_of(client: SocketAddr) -> SocketAddr {
    *web_addrs()
        .lock()
        .unwrap()
        .get(&client)
        .unwrap_or_else(|| panic!("no web port registered for the node at {client}"))
}

/// Starts server s1 alone with default limits.
pub async fn start_node() -> Node {
    start_node_with(Limits::default()).await
}

/// Which transport a raw client uses.
#[derive(Clone, Copy, Debug)]
pub enum Via {
    Tcp,
    Quic,
    /// A WebSocket on the node's web port (`GET /chat`): each line sent is
    /// one text frame, each frame received one line.
    Ws,
}

/// A raw protocol client that asserts exact server lines.
pub struct Raw {
    reader: LineReader<Box<dyn AsyncRead + Unpin + Send>>,
    writer: Box<dyn AsyncWrite + Unpin + Send>,
    _quic: Option<(quinn::Endpoint, quinn::Connection)>,
    pub name: String,
}

impl Raw {
    /// Connects without sending anything.
    pub async fn connect(via: Via, addr: SocketAddr, name: &str) -> Raw {
        match via {
            Via::Tcp => {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .expect("tcp connect");
                Raw::over_tcp(stream, name)
            }
            Via::Quic => Raw::connect_quic_from([127, 0, 0, 1].into(), addr, name).await,
            Via::Ws => Raw::connect_ws(web_addr_of(addr), name).await,
        }
    }

    /// Connects a WebSocket to `ws://web/chat`, without sending anything.
    /// Two pumps turn it into lines: each line written goes out as one text
    /// frame (without its newline), each text frame received is read as one
    /// line. The server closing the WebSocket is the end of the lines; a
    /// binary frame from the server is a test failure.
    pub async fn connect_ws(web: SocketAddr, name: &str) -> Raw {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{web}/chat"))
            .await
            .unwrap_or_else(|e| panic!("{name}: WebSocket connect to {web}: {e}"));
        let (mut sink, mut frames) = ws.split();
        let (mut down_w, down_r) = tokio::io::duplex(1 << 20);
        let (up_w, up_r) = tokio::io::duplex(1 << 20);
        let who = name.to_owned();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = frames.next().await {
                match frame {
                    Message::Text(text) => {
                        assert!(
                            !text.as_str().contains('\n'),
                            "{who}: a frame holds more than one line: {text:?}"
                        );
                        let line = format!("{}\n", text.as_str());
                        if down_w.write_all(line.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                    Message::Binary(b) => panic!("{who}: server sent a binary frame {b:?}"),
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            // Dropping `down_w` is the end of the lines.
        });
        tokio::spawn(async move {
            let mut lines = LineReader::new(up_r, 1 << 22);
            while let Ok(Some(line)) = lines.next_line().await {
                let text = String::from_utf8_lossy(line).into_owned();
                if sink.send(Message::text(text)).await.is_err() {
                    return;
                }
            }
            let _ = sink.close().await;
        });
        Raw {
            reader: LineReader::new(Box::new(down_r), 1 << 22),
            writer: Box::new(up_w),
            _quic: None,
            name: name.to_owned(),
        }
    }

    /// Connects over QUIC from the local address `from`, without sending anything.
    pub async fn connect_quic_from(from: std::net::IpAddr, addr: SocketAddr, name: &str) -> Raw {
        let crypto = chatmesh::tls::chat_client_config(&certs().join("ca.pem")).unwrap();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
        let mut endpoint = quinn::Endpoint::client(SocketAddr::new(from, 0))
            .unwrap_or_else(|e| panic!("{name}: cannot bind {from}: {e}"));
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let connection = endpoint
            .connect(addr, "localhost")
            .unwrap()
            .await
            .expect("quic connect");
        let (send, recv) = connection.open_bi().await.unwrap();
        Raw {
            reader: LineReader::new(Box::new(recv), 1 << 22),
            writer: Box::new(send),
            _quic: Some((endpoint, connection)),
            name: name.to_owned(),
        }
    }

    /// Connects over TCP from the local address `from` (any 127.x address
    /// is loopback on Linux), without sending anything.
    pub async fn connect_from(from: std::net::IpAddr, addr: SocketAddr, name: &str) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().expect("tcp socket");
        socket
            .bind(SocketAddr::new(from, 0))
            .unwrap_or_else(|e| panic!("{name}: cannot bind {from}: {e}"));
        let stream = socket.connect(addr).await.expect("tcp connect");
        Raw::over_tcp(stream, name)
    }

    /// A client on the connected TCP `stream` (Nagle off: each line goes at once).
    fn over_tcp(stream: tokio::net::TcpStream, name: &str) -> Raw {
        stream.set_nodelay(true).unwrap();
        let (r, w) = stream.into_split();
        Raw {
            reader: LineReader::new(Box::new(r), 1 << 22),
            writer: Box::new(w),
            _quic: None,
            name: name.to_owned(),
        }
    }

    /// Asserts the next line is `route` to `roomid` at 127.0.0.1:`port`
    /// with exactly the classic keys plus `token` (32 hex digits), and
    /// returns the token.
    pub async fn expect_route(&mut self, roomid: &str, port: u16) -> String {
        let got = self
            .next()
            .await
            .unwrap_or_else(|| panic!("{}: closed, expected a route", self.name));
        let token = got["token"].as_str().unwrap_or_default().to_owned();
        assert!(
            token.len() == 32
                && token
                    .bytes()
                    .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
            "{}: route token is not 32 hex digits: {got}",
            self.name
        );
        let want = serde_json::json!({
            "type": "route",
            "roomid": roomid,
            "host": "127.0.0.1",
            "port": port.to_string(),
            "token": token,
        });
        assert_eq!(got, want, "{}: expected a route", self.name);
        token
    }

    /// Connects and is approved as `name`, consuming the approval and its own arrival.
    pub async fn join(via: Via, addr: SocketAddr, name: &str, hall: &str) -> Raw {
        let mut c = Raw::connect(via, addr, name).await;
        c.send(&format!(r#"{{"type":"newidentity","identity":"{name}"}}"#))
            .await;
        c.expect(r#"{"type":"newidentity","approved":"true"}"#)
            .await;
        c.expect(&room_change(name, "", hall)).await;
        c
    }

    /// Creates `room` from `former`, consuming the approval and its own move.
    pub async fn create_room(&mut self, room: &str, former: &str) {
        self.send(&format!(r#"{{"type":"createroom","roomid":"{room}"}}"#))
            .await;
        self.expect(&format!(
            r#"{{"type":"createroom","roomid":"{room}","approved":"true"}}"#
        ))
        .await;
        let name = self.name.clone();
        self.expect(&room_change(&name, former, room)).await;
    }

    /// Sends one line (a newline is added).
    pub async fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes()).await;
    }

    /// Sends bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("send");
        self.writer.flush().await.expect("flush");
    }

    /// The next line as JSON, or None if the server closed.
    pub async fn next(&mut self) -> Option<Value> {
        let line = tokio::time::timeout(DEADLINE, self.reader.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!("{}: no line from the server within {DEADLINE:?}", self.name)
            });
        match line {
            Ok(Some(line)) => Some(serde_json::from_slice(line).unwrap_or_else(|e| {
                panic!(
                    "{}: server sent a non-JSON line {:?}: {e}",
                    self.name,
                    String::from_utf8_lossy(line)
                )
            })),
            Ok(None) | Err(_) => None,
        }
    }

    /// Asserts the next line equals `expected` (as JSON: key order is free, but
    /// values and their types must match exactly).
    pub async fn expect(&mut self, expected: &str) {
        let want: Value = serde_json::from_str(expected).expect("test's expected line is JSON");
        let got = self.next().await;
        assert_eq!(
            got.as_ref(),
            Some(&want),
            "{}: expected {expected}",
            self.name
        );
    }

    /// Asserts the next line is an `error` reply.
    pub async fn expect_error(&mut self) -> String {
        let got = self
            .next()
            .await
            .unwrap_or_else(|| panic!("{}: closed, expected an error", self.name));
        assert_eq!(got["type"], "error", "{}: got {got}", self.name);
        got["reason"]
            .as_str()
            .expect("reason is a string")
            .to_owned()
    }

    /// Asserts the server closes the connection next (no further lines).
    pub async fn expect_closed(&mut self) {
        let got = self.next().await;
        assert!(
            got.is_none(),
            "{}: expected the connection to close, got {got:?}",
            self.name
        );
    }

    /// Proves nothing else is queued for this client: asks `who` and asserts
    /// that the very next line is its answer.
    pub async fn expect_nothing_more(&mut self) {
        self.send(r#"{"type":"who"}"#).await;
        let got = self.next().await.expect("open");
        assert_eq!(
            got["type"], "roomcontents",
            "{}: unexpected line {got}",
            self.name
        );
    }
}

/// The roomchange line.
pub fn room_change(identity: &str, former: &str, roomid: &str) -> String {
    format!(
        r#"{{"type":"roomchange","identity":"{identity}","former":"{former}","roomid":"{roomid}"}}"#
    )
}

/// Polls `condition` until true or the deadline; panics with `what` on timeout.
pub async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !condition() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `condition` until true, failing after `within`.
pub async fn wait_for_within(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !condition() {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends 4 KB messages from `talker` until `listener`, which reads every
/// line (a client that keeps up), has seen `count` clients leave: the
/// clients in the room that never read, dropped by the server as slow.
/// Fails after 5,000 messages. Returns how many were sent.
pub async fn talk_until_slow_readers_leave(
    talker: &mut Raw,
    listener: &mut Raw,
    count: usize,
) -> usize {
    talk_until_slow_readers_leave_watching(talker, listener, count, || {}).await
}

/// [`talk_until_slow_readers_leave`], calling `after_each` once the
/// listener has each message.
pub async fn talk_until_slow_readers_leave_watching(
    talker: &mut Raw,
    listener: &mut Raw,
    count: usize,
    mut after_each: impl FnMut(),
) -> usize {
    let line = format!(r#"{{"type":"message","content":"{}"}}"#, "z".repeat(4000));
    let (mut sent, mut left) = (0, 0);
    while left < count {
        assert!(sent < 5000, "the slow readers were never dropped");
        talker.send(&line).await;
        sent += 1;
        // The listener sees each message, and each slow one leaving.
        loop {
            let got = listener.next().await.expect("the listener stays connected");
            match got["type"].as_str() {
                Some("message") => break,
                Some("roomchange") => left += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        after_each();
    }
    sent
}

/// After the server listening at `server` (a port of `node`) dropped the
/// clients of `slow` (each its socket and local address) as slow readers:
/// waits until each connection is reset on the client's side (a graceful
/// close would wait behind the output the client never reads), then until
/// the server's end of each is gone from the kernel, buffer and all, each
/// within 10 s; then until `node` has `in_use` client slots in use. `what`
/// names the clients in failures ("slow reader").
pub async fn expect_slow_readers_reset_and_freed(
    what: &str,
    node: &Node,
    server: SocketAddr,
    slow: &[(&tokio::net::TcpStream, SocketAddr)],
    in_use: usize,
) {
    wait_for_within(
        &format!("every {what}'s connection reset"),
        Duration::from_secs(10),
        || slow.iter().all(|(stream, _)| tcp_state(*stream) == 7),
    )
    .await;
    wait_for_within(
        &format!("the server's end of every {what}'s connection gone"),
        Duration::from_secs(10),
        || {
            slow.iter()
                .all(|(_, client_end)| kernel_socket(server, *client_end).is_none())
        },
    )
    .await;
    let slots = node.client_slots().clone();
    wait_for("the slow readers' slots to be free", || {
        slots.in_use() == in_use
    })
    .await;
}

/// The room goes on after the clients `leavers` were dropped from `hall`:
/// `listener` says "still here", and `talker` gets first one roomchange
/// for each of them (only the type is checked: they may leave in any
/// order), then that message.
pub async fn expect_the_room_goes_on(
    talker: &mut Raw,
    listener: &mut Raw,
    hall: &str,
    leavers: &[String],
) {
    listener
        .send(r#"{"type":"message","content":"still here"}"#)
        .await;
    for name in leavers {
        let leaving = room_change(name, hall, "");
        let got = talker.next().await.expect("talker connected");
        assert_eq!(got["type"], "roomchange", "{got} instead of {leaving}");
    }
    talker
        .expect(r#"{"type":"message","identity":"Listener","content":"still here"}"#)
        .await;
}

/// Ports that were free a moment ago, for a config `up` must bind for real.
///
/// They come from below the kernel's ephemeral range, walked once per test
/// process from a start drawn from the process id. A port a test lets go (a
/// server it stopped, to see clients find it closed) is then not handed to
/// another test's `bind(0)`, nor taken as the source port of some outgoing
/// connection, nor given out here again, while that test still counts on
/// nothing listening there.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let (low, high) = private_port_range();
    let span = u32::from(high - low);
    // The first caller picks the start; later ones go on from there.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let mut free = Vec::new();
    for _ in 0..span {
        if free.len() == n {
            break;
        }
        let port = low + (NEXT.fetch_add(1, Ordering::SeqCst) % span) as u16;
        // Free for both: a mesh binds UDP where its clients use TCP.
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            free.push(port);
        }
    }
    assert_eq!(free.len(), n, "no {n} free ports in {low}..{high}");
    free
}

/// Ports below the kernel's ephemeral range (`ip_local_port_range`), which
/// `bind(0)` and outgoing connections never use.
fn private_port_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    assert!(
        ephemeral_low > 12_000,
        "the ephemeral range starts at {ephemeral_low}: no room below it for test ports"
    );
    (ephemeral_low - 10_000, ephemeral_low)
}

/// The kernel's state of a TCP socket (`tcpi_state`; 1 established, 7 closed).
pub fn tcp_state(stream: &impl std::os::fd::AsRawFd) -> u8 {
    // SAFETY: an all-zero tcp_info is valid; getsockopt writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let result = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    assert_eq!(result, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_state
}

/// The send queue of every socket in this network namespace from `local` to
/// `remote` (the server's end of one client's connection), from
/// /proc/net/tcp: `None` once the kernel has no such socket left.
pub fn kernel_socket(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Option<u64> {
    let hex = |addr: std::net::SocketAddr| match addr {
        std::net::SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(v4.ip().octets()),
            v4.port()
        ),
        std::net::SocketAddr::V6(_) => unreachable!("the test uses 127.0.0.1"),
    };
    let (local, remote) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&local.as_str()) && fields.get(2) == Some(&remote.as_str())).then(
            || {
                let queues = fields.get(4).copied().unwrap_or("0:0");
                u64::from_str_radix(queues.split(':').next().unwrap_or("0"), 16).unwrap_or(0)
            },
        )
    })
}
