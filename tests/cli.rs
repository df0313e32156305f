//! The real `chatmesh` binary: a node process, the bundled client scripted
//! through stdin over QUIC and TCP, graceful shutdown, `up`, and `certs`.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::process::{BIN, Proc, single_node_config, spawn_node, spawn_node_with};
use common::{certs, free_ports, temp_dir};

#[test]
fn bundled_clients_chat_over_quic_and_tcp_and_the_node_stops_cleanly() {
    let (mut node, addr) = spawn_node(&single_node_config("cli"));
    let ca = certs().join("ca.pem").display().to_string();

    let mut bob = Proc::spawn("bob", &["client", "-i", "Bob", "--server", &addr, "--tcp"]);
    bob.wait_line("connected to");
    bob.wait_line("Bob joins MainHall-s1");
    let mut adel = Proc::spawn(
        "adel",
        &["client", "-i", "Adel", "--server", &addr, "--ca", &ca],
    );
    adel.wait_line("over QUIC");
    bob.wait_line("Adel joins MainHall-s1");

    adel.type_line("#createroom jokes");
    adel.wait_line("room jokes created");
    adel.wait_line("Adel moves from MainHall-s1 to jokes");
    bob.wait_line("Adel moves from MainHall-s1 to jokes");

    bob.type_line("#joinroom jokes");
    bob.wait_line("Bob moves from MainHall-s1 to jokes");
    adel.wait_line("Bob moves from MainHall-s1 to jokes");

    adel.type_line("hello \"Bob\" \\ 😀");
    bob.wait_line("Adel: hello \"Bob\" \\ 😀");
    bob.type_line("#who");
    bob.wait_line("in jokes: Adel (owner), Bob");
    bob.type_line("#list");
    bob.wait_line("rooms: MainHall-s1, jokes");
    bob.type_line("#dance");
    bob.wait_line("unknown command #dance");

    // End of input is a clean quit: the owner's room goes first.
    adel.close_stdin();
    bob.wait_line("Adel moves from jokes to MainHall-s1");
    bob.wait_line("Bob moves from jokes to MainHall-s1");
    bob.wait_line("Adel quit");
    assert!(adel.wait_exit(), "adel exits 0");

    bob.type_line("#quit");
    bob.wait_line("Bob quit");
    assert!(bob.wait_exit(), "bob exits 0");

    node.signal(libc::SIGTERM);
    node.wait_line("stopped");
    assert!(node.wait_exit(), "node exits 0 on SIGTERM");
}

#[test]
fn a_refused_identity_is_a_clear_error() {
    let (mut node, addr) = spawn_node(&single_node_config("cli"));
    let mut bad = Proc::spawn("bad", &["client", "-i", "no", "--server", &addr, "--tcp"]);
    bad.wait_line("identity \"no\" refused");
    assert!(!bad.wait_exit(), "a refused identity exits non-zero");
    node.signal(libc::SIGINT);
    assert!(node.wait_exit(), "node exits 0 on SIGINT");
}

/// The `session_threads` a node's start line reports (its runtime's own count).
fn session_threads(line: &str) -> usize {
    line.split("session_threads=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no session_threads in {line:?}"))
}

