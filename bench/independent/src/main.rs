//! An independent cross-check of `chatmesh bench fanout`.
//!
//! Written apart from the bench on purpose: standard library only, blocking
//! sockets, one thread per room that waits in poll(2) on its members'
//! sockets, reads them and writes each member's next messages as soon as
//! its window allows, in one write (as the bench writes), default socket options (TCP_NODELAY, as chat clients set;
//! no TCP_QUICKACK). It shares no code with src/bench.
//!
//! The workload is the bench's: R rooms of M members; each member sends K
//! messages of S bytes with at most W of its own not yet received by every
//! other member of its room. A delivery is one message reaching one member.
//!
//! It loads servers that are already running (see run.sh, which starts
//! them): chatmesh (JSON lines over TCP), IRC (ngircd, one or linked) or NATS.
//!
//!     fanout-independent --proto irc --ports 6667,6668,6669 --place member \
//!         --workload 1x100x50 [--size 64] [--window 4] [--runs 3] [--pids 12,13]
//!
//! Placement: `room` puts room i and all its members on port i mod P;
//! `member` puts member j of room i on port (i*M+j) mod P.
//!
//! Prints one line per run and a `median` line:
//! `median proto=.. workload=.. deliveries_per_s=.. p99_ms=.. gen_us_per_delivery=.. ...`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    Chat,
    Irc,
    Nats,
}

#[derive(Clone)]
struct Args {
    proto: Proto,
    ports: Vec<u16>,
    by_member: bool,
    rooms: usize,
    members: usize,
    messages: usize,
    size: usize,
    window: usize,
    runs: usize,
    timeout: Duration,
    pids: Vec<u32>,
    quickack: bool,
}

fn usage(why: &str) -> ! {
    eprintln!("fanout-independent: {why}");
    eprintln!(
        "usage: fanout-independent --proto chat|irc|nats --ports P1,P2,.. [--place room|member] \
         --workload RxMxK [--size 64] [--window 4] [--runs 3] [--timeout-s 60] [--pids PID,..] [--acks default|quick]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        proto: Proto::Chat,
        ports: Vec::new(),
        by_member: false,
        rooms: 10,
        members: 10,
        messages: 200,
        size: 64,
        window: 4,
        runs: 3,
        timeout: Duration::from_secs(60),
        pids: Vec::new(),
        quickack: false,
    };
    let list: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < list.len() {
        let value = list.get(i + 1).cloned().unwrap_or_default();
        let num = |v: &str| v.parse::<usize>().unwrap_or_else(|_| usage("bad number"));
        match list[i].as_str() {
            "--proto" => {
                args.proto = match value.as_str() {
                    "chat" => Proto::Chat,
                    "irc" => Proto::Irc,
                    "nats" => Proto::Nats,
                    _ => usage("--proto is chat, irc or nats"),
                }
            }
            "--ports" => {
                args.ports = value
                    .split(',')
                    .map(|p| p.parse().unwrap_or_else(|_| usage("bad port")))
                    .collect()
            }
            "--place" => args.by_member = value == "member",
            "--workload" => {
                let parts: Vec<usize> = value.split('x').map(num).collect();
                if parts.len() != 3 || parts[1] < 2 || parts[0] == 0 || parts[2] == 0 {
                    usage("--workload is RxMxK, M >= 2");
                }
                (args.rooms, args.members, args.messages) = (parts[0], parts[1], parts[2]);
            }
            "--size" => args.size = num(&value).max(32),
            "--window" => args.window = num(&value).max(1),
            "--runs" => args.runs = num(&value).max(1),
            "--timeout-s" => args.timeout = Duration::from_secs(num(&value) as u64),
            "--pids" => {
                args.pids = value
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| p.parse().unwrap_or_else(|_| usage("bad pid")))
                    .collect()
            }
            "--acks" => {
                args.quickack = match value.as_str() {
                    "quick" => true,
                    "default" => false,
                    _ => usage("--acks is quick or default"),
                }
            }
            other => usage(&format!("unknown argument {other}")),
        }
        i += 2;
    }
    if args.ports.is_empty() {
        usage("--ports is required");
    }
    args
}

