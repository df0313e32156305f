//! Where the client's commands come from and where its lines go.
//!
//! On a terminal, a line editor (rustyline): history on the arrow keys, and
//! an event that arrives while a line is half typed is printed above the
//! input line, which is then drawn again with what was typed. rustyline's
//! `readline` blocks, so it runs on a thread of its own; a second thread
//! hands lines to its external printer, which can block for a moment, so the
//! async session never waits on the terminal.
//!
//! Piped (stdin or stdout not a terminal), plain lines in and out, exactly
//! as before the editor: that is what scripts and tests read.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::sync::mpsc as sync_mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustyline::error::ReadlineError;
use rustyline::{Config, DefaultEditor, ExternalPrinter};
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};
use tokio::sync::mpsc;

/// What the user did at the input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A line, without its end of line.
    Line(String),
    /// End of input: piped input ended, or Ctrl-D on an empty line.
    End,
    /// Ctrl-C at the line editor (the terminal is raw, so it is no signal).
    Interrupted,
}

/// The client's terminal, or its pipes.
pub enum Console {
    /// stdin is a pipe or a file: lines as they come, output as plain lines.
    Piped(Lines<BufReader<Stdin>>),
    /// A terminal on which the line editor would not start (`TERM=dumb`,
    /// stdout not a terminal): the prompt is printed, and each event line
    /// first clears it.
    Plain(Lines<BufReader<Stdin>>),
    /// The line editor.
    Editor(LineEditor),
}

impl Console {
    /// The line editor if stdin and stdout are a terminal it can drive,
    /// plain lines otherwise.
    pub fn open() -> Console {
        let lines = || BufReader::new(tokio::io::stdin()).lines();
        if !std::io::stdin().is_terminal() {
            return Console::Piped(lines());
        }
        if !std::io::stdout().is_terminal() {
            return Console::Plain(lines());
        }
        match LineEditor::start() {
            Ok(editor) => Console::Editor(editor),
            Err(e) => {
                tracing::debug!(error = %e, "no line editor; reading plain lines");
                Console::Plain(lines())
            }
        }
    }

    /// Whether a person is typing (prompts are shown).
    pub fn interactive(&self) -> bool {
        !matches!(self, Console::Piped(_))
    }

    /// The next input, with `prompt` on the input line. Cancel-safe: a
    /// line typed while this future was dropped is returned by the next call.
    pub async fn next(&mut self, prompt: &str) -> Result<Input> {
        match self {
            Console::Piped(lines) | Console::Plain(lines) => Ok(
                match lines.next_line().await.context("cannot read stdin")? {
                    Some(line) => Input::Line(line),
                    None => Input::End,
                },
            ),
            Console::Editor(editor) => editor.next(prompt).await,
        }
    }

    /// Prints one line (already made safe) above the input line.
    pub fn print(&self, line: &str) {
        match self {
            Console::Piped(_) => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            Console::Plain(_) => {
                let mut out = std::io::stdout().lock();
                // Clear the prompt line so events do not run into it.
                let _ = writeln!(out, "\r\x1b[K{line}");
                let _ = out.flush();
            }
            Console::Editor(editor) => editor.print(line),
        }
    }

    /// Shows the prompt where nothing else does (the editor draws its own).
    pub fn show_prompt(&self, prompt: &str) {
        if let Console::Plain(_) = self {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{prompt}");
            let _ = out.flush();
        }
    }

    /// Leaves the terminal as it was found, every line printed.
    pub fn close(&mut self) {
        if let Console::Editor(editor) = self {
            editor.close();
        }
    }
}

enum PrintJob {
    Line(String),
    /// Answered once every line before it went to the terminal.
    Flush(sync_mpsc::Sender<()>),
}

/// rustyline on its own thread.
pub struct LineEditor {
    /// A prompt for the editor thread: "read one line".
    prompts: sync_mpsc::Sender<String>,
    inputs: mpsc::UnboundedReceiver<Input>,
    /// Lines already read but not yet handed out (a paste of several lines).
    queued: VecDeque<String>,
    /// A line is being read: the terminal is in raw mode.
    reading: bool,
    printer: sync_mpsc::Sender<PrintJob>,
    /// The terminal's settings at start, put back on close: the editor
    /// thread may be stuck in `readline` (raw mode) when the client ends.
    saved: Option<libc::termios>,
    closed: bool,
}

/// Lines of history kept (in memory only: chat is not written to disk).
const HISTORY: usize = 500;

