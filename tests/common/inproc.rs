//! In-process clusters: `start_cluster(n, impairment)` runs n nodes in this
//! test's runtime on 127.0.0.1, each mesh socket behind the netsim layer, with
//! handles to change impairment, cut links, crash and restart nodes.
//!
//! Every node records the names it holds in one [`NameJournal`], with the
//! crashes, stops, cuts and heals marked; [`Cluster::stop`] checks that no
//! name was ever held twice.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chatmesh::journal::{NameJournal, Summary};
use chatmesh::netsim::{self, ImpairHandle, Impairment};
use chatmesh::{ClusterConfig, Node, NodeOptions, ServerId};

use super::{certs, free_ports};

/// How long after the failure timeout a heal may leave a name held on both
/// sides of a healed cut: links come back and holdings merge on a noisy machine.
const HEAL_MARGIN: Duration = Duration::from_secs(2);

/// A running in-process cluster. End it with [`Cluster::stop`], which checks
/// its name journal; dropping it unstopped panics.
pub struct Cluster {
    pub config: ClusterConfig,
    /// Private: a node ends only through `crash` or `stop`, which journal it.
    nodes: Vec<Option<Node>>,
    pub mesh_addrs: Vec<SocketAddr>,
    impairments: Vec<Option<Impairment>>,
    certs: std::path::PathBuf,
    journal: NameJournal,
    stopped: bool,
}

/// The impairment of node `i` from a spec, with its own seed (`base_seed + i`).
pub fn seeded(spec: &str, base_seed: u64, i: usize) -> Impairment {
    Impairment::parse(&format!("{spec},seed={}", base_seed + i as u64)).expect("impairment spec")
}

/// Starts `n` nodes s1..sN; node i's mesh socket gets `impairment(i)`.
pub async fn start_cluster(n: usize, impairment: impl Fn(usize) -> Option<Impairment>) -> Cluster {
    start_cluster_with(n, impairment, |_| {}).await
}

/// A cluster of `n` servers, each with a web port (registered for
/// [`super::Via::Ws`] clients), formed: every node agrees on the leader.
pub async fn web_cluster(n: usize) -> Cluster {
    let web_ports = free_ports(n);
    let cluster = start_cluster_with(
        n,
        |_| None,
        |config| {
            for (server, port) in config.servers.iter_mut().zip(&web_ports) {
                server.web_port = Some(*port);
            }
        },
    )
    .await;
    for i in 0..n {
        super::register_web(cluster.node(i));
    }
    let all: Vec<usize> = (0..n).collect();
    cluster
        .wait_agree(&all, n - 1, Duration::from_secs(20))
        .await;
    cluster
}

/// [`start_cluster`] with the config changed by `tweak` first (limits, quorum).
pub async fn start_cluster_with(
    n: usize,
    impairment: impl Fn(usize) -> Option<Impairment>,
    tweak: impl FnOnce(&mut ClusterConfig),
) -> Cluster {
    // Mesh sockets are bound first (port 0) so the config can name their ports.
    let mut sockets = Vec::new();
    let mut impairments = Vec::new();
    for i in 0..n {
        let imp = impairment(i);
        let (socket, handle) =
            netsim::bind("127.0.0.1:0".parse().unwrap(), imp.clone()).expect("bind mesh");
        impairments.push(imp);
        sockets.push((socket, handle));
    }
    let mesh_addrs: Vec<SocketAddr> = sockets
        .iter()
        .map(|(s, _)| s.local_addr().unwrap())
        .collect();
    let client_ports = free_ports(n);
    let text: String = (0..n)
        .map(|i| {
            format!(
                "s{} 127.0.0.1 {} {}\n",
                i + 1,
                client_ports[i],
                mesh_addrs[i].port()
            )
        })
        .collect();
    let mut config = ClusterConfig::parse(&text, "in-process cluster").unwrap();
    tweak(&mut config);
    // Certificates name the id and host only, so one set serves any cluster of
    // s1..s5 on 127.0.0.1 (and raw QUIC clients trust its CA).
    assert!(n <= 5, "certs() covers s1..s5");
    let certs = certs().to_owned();
    let journal = NameJournal::new();
    let mut nodes = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let mut options = NodeOptions::new(config.clone(), server_id(i), certs.clone());
        options.mesh_socket = Some(socket);
        options.journal = Some(journal.clone());
        nodes.push(Some(Node::start(options).await.expect("node starts")));
    }
    Cluster {
        config,
        nodes,
        mesh_addrs,
        impairments,
        certs,
        journal,
        stopped: false,
    }
}

/// The id of node `i` (0-based): "s1" for 0.
fn server_id(i: usize) -> ServerId {
    format!("s{}", i + 1)
}