#[test]
fn workers_sets_the_session_threads_and_zero_is_refused() {
    let config = single_node_config("workers");
    let certs = certs().display().to_string();
    let mut node = Proc::spawn(
        "node",
        &[
            "node",
            "--config",
            &config,
            "--id",
            "s1",
            "--certs",
            &certs,
            "--workers",
            "3",
        ],
    );
    let line = node.wait_line("serving clients");
    assert_eq!(session_threads(&line), 3, "{line}");
    node.signal(libc::SIGTERM);
    assert!(node.wait_exit());

    let output = Command::new(BIN)
        .args(["node", "--config", &config, "--id", "s1", "--workers", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid value '0' for '--workers <N>'"),
        "{stderr}"
    );
}

#[test]
fn scripted_client_runs_a_whole_script_from_a_pipe() {
    let (_node, addr) = spawn_node(&single_node_config("cli"));
    let ca = certs().join("ca.pem").display().to_string();
    let mut child = Command::new(BIN)
        .args(["client", "-i", "Script", "--server", &addr, "--ca", &ca])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"#createroom talk\n#who\n#joinroom MainHall-s1\n#deleteroom talk\n#list\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let expected = [
        "connected to",
        "Script joins MainHall-s1",
        "room talk created",
        "Script moves from MainHall-s1 to talk",
        "in talk: Script (owner)",
        "Script could not join MainHall-s1",
        "room talk deleted",
        "Script moves from talk to MainHall-s1",
        "rooms: MainHall-s1",
        "Script quit",
    ];
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), expected.len(), "{stdout}");
    for (line, want) in lines.iter().zip(expected) {
        assert!(
            line.contains(want),
            "expected {want:?}, got {line:?}\n{stdout}"
        );
    }
}

/// A plain HTTP/1.1 GET of `path` on `addr`: the whole response.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).expect("web port accepts");
    stream
        .set_read_timeout(Some(common::DEADLINE))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

#[test]
fn up_runs_every_server_and_stops_them_all() {
    let ports = free_ports(9);
    assert!(ports.len() >= 9, "not enough free ports");
    // s1 and s2 have a web port, s3 none.
    let web_ports = free_ports(2);
    let dir = temp_dir("up");
    let config = dir.join("cluster.toml");
    let mut text = String::new();
    for i in 0..3 {
        text += &format!(
            "[[server]]\nid = \"s{}\"\nhost = \"127.0.0.1\"\nclient_port = {}\nmesh_port = {}\nadmin_port = {}\n",
            i + 1,
            ports[i * 3],
            ports[i * 3 + 1],
            ports[i * 3 + 2]
        );
        if let Some(web) = web_ports.get(i) {
            text += &format!("web_port = {web}\n");
        }
        text += "\n";
    }
    std::fs::write(&config, text).unwrap();
    let certs_dir = dir.join("certs");
    let mut up = Proc::spawn(
        "up",
        &[
            "up",
            "--config",
            &config.display().to_string(),
            "--certs",
            &certs_dir.display().to_string(),
        ],
    );
    up.wait_line("made 9 certificate file(s)");
    for (i, web) in web_ports.iter().enumerate() {
        let line = up.wait_line(&format!("started s{} (pid", i + 1));
        assert!(
            line.ends_with(&format!(
                ": clients on 127.0.0.1:{} over TCP and QUIC; web client at http://127.0.0.1:{web}/",
                ports[i * 3]
            )),
            "{line}"
        );
    }
    let line = up.wait_line("started s3 (pid");
    assert!(!line.contains("web client"), "s3 has no web port: {line}");
    // Each node serves, and the three share this machine's cores.
    let cores = std::thread::available_parallelism().unwrap().get();
    let mut serving: Vec<String> = (0..3)
        .map(|_| {
            let line = up.wait_line("serving clients");
            assert_eq!(session_threads(&line), (cores / 3).max(1), "{line}");
            line.trim_start()[..2].to_owned()
        })
        .collect();
    serving.sort();
    assert_eq!(serving, ["s1", "s2", "s3"]);
    for i in 0..3 {
        let addr = format!("127.0.0.1:{}", ports[i * 3]);
        let name = format!("User{i}");
        let mut client = Proc::spawn(
            "client",
            &["client", "-i", &name, "--server", &addr, "--tcp"],
        );
        client.wait_line(&format!("{name} joins MainHall-s{}", i + 1));
        client.close_stdin();
        assert!(client.wait_exit());
    }
    // The printed URL serves the web client.
    let page = http_get(&format!("127.0.0.1:{}", web_ports[0]), "/");
    assert!(
        page.starts_with("HTTP/1.1 200 OK\r\n") && page.contains("<title>chatmesh</title>"),
        "{page}"
    );
    up.signal(libc::SIGTERM);
    up.wait_line("stopping every node");
    for i in 0..3 {
        up.wait_line(&format!("node s{} exited", i + 1));
    }
    assert!(up.wait_exit(), "up exits 0");
    assert!(certs_dir.join("s3.key").exists());
    // The CA key is kept apart from what the nodes read.
    assert!(certs_dir.join("ca").join("ca.key").exists());
    assert!(!certs_dir.join("ca.key").exists());
}

