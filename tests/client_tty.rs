//! The bundled client at a terminal: a real `chatmesh client` on a
//! pseudo-terminal, its output rendered by a terminal emulator (vt100) into
//! a screen grid the test reads. An event that arrives while a line is half
//! typed goes above the input line and what was typed stays; history on the
//! arrow keys; the terminal is left as it was found.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::DEADLINE;
use common::process::{BIN, Proc, single_node_config, spawn_node};

const ROWS: u16 = 24;
const COLS: u16 = 100;

/// A `chatmesh` process on the slave side of a pseudo-terminal.
struct Tty {
    child: Child,
    master: File,
    /// Kept open to read the terminal's settings after the child is gone.
    slave: OwnedFd,
    screen: Arc<Mutex<vt100::Parser>>,
}

impl Tty {
    fn spawn(args: &[&str]) -> Tty {
        let mut master = -1;
        let mut slave = -1;
        let size = libc::winsize {
            ws_row: ROWS,
            ws_col: COLS,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty fills in two fds we then own; the name and termios
        // arguments may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both fds were just returned by openpty and nothing else owns them.
        let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let stdio = || Stdio::from(slave.try_clone().expect("dup slave"));
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("TERM", "xterm-256color")
            .env_remove("RUST_LOG")
            .stdin(stdio())
            .stdout(stdio())
            .stderr(stdio());
        // SAFETY: only async-signal-safe calls between fork and exec: a new
        // session whose controlling terminal is the pty (stdin by now).
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("spawn chatmesh on a pty");
        let screen = Arc::new(Mutex::new(vt100::Parser::new(
            ROWS.try_into().unwrap(),
            COLS.try_into().unwrap(),
            0,
        )));
        let mut reader = master.try_clone().expect("dup master");
        let mut answer = master.try_clone().expect("dup master");
        let shared = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once the child and every slave fd are gone.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let chunk = &buf[..n];
                let mut parser = shared.lock().unwrap();
                // The line editor asks where the cursor is (ESC [ 6 n); a
                // terminal answers ESC [ row ; col R (1-based).
                match find(chunk, b"\x1b[6n") {
                    Some(at) => {
                        parser.process(&chunk[..at]);
                        let (row, col) = parser.screen().cursor_position();
                        let _ = write!(answer, "\x1b[{};{}R", row + 1, col + 1);
                        parser.process(&chunk[at + 4..]);
                    }
                    None => parser.process(chunk),
                }
            }
        });
        Tty {
            child,
            master,
            slave,
            screen,
        }
    }

    /// `chatmesh client` as `name` over TCP to `addr`, the only server it
    /// knows of.
    fn client(name: &str, addr: &str) -> Tty {
        Tty::spawn(&[
            "client",
            "-i",
            name,
            "--server",
            addr,
            "--tcp",
            "--servers",
            addr,
        ])
    }

    fn keys(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).expect("type");
        self.master.flush().unwrap();
    }

    /// Rows of the screen (trailing blanks trimmed) and the cursor's row.
    fn screen(&self) -> (Vec<String>, usize) {
        let parser = self.screen.lock().unwrap();
        let screen = parser.screen();
        let rows = screen
            .rows(0, COLS)
            .map(|r| r.trim_end().to_owned())
            .collect();
        (rows, usize::from(screen.cursor_position().0))
    }

    /// Waits until `ready` holds for the screen; panics with the screen if not.
    fn wait_screen(&self, what: &str, ready: impl Fn(&[String], usize) -> bool) -> Vec<String> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let (rows, cursor) = self.screen();
            if ready(&rows, cursor) {
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {DEADLINE:?}; screen (cursor on row {cursor}):\n{}",
                rows.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until a row of the screen contains `text`; `what` names it in
    /// the failure.
    fn wait_row(&self, what: &str, text: &str) -> Vec<String> {
        self.wait_screen(what, |rows, _| row_of(rows, text).is_some())
    }

    /// Waits until the cursor's row reads `line`.
    fn wait_input_line(&self, line: &str) -> Vec<String> {
        self.wait_screen(&format!("input line {line:?}"), |rows, cursor| {
            rows.get(cursor).is_some_and(|r| r == line)
        })
    }

    fn wait_exit(&mut self) -> bool {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.success();
            }
            assert!(Instant::now() < deadline, "client did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the terminal is back in line mode with echo (not raw).
    fn cooked(&self) -> bool {
        // SAFETY: tcgetattr writes into a zeroed termios we own.
        let settings = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(self.slave.as_raw_fd(), &mut t), 0);
            t
        };
        settings.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG)
            == (libc::ICANON | libc::ECHO | libc::ISIG)
    }
}

