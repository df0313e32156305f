//! Certificates and TLS settings: the cluster CA and per-server certificates made
//! with rcgen, and the rustls/quinn configurations built from them.
//!
//! Layout of a certs directory: `ca.pem` + `ca.key`, and `<id>.pem` + `<id>.key`
//! for every server. Each server certificate names the server's host and its id
//! as subject alternative names, and is good for both TLS server and client
//! auth, because mesh links are mutual TLS.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ClusterConfig, ServerConfig};

/// ALPN of client connections (QUIC transport of the classic JSON-lines protocol).
pub const CLIENT_ALPN: &[u8] = b"chatmesh-client/1";

/// Path of the CA certificate in a certs directory.
pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca.key")
}

fn server_cert_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.pem"))
}

fn server_key_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.key"))
}

/// Makes a new CA and a certificate for every server of `config` in `dir`.
/// Refuses to overwrite an existing file unless `force`. Returns the files written.
pub fn generate(config: &ClusterConfig, dir: &Path, force: bool) -> Result<Vec<PathBuf>> {
    let mut targets = vec![ca_cert_path(dir), ca_key_path(dir)];
    for server in &config.servers {
        targets.push(server_cert_path(dir, &server.id));
        targets.push(server_key_path(dir, &server.id));
    }
    if !force && let Some(existing) = targets.iter().find(|p| p.exists()) {
        bail!(
            "{} already exists; pass --force to replace the whole set (every node then needs the new files)",
            existing.display()
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let issuer = new_ca(dir)?;
    for server in &config.servers {
        new_server_cert(dir, server, &issuer)?;
    }
    Ok(targets)
}

/// Makes whatever is missing in `dir` for `config`: a whole new set when there is
/// no CA, else just the missing server certificates, signed by the existing CA.
/// Returns the files written (empty when nothing was missing).
pub fn ensure(config: &ClusterConfig, dir: &Path) -> Result<Vec<PathBuf>> {
    if !ca_cert_path(dir).exists() || !ca_key_path(dir).exists() {
        return generate(config, dir, true);
    }
    let missing: Vec<&ServerConfig> = config
        .servers
        .iter()
        .filter(|s| !server_cert_path(dir, &s.id).exists() || !server_key_path(dir, &s.id).exists())
        .collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let issuer = load_ca(dir)?;
    let mut written = Vec::new();
    for server in missing {
        new_server_cert(dir, server, &issuer)?;
        written.push(server_cert_path(dir, &server.id));
        written.push(server_key_path(dir, &server.id));
    }
    Ok(written)
}

fn new_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "chatmesh cluster CA");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_public(&ca_cert_path(dir), &cert.pem())?;
    write_secret(&ca_key_path(dir), &key.serialize_pem())?;
    Ok(Issuer::new(params, key))
}

fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>> {
    let cert_path = ca_cert_path(dir);
    let key_path = ca_key_path(dir);
    let cert = fs::read_to_string(&cert_path)
        .with_context(|| format!("cannot read {}", cert_path.display()))?;
    let key = fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read {}", key_path.display()))?;
    let key =
        KeyPair::from_pem(&key).with_context(|| format!("bad key in {}", key_path.display()))?;
    Issuer::from_ca_cert_pem(&cert, key)
        .with_context(|| format!("bad CA certificate in {}", cert_path.display()))
}

/// Subject alternative names of a server: its host, its id, and for a loopback
/// host the usual loopback spellings, so `--server localhost:4444` verifies too.
fn subject_alt_names(server: &ServerConfig) -> Vec<String> {
    let mut names = vec![server.host.clone(), server.id.clone()];
    let loopback = server.host == "localhost"
        || server
            .host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        names.extend([
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ]);
    }
    names.sort();
    names.dedup();
    names
}

fn new_server_cert(dir: &Path, server: &ServerConfig, issuer: &Issuer<'_, KeyPair>) -> Result<()> {
    let mut params = CertificateParams::new(subject_alt_names(server)).with_context(|| {
        format!(
            "server {}: host {:?} is not a valid name",
            server.id, server.host
        )
    })?;
    params
        .distinguished_name
        .push(DnType::CommonName, server.id.clone());
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    write_public(&server_cert_path(dir, &server.id), &cert.pem())?;
    write_secret(&server_key_path(dir, &server.id), &key.serialize_pem())?;
    Ok(())
}

