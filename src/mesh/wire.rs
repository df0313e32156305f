//! Messages between servers, postcard-encoded.
//!
//! Streams: every mesh connection carries one unidirectional stream per
//! direction, a sequence of frames `u32 big-endian length | postcard(PeerMessage)`.
//! The first frame of a stream is `Hello` with the wire version, so a server
//! can refuse a peer that speaks another version instead of misreading it.
//!
//! Datagrams: `WIRE_VERSION | postcard(Heartbeat)`, small enough to always fit
//! one QUIC datagram.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ServerId;
use crate::election::ElectionMessage;
use crate::registry::RegistryMessage;

/// Version of every frame and datagram format below. 2: registry moves
/// carry the `movejoin` proof (issue 12). 3: a registry release names the
/// grants it gives back (their stamps), several at once, and an arrival
/// names the move it completes: a server of an older version is refused at
/// `Hello` instead of misreading them. 4: every released grant is named
/// (the stamp is no longer optional), a move cancel names the move, a
/// request carries the asker's view of who is down, and a refusal may say
/// the asker still hears a server whose names were freed. 5: a move can be
/// given up by its client (`MoveGiveUp`), freeing its identity. 6: a
/// holdings report says how old each open move is (`move_ages`).
pub const WIRE_VERSION: u8 = 8;

/// Largest stream frame accepted; checked before anything is allocated, and
/// the body's buffer grows only as its bytes arrive. A registry snapshot or
/// holdings report is one frame, 30-60 bytes per name: 64 MiB holds over a
/// million names (`a_snapshot_of_a_million_names_is_one_frame`).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// One stream frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// First frame of every stream.
    Hello {
        /// The sender's [`WIRE_VERSION`].
        version: u8,
        /// The sender's id (checked against its certificate).
        id: ServerId,
        /// The sender's process: when it started (nanoseconds since the
        /// epoch). A connection from a later life of the peer replaces a
        /// young link at once, one from an earlier life is refused, and one
        /// from the same process is a simultaneous dial (see
        /// `Mesh::install`).
        incarnation: u64,
    },
    /// Fast Bully.
    Election(ElectionMessage),
    /// The registry of identities and rooms.
    Registry(RegistryMessage),
}

/// A heartbeat datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sender's id (must match the link it arrives on).
    pub from: ServerId,
    /// The sender's current leader term.
    pub term: u64,
    /// The leader the sender follows (`None` during an election): lets a
    /// server that missed an announcement catch up (election anti-entropy).
    pub leader: Option<ServerId>,
    /// Strictly increasing per sender, across its restarts too, so that
    /// duplicated or reordered heartbeats can be told apart from fresh ones.
    pub seq: u64,
    /// Sender's clock, ms since its start (for round-trip estimates in logs).
    pub sent_at_ms: u64,
}

/// Why a frame or datagram could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Length prefix over [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// Another wire version.
    #[error("wire version {0}, this server speaks {WIRE_VERSION}")]
    Version(u8),
    /// Not a valid postcard message.
    #[error("undecodable message: {0}")]
    Decode(String),
}

/// Encodes one stream frame with its length prefix.
pub fn encode_frame(message: &PeerMessage) -> Bytes {
    // The body is written after room for its length, which is filled in
    // once known: one buffer, no copy.
    let mut frame =
        postcard::to_extend(message, vec![0u8; 4]).expect("peer messages always serialize");
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    Bytes::from(frame)
}

/// Checks a frame's length prefix before its body is read.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame body.
pub fn decode_frame(body: &[u8]) -> Result<PeerMessage, WireError> {
    decode_whole(body)
}

