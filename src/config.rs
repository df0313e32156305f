//! The cluster config: chatmesh's own TOML, and the assignment's whitespace line
//! format (`s1 localhost 4444 5555`). Both load into one [`ClusterConfig`], which
//! is validated as a whole so that a node never starts on a config its peers
//! would read differently.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::ServerId;

/// A config that could not be read or does not make sense, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file that failed.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read but a line or field is wrong.
    #[error("{origin}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Invalid {
        /// The file name (or "config" for a string).
        origin: String,
        /// 1-based line of the problem, where known.
        line: Option<usize>,
        /// What is wrong, naming the field.
        message: String,
    },
}

/// One server of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The server's id, e.g. `s1`; its main hall is `MainHall-<id>`.
    pub id: ServerId,
    /// Host name or IP address that clients and peers use to reach it.
    pub host: String,
    /// TCP (classic clients) and UDP (QUIC clients) port.
    pub client_port: u16,
    /// UDP port of the QUIC mesh between servers.
    pub mesh_port: u16,
    /// Loopback HTTP port for `/status` and `/metrics`, if any.
    pub admin_port: Option<u16>,
    /// HTTP port of the web client (`GET /`) and WebSocket chat sessions
    /// (`GET /chat`), bound on `host`, if any.
    pub web_port: Option<u16>,
    /// Election priority: higher wins. Defaults to the position in the file.
    pub priority: u32,
}

impl ServerConfig {
    /// The id of this server's main hall.
    pub fn main_hall(&self) -> String {
        main_hall_of(&self.id)
    }

    /// Resolves `host:port` to one socket address, preferring IPv4.
    pub fn resolve(&self, port: u16) -> std::io::Result<SocketAddr> {
        resolve_host(&self.host, port)
    }
}

/// The TOML of a cluster of `ports.len() / 3` servers s1, s2, ... on
/// 127.0.0.1, each taking three ports in turn: client, mesh, admin (benches
/// and tests run such clusters).
pub fn loopback_cluster_toml(ports: &[u16]) -> String {
    ports
        .chunks_exact(3)
        .enumerate()
        .map(|(i, p)| {
            format!(
                "[[server]]\nid = \"s{}\"\nhost = \"127.0.0.1\"\nclient_port = {}\nmesh_port = {}\nadmin_port = {}\n\n",
                i + 1,
                p[0],
                p[1],
                p[2]
            )
        })
        .collect()
}

/// What every main hall id starts with (client room ids cannot hold a `-`).
pub const MAIN_HALL_PREFIX: &str = "MainHall-";

/// The main hall id of a server id.
pub fn main_hall_of(id: &str) -> String {
    format!("{MAIN_HALL_PREFIX}{id}")
}

/// Resolves a host (name or IP literal) to one address, preferring IPv4 so that
/// `localhost` means 127.0.0.1 where both exist.
pub fn resolve_host(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("host {host:?} has no address"),
            )
        })
}

/// Timing settings of the mesh, the election and client claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// How often a server sends a heartbeat datagram to every peer.
    pub heartbeat_interval: Duration,
    /// Silence after which a peer is declared down.
    pub failure_timeout: Duration,
    /// Fast Bully T1: how long a booting server waits for `View` replies.
    pub election_t1: Duration,
    /// Fast Bully T2: how long an election waits for `Answer`s.
    pub election_t2: Duration,
    /// Fast Bully T3: how long a nominator waits for the nominee's `Coordinator`.
    pub election_t3: Duration,
    /// Fast Bully T4: how long an answerer waits for `Nomination`/`Coordinator`.
    pub election_t4: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_interval: Duration::from_millis(20),
            failure_timeout: Duration::from_millis(350),
            election_t1: Duration::from_millis(150),
            election_t2: Duration::from_millis(100),
            election_t3: Duration::from_millis(150),
            election_t4: Duration::from_millis(300),
        }
    }
}

