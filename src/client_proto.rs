//! The client protocol of `shared/PROTOCOL.md`: one JSON object per line, the
//! same lines over TCP and over a QUIC stream. Booleans and ports are strings on
//! the wire because existing clients expect exactly that.

use std::borrow::Cow;

use bytes::Bytes;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// A line from a client.
///
/// Parsed by hand ([`Request::parse`]): key order is free and unknown keys
/// are ignored (PROTOCOL.md), so a key the request's type does not use is
/// skipped without being parsed, whatever its value (a number out of any
/// range, nesting past serde_json's depth limit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Request {
    /// First line of a session: claim an identity.
    NewIdentity {
        /// The identity wanted.
        identity: String,
    },
    /// Ask for every room of the cluster.
    List,
    /// Ask who is in the current room.
    Who,
    /// Create a room and move into it.
    CreateRoom {
        /// The room id wanted.
        roomid: String,
    },
    /// Move to another room, possibly on another server.
    JoinRoom {
        /// The room to join.
        roomid: String,
    },
    /// Delete a room this client owns.
    DeleteRoom {
        /// The room to delete.
        roomid: String,
    },
    /// Say something to the current room.
    Message {
        /// Arbitrary UTF-8 text.
        content: String,
    },
    /// Leave the chat.
    Quit,
    /// First line on a new server after a `route`.
    MoveJoin {
        /// The room the client left on its former server.
        former: String,
        /// The room it is moving into.
        roomid: String,
        /// Its identity (already held in the cluster).
        identity: String,
        /// The `token` of the `route` it follows (chatmesh's extra key;
        /// classic clients send none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
}

impl Request {
    /// Parses one line (without its newline). The error is the `reason` to send back.
    pub fn parse(line: &[u8]) -> Result<Request, String> {
        // JSON is UTF-8 throughout, in the values of ignored keys too.
        let line = std::str::from_utf8(line).map_err(|e| {
            format!(
                "not a JSON object: invalid UTF-8 at byte {}",
                e.valid_up_to()
            )
        })?;
        let keys: Keys = serde_json::from_str(line).map_err(|e| {
            let msg = strip_position(&e.to_string());
            match e.classify() {
                serde_json::error::Category::Data => msg,
                _ if is_lone_surrogate(&msg) => LONE_SURROGATE.to_string(),
                _ => format!("not a JSON object: {msg}"),
            }
        })?;
        keys.request()
    }

    /// Encodes the request as one line, newline included.
    pub fn encode(&self) -> Bytes {
        encode_line(self)
    }
}

/// The reason given for a `\u` escape of half a UTF-16 surrogate pair.
const LONE_SURROGATE: &str = "not a JSON object: a \\u escape of half a UTF-16 surrogate pair \
     (a character beyond U+FFFF is written as two escapes, \\uD83D\\uDE00)";

/// serde_json's words for half a surrogate pair ("unexpected end of hex
/// escape") name its parser's state, not the mistake.
fn is_lone_surrogate(msg: &str) -> bool {
    msg.contains("surrogate") || msg.contains("end of hex escape")
}

/// The keys of a request line, each value kept as its raw JSON until the
/// request's type says which ones count.
#[derive(Default)]
struct Keys<'a> {
    /// The value of each known key, by [`Key::index`].
    values: [Option<&'a RawValue>; Key::KNOWN],
    /// Known keys given twice (bit [`Key::index`]): an error only if the
    /// type uses the key.
    twice: u8,
}

impl<'a> Keys<'a> {
    /// The request these keys make, or the reason they make none.
    fn request(&self) -> Result<Request, String> {
        let need = |key| self.string(key).map(Cow::into_owned);
        Ok(match &*self.string(Key::Type)? {
            "newidentity" => Request::NewIdentity {
                identity: need(Key::Identity)?,
            },
            "list" => Request::List,
            "who" => Request::Who,
            "createroom" => Request::CreateRoom {
                roomid: need(Key::RoomId)?,
            },
            "joinroom" => Request::JoinRoom {
                roomid: need(Key::RoomId)?,
            },
            "deleteroom" => Request::DeleteRoom {
                roomid: need(Key::RoomId)?,
            },
            "message" => Request::Message {
                content: need(Key::Content)?,
            },
            "quit" => Request::Quit,
            "movejoin" => Request::MoveJoin {
                former: need(Key::Former)?,
                roomid: need(Key::RoomId)?,
                identity: need(Key::Identity)?,
                // Absent or null: none (a classic client sends none).
                token: match self.raw(Key::Token)? {
                    Some(raw) if raw.get() != "null" => Some(need(Key::Token)?),
                    _ => None,
                },
            },
            other => return Err(format!("unknown type `{other}`")),
        })
    }

