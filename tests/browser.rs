//! The web client in a real browser (issue 13): headless Chromium, driven
//! through WebDriver (chromedriver) by `fantoccini`, against an in-process
//! cluster of three servers on 127.0.0.1.
//!
//! The scenario: open `/?identity=Webby` on s1 and see the main hall; create
//! a room; a TCP client joins it and both exchange messages (quotes and
//! emoji intact, markup shown as text); the page is checked at a phone's
//! size; it joins a room of s2 by a click and follows the route there; s2 is
//! crashed and the page reconnects to another server and says so.
//! Screenshots of each step are saved under `target/browser-test/` (their
//! paths are printed), also on a failed wait.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them
//! as root); where either is missing the test prints why and passes as
//! skipped. `CHATMESH_BROWSER=require` turns that skip into a failure.
//!
//! The ignored test `readme_screenshots` makes the README's pictures of a
//! realistic chat (`cargo test --test browser -- --ignored`).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::inproc::web_cluster;
use common::{Raw, Via, free_ports, temp_dir};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// How long any one thing the page should do may take: a loaded 2-core CI
/// machine runs the browser, the driver and three servers at once.
const WAIT: Duration = Duration::from_secs(30);

/// The desktop window the screenshots are taken at.
const DESKTOP: (u32, u32) = (1100, 700);

/// A phone's viewport (CSS pixels), for the small-screen checks.
const PHONE: (u32, u32) = (390, 760);

/// Where Chromium and chromedriver are, or why this test cannot run here.
struct Tools {
    chromium: PathBuf,
    chromedriver: PathBuf,
}