/// Limits that keep one client from hurting the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest accepted client line, newline excluded.
    pub max_line_bytes: usize,
    /// Time a new connection has to send its first line, and a closing one
    /// to take its last lines before it is reset.
    pub handshake_timeout: Duration,
    /// Output a session may have queued before it is dropped as too slow.
    pub outbox_bytes: usize,
    /// Output all the sessions of a server may have queued together (a line
    /// sent to many counted once, plus its slot in each queue); past it, a
    /// session given a line while its client has taken none of its output
    /// for a second, or given none while it has taken none for ten, is
    /// dropped as too slow (see `chat::Outbox`).
    pub outbox_total_bytes: usize,
    /// How long a client's name claim may wait for the leader before it is refused.
    pub claim_timeout: Duration,
    /// How long an identity routed to another server stays reserved for its
    /// `movejoin` there before it is released.
    pub move_timeout: Duration,
    /// Most client connections (TCP, QUIC and web port, identified or not) served at
    /// once; the next one is refused with a reason. `None`: as many as the
    /// open-files limit allows with descriptors kept for the mesh, the admin
    /// endpoint and files (see `listener::ClientSlots`); a configured value
    /// above that is lowered to it.
    pub max_clients: Option<usize>,
    /// The kernel send buffer of each TCP client socket (`SO_SNDBUF`; Linux
    /// reserves twice this for its bookkeeping). Without it the kernel grows
    /// the buffer to 4 MiB for a client that does not read, so a slow reader
    /// would hold four times the outbox before it is dropped.
    pub send_buffer_bytes: usize,
    /// Least time between two writes to one client of events other clients
    /// caused (zero: each goes out at once). Events that come meanwhile go
    /// out together in one write; a client's answers to its own requests
    /// never wait for it (see `chat::Outbox`).
    pub event_pace: Duration,
}

/// The longest `event_pace` a config may set: more would make a busy room
/// visibly lag.
pub const MAX_EVENT_PACE: Duration = Duration::from_millis(100);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: 64 * 1024,
            handshake_timeout: Duration::from_secs(10),
            outbox_bytes: 1024 * 1024,
            outbox_total_bytes: 256 * 1024 * 1024,
            claim_timeout: Duration::from_millis(2000),
            move_timeout: Duration::from_secs(10),
            max_clients: None,
            // Plenty for a chat line stream (a loopback or LAN client drains
            // it at once); the outbox is the real buffer.
            send_buffer_bytes: 64 * 1024,
            event_pace: Duration::from_millis(1),
        }
    }
}

/// Whether the leader needs a majority of the configured servers to grant names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quorum {
    /// Grant only while a majority is reachable (safe under partitions).
    #[default]
    Majority,
    /// Grant whenever there is a leader (the seed's behaviour; for 2-server clusters).
    None,
}

/// The whole cluster: every server, in ascending priority, and shared settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Every configured server, sorted by ascending election priority.
    pub servers: Vec<ServerConfig>,
    /// Mesh, election and claim timing.
    pub timing: Timing,
    /// Per-client limits.
    pub limits: Limits,
    /// Grant rule under partitions.
    pub quorum: Quorum,
}

impl ClusterConfig {
    /// Reads a config file, TOML or the assignment's line format.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses config text; `origin` names it in errors. A text whose first
    /// meaningful line is a TOML table or key is TOML, anything else the line format.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let first = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'));
        let is_toml = first.is_some_and(|l| l.starts_with('[') || l.contains('='));
        if is_toml {
            parse_toml(text, origin)
        } else {
            parse_lines(text, origin)
        }
    }

    /// The server with this id.
    pub fn server(&self, id: &str) -> Option<&ServerConfig> {
        self.servers.iter().find(|s| s.id == id)
    }

    /// The ids of every server, in ascending priority.
    pub fn ids(&self) -> Vec<ServerId> {
        self.servers.iter().map(|s| s.id.clone()).collect()
    }
}

fn invalid(origin: &str, line: Option<usize>, message: impl fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.to_owned(),
        line,
        message: message.to_string(),
    }
}

fn parse_lines(text: &str, origin: &str) -> Result<ClusterConfig, ConfigError> {
    let mut servers = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != 4 {
            return Err(invalid(
                origin,
                Some(line_no),
                format!(
                    "expected `serverid address client_port coordination_port`, found {} field(s)",
                    fields.len()
                ),
            ));
        }
        let port = |name: &str, value: &str| {
            parse_port(value)
                .map_err(|why| invalid(origin, Some(line_no), format!("field {name}: {why}")))
        };
        let server = RawServer {
            id: fields[0].to_owned(),
            host: fields[1].to_owned(),
            client_port: port("client_port", fields[2])?,
            mesh_port: port("coordination_port", fields[3])?,
            admin_port: None,
            web_port: None,
            priority: None,
        };
        servers.push((server, Some(line_no)));
    }
    build(
        servers,
        Timing::default(),
        Limits::default(),
        Quorum::default(),
        origin,
    )
}