    /// The raw value of `key`, if given once.
    fn raw(&self, key: Key) -> Result<Option<&'a RawValue>, String> {
        if self.twice & (1 << key.index()) != 0 {
            return Err(format!("duplicate field `{}`", key.name()));
        }
        Ok(self.values[key.index()])
    }

    /// The string value of `key`, or why there is none. A string without
    /// escapes is the raw value's own text (already checked by the parser).
    fn string(&self, key: Key) -> Result<Cow<'a, str>, String> {
        let raw = self
            .raw(key)?
            .ok_or_else(|| format!("missing field `{}`", key.name()))?
            .get();
        if let Some(text) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"'))
            && !text.contains('\\')
        {
            return Ok(Cow::Borrowed(text));
        }
        serde_json::from_str(raw).map(Cow::Owned).map_err(|e| {
            let msg = strip_position(&e.to_string());
            if is_lone_surrogate(&msg) {
                LONE_SURROGATE.to_string()
            } else {
                format!("{msg} (`{}`)", key.name())
            }
        })
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Keys<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeysVisitor;
        impl<'de> Visitor<'de> for KeysVisitor {
            type Value = Keys<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Keys<'de>, M::Error> {
                let mut keys = Keys::default();
                while let Some(key) = map.next_key::<Key>()? {
                    if key == Key::Other {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    }
                    let value = map.next_value()?;
                    let slot = &mut keys.values[key.index()];
                    if slot.is_some() {
                        keys.twice |= 1 << key.index();
                    }
                    *slot = Some(value);
                }
                Ok(keys)
            }
        }
        d.deserialize_map(KeysVisitor)
    }
}

/// A key of a request line (read without a copy).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Type,
    Identity,
    RoomId,
    Content,
    Former,
    Token,
    /// Any other key: ignored.
    Other,
}

impl Key {
    /// How many keys are known (all but [`Key::Other`]).
    const KNOWN: usize = 6;

    /// Where a known key's value is kept in [`Keys`].
    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Key::Type => "type",
            Key::Identity => "identity",
            Key::RoomId => "roomid",
            Key::Content => "content",
            Key::Former => "former",
            Key::Token => "token",
            Key::Other => "",
        }
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "type" => Key::Type,
                    "identity" => Key::Identity,
                    "roomid" => Key::RoomId,
                    "content" => Key::Content,
                    "former" => Key::Former,
                    "token" => Key::Token,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(KeyVisitor)
    }
}

/// As [`Request::parse`], with serde's errors; only from borrowed input
/// (`serde_json::from_slice` or `from_str`: values are kept as raw JSON).
impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Keys::deserialize(d)?.request().map_err(de::Error::custom)
    }
}

/// serde_json appends "at line 1 column N", which only repeats the line back.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(at) => msg[..at].to_owned(),
        None => msg.to_owned(),
    }
}

/// `"true"` / `"false"` on the wire: existing clients crash on JSON booleans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Approved(pub bool);

impl Serialize for Approved {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0 { "true" } else { "false" })
    }
}

impl<'de> Deserialize<'de> for Approved {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Text(String),
            Bool(bool),
        }
        match Either::deserialize(d)? {
            Either::Bool(b) => Ok(Approved(b)),
            Either::Text(t) if t == "true" => Ok(Approved(true)),
            Either::Text(t) if t == "false" => Ok(Approved(false)),
            Either::Text(t) => Err(serde::de::Error::custom(format!(
                "expected \"true\" or \"false\", found {t:?}"
            ))),
        }
    }
}

