//! The `chatmesh` binary: parses the command line, sets up logging and hands
//! over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use chatmesh::client::ClientOptions;
use chatmesh::up::UpOptions;
use chatmesh::{ClusterConfig, NodeOptions};

/// jemalloc instead of glibc's malloc. Sessions, mesh frames and registry
/// entries are many small allocations, often freed on another thread than the
/// one that made them. Measured with `bench claims`, back to back: about 10%
/// less CPU per granted claim; with `bench conns`, the same memory per idle
/// connection and half of glibc's after a main hall of 10,000 clients.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// chatmesh: a distributed multi-server chat system that speaks the classic
/// multi-server chat protocol over TCP and QUIC.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log format of this process (servers log to stderr; filter with RUST_LOG).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for machines.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Make a cluster CA and a certificate + key per server of the config;
    /// with --id or --host, one server's files from the existing CA (for
    /// another machine). The CA key stays in --ca-dir: nodes never need it.
    Certs {
        /// Cluster config (TOML, or the assignment's `id host client_port mesh_port` lines).
        #[arg(long, default_value = "config/cluster.toml")]
        config: PathBuf,
        /// Directory to write ca.pem, <id>.pem and <id>.key into (what nodes read).
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Directory of the CA's key (ca.key, and a copy of ca.pem) [default: <out>/ca].
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// Replace existing server files. The CA is kept (renewal: nodes can be
        /// restarted one by one).
        #[arg(long)]
        force: bool,
        /// Make a new CA even if there is one (with --force: every node then
        /// needs the new files before it can link to the others).
        #[arg(long)]
        new_ca: bool,
        /// Only these servers (ids, comma-separated), signed by the existing CA.
        #[arg(long, value_delimiter = ',')]
        id: Vec<String>,
        /// Only the servers of the config on these hosts, signed by the existing CA.
        #[arg(long, value_delimiter = ',')]
        host: Vec<String>,
    },
    /// Run one server of the config.
    Node {
        /// Cluster config (TOML, or the assignment's `id host client_port mesh_port` lines).
        #[arg(long, default_value = "config/cluster.toml")]
        config: PathBuf,
        /// Which server of the config to run, e.g. s1.
        #[arg(long)]
        id: String,
        /// Directory holding ca.pem and this server's <id>.pem / <id>.key.
        #[arg(long, default_value = "certs")]
        certs: PathBuf,
        /// Testing aid: impair this node's mesh datagrams, e.g.
        /// "loss=20%,delay=30ms,jitter=10ms,dup=1%,seed=7" (also burst=P_ENTER/P_EXIT,
        /// reorder=5%, dir=out, cut=ADDR; per peer: loss@ADDR=50%). Changeable at
        /// run time through the admin endpoint (POST /impair, /cut/<id>, /heal).
        /// Implies --testing-aids.
        #[arg(long, value_name = "SPEC")]
        impair: Option<chatmesh::netsim::Impairment>,
        /// Testing aid: let the admin endpoint take POST /impair, /cut/<id>,
        /// /heal/<id> and /heal (from local tools; a web page's request, with a
        /// foreign Origin, is refused). Off by default: those routes answer 404.
        #[arg(long)]
        testing_aids: bool,
        /// Threads serving client sessions (default: one per core). Nodes
        /// that share a machine should share its cores: `chatmesh up` gives
        /// each of its nodes cores / nodes (at least 1). The mesh and the
        /// registry run on a thread of their own either way.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
        workers: Option<u16>,
    },
    /// Show one server's view of the cluster, from its admin endpoint.
    Status {
        /// The admin endpoint, HOST:PORT (loopback).
        #[arg(long, conflicts_with = "id")]
        admin: Option<std::net::SocketAddr>,
        /// Cluster config, to find the admin port of --id.
        #[arg(long, default_value = "config/cluster.toml")]
        config: PathBuf,
        /// Which server to ask (default: the first of the config).
        #[arg(long)]
        id: Option<String>,
        /// Print the raw JSON of GET /status.
        #[arg(long)]
        json: bool,
    },
    /// Run every server of the config on this machine (makes certs if missing).
    Up {
        /// Cluster config (TOML, or the assignment's `id host client_port mesh_port` lines).
        #[arg(long, default_value = "config/cluster.toml")]
        config: PathBuf,
        /// Certificate directory; missing certificates are made here.
        #[arg(long, default_value = "certs")]
        certs: PathBuf,
        /// Start every node with --testing-aids (admin POST /impair, /cut, /heal).
        #[arg(long)]
        testing_aids: bool,
    },
    /// The bundled chat client: #list, #who, #createroom R, #joinroom R,
    /// #deleteroom R, #quit; any other line is a message. Reads stdin, so it can
    /// be scripted with piped lines.
    Client {
        /// The identity to claim (3-16 letters or digits, starting with a letter).
        #[arg(short, long)]
        identity: String,
        /// The server to connect to, HOST:PORT (its client port).
        #[arg(short, long, default_value = "127.0.0.1:4444")]
        server: String,
        /// Use the classic plain-TCP transport instead of QUIC.
        #[arg(long)]
        tcp: bool,
        /// CA certificate that QUIC servers must be signed by.
        #[arg(long, default_value = "certs/ca.pem")]
        ca: PathBuf,
        /// Servers to move to if the current one dies, HOST:PORT,... (default:
        /// every server of --config, if that file exists).
        #[arg(long, value_delimiter = ',')]
        servers: Vec<String>,
        /// Cluster config to take the fallback servers from.
        #[arg(long, default_value = "config/cluster.toml")]
        config: PathBuf,
    },
    /// Measure chatmesh beside ngircd and nats-server (started, and installed
    /// if missing, by the bench): a table on stdout, JSON and SVG in --out.
    Bench(chatmesh::bench::BenchOptions),
    /// Started by `bench claims`: its floor, a server of the claims requests
    /// alone with no cluster, on loopback.
    #[command(hide = true)]
    ClaimsFloor {
        /// Loopback ports to listen on, one server each, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        ports: Vec<u16>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_client = matches!(cli.command, Command::Client { .. });
    let log_flush = match init_tracing(cli.log_format, is_client) {
        Ok(flush) => flush,
        Err(e) => {
            eprintln!("error: cannot start the log writer thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Command::Node {
        workers: Some(workers),
        ..
    } = &cli.command
    {
        runtime.worker_threads(usize::from(*workers));
    }
    let result = runtime
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| {
            let result = runtime.block_on(run(cli));
            // The client's stdin reader is a blocking read that never returns
            // while the terminal is idle; do not wait for it on exit.
            runtime.shutdown_background();
            result
        });
    // Every line logged is out before the error line below.
    drop(log_flush);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line with every cause, not a backtrace: this is for people.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Certs {
            config,
            out,
            ca_dir,
            force,
            new_ca,
            id,
            host,
        } => {
            let cluster = ClusterConfig::load(&config)?;
            let options = chatmesh::tls::CertsOptions {
                out,
                ca_dir,
                force,
                new_ca,
                ids: id,
                hosts: host,
            };
            let written = chatmesh::tls::generate_with(&cluster, &options)?;
            for path in written {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Node {
            config,
            id,
            certs,
            impair,
            testing_aids,
            workers: _,
        } => {
            let config = ClusterConfig::load(&config)?;
            let mut options = NodeOptions::new(config, id, certs);
            options.testing_aids = testing_aids || impair.is_some();
            options.impair = impair;
            chatmesh::node::run_until_signal(options).await
        }
        Command::Status {
            admin,
            config,
            id,
            json,
        } => {
            let addr = match admin {
                Some(addr) => addr,
                None => {
                    chatmesh::status::admin_addr(&ClusterConfig::load(&config)?, id.as_deref())?
                }
            };
            let status = chatmesh::admin::fetch(addr, "/status").await?;
            if json {
                print!("{status}");
            } else {
                print!("{}", chatmesh::status::render(&status)?);
            }
            Ok(())
        }
        Command::Up {
            config,
            certs,
            testing_aids,
        } => {
            let mut node_args = Vec::new();
            if testing_aids {
                node_args.push("--testing-aids".to_owned());
            }
            if cli.log_format == LogFormat::Json {
                node_args.extend(["--log-format".to_owned(), "json".to_owned()]);
            }
            chatmesh::up::run(UpOptions {
                config_path: config,
                certs,
                node_args,
            })
            .await
        }
        Command::Client {
            identity,
            server,
            tcp,
            ca,
            servers,
            config,
        } => {
            let fallbacks = if !servers.is_empty() {
                servers
            } else if config.exists() {
                let cluster = ClusterConfig::load(&config)?;
                cluster
                    .servers
                    .iter()
                    .map(|s| format!("{}:{}", s.host, s.client_port))
                    .collect()
            } else {
                Vec::new()
            };
            chatmesh::client::run(ClientOptions {
                identity,
                server,
                tcp,
                ca,
                fallbacks,
            })
            .await
        }
        Command::Bench(options) => chatmesh::bench::run(options).await,
        Command::ClaimsFloor { ports } => chatmesh::bench::floor::serve(&ports).await,
    }
}

/// Logs go to stderr through a writer thread (see `chatmesh::logging`);
/// the returned guard writes out what is left when dropped.
fn init_tracing(format: LogFormat, quiet: bool) -> std::io::Result<chatmesh::logging::Flush> {
    use tracing_subscriber::EnvFilter;
    // The client's screen is for chat; it logs only warnings unless asked.
    // rustyline's own warnings (a terminal that does not report the cursor)
    // would land on the input line: only its errors are shown.
    let default = if quiet {
        "warn,rustyline=error"
    } else {
        "info"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let (writer, flush) = chatmesh::logging::spawn(std::io::stderr())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_timer(chatmesh::logging::Timestamp)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(flush)
}