fn write_public(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}

fn write_secret(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A server's certificate chain and private key, loaded from a certs directory.
pub struct ServerIdentity {
    /// The server certificate (leaf first).
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
    /// The cluster CA, trusted for mesh peers.
    pub ca: CertificateDer<'static>,
}

impl ServerIdentity {
    /// Loads `<id>.pem`, `<id>.key` and `ca.pem` from `dir`.
    pub fn load(dir: &Path, id: &str) -> Result<Self> {
        let cert_path = server_cert_path(dir, id);
        let key_path = server_key_path(dir, id);
        let chain = load_certs(&cert_path)?;
        let key = PrivateKeyDer::from_pem_file(&key_path).with_context(|| {
            format!(
                "cannot load private key {} (run `chatmesh certs` to make one)",
                key_path.display()
            )
        })?;
        let ca = load_certs(&ca_cert_path(dir))?.remove(0);
        Ok(ServerIdentity { chain, key, ca })
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "cannot load certificate {} (run `chatmesh certs` to make one)",
                path.display()
            )
        })?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

/// The crypto provider of every TLS config (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls server config for client-facing QUIC: server auth only.
pub fn client_facing_server_config(identity: &ServerIdentity) -> Result<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .context("server certificate and key do not match")?;
    config.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
    Ok(config)
}

/// A QUIC client config for the chat port, trusting the CA at `ca_path`:
/// pings every `keep_alive`, and takes the server for dead after
/// `idle_timeout` without a packet (quinn's default when `None`).
pub fn quic_chat_client_config(
    ca_path: &Path,
    keep_alive: std::time::Duration,
    idle_timeout: Option<std::time::Duration>,
) -> Result<quinn::ClientConfig> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(chat_client_config(ca_path)?)
        .context("TLS config unusable for QUIC")?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(keep_alive));
    if let Some(idle) = idle_timeout {
        transport.max_idle_timeout(Some(
            idle.try_into().context("idle timeout too long for QUIC")?,
        ));
    }
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The rustls client config of a chat client: trusts only the cluster CA.
pub fn chat_client_config(ca_path: &Path) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca_path)? {
        roots
            .add(cert)
            .with_context(|| format!("{} is not a usable CA certificate", ca_path.display()))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_refuses_to_overwrite_and_ensure_fills_gaps() {
        let dir = tempdir("tls-gen");
        let config = ClusterConfig::parse("s1 127.0.0.1 1 2\ns2 localhost 3 4\n", "t").unwrap();
        let written = generate(&config, &dir, false).unwrap();
        assert_eq!(written.len(), 6);
        let err = generate(&config, &dir, false).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        let ca_before = fs::read(ca_cert_path(&dir)).unwrap();

        fs::remove_file(server_key_path(&dir, "s2")).unwrap();
        let written = ensure(&config, &dir).unwrap();
        assert_eq!(written.len(), 2);
        assert_eq!(fs::read(ca_cert_path(&dir)).unwrap(), ca_before, "CA kept");
        assert!(ensure(&config, &dir).unwrap().is_empty());

        let identity = ServerIdentity::load(&dir, "s2").unwrap();
        client_facing_server_config(&identity).unwrap();
        chat_client_config(&ca_cert_path(&dir)).unwrap();
        let mode = fs::metadata(server_key_path(&dir, "s1"))
            .unwrap()
            .permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loopback_hosts_get_loopback_names() {
        let config = ClusterConfig::parse("s1 127.0.0.1 1 2\ns2 chat.example 3 4\n", "t").unwrap();
        let names = subject_alt_names(&config.servers[0]);
        assert!(names.contains(&"localhost".to_owned()) && names.contains(&"s1".to_owned()));
        assert_eq!(
            subject_alt_names(&config.servers[1]),
            ["chat.example", "s2"]
        );
    }

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("chatmesh-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }
}