/// A line from a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage {
    /// Answer to `newidentity`.
    NewIdentity {
        /// Whether the identity is now this client's.
        approved: Approved,
    },
    /// Someone moved: arrived (`former` empty), quit (`roomid` empty), or a
    /// refused join (`former == roomid`).
    RoomChange {
        /// Who moved.
        identity: String,
        /// From where.
        former: String,
        /// To where.
        roomid: String,
    },
    /// Answer to `list`.
    RoomList {
        /// Every room of the cluster.
        rooms: Vec<String>,
    },
    /// Answer to `who`.
    RoomContents {
        /// The room asked about.
        roomid: String,
        /// Its members.
        identities: Vec<String>,
        /// Its owner, `""` for a main hall.
        owner: String,
    },
    /// Answer to `createroom`.
    CreateRoom {
        /// The room asked for.
        roomid: String,
        /// Whether it was created.
        approved: Approved,
    },
    /// Answer to `deleteroom`.
    DeleteRoom {
        /// The room asked about.
        roomid: String,
        /// Whether it was deleted.
        approved: Approved,
    },
    /// The joined room lives on another server: reconnect there.
    Route {
        /// The room being joined.
        roomid: String,
        /// That server's client host.
        host: String,
        /// That server's client port, as a string.
        port: String,
        /// chatmesh's extra key: the one-time value the client echoes in
        /// `movejoin` to prove it is the one that was routed. Classic
        /// clients ignore it; absent from servers that do not send it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Answer to `movejoin`.
    ServerChange {
        /// Whether the move was accepted.
        approved: Approved,
        /// This server's id.
        serverid: String,
    },
    /// A chat line from another member of the room.
    Message {
        /// The speaker.
        identity: String,
        /// What was said.
        content: String,
    },
    /// chatmesh's answer to a line it cannot take (not part of the classic protocol).
    Error {
        /// What was wrong.
        reason: String,
    },
}

impl ServerMessage {
    /// Encodes the message as one line, newline included.
    pub fn encode(&self) -> Bytes {
        encode_line(self)
    }

    /// Parses one server line.
    pub fn parse(line: &[u8]) -> Result<ServerMessage, serde_json::Error> {
        serde_json::from_slice(line)
    }

    /// A `roomchange` event.
    pub fn room_change(identity: &str, former: &str, roomid: &str) -> ServerMessage {
        ServerMessage::RoomChange {
            identity: identity.to_owned(),
            former: former.to_owned(),
            roomid: roomid.to_owned(),
        }
    }

    /// An `error` reply.
    pub fn error(reason: impl Into<String>) -> ServerMessage {
        ServerMessage::Error {
            reason: reason.into(),
        }
    }
}

fn encode_line<T: Serialize>(value: &T) -> Bytes {
    let mut out = Vec::with_capacity(96);
    // Serializing these plain enums of strings cannot fail.
    serde_json::to_writer(&mut out, value).expect("protocol messages always serialize");
    out.push(b'\n');
    Bytes::from(out)
}

/// Longest `token` a `movejoin` may carry: chatmesh's tokens are 32 hex
/// digits, so a longer one is wrong without asking anybody.
pub const MAX_MOVE_TOKEN: usize = 64;

/// A fresh move token for `route`: 128 random bits as 32 hex digits, from the
/// operating system's generator (unguessable, and one per move).
pub fn new_move_token() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

/// Whether `room` may stand in a `roomchange` as a room id: a valid room id,
/// a main hall (`MainHall-<server id>`), or `""`. `movejoin`'s `former`
/// comes from the client and is relayed to others, so it must pass this.
pub fn valid_room_ref(room: &str) -> bool {
    room.is_empty()
        || valid_name(room)
        || room
            .strip_prefix(crate::config::MAIN_HALL_PREFIX)
            .is_some_and(crate::config::valid_server_id)
}

