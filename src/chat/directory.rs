//! The seam between one server's chat and the cluster's namespace: claims of
//! identities and room ids, the room list, where a room lives, and moves.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use tokio_util::sync::CancellationToken;

/// A boxed future, for the async methods of the object-safe [`Directory`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Where a room of another server is reached by clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRoom {
    /// The server that holds the room.
    pub server: crate::ServerId,
    /// That server's client host, as sent in `route`.
    pub host: String,
    /// That server's client port (TCP and QUIC).
    pub port: u16,
    /// That server's web port (WebSocket sessions), if it has one.
    pub web_port: Option<u16>,
}

/// The cluster-wide namespace as one server's chat sees it.
///
/// Claims answer `Err(reason)` when the name is taken, invalid, or cannot be
/// granted now (no leader, no majority); the reason goes to the log. Every
/// claim and move is answered within the claim timeout (the cluster's
/// registry gives up on a request at its deadline): sessions wait for the
/// answer without a timer of their own, one fewer per claim.
///
/// A server busy with more claims than it keeps in flight makes the later
/// ones wait their turn; a claim, move or arrival whose `client_gone` is
/// cancelled meanwhile (its connection was reset) gives its turn up and is
/// refused, never asked: a flood of claims from connections already reset
/// would otherwise be granted and released by the leader one by one, ahead
/// of the clients still waiting.
///
/// Implementations must not call back into the chat server while holding a
/// lock of their own (the chat server calls them while holding its own lock).
pub trait Directory: Send + Sync + 'static {
    /// Claims an identity for a client of this server.
    fn claim_identity(
        &self,
        identity: &str,
        client_gone: CancellationToken,
    ) -> BoxFuture<Result<(), String>>;
    /// Frees an identity of this server and, when its client owned one, the
    /// room it owned (the two go to the leader in one request). The release
    /// is under way once this returns; the future resolves once the leader
    /// has freed the names (a claim of them anywhere is then granted), or
    /// at the claim timeout, or at once with no leader to ask. Dropping it
    /// changes nothing but the wait.
    fn release_identity(&self, identity: &str, owned_room: Option<&str>) -> BoxFuture<()>;
    /// Claims a room id for a room of this server owned by `owner`.
    fn claim_room(
        &self,
        room: &str,
        owner: &str,
        client_gone: CancellationToken,
    ) -> BoxFuture<Result<(), String>>;
    /// Frees a room id of this server; the future as for
    /// [`Directory::release_identity`].
    fn release_room(&self, room: &str) -> BoxFuture<()>;
    /// Every room of the cluster: main halls of live servers first, then the rest.
    fn rooms(&self) -> Vec<String>;
    /// Where a room that is not on this server lives, if anywhere.
    fn remote_room(&self, room: &str) -> Option<RemoteRoom>;
    /// Reserves `identity` for a move to `to`'s server; on success the client
    /// is sent `route` with `token`. The identity stays reserved until it
    /// arrives there or the move times out. Only a `movejoin` that shows
    /// `token`, or shows none and comes from `client_ip` (the client's source
    /// address here), may complete the move.
    fn start_move(
        &self,
        identity: &str,
        to: &RemoteRoom,
        token: &str,
        client_ip: IpAddr,
        client_gone: CancellationToken,
    ) -> BoxFuture<Result<(), String>>;
    /// The client of a move started with `token` and `client_ip` quit on
    /// its old connection before arriving: its identity is freed if it is
    /// still on that move (not if it arrived, or holds the name here again).
    /// The future as for [`Directory::release_identity`].
    fn give_up_move(&self, identity: &str, token: &str, client_ip: IpAddr) -> BoxFuture<()>;
    /// Whether `identity` may arrive here by `movejoin`: it is moving to this
    /// server, and `token` is the move's token, or is `None` and `ip` is the
    /// address the client had on its former server. On success the identity
    /// now belongs to this server. A refusal (with its reason, for the log)
    /// changes nothing, so the real client can still arrive after an
    /// impostor was turned away.
    fn accept_move(
        &self,
        identity: &str,
        token: Option<&str>,
        ip: IpAddr,
        client_gone: CancellationToken,
    ) -> BoxFuture<Result<(), String>>;
}
