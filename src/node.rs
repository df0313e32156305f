//! One chatmesh server, wired together: config, certificates, the chat state and
//! its client listeners; started and stopped as a unit.
//!
//! The cluster's own work runs apart from the clients': the mesh (its QUIC
//! endpoint and tasks), the failure detector, the election and the registry
//! (all driven by [`cluster::run`]) live on a single-threaded runtime on an OS
//! thread of their own (`ClusterThread`), so heartbeats go out and are
//! judged on time however busy the client sessions keep the caller's runtime.
//! The two sides meet only through channels and locks held for a moment (the
//! room list the registry publishes, the cluster view).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use tokio::sync::{mpsc, oneshot};

use crate::ServerId;
use crate::admin::{self, AdminState};
use crate::chat::ChatServer;
use crate::cluster::{self, ClusterView, Namespace, SharedView};
use crate::config::ClusterConfig;
use crate::journal::NameJournal;
use crate::listener::{ClientSlots, bind_client_ports, listen_for_clients, serve_quic, serve_tcp};
use crate::mesh::Mesh;
use crate::netsim::{self, ImpairHandle, Impairment};
use crate::tls::{ServerIdentity, client_facing_server_config};
use crate::web;

/// What a node needs to start.
#[derive(Clone)]
pub struct NodeOptions {
    /// The whole cluster's config.
    pub config: ClusterConfig,
    /// Which server of the config this node is.
    pub id: ServerId,
    /// Directory with `ca.pem` and this server's `<id>.pem` / `<id>.key`.
    pub certs: PathBuf,
    /// A socket for the mesh endpoint instead of binding `mesh_port` (tests
    /// pass pre-bound sockets), with the handle that impairs it. Its I/O stays
    /// with the runtime it was bound in; a socket the node binds itself
    /// belongs to the node's cluster thread.
    pub mesh_socket: Option<(Arc<dyn quinn::AsyncUdpSocket>, ImpairHandle)>,
    /// Loss, delay and cut links applied to the mesh socket (testing aid).
    pub impair: Option<Impairment>,
    /// Whether the admin endpoint serves its testing aids (`POST /impair`,
    /// `/cut/<id>`, `/heal`); off unless asked for (`--testing-aids`, or
    /// `--impair`, which implies it).
    pub testing_aids: bool,
    /// Where the chat layer records every hold and release of a name (tests
    /// check the cluster-wide log for names held twice).
    pub journal: Option<NameJournal>,
}

impl NodeOptions {
    /// Options for server `id` of `config`, certificates in `certs`.
    pub fn new(config: ClusterConfig, id: impl Into<ServerId>, certs: impl Into<PathBuf>) -> Self {
        NodeOptions {
            config,
            id: id.into(),
            certs: certs.into(),
            mesh_socket: None,
            impair: None,
            testing_aids: false,
            journal: None,
        }
    }
}