impl LineEditor {
    fn start() -> Result<LineEditor> {
        let config = Config::builder()
            .max_history_size(HISTORY)
            .context("history size")?
            .history_ignore_dups(true)
            .context("history")?
            .auto_add_history(false)
            .build();
        let mut editor =
            DefaultEditor::with_config(config).context("cannot start the line editor")?;
        let mut printer = editor
            .create_external_printer()
            .context("the line editor cannot print above the input line")?;
        let saved = terminal_settings();

        let (prompts, prompt_rx) = sync_mpsc::channel::<String>();
        let (input_tx, inputs) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("line editor".into())
            .spawn(move || {
                while let Ok(prompt) = prompt_rx.recv() {
                    let input = match editor.readline(&prompt) {
                        Ok(line) => {
                            if !line.trim().is_empty() {
                                let _ = editor.add_history_entry(line.as_str());
                            }
                            Input::Line(line)
                        }
                        Err(ReadlineError::Eof) => Input::End,
                        Err(ReadlineError::Interrupted) => Input::Interrupted,
                        Err(e) => {
                            tracing::warn!(error = %e, "the line editor failed; quitting");
                            Input::End
                        }
                    };
                    if input_tx.send(input).is_err() {
                        break;
                    }
                }
            })
            .context("cannot start the line editor thread")?;

        let (print_tx, print_rx) = sync_mpsc::channel::<PrintJob>();
        std::thread::Builder::new()
            .name("line printer".into())
            .spawn(move || {
                while let Ok(job) = print_rx.recv() {
                    match job {
                        PrintJob::Line(line) => {
                            // Outside readline the printer writes to the
                            // terminal at once, inside it redraws the input
                            // line under the text.
                            if printer.print(format!("{line}\n")).is_err() {
                                let mut out = std::io::stdout().lock();
                                let _ = write!(out, "{line}\r\n");
                                let _ = out.flush();
                            }
                        }
                        PrintJob::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .context("cannot start the line printer thread")?;

        Ok(LineEditor {
            prompts,
            inputs,
            queued: VecDeque::new(),
            reading: false,
            printer: print_tx,
            saved,
            closed: false,
        })
    }

    async fn next(&mut self, prompt: &str) -> Result<Input> {
        if let Some(line) = self.queued.pop_front() {
            return Ok(Input::Line(line));
        }
        if !self.reading {
            self.prompts
                .send(prompt.to_owned())
                .context("the line editor stopped")?;
            self.reading = true;
        }
        // Cancel-safe: `reading` stays set, and the next call waits for
        // the same line.
        let input = self.inputs.recv().await.unwrap_or(Input::End);
        self.reading = false;
        match input {
            // A paste of several lines is several commands.
            Input::Line(text) if text.contains('\n') => {
                self.queued.extend(
                    text.split('\n')
                        .map(|l| l.trim_end_matches('\r').to_owned()),
                );
                Ok(Input::Line(self.queued.pop_front().unwrap_or_default()))
            }
            other => Ok(other),
        }
    }

    fn print(&self, line: &str) {
        if self.printer.send(PrintJob::Line(line.to_owned())).is_err() {
            println!("{line}");
        }
    }

    fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        // Every line queued goes out first, bounded: a terminal that does
        // not drain must not keep the client from ending.
        let (done, flushed) = sync_mpsc::channel();
        if self.printer.send(PrintJob::Flush(done)).is_ok() {
            let _ = flushed.recv_timeout(Duration::from_secs(1));
        }
        if !self.reading {
            return;
        }
        // readline cannot be cancelled: its thread stays blocked on the
        // terminal until the process exits. Let it draw what it was handed,
        // then take the terminal back as it was and wipe the stale prompt.
        std::thread::sleep(Duration::from_millis(50));
        let mut out = std::io::stdout().lock();
        // Bracketed paste off (rustyline turned it on), then clear the line.
        let _ = write!(out, "\x1b[?2004l\r\x1b[K");
        let _ = out.flush();
        if let Some(saved) = &self.saved {
            restore_terminal(saved);
        }
    }
}

impl Drop for LineEditor {
    fn drop(&mut self) {
        self.close();
    }
}

/// stdin's terminal settings, if it is a terminal.
fn terminal_settings() -> Option<libc::termios> {
    // SAFETY: tcgetattr writes a termios into the zeroed struct we own; fd 0
    // is only read.
    unsafe {
        let mut settings: libc::termios = std::mem::zeroed();
        (libc::tcgetattr(libc::STDIN_FILENO, &mut settings) == 0).then_some(settings)
    }
}

fn restore_terminal(settings: &libc::termios) {
    // SAFETY: tcsetattr reads the termios we saved from the same fd.
    unsafe {
        libc::tcsetattr(libc::STDIN_FILENO, libc::TCSADRAIN, settings);
    }
}
