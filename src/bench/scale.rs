//! `bench scale`: how chatmesh's idle cost and its failover grow with the
//! number of servers. For each N (3, 5, 10, 20 by default; 3 and 5 with
//! `--quick`) the bench starts N nodes on this machine, waits for them to
//! agree on a leader, then measures over an idle window each node's CPU and
//! mesh datagrams sent per second (from the node's own counters, admin
//! `GET /impair`), then kills the leader with SIGKILL `--kills` times:
//! time to every survivor agreeing on the new leader, and time until a
//! survivor grants the names a client of the dead leader held.
//!
//! All N nodes share this machine's cores, so the CPU figures are what N
//! nodes cost together on it, and failover times include the machine's
//! scheduling delays; on separate machines each node would have its own.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::failover::{free_again, hold};
use super::procs::{ChatCluster, CpuMeter};
use super::report::{Plot, Report, quantile};
use super::{BenchOptions, progress};

/// The impairment that makes a node count its datagrams.
const COUNTING: &str = "loss=0.000001%";

/// What one cluster size gave.
#[derive(Debug, Clone, Serialize)]
pub struct SizeResult {
    /// Servers.
    pub servers: usize,
    /// Mean idle CPU per node, percent of one core.
    pub idle_cpu_pct_per_node: f64,
    /// Mesh UDP datagrams each node sent per second while idle (mean).
    pub datagrams_per_s_per_node: f64,
    /// Failover samples, milliseconds.
    pub failover_ms: Vec<f64>,
    /// Names-free samples, milliseconds.
    pub names_free_ms: Vec<f64>,
    /// Median and p99 of the failover samples.
    pub failover_median_ms: f64,
    /// p99 (the max with few kills).
    pub failover_p99_ms: f64,
    /// Median names-free time.
    pub names_free_median_ms: f64,
    /// p99 names-free time.
    pub names_free_p99_ms: f64,
}

/// Datagrams node `i` has sent so far, from its `GET /impair` counters.
async fn datagrams_sent(cluster: &ChatCluster, i: usize) -> Result<u64> {
    let text = crate::admin::fetch(cluster.admin(i), "/impair").await?;
    parse_sent(&text).with_context(|| format!("no datagram counter in /impair: {text:?}"))
}

