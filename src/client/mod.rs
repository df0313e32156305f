//! The bundled CLI client: `#list`, `#who`, `#createroom R`, `#joinroom R`,
//! `#deleteroom R`, `#quit`, anything else is a message. QUIC by default, TCP
//! with `--tcp`; follows `route` by itself.
//!
//! It reads commands one line at a time, on a terminal through a line
//! editor (`editor.rs`), piped as plain lines, so it can be scripted: after a
//! command that has an answer it waits for that answer (bounded) before
//! reading the next line, and at end of input it quits cleanly. If its server
//! dies it claims its identity again on another one, backing off between
//! rounds of attempts (`reconnect.rs`).

mod connection;
mod editor;
mod reconnect;

use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::Instant;

use crate::client_proto::{Request, ServerMessage};
use connection::{Connection, Transport};
use editor::{Console, Input};
use reconnect::{Answer, Backoff, round_line, seconds};

/// How long the client waits for the answer to a command before reading on.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the client needs.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The identity to claim.
    pub identity: String,
    /// `host:port` of the first server.
    pub server: String,
    /// Other servers (`host:port`) to move to if the current one dies.
    pub fallbacks: Vec<String>,
    /// Speak the classic protocol over plain TCP instead of QUIC.
    pub tcp: bool,
    /// CA certificate that QUIC servers must be signed by.
    pub ca: PathBuf,
}

/// What the client is waiting for before it reads the next command.
#[derive(Debug, Clone, PartialEq)]
enum Awaiting {
    Nothing,
    RoomList,
    RoomContents,
    CreateRoom,
    DeleteRoom,
    /// A roomchange of ourselves, or a route.
    Join,
    /// Our own quit roomchange, or the end of the connection.
    Quit,
}

struct Client {
    options: ClientOptions,
    connection: Connection,
    room: String,
    awaiting: Awaiting,
    deadline: Option<Instant>,
    console: Console,
}

/// Runs the client until `#quit`, end of input, or the server closing.
pub async fn run(options: ClientOptions) -> Result<()> {
    let transport = if options.tcp {
        Transport::Tcp
    } else {
        Transport::quic(&options.ca)?
    };
    let connection = match identify(&transport, &options.server, &options.identity).await {
        Ok(connection) => connection,
        Err(Answer::IdentityRefused) => bail!(
            "identity {:?} refused: it must be 3-16 letters or digits starting with a letter, and not in use anywhere in the cluster",
            options.identity
        ),
        Err(answer) => bail!("cannot connect to {}: {answer}", visible(&options.server)),
    };
    let mut client = Client {
        options,
        connection,
        room: String::new(),
        awaiting: Awaiting::Nothing,
        deadline: None,
        console: Console::open(),
    };
    client.say(&format!(
        "connected to {} as {} over {}",
        client.options.server,
        client.options.identity,
        client.connection.transport_name()
    ));
    client.await_main_hall();
    client.prompt();
    let result = client.run().await;
    client.connection.close().await;
    // The terminal as it was, before main prints any error.
    client.console.close();
    result
}

/// How long the client keeps trying the other servers after losing its own.
/// A dead server's names are freed within its peers' failure timeout; a
/// minute also covers a short outage of the whole cluster.
const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// Longest one attempt to claim the identity on one server may take.
const ATTEMPT_TIMEOUT: Duration = ANSWER_TIMEOUT;

/// Connects to `server` and claims `identity`: the connection if approved,
/// else what the server answered (or why it could not be reached).
async fn identify(
    transport: &Transport,
    server: &str,
    identity: &str,
) -> Result<Connection, Answer> {
    claim(open(transport, server).await?, identity).await
}

/// Opens a connection to `server` (no identity yet), bounded in time.
async fn open(transport: &Transport, server: &str) -> Result<Connection, Answer> {
    match tokio::time::timeout(ATTEMPT_TIMEOUT, Connection::open(transport, server)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(Answer::of_error(&e)),
        Err(_) => Err(Answer::TimedOut),
    }
}