#[test]
fn certs_refuses_to_overwrite_without_force() {
    let dir = temp_dir("certs-cli");
    let config = dir.join("cluster.txt");
    std::fs::write(&config, "s1 localhost 4444 5555\ns2 localhost 4445 5556\n").unwrap();
    let out = dir.join("certs");
    let run = |force: bool| {
        let mut args = vec![
            "certs".to_owned(),
            "--config".into(),
            config.display().to_string(),
        ];
        args.extend(["--out".into(), out.display().to_string()]);
        if force {
            args.push("--force".into());
        }
        Command::new(BIN).args(&args).output().unwrap()
    };
    let first = run(false);
    assert!(first.status.success());
    // ca/ca.key, ca/ca.pem, ca.pem and two files per server.
    assert_eq!(String::from_utf8_lossy(&first.stdout).lines().count(), 7);
    let second = run(false);
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already exists; pass --force"));
    assert!(run(true).status.success());
}

#[test]
fn a_broken_config_names_line_and_field() {
    let dir = temp_dir("badconfig");
    let config = dir.join("cluster.txt");
    std::fs::write(&config, "s1 localhost 4444 5555\ns2 localhost 4445\n").unwrap();
    let output = Command::new(BIN)
        .args([
            "node",
            "--id",
            "s1",
            "--config",
            &config.display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "cluster.txt line 2: expected `serverid address client_port coordination_port`"
        ),
        "{stderr}"
    );
}

#[test]
fn clients_notice_a_stopping_server_at_once() {
    let (mut node, addr) = spawn_node(&single_node_config("cli"));
    let ca = certs().join("ca.pem").display().to_string();
    // No other server to move to: --servers names only this one.
    let mut quic = Proc::spawn(
        "quic",
        &[
            "client",
            "-i",
            "Quic",
            "--server",
            &addr,
            "--ca",
            &ca,
            "--servers",
            &addr,
        ],
    );
    quic.wait_line("Quic joins MainHall-s1");
    let mut tcp = Proc::spawn(
        "tcp",
        &[
            "client",
            "-i",
            "Tcp",
            "--server",
            &addr,
            "--tcp",
            "--servers",
            &addr,
        ],
    );
    tcp.wait_line("Tcp joins MainHall-s1");
    node.signal(libc::SIGTERM);
    assert!(node.wait_exit());
    // Their stdin stays open: only the server going away can end them.
    for client in [&mut quic, &mut tcp] {
        client.wait_line("error: the server closed the connection");
        assert!(!client.wait_exit(), "a lost server is a non-zero exit");
    }
}

/// A one-server TOML config with an admin port; returns (config path, admin address).
fn admin_node_config(tag: &str) -> (String, std::net::SocketAddr) {
    let ports = free_ports(3);
    assert_eq!(ports.len(), 3, "not enough free ports");
    let dir = temp_dir(tag);
    let path = dir.join("cluster.toml");
    std::fs::write(
        &path,
        format!(
            "[[server]]\nid = \"s1\"\nhost = \"127.0.0.1\"\nclient_port = {}\nmesh_port = {}\nadmin_port = {}\n",
            ports[0], ports[1], ports[2]
        ),
    )
    .unwrap();
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], ports[2]));
    (path.display().to_string(), admin)
}

