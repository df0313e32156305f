//! `bench failover`: 5 servers; the leader is killed with SIGKILL N times.
//! Measured: from the kill to every survivor agreeing on one new leader (same
//! leader, same term, the killed one seen down), polling each node's admin
//! `GET /status`. Between kills the killed server is restarted and the bench
//! waits for it to lead again.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::procs::ChatCluster;
use super::report::{Plot, Report, quantile};
use super::wire::{self, Proto, Reader, Transport, Writer};
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

    let (samples, frees) =
        kill_leader_repeatedly(&mut cluster, kills, deadline, "failover").await?;
    drop(cluster);

    let [p50, p99, max] = summary(&samples);
    let [free_p50, free_p99, free_max] = summary(&frees);
    // The targets: 1 s on a clean network, 2 s under loss.
    let bound_s = if options.impair.is_some() { 2 } else { 1 };
    let met = p99 < f64::from(bound_s) * 1000.0;
    let impair = options.impair.clone().unwrap_or_else(|| "none".to_owned());
    let notes = vec![
        format!(
            "time from kill -9 of the leader to every survivor agreeing on the new leader; impairment: {impair}"
        ),
        format!(
            "target p99 under {bound_s} s: {} (p99 {p99:.0} ms)",
            if met { "met" } else { "NOT met" }
        ),
        format!(
            "names free: from the kill to a survivor granting the identity and then the room a client of the dead leader held: median {free_p50:.0} ms, p99 {free_p99:.0} ms, max {free_max:.0} ms"
        ),
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
        "names_free_samples_ms": frees,
        "names_free_median_ms": free_p50,
        "names_free_p99_ms": free_p99,
        "names_free_max_ms": free_max,
        "targets": [{"target": format!("failover p99 under {bound_s} s"), "met": met}],
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
            "names free median/p99/max ms",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows: vec![vec![
            "chatmesh (5 nodes)".to_owned(),
            kills.to_string(),
            format!("{p50:.0}"),
            format!("{p99:.0}"),
            format!("{max:.0}"),
            format!("{free_p50:.0} / {free_p99:.0} / {free_max:.0}"),
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
/// Kills the leader (the highest node, `cluster.ids.len() - 1`) with
/// SIGKILL `kills` times, while one of its clients holds an identity and a
/// room. Each time measures, from the kill, until every survivor agrees on
/// the next node as leader, and until the first node grants the dead
/// client's names again; then restarts the killed node and waits until it
/// leads again. Returns (agreement, names free) samples in milliseconds.
/// Shared by `bench failover` and `bench scale`; `label` starts the
/// progress lines and names the identities.
pub(crate) async fn kill_leader_repeatedly(
    cluster: &mut ChatCluster,
    kills: usize,
    deadline: Duration,
    label: &str,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let n = cluster.ids.len();
    let top = n - 1;
    let all: Vec<usize> = (0..n).collect();
    let survivors: Vec<usize> = (0..top).collect();
    let mut agreements = Vec::new();
    let mut frees = Vec::new();
    for kill in 0..kills {
        // A client of the leader holds an identity and a room when it dies.
        let (identity, room) = (format!("{label}{kill}"), format!("room{label}{kill}"));
        let holder = hold(cluster.client_ports[top], &identity, &room)
            .await
            .with_context(|| format!("kill {}: cannot claim names on the leader", kill + 1))?;
        let node = cluster.nodes[top]
            .as_mut()
            .context("the leader is not running")?;
        let killed_at = Instant::now();
        node.kill9().await?;
        cluster.nodes[top] = None;
        drop(holder);
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
        let agreed =
            agreed.with_context(|| format!("kill {}: survivors did not agree", kill + 1))?;
        let freed = freed.with_context(|| {
            format!("kill {}: the dead leader's names were not freed", kill + 1)
        })?;
        agreements.push(agreed.as_secs_f64() * 1000.0);
        frees.push(freed.as_secs_f64() * 1000.0);
        progress(format!(
            "{label} ({n} nodes) kill {}/{kills}: new leader agreed after {:.0} ms, names free after {:.0} ms",
            kill + 1,
            agreed.as_secs_f64() * 1000.0,
            freed.as_secs_f64() * 1000.0,
        ));
        cluster.start(top).await?;
        cluster
            .agreement(&all, top, deadline)
            .await
            .with_context(|| {
                format!("kill {}: the restarted server did not lead again", kill + 1)
            })?;
    }
    Ok((agreements, frees))
}

/// Median, p99 and max of `samples`.
fn summary(samples: &[f64]) -> [f64; 3] {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    [0.5, 0.99, 1.0].map(|q| quantile(&sorted, q))
}

/// Claims `identity` on the server at `port`, then `room` with it; the
/// connection returned keeps both.
pub(crate) async fn hold(port: u16, identity: &str, room: &str) -> Result<(Reader, Writer)> {
    let (mut reader, mut writer) = Proto::Chat(Transport::Tcp)
        .login(port, identity, &[])
        .await?;
    if !wire::chat_claim(&mut reader, &mut writer, "createroom", "roomid", room).await? {
        bail!("room {room} refused");
    }
    Ok((reader, writer))
}

/// Polls the server at `port` until it grants `identity`, then `room`.
pub(crate) async fn free_again(
    port: u16,
    identity: &str,
    room: &str,
    within: Duration,
) -> Result<()> {
    const POLL: Duration = Duration::from_millis(5);
    let start = Instant::now();
    let retry = || async {
        if start.elapsed() > within {
            bail!("still held after {within:?}");
        }
        tokio::time::sleep(POLL).await;
        Ok(())
    };
    let (mut reader, mut writer) = loop {
        let (mut reader, mut writer) = wire::connect_plain(port).await?;
        if wire::chat_claim(
            &mut reader,
            &mut writer,
            "newidentity",
            "identity",
            identity,
        )
        .await?
        {
            break (reader, writer);
        }
        retry().await?;
    };
    while !wire::chat_claim(&mut reader, &mut writer, "createroom", "roomid", room).await? {
        retry().await?;
    }
    writer.send(b"{\"type\":\"quit\"}\n").await
}
