//! `chatmesh bench <scenario>`: chatmesh measured side by side with what a user
//! would pick instead (ngircd, alone and as a linked network, and nats-server),
//! in one run, as ratios.
//!
//! Where things are:
//! - [`procs`]: the processes the bench starts (our nodes, ngircd, nats-server),
//!   free ports, CPU time and resident memory from `/proc`.
//! - [`wire`]: raw protocol clients (chatmesh JSON lines over TCP and QUIC,
//!   IRC, NATS) split into a reader and a writer.
//! - [`fanout`], [`failover`], [`claims`], [`conns`]: the scenarios.
//! - [`report`]: the table, the JSON report and the SVG plot.
//!
//! Every load is bounded in count and in time; everything started is stopped
//! (child processes are killed on drop). Progress goes to stderr, the table to
//! stdout.

pub mod claims;
pub mod conns;
pub mod failover;
pub mod fanout;
pub mod floor;
pub mod procs;
pub mod report;
pub mod scale;
pub mod wire;

use std::path::PathBuf;

use anyhow::Result;

/// Which measurement to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Rooms of members sending to each other in a closed loop: messages/s and latency.
    Fanout,
    /// Kill -9 of the leader of 5 servers, repeatedly: time to a new agreed leader.
    Failover,
    /// Clients on all 3 servers claiming identities and room ids at once:
    /// granted claims/s, claim latency, and duplicates (must be 0).
    Claims,
    /// Idle identified clients on one server: resident memory per connection.
    Conns,
    /// 3, 5, 10, 20 servers: idle CPU and mesh datagrams per node, failover
    /// and names-free times, against N.
    Scale,
}

impl Scenario {
    /// The name used in file names and the report.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Fanout => "fanout",
            Scenario::Failover => "failover",
            Scenario::Claims => "claims",
            Scenario::Conns => "conns",
            Scenario::Scale => "scale",
        }
    }
}

/// Flags shared by every scenario, and each scenario's own.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// What to measure.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Run small (seconds): fewer rooms, members, messages, repetitions and kills.
    #[arg(long)]
    pub quick: bool,
    /// Measure chatmesh alone: do not start (or install) ngircd and nats-server,
    /// nor the floor of `claims`.
    #[arg(long)]
    pub no_peers: bool,
    /// Do not install missing peers with apt-get; print the command instead and skip them.
    #[arg(long)]
    pub no_install: bool,
    /// Directory for the JSON report and the SVG plot.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Repetitions of each measurement; the median is reported (default 3, 1 with
    /// --quick; conns: 1).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Upper bound on one run of one workload on one system, in seconds
    /// (conns: plus 10 ms per client).
    #[arg(long, default_value_t = 60)]
    pub run_timeout_s: u64,
    /// fanout: message size in bytes (the content, timestamp included; at least 40).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// fanout: at most this many of a member's own messages not yet delivered to every other member.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// fanout: put every chatmesh room and its members on s1, instead of room i
    /// (and all its members) on server i mod 3, as for the linked ngircd (the default).
    #[arg(long)]
    pub no_spread: bool,
    /// fanout: accepted for compatibility; spreading rooms is the default.
    #[arg(long, hide = true)]
    pub spread: bool,
    /// fanout: measure only these systems (comma-separated: chatmesh-tcp,
    /// chatmesh-quic, ngircd-1, ngircd-3, nats-server).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// fanout: workload (a) as ROOMSxMEMBERSxMESSAGES (default 10x10x200; 2x5x20 with --quick).
    #[arg(long, value_name = "RxMxK")]
    pub workload_a: Option<String>,
    /// fanout: workload (b) as ROOMSxMEMBERSxMESSAGES (default 1x100x50; 1x20x10 with --quick).
    #[arg(long, value_name = "RxMxK")]
    pub workload_b: Option<String>,
    /// failover, scale: how many times the leader is killed (failover: default
    /// 20, 3 with --quick; scale: 5 per size, 1 with --quick).
    #[arg(long)]
    pub kills: Option<usize>,
    /// failover: impairment passed to every node's --impair, e.g. "loss=5%,delay=2ms".
    #[arg(long, value_name = "SPEC")]
    pub impair: Option<String>,
    /// claims: clients claiming at once, spread evenly over the 3 servers
    /// (rounded up to a multiple of 3; default 48, 24 with --quick). Each waits
    /// for its answer before its next claim, so the mean latency is at least
    /// clients / rate: a p99 target at a rate needs few enough clients.
    #[arg(long)]
    pub clients: Option<usize>,
    /// claims: identities each client claims one after the other, each on a
    /// fresh connection and followed by one room id (default 400, 10 with --quick).
    #[arg(long)]
    pub claims: Option<usize>,
    /// claims: fraction of rounds in which one client on each server claims
    /// the same name at once (alternately an identity and a room id).
    #[arg(long, default_value_t = 0.1)]
    pub contested: f64,
    /// scale: cluster sizes, comma-separated (default 3,5,10,20; 3,5 with --quick).
    #[arg(long, value_delimiter = ',')]
    pub servers: Vec<usize>,
    /// conns: idle connections per system (default 10000, 200 with --quick).
    #[arg(long)]
    pub conns: Option<usize>,
}

