//! `bench scale`: how chatmesh's idle cost and its failover grow with the
//! number of servers. For each N (3, 5, 10, 20 by default; 3 and 5 with
//! `--quick`) the bench starts N nodes on this machine, waits for them to
//! agree on a leader, then measures over an idle window each node's CPU and
//! the mesh UDP datagrams and bytes it sends per second (counted by its mesh
//! socket, read from admin `GET /metrics`), then kills the leader
//! with SIGKILL `--kills` times (`failover::kill_leader_repeatedly`,
//! the loop `bench failover` uses): time to every survivor agreeing on the
//! new leader, and time until a survivor grants the names a client of the
//! dead leader held.
//!
//! Each metric is fitted against N by least squares, as `a*N + b` and as
//! `a*N^2 + b`; the table states the better fit and its R^2, and the SVG
//! plots every metric against N with the fitted curve.
//!
//! All N nodes share this machine's cores, so the CPU figures are what N
//! nodes cost together on it, and failover times include the machine's
//! scheduling delays; on separate machines each node would have its own.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::failover::kill_leader_repeatedly;
use super::procs::{ChatCluster, CpuMeter};
use super::report::{LinePanel, Report, line_plots_svg, quantile};
use super::{BenchOptions, progress};

/// What one cluster size gave.
#[derive(Debug, Clone, Serialize)]
pub struct SizeResult {
    /// Servers.
    pub servers: usize,
    /// Mean idle CPU per node, percent of one core.
    pub idle_cpu_pct_per_node: f64,
    /// Mesh UDP datagrams each node sent per second while idle (mean).
    pub datagrams_per_s_per_node: f64,
    /// Mesh UDP payload bytes each node sent per second while idle (mean).
    pub bytes_per_s_per_node: f64,
    /// Failover samples, milliseconds.
    pub failover_ms: Vec<f64>,
    /// Names-free samples, milliseconds.
    pub names_free_ms: Vec<f64>,
    /// Median of the failover samples.
    pub failover_median_ms: f64,
    /// p99 (the max with few kills).
    pub failover_p99_ms: f64,
    /// Median names-free time.
    pub names_free_median_ms: f64,
    /// p99 names-free time.
    pub names_free_p99_ms: f64,
}

/// A least-squares fit `y = a * g(N) + b`, where g is N or N^2.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fit {
    /// The power of N: 1 (linear) or 2 (quadratic).
    pub power: i32,
    /// Slope.
    pub a: f64,
    /// Intercept.
    pub b: f64,
    /// Coefficient of determination (1 is a perfect fit).
    pub r2: f64,
}

impl Fit {
    /// Fits `y = a * x^power + b` to `points` by least squares; None with
    /// fewer than two distinct x.
    pub fn least_squares(points: &[(f64, f64)], power: i32) -> Option<Fit> {
        let n = points.len() as f64;
        if points.len() < 2 {
            return None;
        }
        let g: Vec<(f64, f64)> = points.iter().map(|&(x, y)| (x.powi(power), y)).collect();
        let mg = g.iter().map(|p| p.0).sum::<f64>() / n;
        let my = g.iter().map(|p| p.1).sum::<f64>() / n;
        let var: f64 = g.iter().map(|p| (p.0 - mg).powi(2)).sum();
        if var <= 0.0 {
            return None;
        }
        let a = g.iter().map(|p| (p.0 - mg) * (p.1 - my)).sum::<f64>() / var;
        let b = my - a * mg;
        let ss_res: f64 = g.iter().map(|p| (p.1 - (a * p.0 + b)).powi(2)).sum();
        let ss_tot: f64 = g.iter().map(|p| (p.1 - my).powi(2)).sum();
        let r2 = if ss_tot > 0.0 {
            1.0 - ss_res / ss_tot
        } else if ss_res <= 1e-12 {
            1.0
        } else {
            0.0
        };
        Some(Fit { power, a, b, r2 })
    }

    /// The better of the linear and the quadratic fit (higher R^2; linear
    /// on a tie, being the simpler claim).
    pub fn best(points: &[(f64, f64)]) -> Option<Fit> {
        let linear = Fit::least_squares(points, 1)?;
        match Fit::least_squares(points, 2) {
            Some(quadratic) if quadratic.r2 > linear.r2 + 1e-9 => Some(quadratic),
            _ => Some(linear),
        }
    }

    /// The fitted value at `n`.
    pub fn at(&self, n: f64) -> f64 {
        self.a * n.powi(self.power) + self.b
    }