/// Claims `identity` on an open connection, bounded in time.
async fn claim(mut connection: Connection, identity: &str) -> Result<Connection, Answer> {
    let answer = async {
        connection
            .send(&Request::NewIdentity {
                identity: identity.to_owned(),
            })
            .await?;
        connection.recv_timeout(ANSWER_TIMEOUT).await
    };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, answer).await {
        Ok(Ok(Some(ServerMessage::NewIdentity { approved }))) if approved.0 => Ok(connection),
        Ok(Ok(Some(ServerMessage::NewIdentity { .. }))) => Err(Answer::IdentityRefused),
        // "server full" and the like.
        Ok(Ok(Some(ServerMessage::Error { reason }))) => Err(Answer::Said(reason)),
        Ok(Ok(Some(other))) => Err(Answer::Other(format!(
            "unexpected answer to newidentity: {other:?}"
        ))),
        Ok(Ok(None)) => Err(Answer::Closed),
        Ok(Err(e)) => Err(Answer::of_error(&e)),
        Err(_) => Err(Answer::TimedOut),
    }
}

impl Client {
    /// The server died under us: claim the identity again on another one,
    /// in rounds over every server, backing off between rounds. Returns
    /// false if the user quit while waiting.
    async fn reconnect(&mut self) -> Result<bool> {
        let lost = self.options.server.clone();
        let mut candidates: Vec<String> = self
            .options
            .fallbacks
            .iter()
            .filter(|s| **s != lost)
            .cloned()
            .collect();
        if candidates.is_empty() {
            bail!("the server closed the connection");
        }
        candidates.push(lost.clone());
        self.say(&format!(
            "lost the connection to {lost}; reconnecting to another server as {}",
            self.options.identity
        ));
        let transport = self.connection.transport().clone();
        let started = Instant::now();
        let deadline = started + RECONNECT_FOR;
        let mut backoff = Backoff::new();
        let mut wait = backoff.next_delay();
        loop {
            if !self.pause(wait).await? {
                self.say("stopped reconnecting; bye");
                return Ok(false);
            }
            let round = backoff.rounds();
            let mut answers = Vec::with_capacity(candidates.len());
            // Every server at once for the connection (a QUIC server that
            // is down costs its handshake timeout, a few seconds), then the
            // identity claimed in order, so the preferred server gets it.
            let opened = futures_util::future::join_all(
                candidates.iter().map(|server| open(&transport, server)),
            )
            .await;
            for (server, opened) in candidates.iter().zip(opened) {
                // Refused identity: the dead server's hold on the name is not
                // yet released; unreachable: try the next one.
                let claimed = match opened {
                    Ok(connection) => claim(connection, &self.options.identity).await,
                    Err(answer) => Err(answer),
                };
                match claimed {
                    Ok(connection) => {
                        self.connection = connection;
                        self.options.server = server.clone();
                        self.room.clear();
                        self.expect(Awaiting::Nothing);
                        self.await_main_hall();
                        if !answers.is_empty() {
                            self.say(&round_line(round, &answers, None));
                        }
                        self.say(&format!(
                            "back online: reconnected to {server} as {} ({} after losing {lost})",
                            self.options.identity,
                            seconds(started.elapsed()),
                        ));
                        // The other connections opened this round close
                        // unused as they drop.
                        return Ok(true);
                    }
                    Err(answer) => answers.push((server.clone(), answer)),
                }
            }
            wait = backoff.next_delay();
            let give_up = Instant::now() + wait >= deadline;
            self.say(&round_line(round, &answers, (!give_up).then_some(wait)));
            if give_up {
                bail!(
                    "the server closed the connection, and no other server took identity {} within {} s",
                    self.options.identity,
                    RECONNECT_FOR.as_secs()
                );
            }
        }
    }

