//! One client session, the same over TCP and QUIC: read lines, answer them
//! through the [`ChatServer`], and clean up however the connection ends.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::outbox::{noting_congestion, wait_for_readers};
use super::{ChatServer, JoinOutcome, Outbox, Overflow, WriterEnd};
use crate::client_proto::{
    Approved, MAX_MOVE_TOKEN, Request, ServerMessage, new_move_token, valid_name, valid_room_ref,
};
use crate::lines::{LineError, LineReader};

/// How long a moved-away client may keep its old connection open before the
/// server closes it (classic clients close it themselves right after `route`).
const MOVE_LINGER: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest a session reads on after a write to its client failed: what the
/// client sent before is handled, then the session ends.
const DRAIN_AFTER_WRITE_FAILURE: std::time::Duration = std::time::Duration::from_millis(200);

/// How a session's connection should be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// Everything was written (or nothing is stuck): close normally.
    Closed,
    /// Output is stuck in the connection (a client that does not read):
    /// reset it now, so that neither the socket nor its kernel buffer
    /// outlives the session.
    Abort,
}

enum Phase {
    /// Connected, no identity yet: only `newidentity` and `movejoin` are taken.
    Handshake,
    /// Identified, in a room of this server.
    Active(String),
    /// Sent `route` for `room`; the client is on its way to another server.
    /// The move's `token` and `ip` name it, should the client quit here.
    Moved {
        identity: String,
        room: String,
        token: String,
        ip: IpAddr,
    },
    /// Quit: nothing more to clean up.
    Left,
}

enum Flow {
    Continue,
    Close,
}

struct Session {
    chat: Arc<ChatServer>,
    outbox: Arc<Outbox>,
    phase: Phase,
    /// The client's source address: a move started here may be completed
    /// without a token only from it, and a `movejoin` without a token is
    /// checked against it.
    peer_ip: IpAddr,
    /// Which port of another server a `route` names.
    transport: Transport,
    /// Refused `createroom`s so far: the first [`ROOM_REFUSALS_LOGGED`] are
    /// logged at info, the rest at debug, so one client repeating a refused
    /// request cannot fill the log (the session stays open after each).
    room_refusals: u32,
    /// Cancelled when the connection is reset while a request is being
    /// answered: a claim still waiting for its turn is then never asked.
    client_gone: CancellationToken,
}

/// Refused `createroom`s of one session logged at info.
const ROOM_REFUSALS_LOGGED: u32 = 16;

/// Which kind of connection a session runs on: it decides which port of
/// another server a `route` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP or QUIC on the client port.
    Stream,
    /// WebSocket on the web port.
    Web,
}

/// Runs a client session on TCP or QUIC until the client quits, the
/// connection drops, or `shutdown` fires. `peer_ip` is the client's source
/// address (moves are bound to it). Never panics on client input.
///
/// On return the writer is gone (a dropped session's at once, however stuck
/// its write); the caller closes the connection as [`SessionEnd`] says.
pub async fn run_session<R, W>(
    chat: Arc<ChatServer>,
    reader: R,
    writer: W,
    peer_ip: IpAddr,
    shutdown: CancellationToken,
) -> SessionEnd
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    run_session_on(Transport::Stream, chat, reader, writer, peer_ip, shutdown).await
}