/// The impairment currently in force, from `GET /impair`, without its
/// seed (a random one is shown when none was set).
async fn impairment(admin: std::net::SocketAddr) -> String {
    let text = chatmesh::admin::fetch(admin, "/impair").await.unwrap();
    let line = text.lines().next().unwrap_or("");
    let items: Vec<&str> = line
        .trim_start_matches("impairment: ")
        .split(',')
        .filter(|item| !item.starts_with("seed=") && *item != "none")
        .collect();
    if items.is_empty() {
        "impairment: none".to_owned()
    } else {
        format!("impairment: {}", items.join(","))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_testing_aids_are_off_without_the_flag() {
    let (config, admin) = admin_node_config("aids-off");
    let (_node, _) = spawn_node_with(&config, &[]);
    for (path, body) in [("/impair", "loss=100%"), ("/cut/s1", ""), ("/heal", "")] {
        for origin in [None, Some("http://evil.example")] {
            let err = chatmesh::admin::post_from(admin, path, body, origin)
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("404") && err.contains("--testing-aids"),
                "POST {path}: {err}"
            );
        }
    }
    // Whatever the path or body: the flag is named before anything else.
    let (answer, _) = tokio::task::spawn_blocking(move || {
        admin_raw(
            admin,
            b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
        )
    })
    .await
    .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 404 Not Found\r\n")
            && answer.ends_with(chatmesh::admin::AIDS_OFF),
        "{answer}"
    );
    assert_eq!(impairment(admin).await, "impairment: none");
    // Reading stays as it was.
    assert!(
        chatmesh::admin::fetch(admin, "/status")
            .await
            .unwrap()
            .contains("\"id\": \"s1\"")
    );
    assert!(
        chatmesh::admin::fetch(admin, "/metrics")
            .await
            .unwrap()
            .contains("chatmesh_term")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_testing_aids_work_with_the_flag_but_not_from_a_foreign_origin() {
    let (config, admin) = admin_node_config("aids-on");
    let (_node, _) = spawn_node_with(&config, &["--testing-aids"]);
    let port = admin.port();
    for origin in [
        "http://evil.example",
        "null",
        "http://127.0.0.1:1",
        "https://127.0.0.1:{port}",
        "http://127.0.0.1.evil.example:{port}",
    ] {
        let origin = origin.replace("{port}", &port.to_string());
        let err = chatmesh::admin::post_from(admin, "/impair", "loss=100%", Some(&origin))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("403"), "Origin {origin}: {err}");
    }
    assert_eq!(impairment(admin).await, "impairment: none");
    // A local tool (no Origin) and the endpoint's own pages may.
    chatmesh::admin::post(admin, "/impair", "loss=5%")
        .await
        .unwrap();
    assert_eq!(impairment(admin).await, "impairment: loss=5%");
    for own in [
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
    ] {
        chatmesh::admin::post_from(admin, "/impair", "loss=7%", Some(&own))
            .await
            .unwrap();
    }
    assert_eq!(impairment(admin).await, "impairment: loss=7%");
    chatmesh::admin::post(admin, "/impair", "loss=0%")
        .await
        .unwrap();
    assert_eq!(impairment(admin).await, "impairment: none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impair_implies_testing_aids() {
    let (config, admin) = admin_node_config("aids-impair");
    let (_node, _) = spawn_node_with(&config, &["--impair", "loss=0%"]);
    chatmesh::admin::post(admin, "/impair", "loss=3%")
        .await
        .unwrap();
    assert_eq!(impairment(admin).await, "impairment: loss=3%");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_capped() {
    let (config, admin) = admin_node_config("admin-cap");
    let (_node, _) = spawn_node_with(&config, &[]);
    let max = chatmesh::admin::MAX_CONNECTIONS;
    // As many idle connections as the cap allows (each would be held until
    // the request timeout).
    let held: Vec<std::net::TcpStream> = (0..max)
        .map(|_| std::net::TcpStream::connect(admin).expect("admin endpoint accepts"))
        .collect();
    // Every one more is told why at once, and closed: it holds nothing.
    let refused = tokio::task::spawn_blocking(move || {
        (0..20).map(|_| admin_raw(admin, b"")).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (answer, took) in refused {
        assert!(
            answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
                && answer.ends_with(&chatmesh::admin::busy()),
            "{answer:?} after {took:?}"
        );
    }
    // A closed connection frees its place.
    drop(held);
    let start = std::time::Instant::now();
    loop {
        match chatmesh::admin::fetch(admin, "/status").await {
            Ok(status) => {
                assert!(status.contains("\"id\": \"s1\""), "{status}");
                break;
            }
            Err(e) => assert!(
                start.elapsed() < common::DEADLINE,
                "no answer once the idle connections closed: {e}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Sends `request` as raw bytes to `admin`, half-closes if `close` (else the
/// connection stays open for writing), and reads until the server closes:
/// the whole answer and how long the server took to close. Panics if the
/// server has not closed within 30 s.
fn admin_raw(admin: std::net::SocketAddr, request: &[u8]) -> (String, std::time::Duration) {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(admin).expect("admin endpoint accepts");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let start = std::time::Instant::now();
    // The server may answer and close before taking every byte.
    let _ = stream.write_all(request);
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            // A reset after an answer to a request not read to its end.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "admin endpoint did not close the connection after {:?}: {e}; got {:?}",
                start.elapsed(),
                String::from_utf8_lossy(&response)
            ),
        }
    }
    (
        String::from_utf8_lossy(&response).into_owned(),
        start.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_bounds_bodies_and_answers_unknown_routes_and_methods() {
    let (config, admin) = admin_node_config("admin-http");
    let (_node, _) = spawn_node_with(&config, &["--testing-aids"]);
    let max = chatmesh::admin::MAX_BODY;
    // A spec padded to exactly the limit is taken (and trimmed) ...
    let spec = format!("{:<max$}", "loss=2%");
    assert_eq!(spec.len(), max);
    chatmesh::admin::post(admin, "/impair", &spec)
        .await
        .expect("a body of MAX_BODY bytes");
    assert_eq!(impairment(admin).await, "impairment: loss=2%");
    // ... one byte more is refused, and changes nothing.
    let spec = format!("{:<len$}", "loss=9%", len = max + 1);
    let err = chatmesh::admin::post(admin, "/impair", &spec)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("413") && err.contains(&format!("over {max} bytes")),
        "{err}"
    );
    assert_eq!(impairment(admin).await, "impairment: loss=2%");
    // A declared length over the limit is refused before any of it comes
    // (the request stays open for writing: the answer does not wait for it).
    let (answer, took) = tokio::task::spawn_blocking(move || {
        admin_raw(
            admin,
            b"POST /impair HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\nloss=",
        )
    })
    .await
    .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "{answer}"
    );
    assert!(
        took < chatmesh::admin::REQUEST_TIMEOUT,
        "answered in {took:?}"
    );
    // A chunked body (no declared length) is counted as it comes.
    let chunk = "x".repeat(8192);
    let mut chunked = String::from(
        "POST /impair HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    );
    for _ in 0..3 {
        chunked.push_str(&format!("2000\r\n{chunk}\r\n"));
    }
    chunked.push_str("0\r\n\r\n");
    let (answer, _) = tokio::task::spawn_blocking(move || admin_raw(admin, chunked.as_bytes()))
        .await
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "{answer}"
    );
    assert_eq!(impairment(admin).await, "impairment: loss=2%");
    // Unknown paths are 404 with a list of the routes, for GET and POST
    // alike; a route's other method too; other methods are 405.
    for (method, path) in [
        ("GET", "/nope"),
        ("POST", "/nope"),
        ("GET", "/"),
        ("GET", "/cut/s1"),
        ("POST", "/status"),
        ("POST", "/cut/"),
    ] {
        let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        let (answer, _) = tokio::task::spawn_blocking(move || admin_raw(admin, request.as_bytes()))
            .await
            .unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 404 Not Found\r\n")
                && answer.ends_with(chatmesh::admin::UNKNOWN),
            "{method} {path}: {answer}"
        );
    }
    for method in ["DELETE", "PUT", "HEAD", "OPTIONS"] {
        let request = format!("{method} /status HTTP/1.1\r\nHost: x\r\n\r\n");
        let (answer, _) = tokio::task::spawn_blocking(move || admin_raw(admin, request.as_bytes()))
            .await
            .unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{method}: {answer}"
        );
    }
    // An unknown peer is a 400 naming it.
    let err = chatmesh::admin::post(admin, "/cut/s9", "")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("400") && err.contains("\"s9\""), "{err}");
    // A foreign Origin is refused whatever the path; a GET is only read.
    let (answer, _) = tokio::task::spawn_blocking(move || {
        admin_raw(
            admin,
            b"POST /nope HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\n\r\n")
    })
    .await
    .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 403 Forbidden\r\n")
            && answer.ends_with(chatmesh::admin::FOREIGN_ORIGIN),
        "{answer}"
    );
    // One request per connection: the answer to a request that did not ask
    // for it says `connection: close`, and the server closes.
    let (answer, _) = tokio::task::spawn_blocking(move || {
        admin_raw(
            admin,
            b"GET /status HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\n\r\n",
        )
    })
    .await
    .unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nconnection: close"),
        "{head}"
    );
    let status: serde_json::Value = serde_json::from_str(body).expect("status JSON");
    assert_eq!(status["id"], "s1");
}

/// A client that half-closes after its request (`nc -N`) is answered:
/// without hyper's `half_close`, the end of input while the request is in
/// flight reads as the client leaving, and the answer is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_answers_a_client_that_half_closed_after_its_request() {
    let (config, admin) = admin_node_config("admin-half-close");
    let (_node, _) = spawn_node_with(&config, &[]);
    let answers = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        (0..20)
            .map(|_| {
                let mut stream = std::net::TcpStream::connect(admin).expect("admin accepts");
                stream
                    .set_read_timeout(Some(std::time::Duration::from_secs(10)))
                    .unwrap();
                stream.write_all(b"GET /status HTTP/1.0\r\n\r\n").unwrap();
                stream.shutdown(std::net::Shutdown::Write).unwrap();
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                answer
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for answer in answers {
        assert!(
            answer.starts_with("HTTP/1.0 200 OK\r\n") || answer.starts_with("HTTP/1.1 200 OK\r\n"),
            "{answer:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_drops_a_request_not_sent_in_time() {
    let (config, admin) = admin_node_config("admin-timeout");
    let (_node, _) = spawn_node_with(&config, &["--testing-aids"]);
    let limit = chatmesh::admin::REQUEST_TIMEOUT;
    // A head never finished, and a body shorter than its declared length:
    // the connection stays open for writing, and the server drops it.
    for request in [
        &b"GET /status HTTP/1.1\r\nHost: x\r\n"[..],
        &b"POST /impair HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nlos"[..],
    ] {
        let (answer, took) = tokio::task::spawn_blocking(move || admin_raw(admin, request))
            .await
            .unwrap();
        assert_eq!(answer, "", "{:?}", String::from_utf8_lossy(request));
        // Not before its time (less a little: timers are not exact), and
        // not much after it (admin_raw gives up at 30 s).
        assert!(
            took >= limit - std::time::Duration::from_millis(200),
            "closed after {took:?}"
        );
        println!("dropped after {took:?} (limit {limit:?})");
    }
    assert_eq!(impairment(admin).await, "impairment: none");
}

/// The wait a round line announces ("...; next try in 0.4 s"), if any.
fn next_try(line: &str) -> Option<f64> {
    line.split("next try in ")
        .nth(1)?
        .trim_end_matches(" s")
        .parse()
        .ok()
}

#[test]
fn a_client_whose_servers_are_down_backs_off_says_what_each_answered_and_comes_back() {
    let ports = free_ports(2);
    assert_eq!(ports.len(), 2, "not enough free ports");
    let dir = temp_dir("backoff");
    let config = dir.join("cluster.txt");
    std::fs::write(&config, format!("s1 127.0.0.1 {} 0\n", ports[0])).unwrap();
    let config = config.display().to_string();
    let (mut node, addr) = spawn_node(&config);
    // The second server of the list never answers: nothing listens there.
    let nobody = format!("127.0.0.1:{}", ports[1]);
    let servers = format!("{addr},{nobody}");
    let mut client = Proc::spawn(
        "roamer",
        &[
            "client",
            "-i",
            "Roamer",
            "--server",
            &addr,
            "--tcp",
            "--servers",
            &servers,
        ],
    );
    client.wait_line("Roamer joins MainHall-s1");
    node.signal(libc::SIGTERM);
    assert!(node.wait_exit());
    client.wait_line(&format!("lost the connection to {addr}"));
    // One line per round, naming each server and what it answered, the
    // other server first; the announced waits follow the schedule: 100 ms
    // doubling, each drawn in the upper half of its step.
    let mut step = 0.1f64;
    for round in 1..=5 {
        let line = client.wait_line(&format!("reconnect attempt {round}: "));
        assert!(
            line.contains(&format!("{nobody}, {addr} connection refused; next try in")),
            "{line}"
        );
        let wait = next_try(&line).expect("a next try");
        // Printed to 0.1 s: allow the rounding.
        assert!(
            wait >= step / 2.0 - 0.05 && wait <= step + 0.05,
            "round {round}: {wait} s not in [{}, {step}]",
            step / 2.0
        );
        step *= 2.0;
    }
    // The server comes back on its port: the client says so, and where.
    let (_node, again) = spawn_node(&config);
    assert_eq!(again, addr);
    let back = client.wait_line("back online: reconnected to");
    assert!(
        back.contains(&format!("reconnected to {addr} as Roamer")),
        "{back}"
    );
    client.wait_line("Roamer joins MainHall-s1");
    client.type_line("#who");
    client.wait_line("in MainHall-s1: Roamer");
    client.close_stdin();
    assert!(client.wait_exit());
}

/// A node whose stderr nobody reads (a terminal paused, `chatmesh up | less`
/// left on its first page) keeps serving: its threads never wait on the
/// pipe behind stderr, whose 64 KiB fill after a few hundred lines. Lines
/// wait in a bounded buffer instead, and come out once the pipe is read again.
#[test]
fn a_node_whose_log_nobody_reads_keeps_serving() {
    use std::io::{BufRead, BufReader};
    let config = single_node_config("unread-log");
    let certs = certs().display().to_string();
    let mut child = Command::new(BIN)
        .args(["node", "--config", &config, "--id", "s1", "--certs", &certs])
        // A client's comings and goings are logged at debug.
        .env("RUST_LOG", "info,chatmesh::chat::session=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the node");
    let mut log = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(log.read_line(&mut line).unwrap() > 0, "the node exited");
        if let Some(rest) = line.split("client_addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    // Nobody reads stderr from here on. Each identity logs two lines of
    // about 150 bytes ("client identified", "client disconnected"): 2,000
    // of them are several times what the pipe holds.
    let claims = 2_000;
    for i in 0..claims {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream.set_read_timeout(Some(common::DEADLINE)).unwrap();
        writeln!(stream, r#"{{"type":"newidentity","identity":"unread{i}"}}"#).unwrap();
        let mut reply = String::new();
        BufReader::new(&stream)
            .read_line(&mut reply)
            .unwrap_or_else(|e| panic!("claim {i} of {claims} got no answer: {e}"));
        assert!(reply.contains(r#""approved":"true""#), "claim {i}: {reply}");
        // Leave, and wait until the server closed its end: by then it has
        // logged the session's end (before, a stop racing the last
        // client's goodbye could end that session without the line).
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        std::io::copy(&mut stream, &mut std::io::sink())
            .unwrap_or_else(|e| panic!("claim {i} of {claims} was not closed: {e}"));
    }
    // Read again: the lines held meanwhile come out, the last claim's too,
    // and the node stops cleanly.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let rest: Vec<String> = log.lines().map_while(Result::ok).collect();
    let last = format!("unread{}", claims - 1);
    assert!(
        rest.iter()
            .any(|l| l.contains("client disconnected") && l.contains(&last)),
        "the last claim's lines are missing from the log"
    );
    assert!(rest.iter().any(|l| l.contains("stopped")), "no clean stop");
    assert!(child.wait().unwrap().success());
}