fn parse_port(value: &str) -> Result<u16, String> {
    value
        .parse::<u16>()
        .map_err(|_| format!("{value:?} is not a port number (0-65535)"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    id: String,
    host: String,
    client_port: u16,
    mesh_port: u16,
    admin_port: Option<u16>,
    web_port: Option<u16>,
    priority: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTiming {
    heartbeat_interval_ms: Option<u64>,
    failure_timeout_ms: Option<u64>,
    election_t1_ms: Option<u64>,
    election_t2_ms: Option<u64>,
    election_t3_ms: Option<u64>,
    election_t4_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_line_bytes: Option<toml::Spanned<usize>>,
    handshake_timeout_ms: Option<u64>,
    outbox_bytes: Option<toml::Spanned<usize>>,
    outbox_total_bytes: Option<toml::Spanned<usize>>,
    claim_timeout_ms: Option<u64>,
    move_timeout_ms: Option<u64>,
    max_clients: Option<toml::Spanned<usize>>,
    send_buffer_bytes: Option<toml::Spanned<usize>>,
    event_pace_ms: Option<toml::Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: Vec<toml::Spanned<RawServer>>,
    #[serde(default)]
    timing: RawTiming,
    #[serde(default)]
    limits: RawLimits,
    quorum: Option<String>,
}

fn parse_toml(text: &str, origin: &str) -> Result<ClusterConfig, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|span| line_of(text, span.start));
        // toml's message may not name the key; the offending line does.
        let message = match line.and_then(|l| text.lines().nth(l - 1)) {
            Some(source) => format!("`{}`: {}", source.trim(), e.message()),
            None => e.message().to_owned(),
        };
        invalid(origin, line, message)
    })?;
    let mut timing = Timing::default();
    let ms = |field: &str, value: Option<u64>, slot: &mut Duration| {
        match value {
            Some(0) => return Err(invalid(origin, None, format!("{field} must be > 0"))),
            Some(v) => *slot = Duration::from_millis(v),
            None => {}
        }
        Ok(())
    };
    let t = &raw.timing;
    ms(
        "timing.heartbeat_interval_ms",
        t.heartbeat_interval_ms,
        &mut timing.heartbeat_interval,
    )?;
    ms(
        "timing.failure_timeout_ms",
        t.failure_timeout_ms,
        &mut timing.failure_timeout,
    )?;
    ms(
        "timing.election_t1_ms",
        t.election_t1_ms,
        &mut timing.election_t1,
    )?;
    ms(
        "timing.election_t2_ms",
        t.election_t2_ms,
        &mut timing.election_t2,
    )?;
    ms(
        "timing.election_t3_ms",
        t.election_t3_ms,
        &mut timing.election_t3,
    )?;
    ms(
        "timing.election_t4_ms",
        t.election_t4_ms,
        &mut timing.election_t4,
    )?;
    if timing.failure_timeout <= timing.heartbeat_interval * 2 {
        return Err(invalid(
            origin,
            None,
            "timing.failure_timeout_ms must be more than twice heartbeat_interval_ms",
        ));
    }
    let mut limits = Limits::default();
    // A size in [limits]: at least `min`, errors naming its line.
    let size = |field: &str, value: &Option<toml::Spanned<usize>>, min: usize, slot: &mut usize| {
        if let Some(value) = value {
            if *value.get_ref() < min {
                return Err(invalid(
                    origin,
                    Some(line_of(text, value.span().start)),
                    format!("field limits.{field}: must be at least {min}"),
                ));
            }
            *slot = *value.get_ref();
        }
        Ok(())
    };
    size(
        "max_line_bytes",
        &raw.limits.max_line_bytes,
        256,
        &mut limits.max_line_bytes,
    )?;
    ms(
        "limits.handshake_timeout_ms",
        raw.limits.handshake_timeout_ms,
        &mut limits.handshake_timeout,
    )?;
    ms(
        "limits.claim_timeout_ms",
        raw.limits.claim_timeout_ms,
        &mut limits.claim_timeout,
    )?;
    ms(
        "limits.move_timeout_ms",
        raw.limits.move_timeout_ms,
        &mut limits.move_timeout,
    )?;
    size(
        "outbox_bytes",
        &raw.limits.outbox_bytes,
        4096,
        &mut limits.outbox_bytes,
    )?;
    if limits.outbox_bytes < 2 * limits.max_line_bytes {
        // A member's outbox must take a relayed message of the longest line
        // a client may send, with the next one behind it; smaller, and one
        // long message drops every member of the room as too slow.
        let at = raw
            .limits
            .outbox_bytes
            .as_ref()
            .or(raw.limits.max_line_bytes.as_ref())
            .map(|value| line_of(text, value.span().start));
        return Err(invalid(
            origin,
            at,
            format!(
                "field limits.outbox_bytes ({}) must be at least twice limits.max_line_bytes ({}): \
                 a member's outbox must hold a message of the longest line allowed, and the next",
                limits.outbox_bytes, limits.max_line_bytes
            ),
        ));
    }
    size(
        "outbox_total_bytes",
        &raw.limits.outbox_total_bytes,
        4096,
        &mut limits.outbox_total_bytes,
    )?;
    if limits.outbox_total_bytes < limits.outbox_bytes {
        let at = raw
            .limits
            .outbox_total_bytes
            .as_ref()
            .or(raw.limits.outbox_bytes.as_ref())
            .map(|value| line_of(text, value.span().start));
        return Err(invalid(
            origin,
            at,
            format!(
                "field limits.outbox_total_bytes ({}) must be at least limits.outbox_bytes ({}): \
                 all the outboxes together may hold no less than one",
                limits.outbox_total_bytes, limits.outbox_bytes
            ),
        ));
    }
    if let Some(pace) = &raw.limits.event_pace_ms {
        let ms = *pace.get_ref();
        if ms > MAX_EVENT_PACE.as_millis() as u64 {
            return Err(invalid(
                origin,
                Some(line_of(text, pace.span().start)),
                format!(
                    "field limits.event_pace_ms ({ms}) must be at most {}: events would lag that long",
                    MAX_EVENT_PACE.as_millis()
                ),
            ));
        }
        limits.event_pace = Duration::from_millis(ms);
    }
    let mut max_clients = 0;
    size("max_clients", &raw.limits.max_clients, 1, &mut max_clients)?;
    limits.max_clients = raw.limits.max_clients.is_some().then_some(max_clients);
    size(
        "send_buffer_bytes",
        &raw.limits.send_buffer_bytes,
        4096,
        &mut limits.send_buffer_bytes,
    )?;
    let quorum = match raw.quorum.as_deref() {
        None | Some("majority") => Quorum::Majority,
        Some("none") => Quorum::None,
        Some(other) => {
            return Err(invalid(
                origin,
                None,
                format!("quorum: expected \"majority\" or \"none\", found {other:?}"),
            ));
        }
    };
    let servers = raw
        .server
        .into_iter()
        .map(|spanned| {
            let line = line_of(text, spanned.span().start);
            (spanned.into_inner(), Some(line))
        })
        .collect();
    build(servers, timing, limits, quorum, origin)
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn build(
    raw: Vec<(RawServer, Option<usize>)>,
    timing: Timing,
    limits: Limits,
    quorum: Quorum,
    origin: &str,
) -> Result<ClusterConfig, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(origin, None, "no servers configured"));
    }
    let mut ids = HashSet::new();
    let mut endpoints = HashSet::new();
    let mut servers = Vec::with_capacity(raw.len());
    for (position, (server, line)) in raw.into_iter().enumerate() {
        let at =
            |message: String| invalid(origin, line, format!("server {:?}: {message}", server.id));
        if !valid_server_id(&server.id) {
            return Err(at(
                "field id: must be 1-32 characters of letters, digits, '-' or '_'".into(),
            ));
        }
        if !ids.insert(server.id.clone()) {
            return Err(at("field id: the same id is configured twice".into()));
        }
        if server.host.is_empty() || server.host.chars().any(char::is_whitespace) {
            return Err(at("field host: must be a host name or IP address".into()));
        }
        let ports = [
            ("client_port", Some(server.client_port)),
            ("mesh_port", Some(server.mesh_port)),
            ("admin_port", server.admin_port),
            ("web_port", server.web_port),
        ];
        for (field, port) in ports {
            let Some(port) = port else { continue };
            // Port 0 lets tests bind ephemeral ports; it never clashes.
            if port != 0 && !endpoints.insert((server.host.clone(), port)) {
                return Err(at(format!(
                    "field {field}: {}:{port} is already used by another port of the config",
                    server.host
                )));
            }
        }
        servers.push(ServerConfig {
            priority: server.priority.unwrap_or(position as u32),
            id: server.id,
            host: server.host,
            client_port: server.client_port,
            mesh_port: server.mesh_port,
            admin_port: server.admin_port,
            web_port: server.web_port,
        });
    }
    let mut priorities = HashSet::new();
    for server in &servers {
        if !priorities.insert(server.priority) {
            return Err(invalid(
                origin,
                None,
                format!(
                    "server {:?}: field priority: {} is shared with another server; priorities must differ",
                    server.id, server.priority
                ),
            ));
        }
    }
    servers.sort_by_key(|s| s.priority);
    Ok(ClusterConfig {
        servers,
        timing,
        limits,
        quorum,
    })
}

