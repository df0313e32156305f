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
//! - [`node`]: one server wired together, with graceful shutdown.
//! - [`up`]: `chatmesh up`, every server of a config as child processes.
//! - [`client`]: the bundled CLI client.

pub mod chat;
pub mod client;
pub mod client_proto;
pub mod config;
pub mod lines;
pub mod listener;
pub mod node;
pub mod tls;
pub mod up;

/// A server's id as written in the cluster config ("s1").
pub type ServerId = String;

pub use config::ClusterConfig;
pub use node::{Node, NodeOptions};