    /// "y = 0.12*N + 1.3 (R^2 0.98)".
    pub fn describe(&self) -> String {
        let n = if self.power == 1 { "N" } else { "N^2" };
        let sign = if self.b < 0.0 { '-' } else { '+' };
        format!(
            "y = {}*{n} {sign} {} (least squares, R^2 {:.3})",
            short(self.a),
            short(self.b.abs()),
            self.r2
        )
    }
}

/// A number with about three significant digits.
fn short(x: f64) -> String {
    let digits = if x.abs() >= 100.0 {
        0
    } else if x.abs() >= 1.0 {
        2
    } else {
        4
    };
    format!("{x:.digits$}")
}

/// The exponent k of the least-squares fit y = c * N^k (log-log slope);
/// None with fewer than two usable points.
pub fn power_fit(points: &[(f64, f64)]) -> Option<f64> {
    let logs: Vec<(f64, f64)> = points
        .iter()
        .filter(|(x, y)| *x > 0.0 && *y > 0.0)
        .map(|(x, y)| (x.ln(), y.ln()))
        .collect();
    Fit::least_squares(&logs, 1).map(|f| f.a)
}

/// The value of gauge `name` in Prometheus text (`name{...} value`).
fn metric_value(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.trim().parse().ok())
}

/// Mesh UDP (datagrams, bytes) node `i` has sent since it started.
async fn mesh_sent(cluster: &ChatCluster, i: usize) -> Result<(u64, u64)> {
    let text = crate::admin::fetch(cluster.admin(i), "/metrics").await?;
    let get = |name: &str| {
        metric_value(&text, name).with_context(|| format!("no {name} in /metrics: {text:?}"))
    };
    Ok((
        get("chatmesh_mesh_udp_datagrams_sent_total")?,
        get("chatmesh_mesh_udp_bytes_sent_total")?,
    ))
}

async fn one_size(
    options: &BenchOptions,
    n: usize,
    kills: usize,
    idle: Duration,
) -> Result<SizeResult> {
    let deadline = Duration::from_secs(options.run_timeout_s);
    let mut cluster = ChatCluster::new(n, &format!("scale{n}"), None)?;
    progress(format!("scale: starting {n} nodes"));
    cluster.start_all().await?;
    let all: Vec<usize> = (0..n).collect();
    cluster
        .agreement(&all, n - 1, deadline)
        .await
        .with_context(|| format!("{n} nodes never agreed on their first leader"))?;
    // Idle: no client anywhere.
    let mut before = Vec::new();
    for i in 0..n {
        before.push(mesh_sent(&cluster, i).await?);
    }
    let cpu = CpuMeter::start(&cluster.pids());
    let started = Instant::now();
    tokio::time::sleep(idle).await;
    let per_node_cpu = cpu.per_server();
    let window = started.elapsed().as_secs_f64();
    let (mut datagrams, mut bytes) = (0u64, 0u64);
    for (i, (d0, b0)) in before.iter().enumerate() {
        let (d1, b1) = mesh_sent(&cluster, i).await?;
        datagrams += d1.saturating_sub(*d0);
        bytes += b1.saturating_sub(*b0);
    }
    let idle_cpu_pct_per_node = per_node_cpu.iter().sum::<f64>() / n as f64 / window * 100.0;
    let datagrams_per_s_per_node = datagrams as f64 / n as f64 / window;
    let bytes_per_s_per_node = bytes as f64 / n as f64 / window;
    progress(format!(
        "scale {n}: idle {idle_cpu_pct_per_node:.2}% of a core per node, {datagrams_per_s_per_node:.1} datagrams/s and {bytes_per_s_per_node:.0} B/s per node"
    ));

    let (failover_ms, names_free_ms) =
        kill_leader_repeatedly(&mut cluster, kills, deadline, "scale").await?;
    let q = |samples: &[f64], at: f64| {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        quantile(&sorted, at)
    };
    Ok(SizeResult {
        servers: n,
        idle_cpu_pct_per_node,
        datagrams_per_s_per_node,
        bytes_per_s_per_node,
        failover_median_ms: q(&failover_ms, 0.5),
        failover_p99_ms: q(&failover_ms, 0.99),
        names_free_median_ms: q(&names_free_ms, 0.5),
        names_free_p99_ms: q(&names_free_ms, 0.99),
        failover_ms,
        names_free_ms,
    })
}

