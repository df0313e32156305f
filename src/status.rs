//! `chatmesh status`: one server's `/status`, rendered for a person.

use std::fmt::Write as _;
use std::net::SocketAddr;

use anyhow::{Context, Result, anyhow};
use serde::Deserialize;

use crate::config::ClusterConfig;

/// The admin address of server `id` (default: the first configured server
/// that has an admin port). The admin endpoint listens on loopback.
pub fn admin_addr(config: &ClusterConfig, id: Option<&str>) -> Result<SocketAddr> {
    let server = match id {
        Some(id) => config.server(id).ok_or_else(|| {
            anyhow!(
                "server {id:?} is not in the config (configured: {})",
                config.ids().join(", ")
            )
        })?,
        None => config
            .servers
            .iter()
            .find(|s| s.admin_port.is_some())
            .ok_or_else(|| anyhow!("no server of the config has an admin_port"))?,
    };
    let port = server
        .admin_port
        .ok_or_else(|| anyhow!("server {} has no admin_port in the config", server.id))?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

#[derive(Deserialize)]
struct Status {
    id: String,
    term: u64,
    leader: Option<String>,
    phase: String,
    members: Vec<Member>,
    sessions: usize,
    identities: usize,
    rooms: usize,
}

#[derive(Deserialize)]
struct Member {
    id: String,
    alive: bool,
    last_heartbeat_ms: Option<u64>,
}

/// Renders a `/status` JSON document as a short table.
pub fn render(json: &str) -> Result<String> {
    let status: Status =
        serde_json::from_str(json).context("the admin endpoint sent an unexpected status")?;
    let mut out = String::new();
    let leader = status
        .leader
        .as_deref()
        .unwrap_or("none (election under way)");
    let _ = writeln!(
        out,
        "server {}: leader {leader}, term {}, {}",
        status.id, status.term, status.phase
    );
    let _ = writeln!(out, "  {:<12} {:<6} last heartbeat", "member", "alive");
    for member in &status.members {
        let heard = if member.id == status.id {
            "(this server)".to_owned()
        } else {
            match member.last_heartbeat_ms {
                Some(ms) => format!("{ms} ms ago"),
                None => "never".to_owned(),
            }
        };
        let role = if status.leader.as_deref() == Some(member.id.as_str()) {
            " *"
        } else {
            ""
        };
        let alive = if member.alive { "yes" } else { "NO" };
        let _ = writeln!(
            out,
            "  {:<12} {alive:<6} {heard}",
            format!("{}{role}", member.id)
        );
    }
    let _ = writeln!(
        out,
        "  sessions {}, identities {}, rooms {} (* = leader)",
        status.sessions, status.identities, status.rooms
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_status() {
        let json = r#"{"id":"s1","term":3,"leader":"s3","phase":"Stable","members":[
            {"id":"s1","alive":true,"last_heartbeat_ms":0},
            {"id":"s2","alive":false,"last_heartbeat_ms":null},
            {"id":"s3","alive":true,"last_heartbeat_ms":12}],
            "sessions":2,"identities":2,"rooms":1}"#;
        let text = render(json).unwrap();
        assert!(
            text.starts_with("server s1: leader s3, term 3, Stable\n"),
            "{text}"
        );
        assert!(text.contains("s2           NO     never"), "{text}");
        assert!(text.contains("s3 *         yes    12 ms ago"), "{text}");
        assert!(render("{}").is_err());
    }
}