    /// Waits `wait` between reconnection rounds. A person at the terminal
    /// may quit meanwhile (false); a script's next lines wait for the
    /// reconnection, as they always did.
    async fn pause(&mut self, wait: Duration) -> Result<bool> {
        if wait.is_zero() {
            return Ok(true);
        }
        let until = Instant::now() + wait;
        if !self.console.interactive() {
            tokio::time::sleep_until(until).await;
            return Ok(true);
        }
        loop {
            let prompt = self.prompt_text();
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return Ok(true),
                input = self.console.next(&prompt) => match input? {
                    Input::Line(line) if line.trim().is_empty() => {}
                    Input::Line(_) => self.say("not sent: reconnecting (Ctrl-C or Ctrl-D quits)"),
                    Input::End | Input::Interrupted => return Ok(false),
                },
            }
        }
    }

    async fn run(&mut self) -> Result<()> {
        let mut input_open = true;
        // At a terminal the line editor holds the terminal in raw mode: end
        // cleanly on SIGTERM or a hang-up rather than leave it so. Piped
        // clients keep the default (they are killed).
        let mut terminated = match &self.console {
            Console::Editor(_) => vec![
                signal(SignalKind::terminate())?,
                signal(SignalKind::hangup())?,
            ],
            _ => Vec::new(),
        };
        loop {
            let read_input = input_open && self.awaiting == Awaiting::Nothing;
            let deadline = self.deadline;
            let prompt = self.prompt_text();
            tokio::select! {
                input = self.console.next(&prompt), if read_input => {
                    match input? {
                        Input::Line(line) => self.command(&line).await?,
                        Input::End | Input::Interrupted => {
                            input_open = false;
                            self.command("#quit").await?;
                        }
                    }
                }
                _ = any_signal(&mut terminated), if input_open && !terminated.is_empty() => {
                    input_open = false;
                    self.command("#quit").await?;
                }
                message = self.connection.recv() => {
                    match message? {
                        Some(message) => {
                            if !self.event(message).await? {
                                return Ok(());
                            }
                        }
                        None => {
                            if self.awaiting == Awaiting::Quit {
                                return Ok(());
                            }
                            if !self.reconnect().await? {
                                return Ok(());
                            }
                        }
                    }
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    if self.awaiting == Awaiting::Quit {
                        return Ok(());
                    }
                    self.say(&format!("no answer from the server within {} s", ANSWER_TIMEOUT.as_secs()));
                    self.expect(Awaiting::Nothing);
                }
            }
        }
    }

    /// At a terminal, the line editor draws the prompt (with the room) when
    /// it starts reading a line and cannot change it meanwhile: so the first
    /// line is read once the server has put us in its main hall (bounded by
    /// the answer timeout). Piped input is read at once, as it always was.
    fn await_main_hall(&mut self) {
        if let Console::Editor(_) = self.console {
            self.expect(Awaiting::Join);
        }
    }

    fn expect(&mut self, awaiting: Awaiting) {
        self.deadline = (awaiting != Awaiting::Nothing).then(|| Instant::now() + ANSWER_TIMEOUT);
        self.awaiting = awaiting;
    }

    async fn command(&mut self, line: &str) -> Result<()> {
        let (request, awaiting) = match parse_command(line) {
            Ok(Some(pair)) => pair,
            Ok(None) => {
                self.prompt();
                return Ok(());
            }
            Err(usage) => {
                self.say(&usage);
                return Ok(());
            }
        };
        self.connection.send(&request).await?;
        self.expect(awaiting);
        if self.awaiting == Awaiting::Nothing {
            self.prompt();
        }
        Ok(())
    }

    /// Shows one server line; returns false when the session is over.
    async fn event(&mut self, message: ServerMessage) -> Result<bool> {
        let me = self.options.identity.clone();
        match message {
            ServerMessage::RoomChange {
                identity,
                former,
                roomid,
            } => {
                let mine = identity == me;
                if former == roomid {
                    self.say(&format!("{identity} could not join {roomid}"));
                } else if roomid.is_empty() {
                    self.say(&format!("{identity} quit"));
                } else if former.is_empty() {
                    self.say(&format!("{identity} joins {roomid}"));
                } else {
                    self.say(&format!("{identity} moves from {former} to {roomid}"));
                }
                if mine {
                    if roomid.is_empty() {
                        // Our own quit: the session is over.
                        return Ok(false);
                    }
                    if former != roomid {
                        self.room = roomid;
                    }
                    if self.awaiting == Awaiting::Join {
                        self.expect(Awaiting::Nothing);
                    }
                }
            }
            ServerMessage::Message { identity, content } => {
                self.say(&format!("{identity}: {content}"));
            }
            ServerMessage::RoomList { rooms } => {
                self.say(&format!("rooms: {}", rooms.join(", ")));
                self.answered(Awaiting::RoomList);
            }
            ServerMessage::RoomContents {
                roomid,
                identities,
                owner,
            } => {
                let people: Vec<String> = identities
                    .iter()
                    .map(|i| {
                        if *i == owner {
                            format!("{i} (owner)")
                        } else {
                            i.clone()
                        }
                    })
                    .collect();
                self.say(&format!("in {roomid}: {}", people.join(", ")));
                self.answered(Awaiting::RoomContents);
            }
            ServerMessage::CreateRoom { roomid, approved } => {
                if approved.0 {
                    self.say(&format!("room {roomid} created"));
                } else {
                    self.say(&format!(
                        "room {roomid} not created (invalid or taken id, or you already own a room)"
                    ));
                }
                let moving = approved.0;
                self.answered_then(Awaiting::CreateRoom, moving);
            }
            ServerMessage::DeleteRoom { roomid, approved } => {
                if approved.0 {
                    self.say(&format!("room {roomid} deleted"));
                } else {
                    self.say(&format!(
                        "room {roomid} not deleted (no such room, or not yours)"
                    ));
                }
                // Deleting the room we are in moves us to the main hall.
                let moving = approved.0 && roomid == self.room;
                self.answered_then(Awaiting::DeleteRoom, moving);
            }
            ServerMessage::Route {
                roomid,
                host,
                port,
                token,
            } => {
                self.follow_route(roomid, host, port, token).await?;
            }
            ServerMessage::ServerChange { approved, serverid } => {
                self.say(&format!(
                    "server change to {serverid} {}",
                    if approved.0 { "approved" } else { "refused" }
                ));
            }
            ServerMessage::NewIdentity { approved } => {
                self.say(&format!("newidentity approved: {}", approved.0));
            }
            ServerMessage::Error { reason } => {
                self.say(&format!("server error: {reason}"));
                self.expect(Awaiting::Nothing);
            }
        }
        if self.awaiting == Awaiting::Nothing {
            self.prompt();
        }
        Ok(true)
    }
}

