//! One chatmesh server, wired together: config, certificates, the chat state and
//! its client listeners; started and stopped as a unit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::chat::{ChatServer, LocalDirectory};
use crate::config::ClusterConfig;
use crate::listener::{bind_client_ports, serve_quic, serve_tcp};
use crate::tls::{client_facing_server_config, ServerIdentity};
use crate::ServerId;

/// What a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The whole cluster's config.
    pub config: ClusterConfig,
    /// Which server of the config this node is.
    pub id: ServerId,
    /// Directory with `ca.pem` and this server's `<id>.pem` / `<id>.key`.
    pub certs: PathBuf,
}

/// A running node. Dropping it does not stop it: call [`Node::stop`].
pub struct Node {
    chat: Arc<ChatServer>,
    client_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Node {
    /// Binds the node's ports and starts serving.
    pub async fn start(options: NodeOptions) -> Result<Node> {
        let NodeOptions { config, id, certs } = options;
        let me = config
            .server(&id)
            .ok_or_else(|| {
                anyhow!(
                    "server id {id:?} is not in the config (configured: {})",
                    config.ids().join(", ")
                )
            })?
            .clone();
        let identity = ServerIdentity::load(&certs, &id)?;
        let client_crypto = client_facing_server_config(&identity)?;
        let addr = me
            .resolve(me.client_port)
            .with_context(|| format!("cannot resolve host {:?} of server {id}", me.host))?;
        let (tcp, quic) = bind_client_ports(addr, client_crypto)?;
        let client_addr = tcp.local_addr()?;

        let directory = Arc::new(LocalDirectory::new(me.main_hall()));
        let chat = ChatServer::new(id.clone(), config.limits.clone(), directory);
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(serve_tcp(
            tcp,
            chat.clone(),
            shutdown.clone(),
            tasks.clone(),
        ));
        tasks.spawn(serve_quic(
            quic,
            chat.clone(),
            shutdown.clone(),
            tasks.clone(),
        ));
        info!(server = %id, %client_addr, "serving clients over TCP and QUIC");
        Ok(Node {
            chat,
            client_addr,
            shutdown,
            tasks,
        })
    }

    /// The address clients connect to (TCP and UDP share the port).
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The node's chat state.
    pub fn chat(&self) -> &Arc<ChatServer> {
        &self.chat
    }

    /// Stops accepting, closes every session and waits (bounded) for the tasks.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.tasks.wait())
            .await
            .is_err()
        {
            warn!("some tasks did not finish within 5 s of shutdown");
        }
        info!(server = %self.chat.id(), "stopped");
    }
}

/// Runs a node until SIGINT or SIGTERM, then shuts it down gracefully.
pub async fn run_until_signal(options: NodeOptions) -> Result<()> {
    let node = Node::start(options).await?;
    shutdown_signal().await?;
    info!("shutting down");
    node.stop().await;
    Ok(())
}

/// Resolves at the first SIGINT or SIGTERM.
pub async fn shutdown_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
