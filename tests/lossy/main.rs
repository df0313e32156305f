//! Lossy networks: the impairment layer itself (`layer`), quinn over it
//! (`quinn_e2e`), and clusters of chatmesh nodes under loss, delay, bursts and
//! partitions (`cluster`). Run alone with `cargo test --test lossy`; every seed
//! is fixed and printed with the figures (`-- --nocapture` shows them).

#[path = "../common/mod.rs"]
mod common;

mod cluster;
mod layer;
mod quinn_e2e;
mod transport;
mod util;