/// [`run_session`] on a given transport: a `route` names the port of the
/// other server that serves `transport`.
pub async fn run_session_on<R, W>(
    transport: Transport,
    chat: Arc<ChatServer>,
    reader: R,
    writer: W,
    peer_ip: IpAddr,
    shutdown: CancellationToken,
) -> SessionEnd
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let limits = chat.limits().clone();
    let outbox = Arc::new(
        Outbox::new(limits.outbox_bytes)
            .paced(limits.event_pace)
            .budgeted(chat.outbox_budget()),
    );
    let mut writer_task = tokio::spawn({
        let outbox = outbox.clone();
        let chat = chat.clone();
        async move { outbox.write_to(writer, &chat.write_turns).await }
    });
    let mut lines = LineReader::new(reader, limits.max_line_bytes);
    let mut session = Session {
        chat,
        outbox: outbox.clone(),
        phase: Phase::Handshake,
        peer_ip,
        transport,
        room_refusals: 0,
        client_gone: CancellationToken::new(),
    };
    let handshake_deadline = Instant::now() + limits.handshake_timeout;
    let mut moved_at = None;
    // Set once a write failed (the connection is gone): until then, what the
    // client sent before is still read and handled.
    let mut draining_until = None;
    loop {
        let deadline = match session.phase {
            Phase::Handshake => Some(handshake_deadline),
            Phase::Moved { .. } => moved_at.map(|t: Instant| t + MOVE_LINGER),
            Phase::Active(_) | Phase::Left => None,
        };
        let deadline = match (deadline, draining_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Lines the client sent before its connection failed are handled
        // before the failure (seen by the writer) ends the session.
        let buffered = lines.has_line();
        let read = async {
            match deadline {
                Some(at) => tokio::time::timeout_at(at, lines.next_line()).await.ok(),
                None => Some(lines.next_line().await),
            }
        };
        let line = tokio::select! {
            _ = shutdown.cancelled() => {
                // The whole server stops: close without goodbyes to the others,
                // who are being closed too.
                outbox.kill();
                session.phase = Phase::Left;
                break;
            }
            // Evicted: stop reading now, not once the writer is done (a
            // client that does not read would keep the session open).
            _ = outbox.finishing().cancelled() => break,
            _ = outbox.dropped().cancelled(), if !buffered && draining_until.is_none() => {
                if outbox.overflowed().is_none() {
                    // A write failed: the connection is gone, but the lines
                    // the client sent before are read and handled (a read of
                    // a reset connection does not wait), for a moment.
                    draining_until = Some(Instant::now() + DRAIN_AFTER_WRITE_FAILURE);
                    continue;
                }
                // Too slow: logged below, however the loop ends.
                break;
            }
            line = read => line,
        };
        let flow = match line {
            None if draining_until.is_some() => break,
            None if matches!(session.phase, Phase::Handshake) => {
                session.chat.connection_lines.log(|left_out| {
                    info!(
                        left_out,
                        "no newidentity within the handshake timeout; closing"
                    );
                });
                session.reply(ServerMessage::error(format!(
                    "no newidentity or movejoin within {} ms",
                    limits.handshake_timeout.as_millis()
                )));
                Flow::Close
            }
            None => Flow::Close,
            Some(Ok(Some(line))) => match session.parse_line(line) {
                None => Flow::Continue,
                Some(request) => {
                    let client_gone = session.client_gone.clone();
                    let handled = noting_congestion(session.handle(request));
                    tokio::pin!(handled);
                    // Answering may wait (for the leader, or for a turn to
                    // ask it): meanwhile the connection is watched, so a
                    // client that resets it gives its turn up. It is looked
                    // at first, so a reset already seen is not even asked
                    // for (a flood of requests reset at once: in a test, the
                    // claims reaching the leader halved). This costs no
                    // read: the one that finds nothing more to read moves
                    // here from the next request's.
                    // Once draining, the drop is known and the requests
                    // read on are handled until the reads end.
                    let mut watch_dropped = draining_until.is_none();
                    let (flow, congested) = loop {
                        tokio::select! {
                            biased;
                            error = lines.hang_up(), if !client_gone.is_cancelled() => {
                                debug!(%error, "connection reset while its request was answered");
                                client_gone.cancel();
                                continue;
                            }
                            // A reset the writer saw first (reads then see
                            // only an end), a client too slow for its
                            // outbox, or an eviction: the session is over,
                            // once the requests already read are handled.
                            () = outbox.dropped().cancelled(), if watch_dropped && !client_gone.is_cancelled() => {}
                            done = &mut handled => break done,
                        }
                        watch_dropped = false;
                        if !lines.has_line() {
                            debug!("session dropped while its request was answered");
                            client_gone.cancel();
                        }
                    };
                    // The answer goes out now, not at the pace of events.
                    outbox.flush();
                    // No further request while this one's lines fill the
                    // outboxes of readers faster than they are written.
                    wait_for_readers(&congested).await;
                    if client_gone.is_cancelled() {
                        Flow::Close
                    } else {
                        flow
                    }
                }
            },
            Some(Ok(None)) => break,
            Some(Err(LineError::TooLong(max))) => {
                session.chat.connection_lines.log(|left_out| {
                    warn!(max, left_out, "client line too long; closing");
                });
                session.reply(ServerMessage::error(format!(
                    "line longer than {max} bytes; closing"
                )));
                Flow::Close
            }
            Some(Err(LineError::Io(e))) => {
                debug!(error = %e, "client read failed");
                break;
            }
        };
        if matches!(session.phase, Phase::Moved { .. }) && moved_at.is_none() {
            moved_at = Some(Instant::now());
        }
        if let Flow::Close = flow {
            break;
        }
    }
    // Named in the drop's log line below.
    let identity = match &session.phase {
        Phase::Active(identity) | Phase::Moved { identity, .. } => identity.clone(),
        _ => String::new(),
    };
    // However the connection ended, an identified client leaves its room.
    if let Phase::Active(identity) = &session.phase {
        session.chat.leave(identity, false).await;
        debug!(%identity, "client disconnected");
    }
    outbox.finish();
    // A closing session's last lines (a goodbye, an error, what was queued)
    // get as long to go out as a new client gets to say who it is; then the
    // connection is reset: a client that stops reading would otherwise hold
    // it for ever.
    let writer_end = match tokio::time::timeout(limits.handshake_timeout, &mut writer_task).await {
        Ok(end) => end.unwrap_or(WriterEnd::Interrupted),
        Err(_) => {
            session.chat.connection_lines.log(|left_out| {
                info!(
                    left_out,
                    "client did not take its last lines; resetting the connection"
                );
            });
            // Stops the write under way.
            outbox.kill();
            (&mut writer_task).await.unwrap_or(WriterEnd::Interrupted)
        }
    };
    // Logged here, not where the drop is seen: the session may see it first
    // while answering a request, or not at all (a shutdown, or its writer
    // dropping it for the budget while the last lines go out).
    let overflow = outbox.overflowed();
    if let Some(overflow) = overflow {
        match overflow {
            Overflow::Limit => warn!(
                %identity,
                limit = limits.outbox_bytes,
                "session dropped: client too slow, outbox full"
            ),
            Overflow::Budget { grace } => warn!(
                %identity,
                budget = limits.outbox_total_bytes,
                waited_s = grace.as_secs(),
                "session dropped: client too slow, it took no output for waited_s seconds while the server's outboxes held their whole budget"
            ),
        }
    }
    if overflow.is_some() || writer_end == WriterEnd::Interrupted {
        SessionEnd::Abort
    } else {
        SessionEnd::Closed
    }
}