/// The `delivered=` count inside `out[...]`.
fn parse_sent(text: &str) -> Option<u64> {
    let out = &text[text.find("out[")?..];
    let at = out.find("delivered=")? + "delivered=".len();
    let digits: String = out[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The exponent k of the least-squares fit y = c * N^k (log-log slope);
/// None with fewer than two usable points.
pub fn power_fit(points: &[(f64, f64)]) -> Option<f64> {
    let logs: Vec<(f64, f64)> = points
        .iter()
        .filter(|(x, y)| *x > 0.0 && *y > 0.0)
        .map(|(x, y)| (x.ln(), y.ln()))
        .collect();
    if logs.len() < 2 {
        return None;
    }
    let n = logs.len() as f64;
    let (mx, my) = (
        logs.iter().map(|p| p.0).sum::<f64>() / n,
        logs.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let var: f64 = logs.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if var <= 0.0 {
        return None;
    }
    Some(logs.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / var)
}

async fn one_size(
    options: &BenchOptions,
    n: usize,
    kills: usize,
    idle: Duration,
) -> Result<SizeResult> {
    let deadline = Duration::from_secs(options.run_timeout_s);
    // The nodes count datagrams only on their impaired path: a loss of one
    // in 10^8 puts every datagram through it and drops none in practice.
    let mut cluster = ChatCluster::new(n, &format!("scale{n}"), Some(COUNTING.to_owned()))?;
    progress(format!("scale: starting {n} nodes"));
    cluster.start_all().await?;
    let top = n - 1;
    let all: Vec<usize> = (0..n).collect();
    cluster
        .agreement(&all, top, deadline)
        .await
        .with_context(|| format!("{n} nodes never agreed on their first leader"))?;
    // Idle: no client anywhere.
    let mut sent_before = Vec::new();
    for i in 0..n {
        sent_before.push(datagrams_sent(&cluster, i).await?);
    }
    let cpu = CpuMeter::start(&cluster.pids());
    let started = Instant::now();
    tokio::time::sleep(idle).await;
    let per_node_cpu = cpu.per_server();
    let window = started.elapsed().as_secs_f64();
    let mut sent = 0u64;
    for (i, before) in sent_before.iter().enumerate() {
        sent += datagrams_sent(&cluster, i).await?.saturating_sub(*before);
    }
    let idle_cpu_pct_per_node = per_node_cpu.iter().sum::<f64>() / n as f64 / window * 100.0;
    let datagrams_per_s_per_node = sent as f64 / n as f64 / window;
    progress(format!(
        "scale {n}: idle {idle_cpu_pct_per_node:.2}% of a core per node, {datagrams_per_s_per_node:.1} datagrams/s per node"
    ));

    let mut failover_ms = Vec::new();
    let mut names_free_ms = Vec::new();
    for kill in 0..kills {
        let (identity, room) = (format!("scale{kill}"), format!("sroom{kill}"));
        let holder = hold(cluster.client_ports[top], &identity, &room).await?;
        let node = cluster.nodes[top]
            .as_mut()
            .context("the leader is not running")?;
        let killed_at = Instant::now();
        node.kill9().await?;
        cluster.nodes[top] = None;
        drop(holder);
        let survivors: Vec<usize> = (0..top).collect();
        let (agreed, freed) = tokio::join!(
            async {
                cluster.agreement(&survivors, top - 1, deadline).await?;
                anyhow::Ok(killed_at.elapsed())
            },
            async {
                free_again(cluster.client_ports[0], &identity, &room, deadline).await?;
                anyhow::Ok(killed_at.elapsed())
            }
        );
        let (agreed, freed) = (agreed?, freed?);
        failover_ms.push(agreed.as_secs_f64() * 1000.0);
        names_free_ms.push(freed.as_secs_f64() * 1000.0);
        progress(format!(
            "scale {n}: kill {}/{kills}: leader agreed after {:.0} ms, names free after {:.0} ms",
            kill + 1,
            agreed.as_secs_f64() * 1000.0,
            freed.as_secs_f64() * 1000.0
        ));
        cluster.start(top).await?;
        cluster.agreement(&all, top, deadline).await?;
    }
    let q = |samples: &[f64], at: f64| {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        quantile(&sorted, at)
    };
    Ok(SizeResult {
        servers: n,
        idle_cpu_pct_per_node,
        datagrams_per_s_per_node,
        failover_median_ms: q(&failover_ms, 0.5),
        failover_p99_ms: q(&failover_ms, 0.99),
        names_free_median_ms: q(&names_free_ms, 0.5),
        names_free_p99_ms: q(&names_free_ms, 0.99),
        failover_ms,
        names_free_ms,
    })
}

/// Runs the scenario (chatmesh only).
pub async fn run(options: &BenchOptions) -> Result<Report> {
    let sizes: Vec<usize> = if options.servers.is_empty() {
        if options.quick {
            vec![3, 5]
        } else {
            vec![3, 5, 10, 20]
        }
    } else {
        options
            .servers
            .iter()
            .copied()
            .filter(|&n| n >= 2)
            .collect()
    };
    let kills = options
        .kills
        .unwrap_or(if options.quick { 1 } else { 5 })
        .max(1);
    let idle = Duration::from_secs(if options.quick { 2 } else { 10 });
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for &n in &sizes {
        match one_size(options, n, kills, idle).await {
            Ok(r) => results.push(r),
            Err(e) => {
                progress(format!("scale {n}: failed: {e:#}"));
                errors.push(format!("{n} servers: {e:#}"));
            }
        }
    }
    let fit = |f: &dyn Fn(&SizeResult) -> f64| {
        power_fit(
            &results
                .iter()
                .map(|r| (r.servers as f64, f(r)))
                .collect::<Vec<_>>(),
        )
    };
    let fits = [
        ("idle CPU per node", fit(&|r| r.idle_cpu_pct_per_node)),
        ("datagrams/s per node", fit(&|r| r.datagrams_per_s_per_node)),
        ("failover median", fit(&|r| r.failover_median_ms)),
        ("names free median", fit(&|r| r.names_free_median_ms)),
    ];
    let mut notes = vec![
        format!(
            "all N nodes on this machine ({} cores); idle window {} s; {kills} kill -9 of the leader per N (p99 of {kills} samples is their max)",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            idle.as_secs()
        ),
        format!(
            "datagrams: mesh UDP datagrams each node sent while idle, from its own counters (GET /impair; the nodes run with --impair {COUNTING} so that they count); bytes are not counted by the node"
        ),
    ];
    for (name, k) in &fits {
        if let Some(k) = k {
            notes.push(format!("fit: {name} grows as N^{k:.2}"));
        }
    }
    notes.extend(errors.iter().map(|e| format!("failed: {e}")));
    let rows = results
        .iter()
        .map(|r| {
            vec![
                r.servers.to_string(),
                format!("{:.2}", r.idle_cpu_pct_per_node),
                format!("{:.1}", r.datagrams_per_s_per_node),
                format!("{:.0} / {:.0}", r.failover_median_ms, r.failover_p99_ms),
                format!("{:.0} / {:.0}", r.names_free_median_ms, r.names_free_p99_ms),
            ]
        })
        .collect();
    let mut bars = Vec::new();
    for r in &results {
        bars.push((
            format!("N={} idle CPU % per node x100", r.servers),
            r.idle_cpu_pct_per_node * 100.0,
        ));
        bars.push((
            format!("N={} datagrams/s per node", r.servers),
            r.datagrams_per_s_per_node,
        ));
        bars.push((
            format!("N={} failover median ms", r.servers),
            r.failover_median_ms,
        ));
        bars.push((
            format!("N={} names free median ms", r.servers),
            r.names_free_median_ms,
        ));
    }
    let json = serde_json::json!({
        "scenario": "scale",
        "quick": options.quick,
        "kills": kills,
        "idle_s": idle.as_secs(),
        "sizes": results,
        "fits": fits.iter().map(|(name, k)| serde_json::json!({"metric": name, "exponent": k})).collect::<Vec<_>>(),
        "errors": errors,
        "duplicates": 0,
    });
    Ok(Report {
        scenario: "scale".to_owned(),
        header: [
            "servers",
            "idle CPU % per node",
            "datagrams/s per node",
            "failover median / p99 ms",
            "names free median / p99 ms",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows,
        notes,
        json,
        plot: Plot {
            title: format!(
                "scale: against N servers on one machine{}",
                if options.quick {
                    " (--quick: a smoke test, NOT a measurement)"
                } else {
                    ""
                }
            ),
            unit: "".to_owned(),
            bars,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_a_power_law_and_reads_the_counter() {
        let k = power_fit(&[(3.0, 9.0), (5.0, 25.0), (10.0, 100.0)]).unwrap();
        assert!((k - 2.0).abs() < 1e-9, "{k}");
        assert_eq!(power_fit(&[(3.0, 1.0)]), None);
        assert_eq!(
            parse_sent(
                "impairment: none\nout[offered=12 delivered=10 lost=2] in[offered=5 delivered=5]"
            ),
            Some(10)
        );
        assert_eq!(parse_sent("garbage"), None);
    }
}
