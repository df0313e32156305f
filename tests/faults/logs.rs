//! What the nodes' own logs say about who heard whom: every `peer_down` and
//! the `peer_up` that ended it, as intervals on the lab's clock.
//!
//! The checker uses them for one thing: a server that hears nothing from a
//! peer the schedule left connected (its process starved of CPU for longer
//! than the failure timeout on a loaded machine, say) is, for the cluster, as
//! good as cut off; a name held twice across such a silence is reported apart
//! from the violations, not hidden.

use std::path::Path;

use crate::history::{Decision, Down, Kind, Secs};

/// Every node log in `dir` (`s<i>.<start>.log`, one per start of server
/// `i`): the server's index and the log's text.
fn node_logs(dir: &Path) -> Vec<(usize, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let server = name
                .strip_prefix('s')
                .and_then(|rest| rest.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|&i| i >= 1 && name.ends_with(".log"))?;
            let text = std::fs::read_to_string(entry.path()).ok()?;
            Some((server - 1, text))
        })
        .collect()
}

/// Every silence logged by the nodes whose logs are in `dir`;
/// `wall0` is the unix time of the lab's t=0.
pub fn observed_downs(dir: &Path, wall0: f64) -> Vec<Down> {
    let mut downs: Vec<Down> = node_logs(dir)
        .iter()
        .flat_map(|(observer, text)| downs_in(text, *observer, wall0))
        .collect();
    downs.sort_by(|a, b| a.from.total_cmp(&b.from));
    downs
}

/// Every `leader_elected` the nodes logged: (time on the lab's clock,
/// observer index), sorted by time.
pub fn leader_changes(dir: &Path, wall0: f64) -> Vec<(Secs, usize)> {
    let mut out = Vec::new();
    for (observer, text) in node_logs(dir) {
        for line in text.lines().filter(|l| l.contains(" leader_elected ")) {
            if let Some(t) = line.split_whitespace().next().and_then(unix_time) {
                out.push((t - wall0, observer));
            }
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// Every `claim_granted` a leader logged: `claim_granted asker=s2
/// name=identity user04` (or `name=room room03`), on the lab's clock.
pub fn grant_decisions(dir: &Path, wall0: f64) -> Vec<Decision> {
    let mut out: Vec<Decision> = node_logs(dir)
        .iter()
        .flat_map(|(_, text)| decisions_in(text, wall0))
        .collect();
    out.sort_by(|a, b| a.at.total_cmp(&b.at));
    out
}

fn decisions_in(text: &str, wall0: f64) -> Vec<Decision> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.contains(" claim_granted ")) {
        let Some(t) = line.split_whitespace().next().and_then(unix_time) else {
            continue;
        };
        let Some(asker) = field(line, "asker=s").and_then(|p| p.parse::<usize>().ok()) else {
            continue;
        };
        let Some(rest) = line.split("name=").nth(1) else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let kind = match words.next() {
            Some("identity") => Kind::Identity,
            Some("room") => Kind::Room,
            _ => continue,
        };
        let Some(name) = words.next() else { continue };
        out.push(Decision {
            at: t - wall0,
            asker: asker - 1,
            kind,
            name: name.to_owned(),
        });
    }
    out
}

/// The silences in one node's log; one still open at the log's end (the
/// process was killed, or the run ended) ends at its last line.
fn downs_in(text: &str, observer: usize, wall0: f64) -> Vec<Down> {
    let mut open: Vec<Down> = Vec::new();
    let mut closed = Vec::new();
    let mut last = 0.0;
    for line in text.lines() {
        let Some(t) = line.split_whitespace().next().and_then(unix_time) else {
            continue;
        };
        let t = t - wall0;
        last = t;
        let Some(peer) = field(line, "peer=s").and_then(|p| p.parse::<usize>().ok()) else {
            continue;
        };
        let peer = peer - 1;
        if line.contains(" peer_down ") {
            let silent = field(line, "silent_for: ")
                .and_then(duration)
                .unwrap_or(0.0);
            open.retain(|d| d.peer != peer);
            open.push(Down {
                observer,
                peer,
                from: t - silent,
                to: f64::INFINITY,
                silent,
            });
        } else if line.contains(" peer_up ")
            && let Some(at) = open.iter().position(|d| d.peer == peer)
        {
            let mut down = open.remove(at);
            down.to = t;
            closed.push(down);
        }
    }
    for mut down in open {
        down.to = last;
        closed.push(down);
    }
    closed
}

/// The text after `key` up to the next space or `}`.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    let rest = &line[start..];
    let end = rest.find([' ', '}']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// A Rust `Duration` debug form (`350.68ms`, `1.2s`, `950µs`) in seconds.
fn duration(text: &str) -> Option<Secs> {
    let digits = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let value: f64 = text[..digits].parse().ok()?;
    let scale = match &text[digits..] {
        "s" => 1.0,
        "ms" => 1e-3,
        "µs" | "us" => 1e-6,
        "ns" => 1e-9,
        _ => return None,
    };
    Some(value * scale)
}

/// `2026-11-26T14:28:39.750641Z` as unix seconds.
fn unix_time(stamp: &str) -> Option<f64> {
    let stamp = stamp.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, mi) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let s: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60) as f64 + s)
}