impl Session {
    fn reply(&self, message: ServerMessage) {
        self.outbox.push(message.encode());
    }

    /// The request a line makes; `None` for an empty line (ignored) or one
    /// that is not a request (answered with an error here).
    fn parse_line(&self, line: &[u8]) -> Option<Request> {
        // A client that writes through a UTF-8 text writer with a byte
        // order mark (.NET's `Encoding.UTF8`, say) starts its first line
        // with one: not JSON, and refused it would never log in.
        let line = match self.phase {
            Phase::Handshake => line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line),
            _ => line,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        match Request::parse(line) {
            Ok(request) => Some(request),
            Err(reason) => {
                debug!(reason = %Logged(&reason), "bad client line");
                self.reply(ServerMessage::error(reason));
                None
            }
        }
    }

    async fn handle(&mut self, request: Request) -> Flow {
        let (identity, request) = match (&self.phase, request) {
            (Phase::Handshake, Request::NewIdentity { identity }) => {
                return self.new_identity(identity).await;
            }
            (
                Phase::Handshake,
                Request::MoveJoin {
                    former,
                    roomid,
                    identity,
                    token,
                },
            ) => return self.move_join(identity, former, roomid, token).await,
            (Phase::Handshake, _) => {
                self.reply(ServerMessage::error("send newidentity first"));
                return Flow::Continue;
            }
            (
                Phase::Moved {
                    identity,
                    room,
                    token,
                    ip,
                },
                Request::Quit,
            ) => {
                // A quit on the connection the client was routed away from
                // (a user quitting while being routed): the move is given
                // up and the identity freed at once, not held for the move
                // timeout. Only that move: if the client arrived meanwhile,
                // or the name is held here again (granted anew, or back by
                // another move), nothing is freed.
                self.chat
                    .directory()
                    .give_up_move(identity, token, *ip)
                    .await;
                self.reply(ServerMessage::room_change(identity, room, ""));
                info!(%identity, room = %room, "client quit after its route");
                self.phase = Phase::Left;
                return Flow::Close;
            }
            (Phase::Moved { .. } | Phase::Left, _) => {
                self.reply(ServerMessage::error(
                    "this session moved to another server; connect there",
                ));
                return Flow::Continue;
            }
            (Phase::Active(_), Request::NewIdentity { .. } | Request::MoveJoin { .. }) => {
                self.reply(ServerMessage::error("this session already has an identity"));
                return Flow::Continue;
            }
            (Phase::Active(identity), request) => (identity.clone(), request),
        };
        let chat = &self.chat;
        match request {
            Request::List => chat.list(&self.outbox),
            Request::Who => chat.who(&identity),
            Request::Message { content } => chat.message(&identity, content),
            Request::CreateRoom { roomid } => self.create_room(&identity, roomid).await,
            Request::JoinRoom { roomid } => {
                if let JoinOutcome::Remote(mut remote) = chat.join_room(&identity, &roomid) {
                    if self.transport == Transport::Web {
                        // A browser can only follow a route to a web port.
                        match remote.web_port {
                            Some(web_port) => remote.port = web_port,
                            None => {
                                info!(%identity, room = %roomid, to = %remote.server, "move refused: that server has no web_port");
                                chat.refuse_join(&identity, &roomid);
                                return Flow::Continue;
                            }
                        }
                    }
                    let chat = chat.clone();
                    // One token per move: only this client learns it (in
                    // `route`), and the destination checks it (issue 12).
                    let token = new_move_token();
                    // A web page always echoes the token: its move has no
                    // address to be completed from without one (behind a
                    // proxy or NAT, every browser has the same address).
                    let ip = if self.transport == Transport::Web {
                        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                    } else {
                        self.peer_ip
                    };
                    let gone = self.client_gone.clone();
                    let start = chat
                        .directory()
                        .start_move(&identity, &remote, &token, ip, gone);
                    match start.await {
                        Ok(()) => {
                            chat.move_out(&identity, &roomid, &remote, &token);
                            info!(%identity, room = %roomid, to = %remote.server, "client routed to another server");
                            self.phase = Phase::Moved {
                                identity: identity.clone(),
                                room: roomid.clone(),
                                token,
                                ip,
                            };
                        }
                        Err(why) => {
                            info!(%identity, room = %roomid, reason = %why, "move refused");
                            chat.refuse_join(&identity, &roomid);
                        }
                    }
                }
            }
            Request::DeleteRoom { roomid } => chat.delete_room(&identity, &roomid).await,
            Request::Quit => {
                chat.leave(&identity, true).await;
                debug!(%identity, "client quit");
                self.phase = Phase::Left;
                return Flow::Close;
            }
            Request::NewIdentity { .. } | Request::MoveJoin { .. } => {}
        }
        Flow::Continue
    }