impl Client {
    fn answered(&mut self, what: Awaiting) {
        if self.awaiting == what {
            self.expect(Awaiting::Nothing);
        }
    }

    /// The answer to `what`; if `moving`, our own roomchange follows it.
    /// At the line editor the next line waits for that move too, so that
    /// its prompt shows the new room (the prompt of a line being read
    /// cannot change). Piped input reads on at once, as it always did.
    fn answered_then(&mut self, what: Awaiting, moving: bool) {
        if self.awaiting != what {
            return;
        }
        if moving && matches!(self.console, Console::Editor(_)) {
            self.expect(Awaiting::Join);
        } else {
            self.expect(Awaiting::Nothing);
        }
    }

    /// Prints one event line. Everything printed comes through here or
    /// [`Client::prompt_text`], and both make control characters visible:
    /// peer text must never drive the terminal.
    fn say(&self, text: &str) {
        self.console.print(&visible(text));
    }

    /// The input line's prompt: the room and the identity.
    fn prompt_text(&self) -> String {
        format!(
            "[{}] {}> ",
            visible(&self.room),
            visible(&self.options.identity)
        )
    }

    /// Shows the prompt again after an event, where the console does not
    /// draw it itself.
    fn prompt(&self) {
        self.console.show_prompt(&self.prompt_text());
    }

    async fn follow_route(
        &mut self,
        roomid: String,
        host: String,
        port: String,
        token: Option<String>,
    ) -> Result<()> {
        let target = format!("{host}:{port}");
        self.say(&format!("{roomid} is on {target}; moving there"));
        let transport = self.connection.transport().clone();
        let mut next = Connection::open(&transport, &target)
            .await
            .with_context(|| format!("cannot move to {}", visible(&target)))?;
        // The route's token proves to the new server that this is the
        // client that was routed (without it, only our address does).
        next.send(&Request::MoveJoin {
            former: self.room.clone(),
            roomid: roomid.clone(),
            identity: self.options.identity.clone(),
            token,
        })
        .await?;
        match next.recv_timeout(ANSWER_TIMEOUT).await? {
            Some(ServerMessage::ServerChange { approved, serverid }) if approved.0 => {
                self.say(&format!("now on server {serverid}"));
            }
            Some(ServerMessage::ServerChange { serverid, .. }) => {
                bail!(
                    "server {} refused the move to {}",
                    visible(&serverid),
                    visible(&roomid)
                )
            }
            other => bail!(
                "unexpected answer to movejoin from {}: {other:?}",
                visible(&target)
            ),
        }
        let mut old = std::mem::replace(&mut self.connection, next);
        old.close().await;
        self.options.server = target;
        // The roomchange that follows on the new server answers the join.
        Ok(())
    }
}

