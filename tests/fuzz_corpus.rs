//! The fuzz targets' checks on stable Rust: every committed corpus file
//! (fuzz/corpus/<target>/) and every input a fuzzer once failed on
//! (fuzz/regressions/<target>/) goes through the same check the `cargo fuzz`
//! target runs (fuzz/src/lib.rs, included here), so a decoder change that
//! breaks one of them fails `cargo test` without cargo-fuzz or nightly.

#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::path::Path;

/// Runs `check` on every file of the target's corpus and regressions; at
/// least `min_corpus` corpus files must be there (a lost corpus fails).
fn replay(target: &str, min_corpus: usize, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut corpus = 0;
    for (dir, counted) in [("corpus", true), ("regressions", false)] {
        let dir = root.join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<_> = entries.map(|e| e.expect("dir entry").path()).collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).expect("corpus file");
            // Name the file that failed: the check's own message says what.
            eprintln!("{target}: {}", file.display());
            check(&data);
            corpus += usize::from(counted);
        }
    }
    assert!(
        corpus >= min_corpus,
        "{target}: {corpus} corpus files, expected at least {min_corpus}"
    );
}

#[test]
fn client_lines() {
    replay("client_lines", 10, checks::client_lines);
}

#[test]
fn mesh_frames() {
    replay("mesh_frames", 5, checks::mesh_frames);
}

#[test]
fn heartbeat() {
    replay("heartbeat", 3, checks::heartbeat);
}

#[test]
fn config() {
    replay("config", 3, checks::config);
}

#[test]
fn impairment() {
    replay("impairment", 5, checks::impairment);
}

#[test]
fn admin_request() {
    replay("admin_request", 3, checks::admin_request);
}

/// The config check's printers say a config back exactly (its round trip
/// compares with `==`, so a printer that dropped a field would fail it).
#[test]
fn the_config_printers_say_the_config_back() {
    let parse = |text: &str| chatmesh::ClusterConfig::parse(text, "t").expect(text);
    let config = parse("s1 h 1 2\ns2 h 3 4\n");
    assert_eq!(parse(&checks::to_toml(&config)), config);
    assert_eq!(
        checks::to_line_format(&config).as_deref(),
        Some("s1 h 1 2\ns2 h 3 4\n")
    );
    let toml = parse(include_str!("../config/cluster.toml"));
    assert_eq!(parse(&checks::to_toml(&toml)), toml);
    assert_eq!(checks::to_line_format(&toml), None, "admin ports");
    let mut fewer = config.clone();
    fewer.servers.pop();
    assert_ne!(parse(&checks::to_toml(&fewer)), config);
}