/// Decodes a value that must fill `body` exactly: bytes after it mean the
/// sender speaks something else (or is corrupt), not a message to act on.
fn decode_whole<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, WireError> {
    let (value, rest) =
        postcard::take_from_bytes(body).map_err(|e| WireError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Decode(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    Ok(value)
}

/// Encodes a heartbeat datagram.
pub fn encode_heartbeat(heartbeat: &Heartbeat) -> Bytes {
    let mut out = vec![WIRE_VERSION];
    out.extend(postcard::to_stdvec(heartbeat).expect("heartbeats always serialize"));
    Bytes::from(out)
}

/// Decodes a heartbeat datagram.
pub fn decode_heartbeat(datagram: &[u8]) -> Result<Heartbeat, WireError> {
    match datagram.split_first() {
        Some((&WIRE_VERSION, body)) => decode_whole(body),
        Some((&other, _)) => Err(WireError::Version(other)),
        None => Err(WireError::Decode("empty datagram".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_of_a_million_names_is_one_frame() {
        use crate::registry::{IdentityEntry, RoomEntry, Stamp};
        // Long names, large stamps: more bytes per name than most.
        let stamp = Stamp {
            term: 1 << 40,
            seq: 1 << 40,
            leader: "server-10".into(),
        };
        let n = 500_000;
        let identities = (0..n)
            .map(|i| IdentityEntry {
                identity: format!("Identity{i:08}"),
                server: "server-10".into(),
                moving_to: None,
                stamp: stamp.clone(),
                move_proof: None,
            })
            .collect();
        let rooms = (0..n)
            .map(|i| RoomEntry {
                room: format!("Room{i:012}"),
                server: "server-10".into(),
                owner: format!("Identity{i:08}"),
                stamp: stamp.clone(),
            })
            .collect();
        let snapshot = PeerMessage::Registry(RegistryMessage::Snapshot {
            term: 1 << 40,
            seq: 1 << 40,
            identities,
            rooms,
            move_ages: Vec::new(),
        });
        let frame = encode_frame(&snapshot);
        let len = frame_len(frame[..4].try_into().unwrap()).expect("under the limit");
        println!("{} names: {len} bytes", 2 * n);
        assert_eq!(decode_frame(&frame[4..]).as_ref(), Ok(&snapshot));
    }

    #[test]
    fn bytes_after_a_message_are_refused() {
        let frame = encode_frame(&PeerMessage::Hello {
            version: WIRE_VERSION,
            id: "s1".into(),
            incarnation: 7,
        });
        let mut body = frame[4..].to_vec();
        assert!(decode_frame(&body).is_ok());
        body.push(0);
        assert_eq!(
            decode_frame(&body),
            Err(WireError::Decode("1 bytes after the message".into()))
        );
        let heartbeat = Heartbeat {
            from: "s1".into(),
            term: 1,
            leader: None,
            seq: 7,
            sent_at_ms: 9,
        };
        let mut datagram = encode_heartbeat(&heartbeat).to_vec();
        assert!(decode_heartbeat(&datagram).is_ok());
        datagram.extend_from_slice(b"xy");
        assert!(decode_heartbeat(&datagram).is_err());
    }

    #[test]
    fn frames_round_trip() {
        let messages = [
            PeerMessage::Hello {
                version: WIRE_VERSION,
                id: "s1".into(),
                incarnation: u64::MAX,
            },
            PeerMessage::Election(ElectionMessage::Coordinator { term: 7 }),
            PeerMessage::Election(ElectionMessage::View {
                leader: Some("s3".into()),
                term: u64::MAX,
                alive: vec!["s1".into(), "s3".into()],
            }),
        ];
        for message in messages {
            let frame = encode_frame(&message);
            let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
            assert_eq!(len, frame.len() - 4);
            assert_eq!(decode_frame(&frame[4..]).unwrap(), message);
        }
    }

    #[test]
    fn oversize_and_garbage_are_errors_not_panics() {
        assert_eq!(
            frame_len((MAX_FRAME as u32 + 1).to_be_bytes()),
            Err(WireError::TooLarge(MAX_FRAME + 1))
        );
        assert!(decode_frame(&[0xff, 0xff, 0xff]).is_err());
        assert!(decode_frame(&[]).is_err());
        assert_eq!(decode_heartbeat(&[9, 1, 2]), Err(WireError::Version(9)));
        assert!(decode_heartbeat(&[]).is_err());
        assert!(decode_heartbeat(&[WIRE_VERSION, 0xff]).is_err());
    }

    #[test]
    fn heartbeats_are_small() {
        let hb = Heartbeat {
            from: "server-with-a-long-id-32-chars-x".into(),
            term: u64::MAX,
            leader: Some("server-with-a-long-id-32-chars-y".into()),
            seq: u64::MAX,
            sent_at_ms: u64::MAX,
        };
        let datagram = encode_heartbeat(&hb);
        // Far below any QUIC max_datagram_size (about 1200 bytes at worst).
        assert!(datagram.len() <= 120, "{}", datagram.len());
        assert_eq!(decode_heartbeat(&datagram).unwrap(), hb);
    }
}