/// Whether `name` is a valid identity or room id: `^[A-Za-z][A-Za-z0-9]{2,15}$`.
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (3..=16).contains(&bytes.len())
        && bytes[0].is_ascii_alphabetic()
        && bytes[1..].iter().all(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_request() {
        let cases = [
            (
                r#"{"type":"newidentity","identity":"Adel"}"#,
                Request::NewIdentity {
                    identity: "Adel".into(),
                },
            ),
            (r#"{"type":"list"}"#, Request::List),
            (r#"{"type":"who","extra":1}"#, Request::Who),
            (
                r#"{"roomid":"jokes","type":"createroom"}"#,
                Request::CreateRoom {
                    roomid: "jokes".into(),
                },
            ),
            (
                r#"{"type":"joinroom","roomid":"jokes"}"#,
                Request::JoinRoom {
                    roomid: "jokes".into(),
                },
            ),
            (
                r#"{"type":"deleteroom","roomid":"jokes"}"#,
                Request::DeleteRoom {
                    roomid: "jokes".into(),
                },
            ),
            (
                r#"{"type":"message","content":"Hi \"there\"\n😀"}"#,
                Request::Message {
                    content: "Hi \"there\"\n😀".into(),
                },
            ),
            (r#"{"type":"quit"}"#, Request::Quit),
            (
                r#"{"type":"movejoin","former":"MainHall-s1","roomid":"jokes","identity":"Adel"}"#,
                Request::MoveJoin {
                    former: "MainHall-s1".into(),
                    roomid: "jokes".into(),
                    identity: "Adel".into(),
                    token: None,
                },
            ),
            (
                r#"{"type":"movejoin","former":"MainHall-s1","roomid":"jokes","identity":"Adel","token":"00ff"}"#,
                Request::MoveJoin {
                    former: "MainHall-s1".into(),
                    roomid: "jokes".into(),
                    identity: "Adel".into(),
                    token: Some("00ff".into()),
                },
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(
                Request::parse(line.as_bytes()),
                Ok(expected.clone()),
                "{line}"
            );
            assert_eq!(Request::parse(&expected.encode()[..]), Ok(expected));
        }
    }

    #[test]
    fn bad_requests_get_reasons() {
        let reason = |line: &str| Request::parse(line.as_bytes()).unwrap_err();
        assert!(
            reason("hello").starts_with("not a JSON object"),
            "{}",
            reason("hello")
        );
        assert_eq!(reason(r#"{"type":"dance"}"#), "unknown type `dance`");
        assert_eq!(reason(r#"{"type":"joinroom"}"#), "missing field `roomid`");
        assert_eq!(reason(r#"{"roomid":"x"}"#), "missing field `type`");
        assert_eq!(
            reason(r#"{"type":"message","content":5}"#),
            "invalid type: integer `5`, expected a string (`content`)"
        );
        assert_eq!(
            reason(r#"{"type":"createroom","roomid":null}"#),
            "invalid type: null, expected a string (`roomid`)"
        );
        assert_eq!(
            reason(r#"{"type":"who","type":"list"}"#),
            "duplicate field `type`"
        );
        assert_eq!(
            reason(r#"{"type":"joinroom","roomid":"a1b","roomid":"c1d"}"#),
            "duplicate field `roomid`"
        );
        // Not UTF-8, wherever it is: not JSON.
        assert_eq!(
            Request::parse(b"{\"type\":\"who\",\"x\":\"\xff\"}"),
            Err("not a JSON object: invalid UTF-8 at byte 19".into())
        );
        assert_eq!(
            reason("[1,2]"),
            "invalid type: sequence, expected a JSON object"
        );
        // Not the fields of a request in order, as serde's derived structs
        // would take them.
        assert!(reason(r#"["list"]"#).starts_with("invalid type"));
        for half in [r"\ud800", r"\ud800x", r"\udc00", r"\ud800\u0041"] {
            let line = format!(r#"{{"type":"message","content":"{half}"}}"#);
            assert_eq!(reason(&line), super::LONE_SURROGATE, "{line}");
        }
        let pair = r#"{"type":"message","content":"\ud83d\ude00"}"#;
        assert_eq!(
            Request::parse(pair.as_bytes()),
            Ok(Request::Message {
                content: "\u{1F600}".into()
            })
        );
    }

    #[test]
    fn keys_a_request_does_not_use_are_ignored_whatever_their_value() {
        let deep = format!("{}1{}", "[".repeat(1000), "]".repeat(1000));
        let join = Request::JoinRoom {
            roomid: "jokes".into(),
        };
        let cases = [
            // Values serde_json would refuse to hold: out of range, too deep.
            (
                r#"{"type":"joinroom","x":1e999,"roomid":"jokes"}"#.to_owned(),
                join.clone(),
            ),
            (
                r#"{"x":-1e-999999,"type":"joinroom","roomid":"jokes"}"#.to_owned(),
                join.clone(),
            ),
            (
                format!(r#"{{"type":"joinroom","x":{deep},"roomid":"jokes"}}"#),
                join.clone(),
            ),
            (
                r#"{"type":"joinroom","roomid":"jokes","x":{"a":[true,null,{"b":"\ud800"}]}}"#
                    .to_owned(),
                join,
            ),
            // Keys other requests use, unused by this one.
            (
                r#"{"type":"list","content":1e999}"#.to_owned(),
                Request::List,
            ),
            (
                r#"{"type":"who","roomid":{"nested":[1,2]}}"#.to_owned(),
                Request::Who,
            ),
            (r#"{"token":null,"type":"quit"}"#.to_owned(), Request::Quit),
            // Given twice: only an error when the type uses the key.
            (
                r#"{"type":"list","content":"a","content":"b"}"#.to_owned(),
                Request::List,
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(Request::parse(line.as_bytes()), Ok(expected), "{line}");
        }
        // Escapes in a key or in the type are read as what they stand for.
        assert_eq!(
            Request::parse(br#"{"ty\u0070e":"\u0071uit"}"#),
            Ok(Request::Quit)
        );
        // A null token is none, as an absent one (JSON libraries write
        // absent fields as null).
        assert_eq!(
            Request::parse(
                br#"{"type":"movejoin","former":"","roomid":"a1b","identity":"Adel","token":null}"#
            ),
            Ok(Request::MoveJoin {
                former: String::new(),
                roomid: "a1b".into(),
                identity: "Adel".into(),
                token: None,
            })
        );
        // A token that is there is read, and must be a string.
        assert_eq!(
            Request::parse(
                br#"{"type":"movejoin","former":"","roomid":"a1b","identity":"Adel","token":7}"#
            ),
            Err("invalid type: integer `7`, expected a string (`token`)".into())
        );
    }

    #[test]
    fn booleans_and_ports_are_strings() {
        let line = ServerMessage::NewIdentity {
            approved: Approved(true),
        }
        .encode();
        assert_eq!(
            &line[..],
            b"{\"type\":\"newidentity\",\"approved\":\"true\"}\n"
        );
        let route = ServerMessage::Route {
            roomid: "jokes".into(),
            host: "127.0.0.1".into(),
            port: "4445".into(),
            token: Some("0123456789abcdef0123456789abcdef".into()),
        };
        assert_eq!(
            &route.encode()[..],
            &b"{\"type\":\"route\",\"roomid\":\"jokes\",\"host\":\"127.0.0.1\",\"port\":\"4445\",\"token\":\"0123456789abcdef0123456789abcdef\"}\n"[..]
        );
        // A route without a token (an older server) still parses.
        let classic = br#"{"type":"route","roomid":"jokes","host":"h","port":"1"}"#;
        assert!(matches!(
            ServerMessage::parse(classic),
            Ok(ServerMessage::Route { token: None, .. })
        ));
        let contents = ServerMessage::RoomContents {
            roomid: "MainHall-s1".into(),
            identities: vec!["Adel".into()],
            owner: String::new(),
        };
        assert_eq!(
            &contents.encode()[..],
            b"{\"type\":\"roomcontents\",\"roomid\":\"MainHall-s1\",\"identities\":[\"Adel\"],\"owner\":\"\"}\n"
        );
        let parsed =
            ServerMessage::parse(br#"{"type":"serverchange","approved":"false","serverid":"s2"}"#)
                .unwrap();
        assert_eq!(
            parsed,
            ServerMessage::ServerChange {
                approved: Approved(false),
                serverid: "s2".into()
            }
        );
    }

    #[test]
    fn content_is_escaped() {
        let msg = ServerMessage::Message {
            identity: "Adel".into(),
            content: "a\"b\\c\nd😀".into(),
        };
        let line = msg.encode();
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        assert_eq!(ServerMessage::parse(&line[..line.len() - 1]).unwrap(), msg);
    }

    #[test]
    fn names() {
        for ok in ["Adel", "abc", "A234567890123456", "jokes2"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "ab",
            "1abc",
            "A2345678901234567",
            "a-b",
            "MainHall-s1",
            "añb",
            "ab cd",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn room_refs_are_room_ids_main_halls_or_empty() {
        for good in ["", "jokes", "MainHall-s1", "MainHall-node_2-b"] {
            assert!(valid_room_ref(good), "{good:?}");
        }
        let long = "x".repeat(50_000);
        for bad in [
            "\u{1b}[2Jjokes",
            "MainHall-",
            "MainHall-s1\u{1b}[31m",
            "MainHall-s 1",
            "jo",
            "room-1",
            long.as_str(),
        ] {
            assert!(!valid_room_ref(bad), "{bad:?}");
        }
    }

    #[test]
    fn move_tokens_are_32_hex_digits_and_differ() {
        let a = new_move_token();
        let b = new_move_token();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
        assert!(a.len() <= MAX_MOVE_TOKEN);
    }
}