/// One metric against N: its name, unit, how to read it from a size, and
/// the p99 beside the median where there is one.
struct Metric {
    name: &'static str,
    unit: &'static str,
    value: fn(&SizeResult) -> f64,
    p99: Option<fn(&SizeResult) -> f64>,
}

const METRICS: [Metric; 5] = [
    Metric {
        name: "idle CPU per node",
        unit: "% of a core",
        value: |r| r.idle_cpu_pct_per_node,
        p99: None,
    },
    Metric {
        name: "mesh datagrams sent per node",
        unit: "datagrams/s",
        value: |r| r.datagrams_per_s_per_node,
        p99: None,
    },
    Metric {
        name: "mesh bytes sent per node",
        unit: "bytes/s",
        value: |r| r.bytes_per_s_per_node,
        p99: None,
    },
    Metric {
        name: "failover (kill -9 to agreed leader)",
        unit: "ms",
        value: |r| r.failover_median_ms,
        p99: Some(|r| r.failover_p99_ms),
    },
    Metric {
        name: "names free after kill -9",
        unit: "ms",
        value: |r| r.names_free_median_ms,
        p99: Some(|r| r.names_free_p99_ms),
    },
];

/// Runs the scenario (chatmesh only); returns the report and its SVG.
pub async fn run(options: &BenchOptions) -> Result<(Report, String)> {
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
    let points = |f: fn(&SizeResult) -> f64| -> Vec<(f64, f64)> {
        results.iter().map(|r| (r.servers as f64, f(r))).collect()
    };
    let fits: Vec<Option<Fit>> = METRICS
        .iter()
        .map(|m| Fit::best(&points(m.value)))
        .collect();
    let mut notes = vec![
        format!(
            "all N nodes on this machine ({} cores); idle window {} s; {kills} kill -9 of the leader per N (p99 of {kills} samples is their max)",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            idle.as_secs()
        ),
        "datagrams and bytes: mesh UDP datagrams and payload bytes each node sent while idle (heartbeats, stream frames, ACKs), counted by its mesh socket (GET /metrics)".to_owned(),
    ];
    for (metric, fit) in METRICS.iter().zip(&fits) {
        let Some(fit) = fit else { continue };
        let k = power_fit(&points(metric.value))
            .map(|k| format!("; log-log slope {k:.2}"))
            .unwrap_or_default();
        notes.push(format!(
            "fit {} ({}): {}{k}; on paper at N=50: {}, N=100: {}",
            metric.name,
            metric.unit,
            fit.describe(),
            short(fit.at(50.0)),
            short(fit.at(100.0))
        ));
    }
    notes.extend(errors.iter().map(|e| format!("failed: {e}")));
    let rows = results
        .iter()
        .map(|r| {
            vec![
                r.servers.to_string(),
                format!("{:.2}", r.idle_cpu_pct_per_node),
                format!("{:.1}", r.datagrams_per_s_per_node),
                format!("{:.0}", r.bytes_per_s_per_node),
                format!("{:.0} / {:.0}", r.failover_median_ms, r.failover_p99_ms),
                format!("{:.0} / {:.0}", r.names_free_median_ms, r.names_free_p99_ms),
            ]
        })
        .collect();
    let (lo, hi) = (
        sizes.iter().copied().min().unwrap_or(2) as f64,
        sizes.iter().copied().max().unwrap_or(3) as f64,
    );
    let panels: Vec<LinePanel> = METRICS
        .iter()
        .zip(&fits)
        .map(|(metric, fit)| {
            let mut series = vec![(
                if metric.p99.is_some() { "median" } else { "" }.to_owned(),
                points(metric.value),
            )];
            if let Some(p99) = metric.p99 {
                series.push(("p99".to_owned(), points(p99)));
            }
            LinePanel {
                title: metric.name.to_owned(),
                y_label: metric.unit.to_owned(),
                series,
                fit: fit.map(|f| {
                    let curve = (0..=40)
                        .map(|i| lo + (hi - lo) * f64::from(i) / 40.0)
                        .map(|n| (n, f.at(n)))
                        .collect();
                    (format!("fit: {}", f.describe()), curve)
                }),
            }
        })
        .collect();
    let title = format!(
        "chatmesh bench scale: against N servers on one machine{}",
        if options.quick {
            " (--quick: a smoke test, NOT a measurement)"
        } else {
            ""
        }
    );
    let svg = line_plots_svg(&title, &panels);
    let json = serde_json::json!({
        "scenario": "scale",
        "quick": options.quick,
        "kills": kills,
        "idle_s": idle.as_secs(),
        "sizes": results,
        "fits": METRICS.iter().zip(&fits).map(|(m, f)| serde_json::json!({
            "metric": m.name,
            "unit": m.unit,
            "fit": f,
            "model": f.map(|f| f.describe()),
            "at_50": f.map(|f| f.at(50.0)),
            "at_100": f.map(|f| f.at(100.0)),
            "log_log_slope": power_fit(&points(m.value)),
        })).collect::<Vec<_>>(),
        "errors": errors,
        "duplicates": 0,
    });
    let report = Report {
        scenario: "scale".to_owned(),
        header: [
            "servers",
            "idle CPU % per node",
            "datagrams/s per node",
            "bytes/s per node",
            "failover median / p99 ms",
            "names free median / p99 ms",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows,
        notes,
        json,
        // The SVG returned beside is the plot; these bars are unused.
        plot: super::report::Plot {
            title: title.clone(),
            unit: String::new(),
            bars: Vec::new(),
        },
    };
    Ok((report, svg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_lines_and_parabolas_and_picks_the_better() {
        // y = 3N + 2 exactly.
        let line: Vec<(f64, f64)> = [3.0, 5.0, 10.0, 20.0]
            .iter()
            .map(|&n| (n, 3.0 * n + 2.0))
            .collect();
        let fit = Fit::best(&line).unwrap();
        assert_eq!(fit.power, 1);
        assert!(
            (fit.a - 3.0).abs() < 1e-9 && (fit.b - 2.0).abs() < 1e-9,
            "{fit:?}"
        );
        assert!((fit.r2 - 1.0).abs() < 1e-12);
        assert!((fit.at(100.0) - 302.0).abs() < 1e-6);
        // y = 0.5N^2 + 1: the quadratic fits exactly, the line does not.
        let parabola: Vec<(f64, f64)> = [3.0, 5.0, 10.0, 20.0]
            .iter()
            .map(|&n| (n, 0.5 * n * n + 1.0))
            .collect();
        let linear = Fit::least_squares(&parabola, 1).unwrap();
        assert!(linear.r2 < 0.99, "{linear:?}");
        let fit = Fit::best(&parabola).unwrap();
        assert_eq!(fit.power, 2);
        assert!(
            (fit.a - 0.5).abs() < 1e-9 && (fit.b - 1.0).abs() < 1e-9,
            "{fit:?}"
        );
        assert_eq!(
            fit.describe(),
            "y = 0.5000*N^2 + 1.00 (least squares, R^2 1.000)"
        );
        // Known R^2: points (1,1) (2,3) (3,2): a = 0.5, b = 1, R^2 = 0.25.
        let fit = Fit::least_squares(&[(1.0, 1.0), (2.0, 3.0), (3.0, 2.0)], 1).unwrap();
        assert!((fit.a - 0.5).abs() < 1e-12 && (fit.b - 1.0).abs() < 1e-12);
        assert!((fit.r2 - 0.25).abs() < 1e-12, "{fit:?}");
        // Flat data: a perfect (constant) fit; too few or equal x: none.
        assert_eq!(
            Fit::least_squares(&[(3.0, 4.0), (5.0, 4.0)], 1).unwrap().r2,
            1.0
        );
        assert_eq!(Fit::least_squares(&[(3.0, 1.0)], 1), None);
        assert_eq!(Fit::least_squares(&[(3.0, 1.0), (3.0, 2.0)], 1), None);
    }

    #[test]
    fn fits_a_power_law_and_reads_the_metrics() {
        let k = power_fit(&[(3.0, 9.0), (5.0, 25.0), (10.0, 100.0)]).unwrap();
        assert!((k - 2.0).abs() < 1e-9, "{k}");
        assert_eq!(power_fit(&[(3.0, 1.0)]), None);
        let text = "# HELP chatmesh_mesh_udp_bytes_sent_total x\n# TYPE chatmesh_mesh_udp_bytes_sent_total counter\n\
                    chatmesh_mesh_udp_bytes_sent_total{server=\"s1\"} 1234\n\
                    chatmesh_mesh_udp_bytes_sent_total_other{server=\"s1\"} 9\n";
        assert_eq!(
            metric_value(text, "chatmesh_mesh_udp_bytes_sent_total"),
            Some(1234)
        );
        assert_eq!(metric_value(text, "chatmesh_mesh_udp_bytes"), None);
        assert_eq!(
            metric_value("garbage", "chatmesh_mesh_udp_bytes_sent_total"),
            None
        );
    }
}