    async fn new_identity(&mut self, identity: String) -> Flow {
        let refuse = |session: &Self, why: &str| {
            match session
                .chat
                .identity_refusals
                .take(std::time::Instant::now())
            {
                Some(0) => {
                    info!(identity = %Logged(&identity), reason = why, "claim_denied: identity refused");
                }
                Some(left_out) => info!(
                    identity = %Logged(&identity),
                    reason = why,
                    left_out,
                    "claim_denied: identity refused (and {left_out} more since the last line)"
                ),
                None => {}
            }
            session.reply(ServerMessage::NewIdentity {
                approved: Approved(false),
            });
            Flow::Close
        };
        if !valid_name(&identity) {
            return refuse(self, "invalid identity");
        }
        let claim = (self.chat.directory()).claim_identity(&identity, self.client_gone.clone());
        if let Err(why) = claim.await {
            return refuse(self, &why);
        }
        let reply = ServerMessage::NewIdentity {
            approved: Approved(true),
        }
        .encode();
        if !self.enter(&identity, reply, "", None) {
            return refuse(self, "identity already has a session here");
        }
        debug!(%identity, "client identified");
        Flow::Continue
    }

    async fn move_join(
        &mut self,
        identity: String,
        former: String,
        room: String,
        token: Option<String>,
    ) -> Flow {
        let serverid = self.chat.id().to_owned();
        // `former` is relayed to the room in `roomchange`: anything that is
        // not a room id or the main hall of a server of the cluster (a
        // hostile client's text, escape sequences, "MainHall-admin") becomes
        // "", which reads as a plain arrival. So does the room it moves into:
        // relayed, `roomchange(I, R, R)` would read as a refused join. Refusing
        // instead would cost a client with a garbled `former` its move.
        let former = if valid_room_ref(&former)
            && former != room
            && self.known_hall_or_room_id(&former)
        {
            former
        } else {
            self.chat.connection_lines.log(|left_out| {
                info!(identity = %Logged(&identity), left_out, "movejoin with an invalid former room; relayed as an arrival");
            });
            String::new()
        };
        // A token longer than any we make is wrong without asking anybody;
        // so is none from a web page, which always echoes the one it got
        // (by address alone, behind a proxy, any browser would prove any
        // routed classic client's move).
        let token_fits = match &token {
            Some(token) => token.len() <= MAX_MOVE_TOKEN,
            None => self.transport != Transport::Web,
        };
        let accepted = if !valid_name(&identity) {
            Err("invalid identity".to_owned())
        } else if !token_fits {
            Err("token too long, or none from a web page".to_owned())
        } else {
            self.chat
                .directory()
                .accept_move(
                    &identity,
                    token.as_deref(),
                    self.peer_ip,
                    self.client_gone.clone(),
                )
                .await
        };
        let reply = ServerMessage::ServerChange {
            approved: Approved(accepted.is_ok()),
            serverid: serverid.clone(),
        };
        let entered = accepted.and_then(|()| {
            self.enter(&identity, reply.encode(), &former, Some(&room))
                .then_some(())
                .ok_or_else(|| "a client here already has that identity".to_owned())
        });
        if let Err(reason) = entered {
            // The token itself is never logged.
            self.chat.movejoin_refusals.log(|left_out| {
                info!(
                    identity = %Logged(&identity),
                    peer = %self.peer_ip,
                    with_token = token.is_some(),
                    %reason,
                    left_out,
                    "movejoin refused"
                );
            });
            self.reply(ServerMessage::ServerChange {
                approved: Approved(false),
                serverid,
            });
            return Flow::Close;
        }
        info!(%identity, %former, room = %Logged(&room), "client moved in");
        Flow::Continue
    }