impl BenchOptions {
    /// Repetitions per measurement.
    pub fn runs(&self) -> usize {
        self.runs.unwrap_or(if self.quick { 1 } else { 3 }).max(1)
    }
}

/// Runs one scenario: starts what it measures, prints progress on stderr and
/// the table on stdout, writes `<out>/<scenario>.json` and `.svg`.
pub async fn run(options: BenchOptions) -> Result<()> {
    // Scale draws line plots against N; the others, bars.
    let (report, svg) = match options.scenario {
        Scenario::Fanout => (fanout::run(&options).await?, None),
        Scenario::Failover => (failover::run(&options).await?, None),
        Scenario::Claims => (claims::run(&options).await?, None),
        Scenario::Conns => (conns::run(&options).await?, None),
        Scenario::Scale => {
            let (report, svg) = scale::run(&options).await?;
            (report, Some(svg))
        }
    };
    print!("{}", report.table());
    let (json, svg) = match svg {
        Some(text) => report.write_with_svg(&options.out, &text)?,
        None => report.write(&options.out)?,
    };
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}

/// One progress line on stderr.
pub(crate) fn progress(line: impl std::fmt::Display) {
    eprintln!("bench: {line}");
}

/// Prints `line()` on stderr every second until the returned task is aborted.
pub(crate) fn ticker(line: impl Fn() -> String + Send + 'static) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            progress(line());
        }
    })
}

/// The repetitions of one measurement: what each run gave, and why the
/// others failed.
pub(crate) struct Runs<T> {
    /// The runs that finished.
    pub ok: Vec<T>,
    /// Why the others failed.
    pub errors: Vec<String>,
}

impl<T> Default for Runs<T> {
    fn default() -> Self {
        Runs {
            ok: Vec::new(),
            errors: Vec::new(),
        }
    }
}

impl<T: Clone> Runs<T> {
    /// Runs `one(run)` for run 0..`count`, printing each result as
    /// `describe` writes it, or why it failed.
    pub async fn collect<F, Fut>(count: usize, mut one: F, describe: impl Fn(&T) -> String) -> Self
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut runs = Runs::default();
        for run in 0..count {
            match one(run).await {
                Ok(result) => {
                    progress(format!("  {}", describe(&result)));
                    runs.ok.push(result);
                }
                Err(e) => {
                    progress(format!("  failed: {e:#}"));
                    runs.errors.push(format!("{e:#}"));
                }
            }
        }
        runs
    }

    /// Adds the runs and failures of `other`.
    pub fn absorb(&mut self, other: Runs<T>) {
        self.ok.extend(other.ok);
        self.errors.extend(other.errors);
    }

    /// The median run by `key` (None if every run failed).
    pub fn median(&self, key: impl Fn(&T) -> f64) -> Option<T> {
        let mut sorted = self.ok.clone();
        sorted.sort_by(|x, y| key(x).total_cmp(&key(y)));
        sorted.get(sorted.len() / 2).cloned()
    }
}
