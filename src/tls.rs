//! Certificates and TLS settings: the cluster CA and per-server certificates made
//! with rcgen, and the rustls/quinn configurations built from them.
//!
//! Layout of a certs directory (what nodes read): `ca.pem`, and `<id>.pem` +
//! `<id>.key` for every server. The CA's key is kept apart, in `ca/ca.key`
//! (with a copy of `ca.pem`) unless `--ca-dir` says elsewhere: a node never
//! reads it, so a node's host needs only `ca.pem`, `<id>.pem` and `<id>.key`.
//! A certs directory of the old layout (`ca.key` beside the node files) still
//! works for issuing, with a warning to move the key.
//!
//! Each server certificate names the server's host and its id as subject
//! alternative names, and is good for both TLS server and client auth,
//! because mesh links are mutual TLS. The CA is valid for
//! [`CA_VALID_YEARS`] years, server certificates for [`SERVER_VALID_YEARS`]
//! (never past the CA's own end), both from a day before they were made (a
//! host whose clock is a little behind still accepts them).
//!
//! Every file is written to a new file beside it, synced, then renamed over
//! the old one: keys get mode 0600 whatever the old file had, and a symlink
//! at the destination is replaced, never followed.

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
use tracing::warn;

use crate::config::{ClusterConfig, ServerConfig};

/// ALPN of client connections (QUIC transport of the classic JSON-lines protocol).
pub const CLIENT_ALPN: &[u8] = b"chatmesh-client/1";

/// Years a new cluster CA is valid.
pub const CA_VALID_YEARS: i32 = 5;

/// Years a new server certificate is valid (renew with `chatmesh certs --force`).
pub const SERVER_VALID_YEARS: i32 = 2;

/// `chatmesh up` re-issues a server certificate that ends within this many days.
pub const RENEW_WITHIN_DAYS: i64 = 30;

/// Path of the CA certificate in a certs directory.
pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