/// CPU seconds (user + system) of a process, from /proc/PID/stat.
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line, in clock ticks (100 per second).
    let Some(rest) = stat.rsplit(')').next() else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

/// What the threads of one run share.
struct Run {
    args: Args,
    base: Instant,
    deliveries: AtomicU64,
    failed: AtomicBool,
}

// From Linux's <netinet/tcp.h> and <sys/socket.h>; declared here to stay
// on the standard library alone.
const IPPROTO_TCP: i32 = 6;
const TCP_QUICKACK: i32 = 12;
unsafe extern "C" {
    fn setsockopt(fd: i32, level: i32, name: i32, value: *const i32, len: u32) -> i32;
}

/// The socket's read side; with `quickack`, asks the kernel after every
/// read to acknowledge at once instead of delaying the ACK (Linux clears the
/// flag by itself, so it is set again each time).
struct Socket {
    stream: TcpStream,
    quickack: bool,
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.stream.read(buf)?;
        if self.quickack && n > 0 {
            let one = 1i32;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&self.stream);
            // SAFETY: fd is this live socket; setsockopt only reads `one`.
            unsafe { setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, 4) };
        }
        Ok(n)
    }
}

/// One connected member: a buffered reader and a shared writer.
struct Conn {
    reader: BufReader<Socket>,
    writer: Arc<Mutex<TcpStream>>,
}

impl Conn {
    fn open(port: u16, quickack: bool) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let writer = Arc::new(Mutex::new(stream.try_clone()?));
        Ok(Conn {
            reader: BufReader::with_capacity(1 << 16, Socket { stream, quickack }),
            writer,
        })
    }

    fn send(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.lock().unwrap().write_all(bytes)
    }

    /// The next line without its line end; an error at end of stream.
    fn line(&mut self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        buf.clear();
        if self.reader.read_until(b'\n', buf)? == 0 {
            return Err(std::io::Error::other("server closed the connection"));
        }
        while buf.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
            buf.pop();
        }
        Ok(())
    }

    /// Answers a server keep-alive; true if `line` was one.
    fn keepalive(&self, proto: Proto, line: &[u8]) -> std::io::Result<bool> {
        answer_keepalive(proto, line, &self.writer)
    }
}

/// Answers a server keep-alive on `writer`; true if `line` was one.
fn answer_keepalive(proto: Proto, line: &[u8], writer: &Mutex<TcpStream>) -> std::io::Result<bool> {
    let pong = match proto {
        Proto::Irc if line.starts_with(b"PING") => [b"PONG", &line[4..], b"\r\n"].concat(),
        Proto::Nats if line == b"PING" => b"PONG\r\n".to_vec(),
        _ => return Ok(false),
    };
    writer.lock().unwrap().write_all(&pong)?;
    Ok(true)
}

