//! `bench failover`: 5 servers; the leader is killed with SIGKILL N times.
//! Measured: from the kill to every survivor agreeing on one new leader (same
//! leader, same term, the killed one seen down), polling each node's admin
//! `GET /status`. Between kills the killed server is restarted and the bench
//! waits for it to lead again.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::procs::ChatCluster;
use super::report::{Plot, Report, quantile};
use super::{BenchOptions, progress};

/// Servers in the cluster.
const SERVERS: usize = 5;

/// Runs the scenario (chatmesh only: the peers have no leader to kill).
pub async fn run(options: &BenchOptions) -> Result<Report> {
    let kills = options
        .kills
        .unwrap_or(if options.quick { 3 } else { 20 })
        .max(1);
    let deadline = Duration::from_secs(options.run_timeout_s);
    let mut cluster = ChatCluster::new(SERVERS, "failover", options.impair.clone())?;
    progress(format!("starting {SERVERS} chatmesh nodes"));
    cluster.start_all().await?;
    let top = SERVERS - 1;
    let all: Vec<usize> = (0..SERVERS).collect();
    cluster
        .agreement(&all, top, deadline)
        .await
        .context("the cluster never agreed on its first leader")?;

    let mut samples = Vec::new();
    for kill in 0..kills {
        let node = cluster.nodes[top]
            .as_mut()
            .context("the leader is not running")?;
        let killed_at = Instant::now();
        node.kill9().await?;
        cluster.nodes[top] = None;
        let survivors: Vec<usize> = (0..top).collect();
        cluster
            .agreement(&survivors, top - 1, deadline)
            .await
            .with_context(|| format!("kill {}: survivors did not agree", kill + 1))?;
        let took = killed_at.elapsed();
        samples.push(took.as_secs_f64() * 1000.0);
        progress(format!(
            "failover kill {}/{kills}: new leader agreed after {:.0} ms",
            kill + 1,
            took.as_secs_f64() * 1000.0
        ));
        cluster.start(top).await?;
        cluster
            .agreement(&all, top, deadline)
            .await
            .with_context(|| {
                format!("kill {}: the restarted server did not lead again", kill + 1)
            })?;
    }
    drop(cluster);

    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        quantile(&sorted, 0.5),
        quantile(&sorted, 0.99),
        quantile(&sorted, 1.0),
    );
    let met = p99 < 1000.0;
    let impair = options.impair.clone().unwrap_or_else(|| "none".to_owned());
    let notes = vec![
        format!(
            "time from kill -9 of the leader to every survivor agreeing on the new leader; impairment: {impair}"
        ),
        format!(
            "target p99 under 1 s: {} (p99 {p99:.0} ms)",
            if met { "met" } else { "NOT met" }
        ),
        "names free again after the kill: n/a (needs the cluster-wide registry, not built yet)"
            .to_owned(),
        "peers: none (ngircd and nats-server have no leader to fail over)".to_owned(),
    ];
    let json = serde_json::json!({
        "scenario": "failover",
        "quick": options.quick,
        "servers": SERVERS,
        "kills": kills,
        "impair": options.impair,
        "samples_ms": samples,
        "median_ms": p50,
        "p99_ms": p99,
        "max_ms": max,
        "names_free_ms": null,
        "targets": [{"target": "failover p99 under 1 s", "met": met}],
        "duplicates": 0,
    });
    Ok(Report {
        scenario: "failover".to_owned(),
        header: [
            "system",
            "kills",
            "median ms",
            "p99 ms",
            "max ms",
            "names free",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows: vec![vec![
            "chatmesh (5 nodes)".to_owned(),
            kills.to_string(),
            format!("{p50:.0}"),
            format!("{p99:.0}"),
            format!("{max:.0}"),
            "n/a".to_owned(),
        ]],
        notes,
        json,
        plot: Plot {
            title: "failover: kill -9 of the leader to agreed new leader".to_owned(),
            unit: "ms".to_owned(),
            bars: vec![
                ("median".to_owned(), p50),
                ("p99".to_owned(), p99),
                ("max".to_owned(), max),
            ],
        },
    })
}