    /// Whether `room` (already shaped like a room reference) may name where
    /// a client came from: a room id, or the main hall of a server this one
    /// knows (its own, or a live one of the cluster).
    fn known_hall_or_room_id(&self, room: &str) -> bool {
        !room.starts_with(crate::config::MAIN_HALL_PREFIX)
            || room == self.chat.main_hall()
            || self.chat.directory().remote_room(room).is_some()
    }

    fn enter(&mut self, identity: &str, reply: Bytes, former: &str, room: Option<&str>) -> bool {
        let entered = self
            .chat
            .enter(identity, self.outbox.clone(), reply, former, room);
        if entered {
            self.phase = Phase::Active(identity.to_owned());
        } else {
            drop(self.chat.directory().release_identity(identity, None));
        }
        entered
    }

    async fn create_room(&mut self, identity: &str, room: String) {
        let chat = self.chat.clone();
        let refuse = |session: &mut Self, why: &str| {
            session.room_refusals = session.room_refusals.saturating_add(1);
            match session.room_refusals {
                n if n < ROOM_REFUSALS_LOGGED => {
                    info!(%identity, room = %Logged(&room), reason = why, "claim_denied: room refused");
                }
                ROOM_REFUSALS_LOGGED => info!(
                    %identity,
                    room = %Logged(&room),
                    reason = why,
                    "claim_denied: room refused; this client's further refusals are logged at debug"
                ),
                _ => {
                    debug!(%identity, room = %Logged(&room), reason = why, "claim_denied: room refused");
                }
            }
            session.reply(ServerMessage::CreateRoom {
                roomid: room.clone(),
                approved: Approved(false),
            });
        };
        if !valid_name(&room) {
            return refuse(self, "invalid room id");
        }
        if chat.owns_room(identity) {
            return refuse(self, "client already owns a room");
        }
        if chat.has_room(&room) {
            return refuse(self, "room id in use");
        }
        let claim = (chat.directory()).claim_room(&room, identity, self.client_gone.clone());
        match claim.await {
            Ok(()) => {
                debug!(%identity, %room, "room created");
                chat.create_room(identity, &room);
            }
            Err(why) => refuse(self, &why),
        }
    }
}

/// Text a client chose, as a log field: control and invisible formatting
/// characters escaped (`\u{1b}`), so a client can neither colour an
/// operator's terminal nor forge log lines; and cut to [`LOGGED_CHARS`]
/// characters with the length it had, so one request cannot make a log
/// line of its size (a 60 KB room id refused over and over grew the log
/// about as fast as the client sent). Names already checked need none of it.
pub(crate) struct Logged<'a>(pub(crate) &'a str);

/// Characters of client text a log line shows.
const LOGGED_CHARS: usize = 64;

impl std::fmt::Display for Logged<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for (i, c) in self.0.chars().enumerate() {
            if i == LOGGED_CHARS {
                return write!(f, "...({} bytes)", self.0.len());
            }
            let invisible = matches!(
                c,
                '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}'
            );
            if c.is_control() || invisible {
                write!(f, "\\u{{{:x}}}", u32::from(c))?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod logged_tests {
    use super::*;

    #[test]
    fn client_text_is_logged_escaped_and_cut() {
        assert_eq!(Logged("Adel").to_string(), "Adel");
        assert_eq!(
            Logged("Ev\u{1b}[31m\r\nX\u{202e}\u{85}").to_string(),
            "Ev\\u{1b}[31m\\u{d}\\u{a}X\\u{202e}\\u{85}"
        );
        let long = "r".repeat(60_000);
        let shown = Logged(&long).to_string();
        assert_eq!(
            shown,
            format!("{}...(60000 bytes)", "r".repeat(LOGGED_CHARS))
        );
    }
}