impl Cluster {
    /// Node `i` (running).
    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("node running")
    }

    /// The impairment handle of node `i`.
    pub fn impair(&self, i: usize) -> &ImpairHandle {
        self.node(i).impairment()
    }

    /// Running node indices.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_some())
            .collect()
    }

    /// Drops node `i` without goodbyes: peers notice by heartbeats only.
    pub async fn crash(&mut self, i: usize) {
        let node = self.nodes[i].take().expect("node running");
        node.crash().await;
        // Its names end once it can no longer serve them, which is now: its
        // sessions are gone, and survivors regrant only after detecting it.
        self.journal.server_gone(&server_id(i));
    }

    /// Restarts node `i` on its old mesh port, with its old impairment.
    pub async fn restart(&mut self, i: usize) {
        let addr = self.mesh_addrs[i];
        let started = Instant::now();
        // The crashed endpoint's socket may take a moment to be released.
        let socket = loop {
            match netsim::bind(addr, self.impairments[i].clone()) {
                Ok(socket) => break socket,
                Err(e) => {
                    assert!(
                        started.elapsed() < super::DEADLINE,
                        "cannot rebind {addr}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let mut options = NodeOptions::new(self.config.clone(), server_id(i), self.certs.clone());
        options.mesh_socket = Some(socket);
        options.journal = Some(self.journal.clone());
        self.nodes[i] = Some(Node::start(options).await.expect("node restarts"));
    }

    /// Cuts every link between the two groups (both directions, both ends).
    pub fn partition(&self, left: &[usize], right: &[usize]) {
        // Journaled first: names may be held on both sides from the cut on.
        let ids = |group: &[usize]| group.iter().map(|&i| server_id(i)).collect::<Vec<_>>();
        self.journal.cut(&ids(left), &ids(right));
        for &a in left {
            for &b in right {
                self.impair(a).cut(self.mesh_addrs[b]);
                self.impair(b).cut(self.mesh_addrs[a]);
            }
        }
    }

    /// Heals every cut.
    pub fn heal(&self) {
        for i in self.running() {
            self.impair(i).heal_all();
        }
        // Journaled once every link is back: the grace to converge starts now.
        self.journal.healed();
    }

    /// Whether every node of `group` follows server `leader` (0-based) at one
    /// common term and sees exactly `group` alive.
    pub fn agree(&self, group: &[usize], leader: usize) -> Option<u64> {
        let leader_id = server_id(leader);
        let mut term = None;
        for &i in group {
            let view = self.node(i).view();
            if view.leader.as_deref() != Some(leader_id.as_str()) {
                return None;
            }
            let members_ok = view
                .members
                .iter()
                .enumerate()
                .all(|(j, m)| m.alive == group.contains(&j));
            if !members_ok || view.members.is_empty() {
                return None;
            }
            match term {
                None => term = Some(view.term),
                Some(t) if t != view.term => return None,
                _ => {}
            }
        }
        term
    }

    /// Waits until [`Cluster::agree`]; returns the time it took and the term.
    pub async fn wait_agree(
        &self,
        group: &[usize],
        leader: usize,
        within: Duration,
    ) -> (Duration, u64) {
        let start = Instant::now();
        loop {
            if let Some(term) = self.agree(group, leader) {
                return (start.elapsed(), term);
            }
            if start.elapsed() > within {
                let views: Vec<_> = group
                    .iter()
                    .map(|&i| (i + 1, self.node(i).view()))
                    .collect();
                panic!(
                    "group {group:?} did not agree on s{} within {within:?}: {views:#?}",
                    leader + 1
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until [`Cluster::agree`] has held, at one term, for `hold` on end
    /// (a cluster formed under heavy loss may need a second election first).
    pub async fn wait_stable(
        &self,
        group: &[usize],
        leader: usize,
        hold: Duration,
        within: Duration,
    ) -> (Duration, u64) {
        let start = Instant::now();
        loop {
            let (_, term) = self
                .wait_agree(group, leader, within.saturating_sub(start.elapsed()))
                .await;
            let since = Instant::now();
            while self.agree(group, leader) == Some(term) && since.elapsed() < hold {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if since.elapsed() >= hold {
                return (start.elapsed(), term);
            }
        }
    }

    /// Stops every running node cleanly, then checks the name journal of the
    /// whole run: panics if a name was ever held twice beyond what a cut
    /// excuses, otherwise prints and returns the journal's summary.
    pub async fn stop(mut self) -> Summary {
        for i in self.running() {
            let node = self.nodes[i].take().expect("node running");
            node.stop().await;
            self.journal.server_gone(&server_id(i));
        }
        self.stopped = true;
        let grace = self.config.timing.failure_timeout + HEAL_MARGIN;
        match self.journal.check(grace) {
            Ok(summary) => {
                println!("name journal: {summary}");
                summary
            }
            Err(violations) => {
                let list: Vec<String> = violations.iter().map(|v| format!("  - {v}")).collect();
                panic!(
                    "the name journal check failed (grace after a heal {grace:?}):\n{}",
                    list.join("\n")
                );
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A test that fails already says why; one that forgot `stop` would
        // skip the journal check without a word.
        if !self.stopped && !std::thread::panicking() {
            panic!(
                "a Cluster was dropped without Cluster::stop, so its name journal was never checked"
            );
        }
    }
}