/// The CA directory used when none is given: `ca/` inside the certs directory.
pub fn default_ca_dir(certs: &Path) -> PathBuf {
    certs.join("ca")
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

/// What `chatmesh certs` makes, and where.
#[derive(Debug, Clone)]
pub struct CertsOptions {
    /// The directory nodes read: `ca.pem`, `<id>.pem`, `<id>.key`.
    pub out: PathBuf,
    /// Where the CA's key (and a copy of its certificate) live; default
    /// [`default_ca_dir`] of `out`.
    pub ca_dir: Option<PathBuf>,
    /// Replace existing server files (and the CA, with `new_ca`).
    pub force: bool,
    /// Make a new CA even if one exists (every node then needs new files).
    pub new_ca: bool,
    /// Only these servers (by id)...
    pub ids: Vec<String>,
    /// ... or the servers of these hosts; both empty: every server. With a
    /// selection, the CA must exist already (one node's files for a host).
    pub hosts: Vec<String>,
}

impl CertsOptions {
    /// Every server of the config, into `out`, CA key in `out/ca`.
    pub fn new(out: impl Into<PathBuf>) -> CertsOptions {
        CertsOptions {
            out: out.into(),
            ca_dir: None,
            force: false,
            new_ca: false,
            ids: Vec::new(),
            hosts: Vec::new(),
        }
    }

    fn ca_dir(&self) -> PathBuf {
        self.ca_dir
            .clone()
            .unwrap_or_else(|| default_ca_dir(&self.out))
    }
}

/// Makes a certificate for every server of `config` in `dir`, and a CA (key
/// in `dir/ca/`) unless one is there already. Refuses to overwrite an existing
/// file unless `force`. Returns the files written.
pub fn generate(config: &ClusterConfig, dir: &Path, force: bool) -> Result<Vec<PathBuf>> {
    let mut options = CertsOptions::new(dir);
    options.force = force;
    generate_with(config, &options)
}

/// A CA found on disk: where its certificate and key are.
struct FoundCa {
    cert: PathBuf,
    key: PathBuf,
}

/// The CA for `out`: key in `ca_dir`, or (old layout) beside the node files.
fn find_ca(out: &Path, ca_dir: &Path) -> Option<FoundCa> {
    let cert = [ca_cert_path(ca_dir), ca_cert_path(out)]
        .into_iter()
        .find(|p| p.exists())?;
    if ca_key_path(ca_dir).exists() {
        return Some(FoundCa {
            cert,
            key: ca_key_path(ca_dir),
        });
    }
    let legacy = ca_key_path(out);
    if legacy.exists() {
        warn!(
            "{} lies beside the node files, so copying that folder to a host hands it the CA key; \
             nodes never need it: move it (mkdir -p {ca}; mv {key} {ca}/; cp {pem} {ca}/)",
            legacy.display(),
            ca = ca_dir.display(),
            key = legacy.display(),
            pem = ca_cert_path(out).display(),
        );
        return Some(FoundCa { cert, key: legacy });
    }
    None
}

/// Makes what `options` asks for (see [`CertsOptions`]). Returns the files written.
pub fn generate_with(config: &ClusterConfig, options: &CertsOptions) -> Result<Vec<PathBuf>> {
    let out = &options.out;
    let ca_dir = options.ca_dir();
    let selective = !options.ids.is_empty() || !options.hosts.is_empty();
    for id in &options.ids {
        if config.server(id).is_none() {
            bail!(
                "server id {id:?} is not in the config (configured: {})",
                config.ids().join(", ")
            );
        }
    }
    let servers: Vec<&ServerConfig> = config
        .servers
        .iter()
        .filter(|s| !selective || options.ids.contains(&s.id) || options.hosts.contains(&s.host))
        .collect();
    if servers.is_empty() {
        bail!(
            "no server of the config is on host(s) {} (hosts: {})",
            options.hosts.join(", "),
            config
                .servers
                .iter()
                .map(|s| s.host.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let found = find_ca(out, &ca_dir);
    if selective && (found.is_none() || options.new_ca) {
        bail!(
            "no CA key in {} to sign with: make the cluster's CA first (`chatmesh certs`), \
             or pass --ca-dir where its ca.key is",
            ca_dir.display()
        );
    }
    let mut targets = Vec::new();
    let new_ca = found.is_none() || options.new_ca;
    if new_ca {
        targets.extend([ca_key_path(&ca_dir), ca_cert_path(&ca_dir)]);
    }
    targets.push(ca_cert_path(out));
    for server in &servers {
        targets.push(server_cert_path(out, &server.id));
        targets.push(server_key_path(out, &server.id));
    }
    if !options.force {
        let existing = targets
            .iter()
            // The CA's certificate is copied, not made, when the CA is kept.
            .filter(|p| new_ca || **p != ca_cert_path(out))
            .find(|p| p.exists());
        if let Some(existing) = existing {
            bail!(
                "{} already exists; pass --force to replace it (keeps the CA: nodes can be \
                 restarted one by one; with --new-ca every node needs the new files)",
                existing.display()
            );
        }
    }
    make_dir(out, 0o755)?;
    let (issuer, ca_pem, ca_end) = if new_ca {
        make_dir(&ca_dir, 0o700)?;
        new_ca_files(&ca_dir)?
    } else {
        let found = found.expect("checked above: a CA exists unless a new one is made");
        load_ca(&found)?
    };
    write_public(&ca_cert_path(out), &ca_pem)?;
    for server in &servers {
        new_server_cert(out, server, &issuer, ca_end)?;
    }
    // The CA's certificate is listed once, even when out and ca_dir are one.
    targets.dedup();
    Ok(targets)
}

/// Makes whatever is missing in `dir` for `config` (for `chatmesh up`): a
/// whole new set when there is no CA key, else the missing server
/// certificates, and those ending within [`RENEW_WITHIN_DAYS`], signed by the
/// existing CA. Returns the files written (empty when nothing was missing).
pub fn ensure(config: &ClusterConfig, dir: &Path) -> Result<Vec<PathBuf>> {
    let ca_dir = default_ca_dir(dir);
    let Some(found) = find_ca(dir, &ca_dir) else {
        return generate(config, dir, true);
    };
    let now = unix_now();
    let renew_before = now + RENEW_WITHIN_DAYS * 86_400;
    let missing: Vec<&ServerConfig> = config
        .servers
        .iter()
        .filter(|s| {
            let cert = server_cert_path(dir, &s.id);
            !cert.exists()
                || !server_key_path(dir, &s.id).exists()
                || cert_not_after(&cert).is_none_or(|end| end < renew_before)
        })
        .collect();
    let mut written = Vec::new();
    let (issuer, ca_pem, ca_end) = load_ca(&found)?;
    if ca_end < renew_before {
        warn!(
            "the cluster CA ends on {}: make a new one with `chatmesh certs --force --new-ca`, then restart every node",
            format_date(ca_end)
        );
    }
    if !ca_cert_path(dir).exists() {
        write_public(&ca_cert_path(dir), &ca_pem)?;
        written.push(ca_cert_path(dir));
    }
    for server in missing {
        new_server_cert(dir, server, &issuer, ca_end)?;
        written.push(server_cert_path(dir, &server.id));
        written.push(server_key_path(dir, &server.id));
    }
    Ok(written)
}

fn make_dir(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// The validity of a new certificate: from a day ago (clock skew between
/// hosts) for `years`, but never past `cap` (unix seconds) when given.
fn set_validity(params: &mut CertificateParams, years: i32, cap: Option<i64>) {
    let now = unix_now();
    let (y, m, d) = civil_from_unix(now - 86_400);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil_from_unix(now);
    // 28: the same day of the month exists in every year.
    let mut end = (y + years, m, d.min(28));
    if let Some(cap) = cap
        && unix_from_civil(end.0, end.1, end.2) > cap
    {
        end = civil_from_unix(cap);
    }
    params.not_after = rcgen::date_time_ymd(end.0, end.1, end.2);
}

fn new_ca_files(dir: &Path) -> Result<(Issuer<'static, KeyPair>, String, i64)> {
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
    set_validity(&mut params, CA_VALID_YEARS, None);
    let end = params.not_after.unix_timestamp();
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let pem = cert.pem();
    write_public(&ca_cert_path(dir), &pem)?;
    write_secret(&ca_key_path(dir), &key.serialize_pem())?;
    Ok((Issuer::new(params, key), pem, end))
}

fn load_ca(found: &FoundCa) -> Result<(Issuer<'static, KeyPair>, String, i64)> {
    let cert = fs::read_to_string(&found.cert)
        .with_context(|| format!("cannot read {}", found.cert.display()))?;
    let key = fs::read_to_string(&found.key)
        .with_context(|| format!("cannot read {}", found.key.display()))?;
    let key =
        KeyPair::from_pem(&key).with_context(|| format!("bad key in {}", found.key.display()))?;
    let end = cert_not_after(&found.cert)
        .with_context(|| format!("bad CA certificate in {}", found.cert.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&cert, key)
        .with_context(|| format!("bad CA certificate in {}", found.cert.display()))?;
    Ok((issuer, cert, end))
}

/// When the (first) certificate in the PEM file at `path` ends, in unix
/// seconds; None if it cannot be read.
pub fn cert_not_after(path: &Path) -> Option<i64> {
    let der = CertificateDer::from_pem_file(path).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.validity().not_after.timestamp())
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

fn new_server_cert(
    dir: &Path,
    server: &ServerConfig,
    issuer: &Issuer<'_, KeyPair>,
    ca_end: i64,
) -> Result<()> {
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
    set_validity(&mut params, SERVER_VALID_YEARS, Some(ca_end));
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    write_public(&server_cert_path(dir, &server.id), &cert.pem())?;
    write_secret(&server_key_path(dir, &server.id), &key.serialize_pem())?;
    Ok(())
}

fn write_public(path: &Path, contents: &str) -> Result<()> {
    write_replacing(path, contents, 0o644)
}

fn write_secret(path: &Path, contents: &str) -> Result<()> {
    write_replacing(path, contents, 0o600)
}

/// Writes `contents` to a new file beside `path` (mode `mode`, created
/// exclusively, never through a symlink), syncs it, and renames it over
/// `path`: the old file's mode, or a symlink there, plays no part, and a
/// crash leaves either the old file or the new one.
fn write_replacing(path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?
        .to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        // The umask may have taken bits away, never added any; set exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    // The rename itself survives a crash once the directory is synced.
    if let Ok(dir) = fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// (year, month, day) in UTC of a unix time (Howard Hinnant's civil_from_days).
fn civil_from_unix(secs: i64) -> (i32, u8, u8) {
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m, d)
}

/// Unix time of midnight UTC starting (year, month, day).
fn unix_from_civil(y: i32, m: u8, d: u8) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) * 86_400
}

/// `YYYY-MM-DD` of a unix time.
pub fn format_date(secs: i64) -> String {
    let (y, m, d) = civil_from_unix(secs);
    format!("{y:04}-{m:02}-{d:02}")
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
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn generate_refuses_to_overwrite_and_ensure_fills_gaps() {
        let dir = tempdir("tls-gen");
        let config = ClusterConfig::parse("s1 127.0.0.1 1 2\ns2 localhost 3 4\n", "t").unwrap();
        let written = generate(&config, &dir, false).unwrap();
        // ca/ca.pem, ca/ca.key, ca.pem, and two files per server.
        assert_eq!(written.len(), 7, "{written:?}");
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
        assert_eq!(mode(&server_key_path(&dir, "s1")), 0o600);
        assert_eq!(mode(&ca_key_path(&default_ca_dir(&dir))), 0o600);
        assert_eq!(mode(&default_ca_dir(&dir)), 0o700);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_ca_key_is_kept_apart_and_nodes_start_without_it() {
        let dir = tempdir("tls-apart");
        let config = ClusterConfig::parse("s1 127.0.0.1 1 2\ns2 localhost 3 4\n", "t").unwrap();
        generate(&config, &dir, false).unwrap();
        assert!(
            !ca_key_path(&dir).exists(),
            "no CA key among the node files"
        );
        assert!(ca_key_path(&default_ca_dir(&dir)).exists());
        // What one host gets: ca.pem and its own pair, nothing else.
        let host = tempdir("tls-apart-host");
        fs::create_dir_all(&host).unwrap();
        for name in ["ca.pem", "s1.pem", "s1.key"] {
            fs::copy(dir.join(name), host.join(name)).unwrap();
        }
        let identity = ServerIdentity::load(&host, "s1").unwrap();
        client_facing_server_config(&identity).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_dir_all(&host).unwrap();
    }

    #[test]
    fn one_servers_files_for_another_host_come_from_the_existing_ca() {
        let dir = tempdir("tls-host");
        let config =
            ClusterConfig::parse("s1 127.0.0.1 1 2\ns2 10.0.0.2 3 4\ns3 10.0.0.3 5 6\n", "t")
                .unwrap();
        generate(&config, &dir, false).unwrap();
        let ca = fs::read(ca_cert_path(&dir)).unwrap();
        let ship = tempdir("tls-host-ship");
        let mut options = CertsOptions::new(&ship);
        options.ca_dir = Some(default_ca_dir(&dir));
        options.hosts = vec!["10.0.0.2".into()];
        let written = generate_with(&config, &options).unwrap();
        assert_eq!(
            written,
            [
                ship.join("ca.pem"),
                ship.join("s2.pem"),
                ship.join("s2.key")
            ]
        );
        assert_eq!(fs::read(ship.join("ca.pem")).unwrap(), ca, "same CA");
        assert!(!ship.join("ca").exists() && !ship.join("ca.key").exists());
        ServerIdentity::load(&ship, "s2").unwrap();
        // --id into the main folder again needs --force, and keeps the CA.
        let mut options = CertsOptions::new(&dir);
        options.ids = vec!["s3".into()];
        let err = generate_with(&config, &options).unwrap_err().to_string();
        assert!(err.contains("s3.pem already exists"), "{err}");
        options.force = true;
        generate_with(&config, &options).unwrap();
        assert_eq!(fs::read(ca_cert_path(&dir)).unwrap(), ca, "CA kept");
        // Without a CA, a selection is refused: it would make a second CA.
        let empty = tempdir("tls-host-empty");
        let mut options = CertsOptions::new(&empty);
        options.ids = vec!["s2".into()];
        let err = generate_with(&config, &options).unwrap_err().to_string();
        assert!(err.contains("no CA key"), "{err}");
        options.ids = vec!["s9".into()];
        let err = generate_with(&config, &options).unwrap_err().to_string();
        assert!(err.contains("\"s9\" is not in the config"), "{err}");
        for d in [&dir, &ship] {
            fs::remove_dir_all(d).unwrap();
        }
        let _ = fs::remove_dir_all(&empty);
    }

    #[test]
    fn force_keeps_the_ca_and_new_ca_replaces_it() {
        let dir = tempdir("tls-renew");
        let config = ClusterConfig::parse("s1 127.0.0.1 1 2\n", "t").unwrap();
        generate(&config, &dir, false).unwrap();
        let ca = fs::read(ca_cert_path(&dir)).unwrap();
        let cert = fs::read(server_cert_path(&dir, "s1")).unwrap();
        generate(&config, &dir, true).unwrap();
        assert_eq!(
            fs::read(ca_cert_path(&dir)).unwrap(),
            ca,
            "--force keeps the CA"
        );
        assert_ne!(fs::read(server_cert_path(&dir, "s1")).unwrap(), cert);
        let mut options = CertsOptions::new(&dir);
        options.new_ca = true;
        let err = generate_with(&config, &options).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        options.force = true;
        generate_with(&config, &options).unwrap();
        assert_ne!(fs::read(ca_cert_path(&dir)).unwrap(), ca, "--new-ca");
        assert_eq!(
            fs::read(ca_cert_path(&dir)).unwrap(),
            fs::read(ca_cert_path(&default_ca_dir(&dir))).unwrap()
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_old_layout_ca_key_still_issues() {
        let dir = tempdir("tls-legacy");
        let config = ClusterConfig::parse("s1 127.0.0.1 1 2\ns2 localhost 3 4\n", "t").unwrap();
        generate(&config, &dir, false).unwrap();
        // The old layout: ca.key beside the node files, no ca/ folder.
        fs::rename(ca_key_path(&default_ca_dir(&dir)), ca_key_path(&dir)).unwrap();
        fs::remove_dir_all(default_ca_dir(&dir)).unwrap();
        let ca = fs::read(ca_cert_path(&dir)).unwrap();
        fs::remove_file(server_cert_path(&dir, "s2")).unwrap();
        let written = ensure(&config, &dir).unwrap();
        assert_eq!(written.len(), 2, "only s2 re-made: {written:?}");
        assert_eq!(fs::read(ca_cert_path(&dir)).unwrap(), ca, "old CA used");
        ServerIdentity::load(&dir, "s2").unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn force_writes_keys_0600_and_replaces_symlinks_without_following_them() {
        let dir = tempdir("tls-force");
        let config = ClusterConfig::parse("s1 127.0.0.1 1 2\ns2 localhost 3 4\n", "t").unwrap();
        generate(&config, &dir, false).unwrap();
        // s1.key left world-readable, s2.key a symlink to a file elsewhere.
        fs::set_permissions(
            server_key_path(&dir, "s1"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let elsewhere = tempdir("tls-force-target");
        fs::create_dir_all(&elsewhere).unwrap();
        let victim = elsewhere.join("victim");
        fs::write(&victim, "untouched").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
        fs::remove_file(server_key_path(&dir, "s2")).unwrap();
        std::os::unix::fs::symlink(&victim, server_key_path(&dir, "s2")).unwrap();

        generate(&config, &dir, true).unwrap();
        assert_eq!(mode(&server_key_path(&dir, "s1")), 0o600);
        let s2 = fs::symlink_metadata(server_key_path(&dir, "s2")).unwrap();
        assert!(
            s2.file_type().is_file(),
            "the symlink was replaced by a file"
        );
        assert_eq!(mode(&server_key_path(&dir, "s2")), 0o600);
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        ServerIdentity::load(&dir, "s2").unwrap();
        // No temporary file is left behind.
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_dir_all(&elsewhere).unwrap();
    }

    #[test]
    fn certificates_are_valid_from_yesterday_for_a_few_years() {
        let dir = tempdir("tls-validity");
        let config = ClusterConfig::parse("s1 127.0.0.1 1 2\n", "t").unwrap();
        generate(&config, &dir, false).unwrap();
        let now = unix_now();
        let year = 365 * 86_400;
        let check = |path: PathBuf, years: i64| {
            let der = CertificateDer::from_pem_file(&path).unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let from = cert.validity().not_before.timestamp();
            let to = cert.validity().not_after.timestamp();
            assert!(
                from <= now - 86_400 + 60 && from > now - 3 * 86_400,
                "{}: from {}",
                path.display(),
                format_date(from)
            );
            assert!(
                to > now + years * year - 5 * 86_400 && to <= now + years * year + 3 * 86_400,
                "{}: to {}",
                path.display(),
                format_date(to)
            );
        };
        check(ca_cert_path(&dir), CA_VALID_YEARS as i64);
        check(server_cert_path(&dir, "s1"), SERVER_VALID_YEARS as i64);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn up_re_issues_a_server_certificate_that_is_about_to_end() {
        let dir = tempdir("tls-expiring");
        let config = ClusterConfig::parse("s1 127.0.0.1 1 2\ns2 localhost 3 4\n", "t").unwrap();
        generate(&config, &dir, false).unwrap();
        // s1's certificate, from the same CA, ending in 10 days.
        let found = find_ca(&dir, &default_ca_dir(&dir)).unwrap();
        let (issuer, _, _) = load_ca(&found).unwrap();
        let mut params = CertificateParams::new(subject_alt_names(&config.servers[0])).unwrap();
        let (y, m, d) = civil_from_unix(unix_now() + 10 * 86_400);
        params.not_after = rcgen::date_time_ymd(y, m, d);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        write_public(&server_cert_path(&dir, "s1"), &cert.pem()).unwrap();
        write_secret(&server_key_path(&dir, "s1"), &key.serialize_pem()).unwrap();
        let s2_before = fs::read(server_cert_path(&dir, "s2")).unwrap();

        let written = ensure(&config, &dir).unwrap();
        assert_eq!(
            written,
            [server_cert_path(&dir, "s1"), server_key_path(&dir, "s1")]
        );
        let end = cert_not_after(&server_cert_path(&dir, "s1")).unwrap();
        assert!(
            end > unix_now() + 365 * 86_400,
            "renewed: {}",
            format_date(end)
        );
        assert_eq!(fs::read(server_cert_path(&dir, "s2")).unwrap(), s2_before);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn civil_dates_round_trip() {
        for secs in [0, 951_782_400, 1_700_000_000, 4_102_444_800, -86_400] {
            let (y, m, d) = civil_from_unix(secs);
            assert_eq!(unix_from_civil(y, m, d), secs - secs.rem_euclid(86_400));
        }
        assert_eq!(format_date(951_782_400), "2000-02-29");
        assert_eq!(format_date(0), "1970-01-01");
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
