//! The workload: classic-protocol TCP clients that claim an identity (and
//! often a room) from small pools on a fresh connection, hold it a while, then
//! quit or drop the connection, over and over. Every line sent and received is
//! recorded with its time, and so is every request's answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatmesh::lines::LineReader;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinSet;

use crate::history::{Hold, Kind, Request, Secs, Session};
use crate::schedule::Rng;

/// How long a client waits for an answer before it gives up on it (longer
/// than the rule's limit, so that late answers are measured, not just missed).
pub const WAIT: Duration = Duration::from_secs(8);
/// Bound on sessions per client, whatever the time budget.
const MAX_SESSIONS: u32 = 2000;
/// The reason text of an eviction (chat/mod.rs).
const EVICTED: &str = "held by a client of another server";

/// What the clients do.
pub struct Workload {
    pub seed: u64,
    pub clients: usize,
    pub servers: Vec<SocketAddr>,
    /// Pool sizes: names user00.., room00..
    pub identities: u64,
    pub rooms: u64,
    /// The lab's time zero.
    pub t0: Instant,
    /// No session starts after this.
    pub stop_at: Instant,
}

/// Runs every client to the end on a runtime of this thread (call it inside
/// the clients' namespace); returns every session.
pub fn run(workload: Workload) -> Vec<Session> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let workload = Arc::new(workload);
    runtime.block_on(async {
        let mut set = JoinSet::new();
        for client in 0..workload.clients {
            set.spawn(one_client(workload.clone(), client));
        }
        let mut sessions = Vec::new();
        while let Some(done) = set.join_next().await {
            sessions.extend(done.expect("a client task panicked"));
        }
        sessions.sort_by_key(|s| (s.client, s.seq));
        sessions
    })
}