#[test]
fn node_log_lines_give_silences_on_the_lab_clock() {
    assert_eq!(unix_time("1970-01-01T00:00:01.5Z"), Some(1.5));
    assert_eq!(unix_time("2026-11-26T00:00:00Z"), Some(1_795_651_200.0));
    assert!((duration("350.5ms").unwrap() - 0.3505).abs() < 1e-9);
    assert_eq!(duration("2s"), Some(2.0));
    let wall0 = unix_time("2026-11-26T14:28:39.000000Z").unwrap();
    let log = "\
2026-11-26T14:28:39.750641Z  WARN chatmesh::cluster: peer_down peer=s4 reason=Timeout { silent_for: 650ms }
2026-11-26T14:28:39.800000Z  WARN chatmesh::cluster: peer_down peer=s2 reason=ConnectionClosed
2026-11-26T14:28:40.250641Z  INFO chatmesh::cluster: peer_up peer=s4
2026-11-26T14:28:41.000000Z  INFO chatmesh::cluster: leader_elected leader=s5 term=8
";
    let downs = downs_in(log, 4, wall0);
    assert_eq!(downs.len(), 2);
    let s4 = downs.iter().find(|d| d.peer == 3).unwrap();
    assert!((s4.from - 0.100641).abs() < 1e-6 && (s4.to - 1.250641).abs() < 1e-6);
    let s2 = downs.iter().find(|d| d.peer == 1).unwrap();
    assert!((s2.from - 0.8).abs() < 1e-6 && (s2.to - 2.0).abs() < 1e-6);
}

#[test]
fn node_log_lines_give_grant_decisions() {
    let wall0 = unix_time("2026-11-26T14:28:39.000000Z").unwrap();
    let log = "\
2026-11-26T14:28:39.500000Z DEBUG chatmesh::cluster: claim_granted asker=s2 name=identity user04
2026-11-26T14:28:39.600000Z  INFO chatmesh::cluster: claim_denied asker=s5 name=identity user01 reason=name already taken
2026-11-26T14:28:40.000000Z DEBUG chatmesh::cluster: claim_granted asker=s5 name=room room09
";
    let d = decisions_in(log, wall0);
    assert_eq!(d.len(), 2);
    assert_eq!(
        (d[0].asker, d[0].kind, d[0].name.as_str()),
        (1, Kind::Identity, "user04")
    );
    assert!((d[0].at - 0.5).abs() < 1e-6);
    assert_eq!(
        (d[1].asker, d[1].kind, d[1].name.as_str()),
        (4, Kind::Room, "room09")
    );
}