fn contains(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Connects member `index` of `room`, logs in and enters the room; for IRC
/// also waits until all `members` are seen in the channel (linked servers
/// learn of joins late).
fn join(args: &Args, tag: &str, room: usize, index: usize) -> std::io::Result<Conn> {
    let port = if args.by_member {
        args.ports[(room * args.members + index) % args.ports.len()]
    } else {
        args.ports[room % args.ports.len()]
    };
    let name = format!("i{tag}r{room}m{index}");
    let room_name = format!("x{tag}r{room}");
    let mut conn = Conn::open(port, args.quickack)?;
    let mut line = Vec::new();
    let bad = |what: String| std::io::Error::other(what);
    match args.proto {
        Proto::Chat => {
            conn.send(
                format!("{{\"type\":\"newidentity\",\"identity\":\"{name}\"}}\n").as_bytes(),
            )?;
            loop {
                conn.line(&mut line)?;
                if contains(&line, b"\"newidentity\"").is_some() {
                    if contains(&line, b"\"approved\":\"true\"").is_none() {
                        return Err(bad(format!("{name} refused")));
                    }
                    break;
                }
            }
            let kind = if index == 0 { "createroom" } else { "joinroom" };
            conn.send(format!("{{\"type\":\"{kind}\",\"roomid\":\"{room_name}\"}}\n").as_bytes())?;
            // Entered once our own roomchange names the room as the new one.
            let want_id = format!("\"identity\":\"{name}\"");
            let want_room = format!("\"roomid\":\"{room_name}\"");
            loop {
                conn.line(&mut line)?;
                if contains(&line, b"\"approved\":\"false\"").is_some() {
                    return Err(bad(format!("{name}: {}", String::from_utf8_lossy(&line))));
                }
                if contains(&line, b"\"roomchange\"").is_some()
                    && contains(&line, want_id.as_bytes()).is_some()
                    && contains(&line, want_room.as_bytes()).is_some()
                    && contains(&line, format!("\"former\":\"{room_name}\"").as_bytes()).is_none()
                {
                    break;
                }
            }
        }
        Proto::Irc => {
            conn.send(format!("NICK {name}\r\nUSER {name} 0 * :{name}\r\n").as_bytes())?;
            loop {
                conn.line(&mut line)?;
                if conn.keepalive(Proto::Irc, &line)? {
                    continue;
                }
                let text = String::from_utf8_lossy(&line);
                match text.split(' ').nth(1) {
                    Some("001") => break,
                    Some("433") => return Err(bad(format!("{name}: {text}"))),
                    _ if text.starts_with("ERROR") => return Err(bad(text.into_owned())),
                    _ => {}
                }
            }
            conn.send(format!("JOIN #{room_name}\r\n").as_bytes())?;
            let mut seen = std::collections::HashSet::new();
            while seen.len() < args.members {
                conn.line(&mut line)?;
                if conn.keepalive(Proto::Irc, &line)? {
                    continue;
                }
                let text = String::from_utf8_lossy(&line).into_owned();
                let words: Vec<&str> = text.split(' ').collect();
                match words.get(1).copied() {
                    Some("353") => {
                        if let Some(at) = text[1..].find(" :") {
                            for nick in text[at + 3..].split(' ') {
                                let nick = nick.trim_start_matches(['@', '+']);
                                if !nick.is_empty() {
                                    seen.insert(nick.to_owned());
                                }
                            }
                        }
                    }
                    Some("JOIN") => {
                        let nick = words[0].trim_start_matches(':');
                        seen.insert(nick.split('!').next().unwrap_or("").to_owned());
                    }
                    _ => {}
                }
            }
        }
        Proto::Nats => {
            conn.line(&mut line)?;
            if !line.starts_with(b"INFO") {
                return Err(bad("no INFO from nats-server".into()));
            }
            conn.send(
                format!(
                    "CONNECT {{\"verbose\":false,\"pedantic\":false,\"echo\":false,\"name\":\"{name}\"}}\r\n\
                     SUB {room_name} 1\r\nPING\r\n"
                )
                .as_bytes(),
            )?;
            loop {
                conn.line(&mut line)?;
                if line == b"PONG" {
                    break;
                }
                if line.starts_with(b"-ERR") {
                    return Err(bad(String::from_utf8_lossy(&line).into_owned()));
                }
                conn.keepalive(Proto::Nats, &line)?;
            }
        }
    }
    Ok(conn)
}

/// The bench content of a received line, if it is a room message.
fn content_of(proto: Proto, line: &[u8], nats_next: &mut bool) -> Option<(usize, usize, u64)> {
    let content: &[u8] = match proto {
        Proto::Chat => {
            contains(line, b"\"type\":\"message\"")?;
            let key = b"\"content\":\"";
            let start = contains(line, key)? + key.len();
            let len = line[start..].iter().position(|&b| b == b'"')?;
            &line[start..start + len]
        }
        Proto::Irc => {
            let at = contains(line, b" PRIVMSG ")?;
            let rest = &line[at + 9..];
            let colon = contains(rest, b" :")?;
            &rest[colon + 2..]
        }
        Proto::Nats => {
            if *nats_next {
                *nats_next = false;
                line
            } else {
                *nats_next = line.starts_with(b"MSG ");
                return None;
            }
        }
    };
    let text = std::str::from_utf8(content).ok()?;
    let mut parts = text.split(':');
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    ))
}