/// Server ids go into file names, certificate names and room names.
pub(crate) fn valid_server_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_cluster_toml_names_each_server_and_its_three_ports() {
        let text = loopback_cluster_toml(&[4001, 5001, 7001, 4002, 5002, 7002]);
        let config = ClusterConfig::parse(&text, "loopback").unwrap();
        let got: Vec<_> = config
            .servers
            .iter()
            .map(|s| (s.id.as_str(), s.client_port, s.mesh_port, s.admin_port))
            .collect();
        assert_eq!(
            got,
            [
                ("s1", 4001, 5001, Some(7001)),
                ("s2", 4002, 5002, Some(7002))
            ]
        );
    }

    #[test]
    fn shipped_toml_loads() {
        let config = ClusterConfig::load(Path::new("config/cluster.toml")).unwrap();
        assert_eq!(config.ids(), ["s1", "s2", "s3"]);
        let s2 = config.server("s2").unwrap();
        assert_eq!(
            (s2.client_port, s2.mesh_port, s2.admin_port, s2.web_port),
            (4445, 5556, Some(7002), Some(8081))
        );
        assert_eq!(config.timing, Timing::default());
        assert_eq!(config.limits, Limits::default());
    }

    #[test]
    fn web_port_is_optional_and_must_not_clash() {
        let base = "[[server]]\nid = \"s1\"\nhost = \"h\"\nclient_port = 1\nmesh_port = 2\n";
        let none = ClusterConfig::parse(base, "c").unwrap();
        assert_eq!(none.servers[0].web_port, None);
        let some = ClusterConfig::parse(&format!("{base}web_port = 8080\n"), "c").unwrap();
        assert_eq!(some.servers[0].web_port, Some(8080));
        let err = ClusterConfig::parse(&format!("{base}web_port = 2\n"), "c")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("web_port") && err.contains("already used"),
            "{err}"
        );
        let err = ClusterConfig::parse(&format!("{base}web_port = 70000\n"), "c")
            .unwrap_err()
            .to_string();
        assert!(err.contains("web_port"), "{err}");
    }

    #[test]
    fn line_format_loads_with_any_whitespace() {
        let config = ClusterConfig::parse(
            "# comment\ns1 localhost 4444 5555\n\n s2\tlocalhost   4445\t5556 \n",
            "x",
        )
        .unwrap();
        assert_eq!(config.ids(), ["s1", "s2"]);
        assert_eq!(config.servers[1].host, "localhost");
        assert_eq!(config.servers[1].mesh_port, 5556);
        assert_eq!(config.servers[1].admin_port, None);
        let shipped = ClusterConfig::load(Path::new("config/cluster.txt")).unwrap();
        assert_eq!(shipped.ids(), ["s1", "s2", "s3"]);
    }

    #[test]
    fn line_format_errors_name_line_and_field() {
        let err = ClusterConfig::parse("s1 localhost 4444 5555\ns2 localhost 44x5 5556\n", "c.txt")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "c.txt line 2: field client_port: \"44x5\" is not a port number (0-65535)"
        );
        let err = ClusterConfig::parse("s1 localhost 4444\n", "c.txt")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.txt line 1: expected"), "{err}");
    }

    #[test]
    fn toml_errors_name_line_and_field() {
        let text = "[[server]]\nid = \"s1\"\nhost = \"h\"\nclient_port = 1\nmesh_port = 2\n\n[[server]]\nid = \"s2\"\nhost = \"h\"\nclient_port = \"x\"\nmesh_port = 3\n";
        let err = ClusterConfig::parse(text, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml line 10:"), "{err}");
        assert!(
            err.contains("client_port") || err.contains("integer"),
            "{err}"
        );

        let dup = "[[server]]\nid = \"s1\"\nhost = \"h\"\nclient_port = 1\nmesh_port = 2\n[[server]]\nid = \"s1\"\nhost = \"h\"\nclient_port = 3\nmesh_port = 4\n";
        let err = ClusterConfig::parse(dup, "c.toml").unwrap_err().to_string();
        assert!(
            err.starts_with("c.toml line 6: server \"s1\": field id"),
            "{err}"
        );

        let clash = "[[server]]\nid = \"s1\"\nhost = \"h\"\nclient_port = 1\nmesh_port = 1\n";
        let err = ClusterConfig::parse(clash, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("field mesh_port"), "{err}");

        let unknown = "[[server]]\nid = \"s1\"\nhost = \"h\"\nclient_prot = 1\nmesh_port = 1\n";
        let err = ClusterConfig::parse(unknown, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("client_prot"), "{err}");
    }

    #[test]
    fn limits_load_and_their_errors_name_line_and_fields() {
        let servers = "[[server]]\nid = \"s1\"\nhost = \"h\"\nclient_port = 1\nmesh_port = 2\n";
        let text = format!(
            "{servers}[limits]\nmax_line_bytes = 1024\noutbox_bytes = 4096\nmax_clients = 500\nsend_buffer_bytes = 8192\n"
        );
        let limits = ClusterConfig::parse(&text, "c.toml").unwrap().limits;
        assert_eq!(
            (
                limits.max_line_bytes,
                limits.outbox_bytes,
                limits.max_clients,
                limits.send_buffer_bytes
            ),
            (1024, 4096, Some(500), 8192)
        );
        assert_eq!(limits.event_pace, Duration::from_millis(1), "the default");

        for (ms, pace) in [("0", Some(0)), ("100", Some(100)), ("101", None)] {
            let text = format!("{servers}[limits]\nevent_pace_ms = {ms}\n");
            match (ClusterConfig::parse(&text, "c.toml"), pace) {
                (Ok(config), Some(pace)) => {
                    assert_eq!(config.limits.event_pace, Duration::from_millis(pace));
                }
                (Err(e), None) => assert_eq!(
                    e.to_string(),
                    "c.toml line 7: field limits.event_pace_ms (101) must be at most 100: events would lag that long"
                ),
                (other, _) => panic!("event_pace_ms = {ms}: {other:?}"),
            }
        }

        // One 5 KB message would drop every member of a room.
        let small_outbox =
            format!("{servers}[limits]\nmax_line_bytes = 8192\noutbox_bytes = 4096\n");
        let err = ClusterConfig::parse(&small_outbox, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "c.toml line 8: field limits.outbox_bytes (4096) must be at least twice limits.max_line_bytes (8192)"
            ),
            "{err}"
        );
        // Only the line limit raised: the default outbox is too small for it.
        let long_lines = format!("{servers}[limits]\nmax_line_bytes = 1048576\n");
        let err = ClusterConfig::parse(&long_lines, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("c.toml line 7: field limits.outbox_bytes (1048576) must be at least twice limits.max_line_bytes (1048576)"),
            "{err}"
        );
        // Equal is not enough either: the relayed line is longer than the sent one.
        let equal = format!("{servers}[limits]\nmax_line_bytes = 4096\noutbox_bytes = 4096\n");
        assert!(ClusterConfig::parse(&equal, "c.toml").is_err());
        // The budget of all outboxes holds at least one full outbox.
        let small_budget = format!("{servers}[limits]\noutbox_total_bytes = 524288\n");
        let err = ClusterConfig::parse(&small_budget, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("c.toml line 7: field limits.outbox_total_bytes (524288) must be at least limits.outbox_bytes (1048576)"),
            "{err}"
        );
        let budget = format!("{servers}[limits]\noutbox_total_bytes = 1048576\n");
        let config = ClusterConfig::parse(&budget, "c.toml").unwrap();
        assert_eq!(config.limits.outbox_total_bytes, 1 << 20);

        for (field, value) in [
            ("max_clients", "0"),
            ("send_buffer_bytes", "100"),
            ("max_line_bytes", "10"),
        ] {
            let text = format!("{servers}[limits]\n{field} = {value}\n");
            let err = ClusterConfig::parse(&text, "c.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!(
                    "c.toml line 7: field limits.{field}: must be at least"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn priority_orders_servers() {
        let text = "[[server]]\nid = \"a\"\nhost = \"h\"\nclient_port = 1\nmesh_port = 2\npriority = 9\n[[server]]\nid = \"b\"\nhost = \"h\"\nclient_port = 3\nmesh_port = 4\n";
        let config = ClusterConfig::parse(text, "c").unwrap();
        assert_eq!(config.ids(), ["b", "a"]);
    }

    #[test]
    fn missing_file_is_named() {
        let err = ClusterConfig::load(Path::new("no/such.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cannot read config no/such.toml"), "{err}");
    }
}
