//! A real `chatmesh` process whose output lines can be waited for.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use super::DEADLINE;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_chatmesh");

/// A one-server config file on port 0 (the node logs the port it got), in a
/// fresh temp dir tagged `tag`; its path.
pub fn single_node_config(tag: &str) -> String {
    let dir = super::temp_dir(tag);
    let path = dir.join("cluster.txt");
    std::fs::write(&path, "s1 127.0.0.1 0 0\n").unwrap();
    path.display().to_string()
}

/// Starts `chatmesh node` as s1 on `config`; its process and the client
/// address it logs.
pub fn spawn_node(config: &str) -> (Proc, String) {
    spawn_node_with(config, &[])
}

/// [`spawn_node`] with `extra` arguments after the usual ones.
pub fn spawn_node_with(config: &str, extra: &[&str]) -> (Proc, String) {
    let certs = super::certs().display().to_string();
    let mut args = vec!["node", "--config", config, "--id", "s1", "--certs", &certs];
    args.extend_from_slice(extra);
    let mut node = Proc::spawn("node", &args);
    let line = node.wait_line("serving clients");
    let addr = line
        .split("client_addr=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("node logs its client address")
        .to_owned();
    (node, addr)
}

/// A child process whose output lines (stdout and stderr) arrive on a channel.
pub struct Proc {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every line so far, for failure messages.
    seen: Vec<String>,
    /// Lines not yet matched by `wait_line`, so order between processes' logs
    /// does not matter.
    unmatched: Vec<String>,
    name: String,
}

impl Proc {
    /// Starts the binary under test with `args`, logging at info.
    pub fn spawn(name: &str, args: &[&str]) -> Proc {
        let mut command = Command::new(BIN);
        command.args(args).env("RUST_LOG", "info");
        Proc::spawn_command(name, command)
    }

    /// Starts `command` (a test may set limits or a `pre_exec` on it) with
    /// its stdin, stdout and stderr piped.
    pub fn spawn_command(name: &str, mut command: Command) -> Proc {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let (tx, lines) = channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for stream in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Proc {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            unmatched: Vec::new(),
            name: name.to_owned(),
        }
    }

    /// How many output lines read so far contain `needle`.
    pub fn count_seen(&self, needle: &str) -> usize {
        self.seen_with(needle).len()
    }

    /// The output lines read so far that contain `needle`.
    pub fn seen_with(&self, needle: &str) -> Vec<&str> {
        let lines = self.seen.iter().filter(|l| l.contains(needle));
        lines.map(String::as_str).collect()
    }

    /// Waits for an output line containing `needle` that no earlier call
    /// matched; returns it.
    pub fn wait_line(&mut self, needle: &str) -> String {
        if let Some(at) = self.unmatched.iter().position(|l| l.contains(needle)) {
            return self.unmatched.remove(at);
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                    self.unmatched.push(line);
                }
                Err(_) => panic!(
                    "{}: no line containing {needle:?} within {DEADLINE:?}; saw:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    pub fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to client stdin");
        stdin.flush().unwrap();
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// Waits for the exit, bounded; returns whether it succeeded.
    pub fn wait_exit(&mut self) -> bool {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "{}: did not exit within {DEADLINE:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// VmRSS of a process in KiB (0 if it cannot be read).
pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