type RoomResult = Result<(Vec<u32>, Vec<Arc<Mutex<TcpStream>>>), String>;

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

const POLLIN: i16 = 1;

unsafe extern "C" {
    fn poll(fds: *mut PollFd, nfds: u64, timeout: i32) -> i32;
}

/// Runs every member of one room: one thread waits in poll(2) on all their
/// sockets, takes what each has, and as soon as a member's message has
/// reached every other member, writes what its window now allows. A thread
/// per member, blocked on its socket and woken for every line (and another
/// to send, woken for every message delivered), cost this generator about
/// twice the CPU per delivery of the bench's, and made it the bottleneck on
/// 2 cores.
/// Returns the latencies, and the members' writers, which keep their
/// connections open until every room is done.
fn room_loop(run: Arc<Run>, conns: Vec<Conn>, room_name: String) -> RoomResult {
    let args = &run.args;
    let expected = (args.members - 1) * args.messages;
    let mut latencies = Vec::with_capacity(expected * conns.len());
    // Per member: bytes read but not yet a whole line (the first are what
    // its login left in the buffer), lines counted, NATS payload state.
    let mut pending: Vec<Vec<u8>> = conns.iter().map(|c| c.reader.buffer().to_vec()).collect();
    let mut got = vec![0usize; conns.len()];
    let mut nats_next = vec![false; conns.len()];
    // Keep-alive answers go through each member's writer lock, as its
    // sender's lines do, so that they never land inside one.
    let writers: Vec<Arc<Mutex<TcpStream>>> = conns.iter().map(|c| c.writer.clone()).collect();
    let mut sockets: Vec<Socket> = conns.into_iter().map(|c| c.reader.into_inner()).collect();
    let mut fds: Vec<PollFd> = sockets
        .iter()
        .map(|s| PollFd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&s.stream),
            events: POLLIN,
            revents: 0,
        })
        .collect();
    let mut scratch = vec![0u8; 1 << 16];
    // Per member: its next message and how many are not yet received by
    // every other member; per message (sender, seq): members it reached.
    let mut next = vec![0usize; sockets.len()];
    let mut in_flight = vec![0usize; sockets.len()];
    let mut reached = vec![0u32; sockets.len() * args.messages];
    let mut batch = String::new();
    let mut send_more = |index: usize, in_flight: &mut Vec<usize>| -> Result<(), String> {
        let k = (args.window - in_flight[index]).min(args.messages - next[index]);
        if k == 0 {
            return Ok(());
        }
        batch.clear();
        let micros = run.base.elapsed().as_micros();
        for seq in next[index]..next[index] + k {
            let mut content = format!("{index}:{seq}:{micros}:");
            while content.len() < args.size {
                content.push('x');
            }
            match args.proto {
                Proto::Chat => batch.push_str(&format!(
                    "{{\"type\":\"message\",\"content\":\"{content}\"}}\n"
                )),
                Proto::Irc => batch.push_str(&format!("PRIVMSG #{room_name} :{content}\r\n")),
                Proto::Nats => batch.push_str(&format!(
                    "PUB {room_name} {}\r\n{content}\r\n",
                    content.len()
                )),
            }
        }
        next[index] += k;
        in_flight[index] += k;
        writers[index]
            .lock()
            .unwrap()
            .write_all(batch.as_bytes())
            .map_err(|e| format!("write: {e}"))
    };
    for index in 0..sockets.len() {
        send_more(index, &mut in_flight)?;
    }
    let deadline = Instant::now() + args.timeout;
    let mut first = true;
    while got.iter().any(|&n| n < expected) {
        if run.failed.load(Ordering::Relaxed) || Instant::now() > deadline {
            return Err(format!(
                "stopped after {} of {expected} per member",
                got.iter().min().unwrap_or(&0)
            ));
        }
        // What a member's login left buffered is handled before any wait.
        let initial = first;
        let ready: Vec<usize> = if first {
            first = false;
            (0..fds.len()).filter(|&i| !pending[i].is_empty()).collect()
        } else {
            // SAFETY: fds is a live array of fds.len() pollfd structs.
            let n = unsafe { poll(fds.as_mut_ptr(), fds.len() as u64, 100) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll: {e}"));
            }
            let ready = (0..fds.len()).filter(|&i| fds[i].revents != 0).collect();
            for fd in &mut fds {
                fd.revents = 0;
            }
            ready
        };
        for i in ready {
            if !initial {
                let n = sockets[i].read(&mut scratch).map_err(|e| {
                    run.failed.store(true, Ordering::Relaxed);
                    format!("read after {} of {expected}: {e}", got[i])
                })?;
                if n == 0 {
                    run.failed.store(true, Ordering::Relaxed);
                    return Err(format!(
                        "server closed the connection after {} of {expected}",
                        got[i]
                    ));
                }
                pending[i].extend_from_slice(&scratch[..n]);
            }
            let mut start = 0;
            while let Some(end) = pending[i][start..].iter().position(|&b| b == b'\n') {
                let mut line = &pending[i][start..start + end];
                start += end + 1;
                while line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                if answer_keepalive(args.proto, line, &writers[i]).map_err(|e| e.to_string())? {
                    continue;
                }
                let Some((sender, seq, micros)) = content_of(args.proto, line, &mut nats_next[i])
                else {
                    continue;
                };
                if sender >= args.members || seq >= args.messages {
                    run.failed.store(true, Ordering::Relaxed);
                    return Err(format!("unexpected message {sender}:{seq}"));
                }
                let now = run.base.elapsed().as_micros() as u64;
                latencies.push(now.saturating_sub(micros).min(u32::MAX as u64) as u32);
                got[i] += 1;
                run.deliveries.fetch_add(1, Ordering::Relaxed);
                let count = &mut reached[sender * args.messages + seq];
                *count += 1;
                if *count as usize == args.members - 1 {
                    in_flight[sender] -= 1;
                    send_more(sender, &mut in_flight)?;
                }
            }
            pending[i].drain(..start);
        }
    }
    Ok((latencies, writers))
}