/// A running node. Stop it with [`Node::stop`] (or [`Node::crash`]).
/// Dropping it ends its cluster thread (mesh, election, registry) at once;
/// its client tasks live on until the runtime that started it ends.
pub struct Node {
    chat: Arc<ChatServer>,
    cluster_thread: ClusterThread,
    mesh: Mesh,
    view: SharedView,
    client_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    /// What the admin endpoint serves, if it is configured.
    admin: Option<AdminState>,
    web_addr: Option<SocketAddr>,
    client_slots: ClientSlots,
    impair: ImpairHandle,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Node {
    /// Binds the node's ports and starts serving. Raises the process's soft
    /// limit of open files to its hard limit first (every TCP client is a
    /// descriptor), and takes at most as many clients as that limit leaves
    /// room for (see [`ClientSlots::for_limits`]).
    pub async fn start(options: NodeOptions) -> Result<Node> {
        let NodeOptions {
            config,
            id,
            certs,
            mesh_socket,
            impair,
            testing_aids,
            journal,
        } = options;
        let me = config
            .server(&id)
            .ok_or_else(|| {
                anyhow!(
                    "server id {id:?} is not in the config (configured: {})",
                    config.ids().join(", ")
                )
            })?
            .clone();
        let open_files = raise_open_files_limit();
        let client_slots = ClientSlots::for_limits(&config.limits, open_files);
        let identity = ServerIdentity::load(&certs, &id)?;
        let client_crypto = client_facing_server_config(&identity)?;
        let addr = me
            .resolve(me.client_port)
            .with_context(|| format!("cannot resolve host {:?} of server {id}", me.host))?;
        let (tcp, quic) = bind_client_ports(addr, &config.limits, client_crypto)?;
        let client_addr = tcp.local_addr()?;

        let web = match me.web_port {
            Some(port) => {
                let addr = me
                    .resolve(port)
                    .with_context(|| format!("cannot resolve host {:?} of server {id}", me.host))?;
                let listener = listen_for_clients(addr, &config.limits)
                    .with_context(|| format!("cannot listen on TCP {addr} for the web port"))?;
                Some(listener)
            }
            None => None,
        };
        let web_addr = match &web {
            Some(listener) => Some(listener.local_addr()?),
            None => None,
        };

        let admin = match me.admin_port {
            // Loopback only: the admin endpoint has no authentication.
            Some(port) => Some(admin::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?),
            None => None,
        };

        // Stops itself if anything below fails (dropped with this function).
        let cluster_thread = ClusterThread::start(&id)?;
        let (directory, namespace) = Namespace::new(&config, &id);
        let chat = ChatServer::new(id.clone(), config.limits.clone(), directory, journal);
        namespace.set_chat(&chat);
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (events_tx, events_rx) = mpsc::channel(4096);
        let (mesh, impair_handle) = {
            // Inside the cluster runtime: the mesh socket registers with its
            // I/O driver, and quinn and the mesh spawn their tasks onto it.
            // (A socket a test binds beforehand stays with the test's driver.)
            let _cluster_runtime = cluster_thread.handle.enter();
            // The mesh socket always goes through the impairment layer (one
            // atomic load per datagram when off), so links can be cut at run time.
            let (socket, impair_handle) = match mesh_socket {
                Some((socket, handle)) => {
                    if let Some(impairment) = impair {
                        handle.set(impairment)?;
                    }
                    (socket, handle)
                }
                None => {
                    let addr = me.resolve(me.mesh_port).with_context(|| {
                        format!("cannot resolve host {:?} of server {id}", me.host)
                    })?;
                    netsim::bind(addr, impair)
                        .with_context(|| format!("cannot listen on UDP {addr} for the mesh"))?
                }
            };
            let mesh = Mesh::start(
                &config,
                &id,
                &identity,
                socket,
                events_tx,
                shutdown.clone(),
                tasks.clone(),
            )?;
            (mesh, impair_handle)
        };
        if !impair_handle.impairment().is_none() {
            warn!(impairment = %impair_handle.impairment(), "mesh datagrams are impaired (testing aid)");
        }
        let view = SharedView::default();
        cluster_thread.handle.spawn(tasks.track_future(cluster::run(
            config.clone(),
            id.clone(),
            mesh.clone(),
            events_rx,
            namespace,
            view.clone(),
            shutdown.clone(),
        )));
        tasks.spawn(chat.background(shutdown.clone()));
        tasks.spawn(serve_tcp(
            tcp,
            chat.clone(),
            client_slots.clone(),
            shutdown.clone(),
            tasks.clone(),
        ));
        tasks.spawn(serve_quic(
            quic,
            chat.clone(),
            client_slots.clone(),
            shutdown.clone(),
            tasks.clone(),
        ));
        if let Some(listener) = web {
            let config = config.clone();
            let (chat, slots) = (chat.clone(), client_slots.clone());
            let (shutdown, tasks_) = (shutdown.clone(), tasks.clone());
            tasks.spawn(async move {
                web::serve(listener, &config, chat, slots, shutdown, tasks_).await;
            });
        }
        let mut admin_addr = None;
        let mut admin_state = None;
        if let Some(listener) = admin {
            admin_addr = Some(listener.local_addr()?);
            let state = AdminState {
                chat: chat.clone(),
                view: view.clone(),
                mesh: mesh.clone(),
                impair: impair_handle.clone(),
                peers: peer_mesh_addrs(&config, &id)?,
                testing_aids,
            };
            if testing_aids {
                warn!(
                    "admin testing aids are on: any local process can cut or impair this node's mesh links"
                );
            }
            admin_state = Some(state.clone());
            tasks.spawn(admin::serve(listener, state, shutdown.clone()));
        }
        info!(
            server = %id,
            %client_addr,
            mesh_addr = %mesh.local_addr()?,
            admin_addr = ?admin_addr,
            web_addr = ?web_addr,
            session_threads = tokio::runtime::Handle::current().metrics().num_workers(),
            "serving clients over TCP and QUIC"
        );
        Ok(Node {
            chat,
            cluster_thread,
            mesh,
            view,
            client_addr,
            admin_addr,
            admin: admin_state,
            web_addr,
            client_slots,
            impair: impair_handle,
            shutdown,
            tasks,
        })
    }

    /// The handle that impairs this node's mesh socket (cut links, add loss).
    pub fn impairment(&self) -> &ImpairHandle {
        &self.impair
    }

    /// The address clients connect to (TCP and UDP share the port).
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The client connections this node takes at once, and how many are open.
    pub fn client_slots(&self) -> &ClientSlots {
        &self.client_slots
    }

    /// The admin endpoint's address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// What the admin endpoint serves, if configured (the admin fuzz target
    /// drives [`admin::router`] on it without a socket).
    pub fn admin_state(&self) -> Option<&AdminState> {
        self.admin.as_ref()
    }

    /// The web port's address (web client and WebSocket sessions), if configured.
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web_addr
    }