/// The first of `names` found on PATH or in `extra` directories.
fn find_program(names: &[&str], extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .collect();
    names
        .iter()
        .flat_map(|name| dirs.iter().map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
}

fn tools() -> Result<Tools, String> {
    let chromium = find_program(
        &["chromium", "chromium-browser", "google-chrome"],
        &["/usr/bin", "/usr/lib/chromium"],
    )
    .ok_or("no chromium on this machine (Debian: apt-get install chromium chromium-driver)")?;
    let chromedriver = find_program(&["chromedriver"], &["/usr/bin", "/usr/lib/chromium"])
        .ok_or("no chromedriver on this machine (Debian: apt-get install chromium-driver)")?;
    Ok(Tools {
        chromium,
        chromedriver,
    })
}

/// The tools, or None after printing why the test skips (a failure instead
/// with `CHATMESH_BROWSER=require`).
fn tools_or_skip() -> Option<Tools> {
    match tools() {
        Ok(tools) => Some(tools),
        Err(why) => {
            assert!(
                std::env::var("CHATMESH_BROWSER").as_deref() != Ok("require"),
                "CHATMESH_BROWSER=require, but {why}"
            );
            println!("skipped: {why}");
            None
        }
    }
}

/// `target/browser-test/`, beside the test binary's own target directory.
fn artefact_dir() -> PathBuf {
    // The test binary is target/<profile>/deps/browser-<hash>.
    let exe = std::env::current_exe().expect("test binary path");
    let target = exe
        .ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let dir = target.join("browser-test");
    std::fs::create_dir_all(&dir).expect("artefact dir");
    dir
}

/// What the page shows, read in one script call.
#[derive(Debug, Default)]
struct Shown {
    /// The login form is hidden and the chat shown.
    in_chat: bool,
    room: String,
    owner: String,
    /// The identity the header shows.
    me: String,
    status: String,
    /// Every line of the message log, as text.
    log: Vec<String>,
    members: Vec<String>,
    rooms: Vec<String>,
    login_error: String,
    /// Elements inside the log other than its lines and their name spans:
    /// markup a message injected.
    foreign_elements: usize,
    /// Set only by a script a message injected.
    pwned: bool,
}

impl Shown {
    fn logged(&self, line: &str) -> bool {
        self.log.iter().any(|l| l == line)
    }
}

const READ_PAGE: &str = r##"
const text = (id) => { const e = document.getElementById(id); return e ? e.textContent : ""; };
const all = (sel) => Array.from(document.querySelectorAll(sel), (e) => e.textContent);
const app = document.getElementById("app");
return {
  in_chat: !!app && app.classList.contains("on"),
  room: text("roomname"),
  owner: text("roomowner"),
  me: text("me"),
  status: text("status"),
  log: all("#log p"),
  members: all("#memberlist li"),
  rooms: all("#roomlist button"),
  login_error: text("loginerror"),
  foreign_elements: document.querySelectorAll("#log *:not(p):not(span.who)").length,
  pwned: window.pwned === 1 || document.title !== "chatmesh",
};
"##;

/// A headless Chromium through its chromedriver, with a screenshot folder.
struct Browser {
    client: Client,
    _driver: DriverGroup,
    shots: PathBuf,
    tag: String,
    started: Instant,
}

impl Browser {
    async fn start(tools: &Tools, tag: &str) -> Browser {
        let shots = artefact_dir();
        let port = free_ports(1)[0];
        let log = shots.join(format!("{tag}-chromedriver.log"));
        let profile = temp_dir("chromium-profile");
        let child = tokio::process::Command::new(&tools.chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", tools.chromedriver.display()));
        let driver = DriverGroup {
            child,
            profile: profile.clone(),
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on {addr} within {WAIT:?}; see {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let args = [
            "--headless=new".to_owned(),
            // Root in a container has no user namespaces for the sandbox.
            "--no-sandbox".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-gpu".to_owned(),
            "--no-first-run".to_owned(),
            "--force-device-scale-factor=1".to_owned(),
            "--hide-scrollbars".to_owned(),
            format!("--window-size={},{}", DESKTOP.0, DESKTOP.1),
            format!("--user-data-dir={}", profile.display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": tools.chromium, "args": args}),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://{addr}"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "chromedriver could not start {}: {e}; see {}",
                    tools.chromium.display(),
                    log.display()
                )
            });
        Browser {
            client,
            _driver: driver,
            shots,
            tag: tag.to_owned(),
            started: Instant::now(),
        }
    }

    /// Sets the size of the page's viewport (not the window's).
    async fn viewport(&self, (width, height): (u32, u32)) {
        self.client
            .set_window_size(width, height)
            .await
            .expect("set window size");
        // Chromium's window may be larger than its viewport: grow it by
        // the difference once.
        let inner = self
            .client
            .execute("return [window.innerWidth, window.innerHeight];", vec![])
            .await
            .expect("read viewport");
        let (w, h) = (
            inner[0].as_u64().unwrap_or(width.into()) as u32,
            inner[1].as_u64().unwrap_or(height.into()) as u32,
        );
        if (w, h) != (width, height) {
            self.client
                .set_window_size(
                    width + width.saturating_sub(w),
                    height + height.saturating_sub(h),
                )
                .await
                .expect("set window size");
        }
    }

    /// Saves a screenshot as `target/browser-test/<tag>-<name>.png` and
    /// prints its path.
    async fn shot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let path = self.shots.join(format!("{}-{name}.png", self.tag));
        std::fs::write(&path, png).expect("write screenshot");
        println!(
            "[{:>5.1}s] screenshot: {}",
            self.started.elapsed().as_secs_f64(),
            path.display()
        );
        path
    }

    async fn read(&self) -> Shown {
        let v = self
            .client
            .execute(READ_PAGE, vec![])
            .await
            .expect("read the page");
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        let list = |k: &str| -> Vec<String> {
            v[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        Shown {
            in_chat: v["in_chat"].as_bool().unwrap_or(false),
            room: s("room"),
            owner: s("owner"),
            me: s("me"),
            status: s("status"),
            log: list("log"),
            members: list("members"),
            rooms: list("rooms"),
            login_error: s("login_error"),
            foreign_elements: v["foreign_elements"].as_u64().unwrap_or(0) as usize,
            pwned: v["pwned"].as_bool().unwrap_or(true),
        }
    }

    /// Polls the page until `condition` holds, for up to [`WAIT`]; on time
    /// out saves a screenshot and fails with what the page shows.
    async fn until(&self, what: &str, condition: impl Fn(&Shown) -> bool) -> Shown {
        let deadline = Instant::now() + WAIT;
        loop {
            let shown = self.read().await;
            if condition(&shown) {
                println!(
                    "[{:>5.1}s] ok: {what}",
                    self.started.elapsed().as_secs_f64()
                );
                return shown;
            }
            if Instant::now() > deadline {
                let path = self.shot("timed-out").await;
                panic!(
                    "timed out after {WAIT:?} waiting for: {what}\nscreenshot: {}\npage: {shown:#?}",
                    path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Types `text` with the keyboard into the box at `at`, `what`.
    /// (chromedriver types only characters of the Basic Multilingual Plane.)
    async fn type_into(&self, at: Locator<'_>, what: &str, text: &str) {
        self.client
            .find(at)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"))
            .send_keys(text)
            .await
            .expect("type");
    }

    /// Clicks the button at `at`, labelled `label`.
    async fn click(&self, at: Locator<'_>, label: &str) {
        self.client
            .find(at)
            .await
            .unwrap_or_else(|e| panic!("{label} button: {e:?}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {label}: {e:?}"));
    }

    /// Types `text` into the message box with the keyboard and presses Send.
    async fn type_and_send(&self, text: &str) {
        self.type_into(Locator::Id("text"), "box", text).await;
        self.click(Locator::Css("#say button"), "Send").await;
    }

    /// Puts `text` into the message box as a paste would (any characters,
    /// emoji too) and presses Send.
    async fn paste_and_send(&self, text: &str) {
        self.client
            .execute(
                r#"document.getElementById("text").value = arguments[0];"#,
                vec![json!(text)],
            )
            .await
            .expect("paste");
        self.click(Locator::Css("#say button"), "Send").await;
    }

    /// Clicks the room list's button for `room`.
    async fn click_room(&self, room: &str) {
        for button in self
            .client
            .find_all(Locator::Css("#roomlist button"))
            .await
            .expect("room buttons")
        {
            if button.text().await.ok().as_deref() == Some(room) {
                button.click().await.expect("click room");
                return;
            }
        }
        panic!("no button for room {room}");
    }

    /// Where the page overflows a phone-sized viewport, if anywhere: the
    /// page wider than the screen, or a control not on screen.
    async fn overflow(&self) -> Vec<String> {
        let v = self
            .client
            .execute(
                r##"
const out = [];
const W = window.innerWidth, H = window.innerHeight;
if (document.documentElement.scrollWidth > W) out.push("page is " + document.documentElement.scrollWidth + "px wide in a " + W + "px viewport");
for (const sel of ["#text", "#say button", "#quit", "#log", "#log p:last-of-type", "#roomlist button.here", "#memberlist li"]) {
  const e = document.querySelector(sel);
  if (!e) { out.push(sel + " missing"); continue; }
  const r = e.getBoundingClientRect();
  if (r.width < 1 || r.height < 1) out.push(sel + " not shown");
  else if (r.left < 0 || r.right > W + 0.5 || r.top < 0 || r.bottom > H + 0.5) out.push(sel + " off screen: " + JSON.stringify([r.left, r.top, r.right, r.bottom]));
  else {
    // On screen, but clipped by its box or covered by something else?
    const hit = document.elementFromPoint((r.left + r.right) / 2, (r.top + r.bottom) / 2);
    if (!hit || !(hit === e || e.contains(hit))) out.push(sel + " is hidden under " + (hit ? hit.tagName + "#" + hit.id : "nothing"));
  }
}
const log = document.getElementById("log").getBoundingClientRect();
if (log.height < H * 0.3) out.push("the message log gets only " + Math.round(log.height) + "px of " + H);
return out;
"##,
                vec![],
            )
            .await
            .expect("layout check");
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Ends the WebDriver session (Chromium quits); the drop ends the rest.
    async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

/// chromedriver, leader of a process group that Chromium and its helpers
/// join, and Chromium's profile directory: dropping it kills the whole group
/// and removes the directory, also when a failed assertion unwinds past
/// [`Browser::close`] (or past the session's start).
struct DriverGroup {
    child: tokio::process::Child,
    profile: PathBuf,
}

impl Drop for DriverGroup {
    fn drop(&mut self) {
        if let Some(pid) = self
            .child
            .id()
            .and_then(|pid| libc::pid_t::try_from(pid).ok())
        {
            // SAFETY: a plain syscall; the group is chromedriver's own
            // (`process_group(0)`), still running since `id()` is Some.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Reads `raw`'s lines until one satisfies `want`, for up to [`WAIT`].
async fn until_line(raw: &mut Raw, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "{}: timed out waiting for {what}; got {seen:?}",
            raw.name
        );
        let line = raw
            .next()
            .await
            .unwrap_or_else(|| panic!("{}: closed while waiting for {what}", raw.name));
        if want(&line) {
            return line;
        }
        seen.push(line);
    }
}

fn is_message(line: &Value, from: &str, content: &str) -> bool {
    line["type"] == "message" && line["identity"] == from && line["content"] == content
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_chromium_chats_follows_a_route_and_reconnects() {
    let Some(tools) = tools_or_skip() else {
        return;
    };
    let started = Instant::now();
    let mut cluster = web_cluster(3).await;
    println!("cluster formed in {:?}", started.elapsed());
    let s1_web = cluster.node(0).web_addr().expect("s1 web port");
    let s2_web = cluster.node(1).web_addr().expect("s2 web port");
    let browser = Browser::start(&tools, "chat").await;
    println!("browser started in {:?}", started.elapsed());
    browser.viewport(DESKTOP).await;

    // 1. Log in from the URL and see the main hall.
    browser
        .client
        .goto(&format!("http://{s1_web}/?identity=Webby"))
        .await
        .expect("open the page");
    let shown = browser
        .until("the page is in the main hall of s1", |s| {
            s.in_chat
                && s.room == "MainHall-s1"
                && s.members.iter().any(|m| m == "Webby")
                && s.rooms.iter().any(|r| r == "MainHall-s1")
        })
        .await;
    assert_eq!(shown.status, "on server s1");
    assert_eq!(shown.login_error, "");
    assert_eq!(shown.me, "Webby");
    assert!(shown.logged("you are in MainHall-s1"), "{:?}", shown.log);
    browser.shot("1-main-hall").await;

    // 2. Create a room with the form: the creator is moved into it.
    browser
        .type_into(Locator::Id("newroomid"), "new room box", "lounge")
        .await;
    browser
        .click(Locator::Css("#newroom button"), "Create")
        .await;
    browser
        .until("the page created lounge, is in it and owns it", |s| {
            s.logged("room lounge created")
                && s.room == "lounge"
                && s.owner == "owner Webby"
                && s.rooms.iter().any(|r| r == "lounge")
        })
        .await;

    // 3. A TCP client joins it; both exchange messages.
    let mut tcpy = Raw::join(
        Via::Tcp,
        cluster.node(0).client_addr(),
        "Tcpy",
        "MainHall-s1",
    )
    .await;
    tcpy.send(r#"{"type":"joinroom","roomid":"lounge"}"#).await;
    until_line(&mut tcpy, "Tcpy's move into lounge", |l| {
        l["type"] == "roomchange" && l["identity"] == "Tcpy" && l["roomid"] == "lounge"
    })
    .await;
    browser
        .until("the page sees Tcpy come in", |s| {
            s.logged("Tcpy came from MainHall-s1") && s.members.iter().any(|m| m == "Tcpy")
        })
        .await;
    let quoted = r#"She said "hi" & 'bye' \o/ — ok"#;
    let emoji = "emoji 😀🎉 and ünïcödé";
    let markup =
        r#"<img src=x onerror="window.pwned=1"><b>not bold</b> <script>window.pwned=1</script>"#;
    for content in [quoted, emoji, markup] {
        tcpy.send(&json!({"type":"message","content":content}).to_string())
            .await;
        browser
            .until(&format!("the page shows Tcpy's {content:?}"), |s| {
                s.logged(&format!("Tcpy: {content}"))
            })
            .await;
    }
    let shown = browser.read().await;
    assert_eq!(
        shown.foreign_elements, 0,
        "a message became markup in the log"
    );
    assert!(!shown.pwned, "a message ran a script");
    let from_page_typed = r#"Webby says "quoted" & <i>not italic</i>"#;
    browser.type_and_send(from_page_typed).await;
    until_line(&mut tcpy, "the page's typed message", |l| {
        is_message(l, "Webby", from_page_typed)
    })
    .await;
    let from_page_pasted = "pasted 🌍👍 \"quotes\" too";
    browser.paste_and_send(from_page_pasted).await;
    until_line(&mut tcpy, "the page's pasted message", |l| {
        is_message(l, "Webby", from_page_pasted)
    })
    .await;
    let shown = browser
        .until("the page shows its own messages", |s| {
            s.logged(&format!("Webby: {from_page_typed}"))
                && s.logged(&format!("Webby: {from_page_pasted}"))
        })
        .await;
    assert_eq!(shown.foreign_elements, 0, "own message became markup");
    browser.shot("2-lounge").await;

    // 4. The same page at a phone's size, its log longer than the screen:
    // nothing off screen, the newest line in sight.
    for n in 1..=12 {
        tcpy.send(&format!(
            r#"{{"type":"message","content":"line {n} of a long chat"}}"#
        ))
        .await;
    }
    browser
        .until("the page shows a log longer than a phone's screen", |s| {
            s.logged("Tcpy: line 12 of a long chat")
        })
        .await;
    browser.viewport(PHONE).await;
    let overflow = browser.overflow().await;
    browser.shot("3-phone").await;
    assert!(overflow.is_empty(), "at {PHONE:?}: {overflow:?}");
    browser.viewport(DESKTOP).await;

    // 5. A room on s2 (made by a TCP client there): the page joins it with a
    // click, follows the route to s2's web port and completes the move.
    let mut farah = Raw::join(
        Via::Tcp,
        cluster.node(1).client_addr(),
        "Farah",
        "MainHall-s2",
    )
    .await;
    farah.send(r#"{"type":"createroom","roomid":"far"}"#).await;
    until_line(&mut farah, "far created", |l| {
        l["type"] == "createroom" && l["approved"] == "true"
    })
    .await;
    // The page learns of rooms made elsewhere when it lists them.
    browser
        .until("the page lists far", |s| s.rooms.iter().any(|r| r == "far"))
        .await;
    // The owner of a room may not leave it: the page says why.
    browser.click_room("far").await;
    browser
        .until("the page says why it cannot join far", |s| {
            s.logged("could not join far: you own lounge (delete it to leave)")
                && s.room == "lounge"
        })
        .await;
    browser
        .click(Locator::Id("deleteroom"), "Delete room")
        .await;
    browser
        .until("lounge deleted, the page back in the main hall", |s| {
            s.logged("room lounge deleted")
                && s.room == "MainHall-s1"
                && !s.rooms.iter().any(|r| r == "lounge")
        })
        .await;
    until_line(&mut tcpy, "Tcpy moved out of the deleted lounge", |l| {
        l["type"] == "roomchange" && l["identity"] == "Tcpy" && l["former"] == "lounge"
    })
    .await;
    browser.click_room("far").await;
    let shown = browser
        .until("the page followed the route to s2 and is in far", |s| {
            s.logged("now on server s2") && s.room == "far" && s.status == "on server s2"
        })
        .await;
    assert!(
        shown.log.iter().any(|l| l
            .starts_with("room far is on another server; moving to 127.0.0.1:")
            && l.ends_with(&s2_web.port().to_string())),
        "the page moved to s2's web port {}: {:?}",
        s2_web.port(),
        shown.log
    );
    // Reached s2: its TCP client sees the page arrive and they chat.
    until_line(&mut farah, "Webby arriving in far", |l| {
        l["type"] == "roomchange" && l["identity"] == "Webby" && l["roomid"] == "far"
    })
    .await;
    browser.type_and_send("hello far").await;
    until_line(&mut farah, "the page's message on s2", |l| {
        is_message(l, "Webby", "hello far")
    })
    .await;
    // Tcpy, left behind in s1's main hall, sees the page go.
    until_line(&mut tcpy, "Webby leaving for far", |l| {
        l["type"] == "roomchange"
            && l["identity"] == "Webby"
            && l["former"] == "MainHall-s1"
            && l["roomid"] == "far"
    })
    .await;
    browser.shot("4-routed-to-s2").await;

    // 6. s2 dies: the page says so and logs in again on another server.
    let crashed_at = Instant::now();
    cluster.crash(1).await;
    drop(farah);
    let shown = browser
        .until("the page reconnected to another server and said so", |s| {
            let lost = s
                .log
                .iter()
                .position(|l| l.starts_with("lost the connection to server s2"));
            lost.is_some_and(|at| {
                s.log[at..].iter().any(|l| {
                    l == "reconnected: now on server s1" || l == "reconnected: now on server s3"
                })
            }) && (s.status == "on server s1" || s.status == "on server s3")
                && s.members.iter().any(|m| m == "Webby")
        })
        .await;
    println!("reconnected {:?} after the crash", crashed_at.elapsed());
    let back_on = if shown.status == "on server s1" { 0 } else { 2 };
    // It chats there: a TCP client on that server talks to it.
    let hall = format!("MainHall-s{}", back_on + 1);
    let mut tcpz = Raw::join(Via::Tcp, cluster.node(back_on).client_addr(), "Tcpz", &hall).await;
    tcpz.send(r#"{"type":"message","content":"still there? 👀"}"#)
        .await;
    browser
        .until("the page gets a message after reconnecting", |s| {
            s.logged("Tcpz: still there? 👀")
        })
        .await;
    browser.shot("5-reconnected").await;
    assert!(!browser.read().await.pwned);

    browser.close().await;
    drop((tcpy, tcpz));
    cluster.stop().await;
    println!("browser test took {:?}", started.elapsed());
}

/// The README's pictures: a realistic chat in two rooms with several
/// members, at a desktop size and a phone's. Writes
/// `target/browser-test/readme-desktop.png` and `readme-phone.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "makes the README's screenshots: cargo test --test browser -- --ignored"]
async fn readme_screenshots() {
    let Some(tools) = tools_or_skip() else {
        return;
    };
    let cluster = web_cluster(3).await;
    let s1 = cluster.node(0).client_addr();
    let s2 = cluster.node(1).client_addr();
    let s1_web = cluster.node(0).web_addr().expect("s1 web port");

    // Two rooms: `release` on s1 (Adel's) and `design` on s2 (Erin's).
    let mut adel = Raw::join(Via::Tcp, s1, "Adel", "MainHall-s1").await;
    adel.send(r#"{"type":"createroom","roomid":"release"}"#)
        .await;
    until_line(&mut adel, "release created", |l| l["type"] == "roomchange").await;
    let mut erin = Raw::join(Via::Tcp, s2, "Erin", "MainHall-s2").await;
    erin.send(r#"{"type":"createroom","roomid":"design"}"#)
        .await;
    until_line(&mut erin, "design created", |l| l["type"] == "roomchange").await;
    let mut bob = Raw::join(Via::Tcp, s1, "Bob", "MainHall-s1").await;
    let mut chen = Raw::join(Via::Tcp, s1, "Chen", "MainHall-s1").await;
    for who in [&mut bob, &mut chen] {
        who.send(r#"{"type":"joinroom","roomid":"release"}"#).await;
        let name = who.name.clone();
        until_line(who, "into release", |l| {
            l["type"] == "roomchange" && l["identity"] == name.as_str()
        })
        .await;
    }

    let browser = Browser::start(&tools, "readme").await;
    browser.viewport(DESKTOP).await;
    // Logs in with the form this time.
    browser
        .client
        .goto(&format!("http://{s1_web}/"))
        .await
        .expect("open the page");
    browser
        .type_into(Locator::Id("identity"), "name box", "Dana")
        .await;
    browser.shot("login").await;
    browser
        .click(Locator::Css("#loginform button"), "Chat")
        .await;
    browser
        .until("in the main hall, rooms listed", |s| {
            s.room == "MainHall-s1"
                && s.rooms.iter().any(|r| r == "release")
                && s.rooms.iter().any(|r| r == "design")
        })
        .await;
    browser.click_room("release").await;
    browser
        .until("in release", |s| {
            s.room == "release" && s.members.len() == 4
        })
        .await;
    // Who says what; `None`: Farid comes into the room.
    let script: [(&str, Option<&str>); 12] = [
        (
            "Adel",
            Some("Morning! The 0.4 release candidate is built ☕"),
        ),
        (
            "Bob",
            Some("I upgraded s2 an hour ago: no session dropped, failover took 0.4 s"),
        ),
        (
            "Chen",
            Some("Same on s3. The registry caught up in under a second"),
        ),
        (
            "Dana",
            Some("Nice. I'm on the new web client: a browser, nothing to install 🎉"),
        ),
        ("Adel", Some("How does it look on a phone?")),
        (
            "Dana",
            Some("Fine: rooms and members in a row on top, the chat below 📱"),
        ),
        ("Farid", None),
        ("Farid", Some("Hi all, what did I miss?")),
        (
            "Chen",
            Some("The RC is out. Quotes \"survive\", and <b>tags</b> show as text 👍"),
        ),
        (
            "Adel",
            Some("Then let's tag it after lunch. Erin, is the logo ready?"),
        ),
        ("Dana", Some("Erin is in design on s2, I'll ask her there")),
        ("Bob", Some("👍")),
    ];
    let mut farid = None;
    for (who, text) in script {
        let Some(text) = text else {
            let mut c = Raw::join(Via::Tcp, s1, who, "MainHall-s1").await;
            c.send(r#"{"type":"joinroom","roomid":"release"}"#).await;
            until_line(&mut c, "into release", |l| l["type"] == "roomchange").await;
            farid = Some(c);
            browser
                .until(&format!("{who} shown coming in"), |s| {
                    s.logged(&format!("{who} came from MainHall-s1"))
                })
                .await;
            continue;
        };
        let line = json!({"type":"message","content":text}).to_string();
        match who {
            "Adel" => adel.send(&line).await,
            "Bob" => bob.send(&line).await,
            "Chen" => chen.send(&line).await,
            "Farid" => farid.as_mut().expect("Farid came").send(&line).await,
            _ => browser.paste_and_send(text).await,
        }
        browser
            .until(&format!("{who}'s line shown"), |s| {
                s.logged(&format!("{who}: {text}"))
            })
            .await;
    }
    browser.shot("desktop").await;
    browser.viewport((390, 700)).await;
    browser.shot("phone").await;
    browser.close().await;
    drop((adel, bob, chen, erin, farid));
    cluster.stop().await;
}