/// Peer text made safe to print: control characters (C0 as `^X`, DEL as
/// `^?`, C1 as `\u{9b}`) and the bidirectional overrides (`\u{202e}` and
/// friends) are written as visible escapes, never raw, so a peer's message,
/// name or room id cannot move the cursor, clear the screen, retitle the
/// window or reorder the line. Other text, emoji included, is unchanged.
pub fn visible(text: &str) -> Cow<'_, str> {
    fn hidden(c: char) -> bool {
        c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !text.chars().any(hidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\u{7f}' => out.push_str("^?"),
            // C0: caret notation, `ESC` is `^[` as terminals show it.
            '\0'..='\u{1f}' => {
                out.push('^');
                out.push(char::from(c as u8 + 0x40));
            }
            c if hidden(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Turns a typed line into a request and what answer to wait for.
/// `Ok(None)` for an empty line; `Err(usage)` for a malformed command.
fn parse_command(line: &str) -> Result<Option<(Request, Awaiting)>, String> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    if !trimmed.starts_with('#') {
        return Ok(Some((
            Request::Message {
                content: line.to_owned(),
            },
            Awaiting::Nothing,
        )));
    }
    let mut words = trimmed.split_whitespace();
    let command = words.next().unwrap_or("");
    let argument = words.next();
    let room = |make: fn(String) -> Request, awaiting: Awaiting| match argument {
        Some(room) => Ok(Some((make(room.to_owned()), awaiting))),
        None => Err(format!("usage: {command} ROOM")),
    };
    match command {
        "#list" => Ok(Some((Request::List, Awaiting::RoomList))),
        "#who" => Ok(Some((Request::Who, Awaiting::RoomContents))),
        "#quit" => Ok(Some((Request::Quit, Awaiting::Quit))),
        "#createroom" => room(
            |roomid| Request::CreateRoom { roomid },
            Awaiting::CreateRoom,
        ),
        "#joinroom" => room(|roomid| Request::JoinRoom { roomid }, Awaiting::Join),
        "#deleteroom" => room(
            |roomid| Request::DeleteRoom { roomid },
            Awaiting::DeleteRoom,
        ),
        _ => Err(format!(
            "unknown command {command}; commands: #list #who #createroom R #joinroom R #deleteroom R #quit"
        )),
    }
}

/// The first of `signals` to arrive; never if there are none.
async fn any_signal(signals: &mut [Signal]) {
    if signals.is_empty() {
        return std::future::pending().await;
    }
    let waits = signals.iter_mut().map(|s| Box::pin(s.recv()));
    futures_util::future::select_all(waits).await;
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let parsed = |line: &str| parse_command(line).unwrap().map(|(r, _)| r);
        assert_eq!(parsed("#list"), Some(Request::List));
        assert_eq!(
            parsed("  #joinroom jokes "),
            Some(Request::JoinRoom {
                roomid: "jokes".into()
            })
        );
        assert_eq!(
            parsed("hello #all"),
            Some(Request::Message {
                content: "hello #all".into()
            })
        );
        assert_eq!(parsed("   "), None);
        assert_eq!(
            parse_command("#createroom").unwrap_err(),
            "usage: #createroom ROOM"
        );
        assert!(
            parse_command("#dance")
                .unwrap_err()
                .starts_with("unknown command #dance")
        );
    }

    #[test]
    fn peer_text_is_printed_with_control_characters_visible() {
        assert!(matches!(visible("Hi there 😀"), Cow::Borrowed(_)));
        assert_eq!(visible("\u{1b}[2J\u{1b}]0;pwned\u{7}"), "^[[2J^[]0;pwned^G");
        assert_eq!(visible("a\nb\r\tc\0"), "a^Jb^M^Ic^@");
        assert_eq!(visible("del\u{7f} csi\u{9b}31m"), "del^? csi\\u{9b}31m");
        assert_eq!(visible("abc\u{202e}fed"), "abc\\u{202e}fed");
        // Whatever comes in, nothing below 0x20, DEL or C1 comes out.
        let all: String = (0u32..0x300).filter_map(char::from_u32).collect();
        assert!(!visible(&all).chars().any(char::is_control));
    }
}