async fn one_client(w: Arc<Workload>, client: usize) -> Vec<Session> {
    let mut rng = Rng::new(w.seed ^ (client as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    // Staggered, so that forty connections do not all land at once.
    tokio::time::sleep(Duration::from_millis(25 * client as u64)).await;
    let mut sessions = Vec::new();
    for seq in 0..MAX_SESSIONS {
        if Instant::now() >= w.stop_at {
            break;
        }
        sessions.push(session(&w, client, seq, &mut rng).await);
        tokio::time::sleep(Duration::from_millis(rng.between(20, 300))).await;
    }
    sessions
}

enum Got {
    Line(Value),
    Closed,
    Late,
}

/// One connection and what it recorded.
struct Conn {
    reader: Option<LineReader<OwnedReadHalf>>,
    writer: Option<OwnedWriteHalf>,
    s: Session,
    identity: String,
    t0: Instant,
}

impl Conn {
    fn now(&self) -> Secs {
        self.t0.elapsed().as_secs_f64()
    }

    fn note(&mut self, line: String) {
        let t = self.now();
        self.s.lines.push((t, line));
    }

    /// Sends a request; returns its index in the session's requests.
    async fn request(&mut self, what: &'static str, name: &str, line: String) -> usize {
        let sent = self.now();
        self.s.requests.push(Request {
            what,
            name: name.to_owned(),
            sent,
            answered: None,
            granted: false,
        });
        self.s.lines.push((sent, format!("-> {line}")));
        if let Some(writer) = self.writer.as_mut() {
            // A write that fails means the server is gone; the read that
            // follows sees the close and answers the request.
            let _ = writer.write_all(format!("{line}\n").as_bytes()).await;
        }
        self.s.requests.len() - 1
    }

    fn answered(&mut self, request: usize, granted: bool) {
        let t = self.now();
        let r = &mut self.s.requests[request];
        r.answered = Some(t);
        r.granted = granted;
    }

    /// The next line, the close, or nothing by `until`.
    async fn recv(&mut self, until: tokio::time::Instant) -> Got {
        let Some(reader) = self.reader.as_mut() else {
            return Got::Closed;
        };
        let line = match tokio::time::timeout_at(until, reader.next_line()).await {
            Err(_) => return Got::Late,
            Ok(Ok(Some(bytes))) => String::from_utf8_lossy(bytes).into_owned(),
            Ok(Ok(None)) | Ok(Err(_)) => {
                self.reader = None;
                self.writer = None;
                self.note("closed by the server".into());
                self.end_holds(None, "closed");
                return Got::Closed;
            }
        };
        let value: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        // Others' comings and goings are noise in a report about names.
        if value["type"] != "roomchange" || value["identity"] == self.identity.as_str() {
            self.note(format!("<- {line}"));
        }
        if value["type"] == "error"
            && value["reason"]
                .as_str()
                .is_some_and(|r| r.contains(EVICTED))
        {
            self.end_holds(None, "evicted");
        }
        if value["type"] == "roomchange" && value["identity"] == self.identity.as_str() {
            // Moved out of its own room: the room is gone (deleted or evicted).
            let room = self.open_hold(Kind::Room).map(|h| h.name.clone());
            if let Some(room) = room
                && value["former"] == room.as_str()
                && value["roomid"] != room.as_str()
            {
                let t = self.now();
                if let Some(h) = self.open_hold(Kind::Room) {
                    h.end = Some(t);
                    h.why_end = "room gone";
                }
            }
        }
        Got::Line(value)
    }

    fn open_hold(&mut self, kind: Kind) -> Option<&mut Hold> {
        self.s
            .holds
            .iter_mut()
            .find(|h| h.kind == kind && h.end.is_none())
    }

    fn start_hold(&mut self, kind: Kind, name: &str) {
        let start = self.now();
        self.s.holds.push(Hold {
            kind,
            name: name.to_owned(),
            start,
            end: None,
            why_end: "",
        });
    }

    /// Ends every open hold (at `at`, or now).
    fn end_holds(&mut self, at: Option<Secs>, why: &'static str) {
        let t = at.unwrap_or_else(|| self.now());
        for h in self.s.holds.iter_mut().filter(|h| h.end.is_none()) {
            h.end = Some(t);
            h.why_end = why;
        }
    }

    fn identity_held(&self) -> bool {
        self.s
            .holds
            .iter()
            .any(|h| h.kind == Kind::Identity && h.end.is_none())
    }

    /// Reads until the server closes, for at most `for_at_most`.
    async fn drain(&mut self, for_at_most: Duration) {
        let until = tokio::time::Instant::now() + for_at_most;
        while let Got::Line(_) = self.recv(until).await {}
    }

    /// Closes from this side (if still open) and returns the record.
    fn finish(mut self) -> Session {
        if self.reader.is_some() {
            self.note("client closes the connection".into());
        }
        self.end_holds(None, "client closed");
        self.s
    }
}

/// One session: everything it will do is drawn first, so that the random
/// sequence does not depend on what the servers answered.
async fn session(w: &Workload, client: usize, seq: u32, rng: &mut Rng) -> Session {
    let n = w.servers.len() as u64;
    let server = if rng.chance(60) {
        client % w.servers.len()
    } else {
        rng.below(n) as usize
    };
    let identity = format!("user{:02}", rng.below(w.identities));
    let room = rng
        .chance(50)
        .then(|| format!("room{:02}", rng.below(w.rooms)));
    let hold = Duration::from_millis(rng.between(100, 2500));
    let abrupt = rng.chance(20);

    let mut conn = Conn {
        reader: None,
        writer: None,
        s: Session {
            client,
            seq,
            server,
            lines: Vec::new(),
            requests: Vec::new(),
            holds: Vec::new(),
        },
        identity: identity.clone(),
        t0: w.t0,
    };

    // connect
    let sent = conn.now();
    conn.s.requests.push(Request {
        what: "connect",
        name: String::new(),
        sent,
        answered: None,
        granted: false,
    });
    match tokio::time::timeout(WAIT, TcpStream::connect(w.servers[server])).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            let (r, wr) = stream.into_split();
            conn.reader = Some(LineReader::new(r, 1 << 20));
            conn.writer = Some(wr);
            conn.answered(0, false);
            conn.note("connected".into());
        }
        Ok(Err(e)) => {
            conn.answered(0, false);
            conn.note(format!("connect failed: {e}"));
            return conn.finish();
        }
        Err(_) => {
            conn.note("connect: no answer".into());
            return conn.finish();
        }
    }

    // newidentity
    let line = format!(r#"{{"type":"newidentity","identity":"{identity}"}}"#);
    let request = conn.request("newidentity", &identity, line).await;
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        match conn.recv(until).await {
            Got::Line(v) if v["type"] == "newidentity" => {
                let approved = v["approved"] == "true";
                conn.answered(request, approved);
                if approved {
                    conn.start_hold(Kind::Identity, &identity);
                    break;
                }
                conn.drain(Duration::from_secs(2)).await;
                return conn.finish();
            }
            Got::Line(_) => {}
            Got::Closed => {
                conn.answered(request, false);
                return conn.finish();
            }
            Got::Late => return conn.finish(),
        }
    }

    // createroom
    if let Some(room) = room {
        let line = format!(r#"{{"type":"createroom","roomid":"{room}"}}"#);
        let request = conn.request("createroom", &room, line).await;
        let until = tokio::time::Instant::now() + WAIT;
        loop {
            match conn.recv(until).await {
                Got::Line(v) if v["type"] == "createroom" && v["roomid"] == room.as_str() => {
                    let approved = v["approved"] == "true";
                    conn.answered(request, approved);
                    if approved && conn.identity_held() {
                        conn.start_hold(Kind::Room, &room);
                    }
                    break;
                }
                Got::Line(_) => {}
                Got::Closed => {
                    conn.answered(request, false);
                    return conn.finish();
                }
                Got::Late => return conn.finish(),
            }
        }
    }

    // hold, reading whatever comes (an eviction, a close)
    let until = tokio::time::Instant::now() + hold;
    loop {
        match conn.recv(until).await {
            Got::Line(_) => {}
            Got::Closed => return conn.finish(),
            Got::Late => break,
        }
    }

    if abrupt {
        return conn.finish();
    }

    // quit: the holds end as it is sent (the server releases after that)
    conn.end_holds(None, "quit");
    let request = conn
        .request("quit", &identity, r#"{"type":"quit"}"#.into())
        .await;
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        match conn.recv(until).await {
            Got::Line(v)
                if v["type"] == "roomchange"
                    && v["identity"] == identity.as_str()
                    && v["roomid"] == "" =>
            {
                conn.answered(request, false);
                break;
            }
            Got::Line(_) => {}
            Got::Closed => {
                conn.answered(request, false);
                return conn.finish();
            }
            Got::Late => return conn.finish(),
        }
    }
    conn.drain(Duration::from_secs(2)).await;
    conn.finish()
}

/// Claims `identity` on `server` once; whether it was approved (None: no answer).
pub async fn claim_once(server: SocketAddr, identity: &str) -> Option<bool> {
    let stream = tokio::time::timeout(WAIT, TcpStream::connect(server))
        .await
        .ok()?
        .ok()?;
    let (r, mut wr) = stream.into_split();
    let mut reader = LineReader::new(r, 1 << 20);
    let line = format!("{{\"type\":\"newidentity\",\"identity\":\"{identity}\"}}\n");
    wr.write_all(line.as_bytes()).await.ok()?;
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let line = tokio::time::timeout_at(until, reader.next_line())
            .await
            .ok()?
            .ok()??;
        let v: Value = serde_json::from_slice(line).unwrap_or(Value::Null);
        if v["type"] == "newidentity" {
            let approved = v["approved"] == "true";
            if approved {
                let _ = wr.write_all(b"{\"type\":\"quit\"}\n").await;
            }
            return Some(approved);
        }
    }
}
