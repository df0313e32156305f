//! A cluster of real `chatmesh node` processes on free loopback ports, with
//! their own CA, for failover tests: kill -9, stop, restart, and polling of
//! every node's `/status`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::process::Proc;
use super::{DEADLINE, free_ports, temp_dir};

/// N real nodes s1..sN (ascending priority).
pub struct ProcCluster {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub certs: PathBuf,
    pub ids: Vec<String>,
    pub client_ports: Vec<u16>,
    pub admin_ports: Vec<u16>,
    pub nodes: Vec<Option<Proc>>,
    /// Start nodes with `--testing-aids` (admin `POST /cut`, `/heal`, `/impair`).
    pub testing_aids: bool,
}

impl ProcCluster {
    /// Writes a config and certs for `n` servers; starts none.
    pub fn new(n: usize, tag: &str) -> ProcCluster {
        let ports = free_ports(3 * n);
        assert_eq!(ports.len(), 3 * n, "not enough free ports");
        let dir = temp_dir(tag);
        let ids: Vec<String> = (1..=n).map(|i| format!("s{i}")).collect();
        let config = dir.join("cluster.toml");
        std::fs::write(&config, chatmesh::config::loopback_cluster_toml(&ports)).unwrap();
        let certs = dir.join("certs");
        let parsed = chatmesh::ClusterConfig::load(&config).unwrap();
        chatmesh::tls::generate(&parsed, &certs, false).unwrap();
        ProcCluster {
            dir,
            config,
            certs,
            client_ports: (0..n).map(|i| ports[3 * i]).collect(),
            admin_ports: (0..n).map(|i| ports[3 * i + 2]).collect(),
            ids,
            nodes: (0..n).map(|_| None).collect(),
            testing_aids: false,
        }
    }

    /// Starts node `i` (0-based) with the cluster's certs.
    pub fn start(&mut self, i: usize) {
        let certs = self.certs.display().to_string();
        self.start_with_certs(i, &certs);
    }

    /// Starts node `i` with certificates from `certs` (e.g. another CA).
    pub fn start_with_certs(&mut self, i: usize, certs: &str) {
        let config = self.config.display().to_string();
        let mut args = vec![
            "node",
            "--config",
            &config,
            "--id",
            &self.ids[i],
            "--certs",
            certs,
        ];
        if self.testing_aids {
            args.push("--testing-aids");
        }
        let mut node = Proc::spawn(&self.ids[i], &args);
        node.wait_line("serving clients");
        self.nodes[i] = Some(node);
    }

    /// Starts every node.
    pub fn start_all(&mut self) {
        for i in 0..self.ids.len() {
            self.start(i);
        }
    }

    /// SIGKILL: no goodbye, peers must notice by heartbeat.
    pub fn kill9(&mut self, i: usize) {
        let mut node = self.nodes[i].take().expect("node running");
        node.signal(libc::SIGKILL);
        let _ = node.child.wait();
    }

    /// SIGTERM: a clean stop (exit 0 expected).
    pub fn stop(&mut self, i: usize) {
        let mut node = self.nodes[i].take().expect("node running");
        node.signal(libc::SIGTERM);
        assert!(node.wait_exit(), "{} exits 0 on SIGTERM", self.ids[i]);
    }

    /// Indices of running nodes.
    pub fn running(&self) -> Vec<usize> {
        (0..self.ids.len())
            .filter(|&i| self.nodes[i].is_some())
            .collect()
    }

    pub fn admin(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin_ports[i]))
    }

    /// Node `i`'s `/status`, or None if it does not answer.
    pub async fn status(&self, i: usize) -> Option<Value> {
        let body = chatmesh::admin::fetch(self.admin(i), "/status")
            .await
            .ok()?;
        serde_json::from_str(&body).ok()
    }

    /// POSTs to node `i`'s admin endpoint.
    pub async fn admin_post(&self, i: usize, path: &str, body: &str) {
        chatmesh::admin::post(self.admin(i), path, body)
            .await
            .unwrap_or_else(|e| panic!("POST {path} to {}: {e:#}", self.ids[i]));
    }

    /// Polls until every running node follows `leader` at one common term and
    /// sees exactly the running nodes alive. Returns (time taken, term).
    pub async fn wait_agreement(&self, leader: usize, within: Duration) -> (Duration, u64) {
        let start = Instant::now();
        let running = self.running();
        loop {
            let mut last = Vec::new();
            let mut terms = Vec::new();
            for &i in &running {
                let status = self.status(i).await;
                let ok = status.as_ref().is_some_and(|s| {
                    s["leader"] == self.ids[leader].as_str()
                        && s["members"].as_array().is_some_and(|members| {
                            members
                                .iter()
                                .enumerate()
                                .all(|(j, m)| m["alive"] == running.contains(&j))
                        })
                });
                if ok {
                    terms.push(status.as_ref().unwrap()["term"].as_u64().unwrap());
                }
                last.push(status);
            }
            if terms.len() == running.len() && terms.windows(2).all(|w| w[0] == w[1]) {
                return (start.elapsed(), terms[0]);
            }
            assert!(
                start.elapsed() < within,
                "no agreement on leader {} within {within:?}; statuses: {last:#?}",
                self.ids[leader]
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Median and maximum of some durations.
pub fn median_max(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (samples[samples.len() / 2], *samples.last().unwrap())
}

/// The deadline for anything cluster-wide to settle.
pub const SETTLE: Duration = DEADLINE;