impl Drop for Tty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn row_of(rows: &[String], text: &str) -> Option<usize> {
    rows.iter().position(|r| r.contains(text))
}

#[test]
fn an_event_goes_above_a_half_typed_line_which_stays() {
    let (_node, addr) = spawn_node(&single_node_config("tty"));
    let mut adel = Tty::client("Adel", &addr);
    adel.wait_row("Adel's arrival", "Adel joins MainHall-s1");
    adel.wait_input_line("[MainHall-s1] Adel>");
    adel.keys("#who\r");
    adel.wait_row("the answer to #who", "in MainHall-s1: Adel");
    adel.wait_input_line("[MainHall-s1] Adel>");

    // Half a line, no Enter; then events from another client.
    adel.keys("half typed");
    adel.wait_input_line("[MainHall-s1] Adel> half typed");
    let mut bob = Proc::spawn("bob", &["client", "-i", "Bob", "--server", &addr, "--tcp"]);
    bob.wait_line("Bob joins MainHall-s1");
    // An escape sequence that would turn the rest red, and a newline: shown, not obeyed.
    bob.type_line("hello from Bob \u{1b}[31m");
    let rows = adel.wait_screen("Bob's message above the input line", |rows, cursor| {
        row_of(rows, "Bob: hello from Bob ^[[31m").is_some_and(|at| at < cursor)
            && rows[cursor] == "[MainHall-s1] Adel> half typed"
    });
    let joined = row_of(&rows, "Bob joins MainHall-s1").expect("Bob's arrival shown");
    let said = row_of(&rows, "Bob: hello").unwrap();
    assert!(joined < said, "events in order:\n{}", rows.join("\n"));
    // The half-typed line shows once, on the input line only.
    assert_eq!(
        rows.iter().filter(|r| r.contains("half typed")).count(),
        1,
        "{}",
        rows.join("\n")
    );
    println!("screen after the events:\n{}", rows.join("\n"));

    // What was typed is still in the editor, not just on the screen.
    adel.keys(" and finished\r");
    bob.wait_line("Adel: half typed and finished");

    // History: up twice is #who again (now with Bob in the room).
    adel.wait_input_line("[MainHall-s1] Adel>");
    adel.keys("\x1b[A");
    adel.wait_input_line("[MainHall-s1] Adel> half typed and finished");
    adel.keys("\x1b[A");
    adel.wait_input_line("[MainHall-s1] Adel> #who");
    adel.keys("\r");
    adel.wait_row("the second #who", "in MainHall-s1: Adel, Bob");

    // The prompt shows the room the client is in after each command.
    adel.wait_input_line("[MainHall-s1] Adel>");
    adel.keys("#createroom jokes\r");
    bob.wait_line("Adel moves from MainHall-s1 to jokes");
    adel.wait_input_line("[jokes] Adel>");
    adel.keys("#deleteroom jokes\r");
    adel.wait_row("the deletion", "Adel moves from jokes to MainHall-s1");
    adel.wait_input_line("[MainHall-s1] Adel>");

    // Ctrl-D on an empty line quits cleanly.
    adel.keys("\x04");
    bob.wait_line("Adel quit");
    assert!(adel.wait_exit(), "Ctrl-D is a clean quit");
    assert!(adel.cooked(), "the terminal is back in line mode");
}

#[test]
fn a_lost_server_ends_the_client_with_the_terminal_restored() {
    let (mut node, addr) = spawn_node(&single_node_config("tty"));
    let mut adel = Tty::client("Adel", &addr);
    adel.wait_input_line("[MainHall-s1] Adel>");
    adel.keys("typing when");
    adel.wait_input_line("[MainHall-s1] Adel> typing when");
    assert!(!adel.cooked(), "the line editor holds the terminal raw");
    node.signal(libc::SIGTERM);
    assert!(node.wait_exit());
    // readline is still waiting for a key when the client ends: the client
    // itself must give the terminal back.
    assert!(!adel.wait_exit(), "a lost server is a non-zero exit");
    let rows = adel.wait_row("the error", "error: the server closed the connection");
    assert!(adel.cooked(), "terminal left raw:\n{}", rows.join("\n"));
}
