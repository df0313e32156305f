//! `chatmesh bench <scenario> --quick`: the real binary runs each scenario
//! small and writes a well-formed JSON report with no duplicates. Without the
//! peers always (`--no-peers`); with them too when ngircd and nats-server are
//! installed (skipped with a note otherwise: CI must not depend on them).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_chatmesh");

fn out_dir(tag: &str) -> PathBuf {
    let dir = common::temp_dir(&format!("bench-{tag}"));
    // The bench makes its output dir itself.
    let _ = std::fs::remove_dir(&dir);
    dir
}

/// Runs `chatmesh bench <scenario> --quick <extra>` (bounded by the bench's
/// own run timeout) into a fresh output dir named after `tag`, checks what
/// every report has, and returns the parsed `<scenario>.json`.
fn bench(tag: &str, scenario: &str, extra: &[&str]) -> Value {
    let out = out_dir(tag);
    let report = run_bench(scenario, extra, &out);
    let _ = std::fs::remove_dir_all(&out);
    report
}

fn run_bench(scenario: &str, extra: &[&str], out: &Path) -> Value {
    let output = Command::new(BIN)
        .args([
            "bench",
            scenario,
            "--quick",
            "--run-timeout-s",
            "20",
            "--out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .expect("run chatmesh bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench {scenario} {extra:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    println!("{stdout}");
    let path = out.join(format!("{scenario}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{} not written: {e}\n{stdout}\n{stderr}", path.display()));
    let report: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}\n{text}", path.display()));
    assert_eq!(report["scenario"], scenario, "{text}");
    assert_eq!(report["duplicates"], 0, "duplicates in {text}");
    let svg = std::fs::read_to_string(out.join(format!("{scenario}.svg"))).expect("svg written");
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
    report
}

/// The number at `pointer` (a JSON pointer) in `report`, which must be positive.
fn positive(report: &Value, pointer: &str) -> f64 {
    let value = report.pointer(pointer).and_then(Value::as_f64);
    assert!(
        value.is_some_and(|v| v > 0.0),
        "{pointer} is not a positive number in {report}"
    );
    value.unwrap_or_default()
}

fn peers_installed() -> bool {
    ["ngircd", "nats-server"]
        .iter()
        .all(|p| chatmesh::bench::procs::find_program(p).is_some())
}

/// Every chatmesh cell of a fanout report has a median with traffic in it.
fn check_fanout(report: &Value, want_peers: bool) {
    let cells = report["cells"].as_array().expect("cells array");
    for cell in cells {
        let system = cell["system"].as_str().expect("system name");
        if system.starts_with("chatmesh") || want_peers {
            let median = &cell["median"];
            assert!(
                median["msgs_per_s"].as_f64().is_some_and(|v| v > 0.0),
                "{system} workload {} has no result: {cell}",
                cell["workload"]
            );
            assert!(
                median["p99_ms"]
                    .as_f64()
                    .is_some_and(|v| v >= median["p50_ms"].as_f64().unwrap_or(0.0))
            );
        }
    }
    let systems: Vec<&str> = cells.iter().filter_map(|c| c["system"].as_str()).collect();
    assert!(
        systems.contains(&"chatmesh-tcp") && systems.contains(&"chatmesh-quic"),
        "{systems:?}"
    );
    if want_peers {
        for peer in ["ngircd-1", "ngircd-3", "nats-server"] {
            assert!(systems.contains(&peer), "{peer} missing from {systems:?}");
        }
    }
}

#[test]
fn fanout_quick_without_peers() {
    let out = out_dir("fanout");
    let report = run_bench("fanout", &["--no-peers"], &out);
    check_fanout(&report, false);
    // A smoke test must not pass for a measurement: no ratios, no targets,
    // and the plot says so.
    assert_eq!(report["ratios_meaningful"], false, "{report}");
    assert!(report["targets"].is_null(), "{report}");
    let svg = std::fs::read_to_string(out.join("fanout.svg")).expect("svg written");
    assert!(svg.contains("NOT a measurement"), "{svg}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn fanout_quick_with_peers_when_installed() {
    if !peers_installed() {
        println!(
            "note: ngircd or nats-server not installed; skipping the bench with peers (apt-get install -y ngircd nats-server)"
        );
        return;
    }
    let report = bench("fanout-peers", "fanout", &["--no-install"]);
    check_fanout(&report, true);
}

#[test]
fn failover_quick() {
    let report = bench("failover", "failover", &["--no-peers", "--kills", "2"]);
    let samples = report["samples_ms"].as_array().expect("samples");
    assert_eq!(samples.len(), 2, "{report}");
    positive(&report, "/p99_ms");
    // The dead leader's identity and room were granted again on a survivor.
    let frees = report["names_free_samples_ms"]
        .as_array()
        .expect("names free");
    assert_eq!(frees.len(), 2, "{report}");
    positive(&report, "/names_free_p99_ms");
}

#[test]
fn claims_quick() {
    let report = bench("claims", "claims", &["--no-peers"]);
    positive(&report, "/granted");
    let (p50, p99) = (positive(&report, "/p50_ms"), positive(&report, "/p99_ms"));
    assert!(p99 >= p50, "p50 {p50} p99 {p99}: {report}");
    // Duplicates are looked for only among contested names.
    positive(&report, "/contested_names");
}

#[test]
fn conns_quick() {
    // The peers too when installed (never installed from a test).
    let report = bench("conns", "conns", &["--no-install"]);
    let mut systems = vec!["tcp", "quic"];
    if peers_installed() {
        systems.extend(["ngircd", "nats-server"]);
    }
    for system in systems {
        positive(&report, &format!("/kib_per_conn/{system}"));
    }
}

#[test]
fn scale_quick() {
    let report = bench("scale", "scale", &["--kills", "1"]);
    let sizes = report["sizes"].as_array().expect("sizes");
    let servers: Vec<u64> = sizes.iter().filter_map(|s| s["servers"].as_u64()).collect();
    assert_eq!(servers, vec![3, 5], "{report}");
    for i in 0..sizes.len() {
        positive(&report, &format!("/sizes/{i}/idle_cpu_pct_per_node"));
        positive(&report, &format!("/sizes/{i}/datagrams_per_s_per_node"));
        positive(&report, &format!("/sizes/{i}/failover_median_ms"));
        positive(&report, &format!("/sizes/{i}/names_free_median_ms"));
    }
}
