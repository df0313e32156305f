//! chatmesh: a distributed multi-server chat system.
//!
//! Where things are:
//! - [`config`]: the cluster config (TOML, or the assignment's line format).
//! - [`tls`]: the cluster CA and server certificates (rcgen), rustls configs.
//! - [`client_proto`]: the JSON-lines client protocol of `shared/PROTOCOL.md`.
//! - [`lines`]: newline framing with a size limit.
//! - [`chat`]: rooms, sessions and fan-out on one server; the [`chat::Directory`]
//!   seam to the cluster-wide namespace.
//! - [`listener`]: the TCP and QUIC client listeners, one session logic for both.
//! - [`detector`]: the heartbeat failure detector, a pure state machine.
//! - [`election`]: Fast Bully leader election, a pure state machine.
//! - [`mesh`]: QUIC links between servers (mutual TLS), heartbeat datagrams,
//!   peer message frames ([`mesh::wire`]).
//! - [`netsim`]: an impaired UDP socket under quinn: loss, delay, duplication,
//!   reordering and cut links, for tests and `--impair`.
//! - [`registry`]: the replicated registry of identities and rooms and the
//!   leader's claim serializer, a pure state machine.
//! - [`cluster`]: the task that drives detector, election and registry from mesh
//!   events, and [`cluster::ClusterDirectory`], the chat layer's side of it.
//! - [`journal`]: a log of which server holds which name when, and the check
//!   that no name is ever held twice (every in-process cluster test runs it).
//! - [`web`]: the web port: the browser client page and WebSocket chat sessions.
//! - [`admin`]: loopback HTTP `/status` and `/metrics`, and the testing aids.
//! - [`http`]: how both serve their axum routers: listener limits, graceful
//!   shutdown.
//! - [`node`]: one server wired together, with graceful shutdown.
//! - [`status`]: `chatmesh status`, the admin view for a person.
//! - [`up`]: `chatmesh up`, every server of a config as child processes.
//! - [`client`]: the bundled CLI client (line editor in `client/editor.rs`,
//!   reconnection backoff and what servers answered in `client/reconnect.rs`).
//! - [`bench`](mod@bench): `chatmesh bench`, chatmesh measured beside ngircd and nats-server.

pub mod admin;
pub mod bench;
pub mod chat;
pub mod client;
pub mod client_proto;
pub mod cluster;
pub mod config;
pub mod detector;
pub mod election;
pub mod http;
pub mod journal;
pub mod lines;
pub mod listener;
pub mod logging;
pub mod mesh;
pub mod netsim;
pub mod node;
pub mod registry;
pub mod status;
pub mod tls;
pub mod up;
pub mod web;

/// A server's id as written in the cluster config ("s1").
pub type ServerId = String;

pub use config::ClusterConfig;
pub use node::{Node, NodeOptions};