struct Outcome {
    deliveries_per_s: f64,
    msgs_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    gen_us: f64,
    srv_us: f64,
    seconds: f64,
}

fn one_run(args: &Args, number: usize) -> Result<Outcome, String> {
    let tag = format!("{}{}", std::process::id() % 10000, number);
    // chatmesh: room owners first (a room exists once its creator made it),
    // then everyone else at once. IRC and NATS: everyone at once (an IRC
    // member waits in `join` until it sees the whole room).
    let mut conns: Vec<Option<Conn>> = (0..args.rooms * args.members).map(|_| None).collect();
    let groups = if args.proto == Proto::Chat {
        vec![0..1, 1..args.members]
    } else {
        // One group of every member (a list of ranges, like the above).
        #[allow(clippy::single_range_in_vec_init)]
        let all = vec![0..args.members];
        all
    };
    for group in groups {
        let handles: Vec<_> = (0..args.rooms)
            .flat_map(|room| group.clone().map(move |index| (room, index)))
            .map(|(room, index)| {
                let (args, tag) = (args.clone(), tag.clone());
                (
                    room,
                    index,
                    thread::spawn(move || join(&args, &tag, room, index)),
                )
            })
            .collect();
        for (room, index, handle) in handles {
            let conn = handle
                .join()
                .map_err(|_| "a join thread panicked".to_owned())?
                .map_err(|e| format!("member {index} of room {room}: {e}"))?;
            conns[room * args.members + index] = Some(conn);
        }
    }
    let run = Arc::new(Run {
        args: args.clone(),
        base: Instant::now(),
        deliveries: AtomicU64::new(0),
        failed: AtomicBool::new(false),
    });
    let pids: Vec<String> = args.pids.iter().map(|p| p.to_string()).collect();
    let srv_before: f64 = pids.iter().map(|p| cpu_seconds(p)).sum();
    let gen_before = cpu_seconds("self");
    let start = Instant::now();
    let mut rooms = Vec::new();
    let mut room_conns: Vec<Vec<Conn>> = (0..args.rooms).map(|_| Vec::new()).collect();
    for (i, conn) in conns.into_iter().enumerate() {
        room_conns[i / args.members].push(conn.expect("every member joined"));
    }
    for (room, conns) in room_conns.into_iter().enumerate() {
        let r = run.clone();
        let room_name = format!("x{tag}r{room}");
        rooms.push(thread::spawn(move || room_loop(r, conns, room_name)));
    }
    let mut latencies = Vec::new();
    let mut error = None;
    let mut keep = Vec::new();
    for handle in rooms {
        match handle.join() {
            Ok(Ok((l, writers))) => {
                latencies.extend(l);
                keep.extend(writers);
            }
            Ok(Err(e)) => error = error.or(Some(e)),
            Err(_) => error = error.or(Some("a room thread panicked".into())),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let gen_cpu = cpu_seconds("self") - gen_before;
    let srv_cpu = pids.iter().map(|p| cpu_seconds(p)).sum::<f64>() - srv_before;
    drop(keep);
    if let Some(e) = error {
        return Err(e);
    }
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    let n = latencies.len() as f64;
    Ok(Outcome {
        deliveries_per_s: n / seconds,
        msgs_per_s: (args.rooms * args.members * args.messages) as f64 / seconds,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        gen_us: gen_cpu * 1e6 / n,
        srv_us: srv_cpu * 1e6 / n,
        seconds,
    })
}

fn main() {
    let args = parse_args();
    let proto = match args.proto {
        Proto::Chat => "chat",
        Proto::Irc => "irc",
        Proto::Nats => "nats",
    };
    let workload = format!("{}x{}x{}", args.rooms, args.members, args.messages);
    let acks = if args.quickack { "quick" } else { "default" };
    let describe = |o: &Outcome| {
        format!(
            "proto={proto} workload={workload} acks={acks} deliveries_per_s={:.0} msgs_per_s={:.0} p50_ms={:.2} p99_ms={:.2} \
             gen_us_per_delivery={:.2} srv_us_per_delivery={:.2} seconds={:.3}",
            o.deliveries_per_s, o.msgs_per_s, o.p50_ms, o.p99_ms, o.gen_us, o.srv_us, o.seconds
        )
    };
    let mut outcomes = Vec::new();
    for number in 0..args.runs {
        match one_run(&args, number) {
            Ok(o) => {
                println!("run {} {}", number + 1, describe(&o));
                outcomes.push(o);
            }
            Err(e) => println!("run {} failed: {e}", number + 1),
        }
        // Let the servers tidy up the closed sessions.
        thread::sleep(Duration::from_millis(300));
    }
    if outcomes.is_empty() {
        std::process::exit(1);
    }
    outcomes.sort_by(|a, b| a.deliveries_per_s.total_cmp(&b.deliveries_per_s));
    println!("median {}", describe(&outcomes[outcomes.len() / 2]));
}