    /// The UDP address of the mesh endpoint.
    pub fn mesh_addr(&self) -> SocketAddr {
        self.mesh
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    /// The node's mesh.
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// The node's chat state.
    pub fn chat(&self) -> &Arc<ChatServer> {
        &self.chat
    }

    /// This node's current view of the cluster (leader, term, members).
    pub fn view(&self) -> ClusterView {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops like a crash: no goodbyes, peers find out by missing heartbeats.
    /// (In-process tests; a real crash is `kill -9`.)
    pub async fn crash(self) {
        // Silence the socket first, so not even QUIC close frames get out.
        let silent = Impairment::parse("loss=100%").expect("a valid impairment");
        let _ = self.impair.set(silent);
        self.mesh.abort();
        self.shutdown.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        self.cluster_thread.stop().await;
    }

    /// Stops accepting, tells the peers (they see this server down at once),
    /// closes every session and waits (bounded) for the tasks.
    pub async fn stop(self) {
        self.mesh.close().await;
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.tasks.wait())
            .await
            .is_err()
        {
            warn!("some tasks did not finish within 5 s of shutdown");
        }
        self.cluster_thread.stop().await;
        info!(server = %self.chat.id(), "stopped");
    }
}

/// The OS thread, and the single-threaded tokio runtime on it, that run the
/// cluster's own work. Ends (dropping whatever still runs on it, such as the
/// QUIC endpoint's driver, which frees the mesh socket) when stopped or
/// dropped.
struct ClusterThread {
    handle: tokio::runtime::Handle,
    /// Tells the thread to shut its runtime down.
    stop: CancellationToken,
    /// Fires once the runtime is shut down.
    done: Option<oneshot::Receiver<()>>,
}

impl ClusterThread {
    fn start(id: &str) -> Result<ClusterThread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the cluster runtime")?;
        let handle = runtime.handle().clone();
        let stop = CancellationToken::new();
        let (done_tx, done) = oneshot::channel();
        let stopping = stop.clone();
        std::thread::Builder::new()
            .name(format!("cluster-{id}"))
            .spawn(move || {
                runtime.block_on(stopping.cancelled());
                // What is left once the node's tasks ended (or were given up
                // on) is dropped: quinn's endpoint and connection drivers.
                runtime.shutdown_timeout(Duration::from_secs(1));
                let _ = done_tx.send(());
            })
            .context("cannot start the cluster thread")?;
        Ok(ClusterThread {
            handle,
            stop,
            done: Some(done),
        })
    }

    /// Shuts the runtime down and waits (bounded) until it is.
    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(done) = self.done.take()
            && tokio::time::timeout(Duration::from_secs(5), done)
                .await
                .is_err()
        {
            warn!("the cluster thread did not end within 5 s");
        }
    }
}

impl Drop for ClusterThread {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The mesh address of every other server, by id (for `/cut/<id>`).
fn peer_mesh_addrs(config: &ClusterConfig, me: &str) -> Result<Vec<(ServerId, SocketAddr)>> {
    config
        .servers
        .iter()
        .filter(|s| s.id != me)
        .map(|s| {
            let addr = s
                .resolve(s.mesh_port)
                .with_context(|| format!("cannot resolve host {:?} of server {}", s.host, s.id))?;
            Ok((s.id.clone(), addr))
        })
        .collect()
}

/// Runs a node until SIGINT or SIGTERM, then shuts it down gracefully.
pub async fn run_until_signal(options: NodeOptions) -> Result<()> {
    let node = Node::start(options).await?;
    shutdown_signal().await?;
    info!("shutting down");
    node.stop().await;
    Ok(())
}

/// Raises this process's soft limit of open files to its hard limit: every
/// client is a socket, and the usual soft limit (1024) caps a server at about
/// a thousand clients. Logs the outcome; returns the soft limit now in force
/// (`None` if it cannot be read).
fn raise_open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot read the open files limit");
        return None;
    }
    let before = limit.rlim_cur;
    if before >= limit.rlim_max {
        info!(limit = before, "open files limit already at its maximum");
        return Some(before);
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads the valid struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        info!(
            from = before,
            to = limit.rlim_max,
            "open files limit raised"
        );
        Some(limit.rlim_max)
    } else {
        warn!(
            limit = before,
            error = %std::io::Error::last_os_error(),
            "cannot raise the open files limit"
        );
        Some(before)
    }
}

/// Resolves at the first SIGINT or SIGTERM.
pub async fn shutdown_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
