//! How log lines are stamped, and where they go: stderr, through one
//! writer thread.
//!
//! [`Timestamp`] writes the time as tracing's default does
//! (`2026-11-27T05:51:42.044431Z`, UTC, microseconds), but formats the date
//! and the second only when the second changes.
//!
//! A thread that logs only appends the formatted line to a shared buffer; it
//! never makes a system call for it. The writer thread wakes when the first
//! line lands in an empty buffer, lets the lines of the next few
//! milliseconds join it, and writes them all at once. So:
//! - no chat session or cluster thread waits on the disk or pipe behind
//!   stderr (a cluster thread stuck in a write sends no heartbeats, and the
//!   other servers would see this server down);
//! - a busy server makes one `write` per batch, not one per line;
//! - memory is bounded: past [`MAX_BUFFERED`] bytes waiting, lines are
//!   dropped and counted, and the next batch says how many.
//!
//! Lines reach stderr at most [`GATHER`] after they are logged, and whatever
//! is buffered is written when the [`Flush`] guard is dropped (normal exit),
//! waiting at most [`EXIT_WAIT`] for a stderr that is not read. A `kill -9`
//! loses at most the last [`GATHER`] of lines.

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// The `FormatTime` for `tracing_subscriber::fmt().with_timer(..)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timestamp;

thread_local! {
    /// The last second this thread stamped, and its text up to the seconds.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for Timestamp {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        write_stamp(w, since_epoch)
    }
}

fn write_stamp(w: &mut impl std::fmt::Write, since_epoch: Duration) -> std::fmt::Result {
    let secs = since_epoch.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            *second = secs;
            text.clear();
            let (year, month, day) = civil_date(secs / 86_400);
            let in_day = secs % 86_400;
            let (h, m, s) = (in_day / 3600, in_day / 60 % 60, in_day % 60);
            use std::fmt::Write as _;
            let _ = write!(text, "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}");
        }
        write!(w, "{text}.{:06}Z", since_epoch.subsec_micros())
    })
}

/// Year, month (1-12) and day (1-31) of a day counted from 1970-01-01
/// (Howard Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// How long the writer lets lines gather after the first one.
pub const GATHER: Duration = Duration::from_millis(5);

/// How long the [`Flush`] guard waits for the last lines to be written.
pub const EXIT_WAIT: Duration = Duration::from_secs(2);

/// Bytes of log waiting for the writer, at most.
pub const MAX_BUFFERED: usize = 4 << 20;

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Lines dropped because `bytes` was full, not yet reported.
    dropped: u64,
    /// No more lines will come: write what is left and stop.
    closed: bool,
    /// The writer has written what was left after `closed` and stopped.
    finished: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when the first line lands in an empty buffer, and on close.
    wake: Condvar,
    /// Signalled when the writer has finished.
    finished: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A thread that panicked mid-append leaves at worst a partial line.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The `MakeWriter` for `tracing_subscriber::fmt().with_writer(..)`.
#[derive(Clone)]
pub struct BatchedStderr {
    shared: Arc<Shared>,
}

/// Writes out what is buffered and stops the writer thread when dropped.
pub struct Flush {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread (named `log-writer`) that writes to `out`.
pub fn spawn(out: impl Write + Send + 'static) -> std::io::Result<(BatchedStderr, Flush)> {
    let shared = Arc::new(Shared::default());
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".to_owned())
            .spawn(move || write_batches(&shared, out))?
    };
    Ok((
        BatchedStderr {
            shared: shared.clone(),
        },
        Flush {
            shared,
            thread: Some(thread),
        },
    ))
}

fn write_batches(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut pending = shared.lock();
        while pending.bytes.is_empty() && pending.dropped == 0 && !pending.closed {
            pending = shared.wake.wait(pending).unwrap_or_else(|e| e.into_inner());
        }
        if !pending.closed {
            drop(pending);
            std::thread::sleep(GATHER);
            pending = shared.lock();
        }
        std::mem::swap(&mut batch, &mut pending.bytes);
        let dropped = std::mem::take(&mut pending.dropped);
        let closed = pending.closed;
        drop(pending);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "{dropped} log lines dropped: stderr took them slower than they came"
            );
        }
        // Nowhere to report a failed write to: the batch is dropped.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if closed {
            shared.lock().finished = true;
            shared.finished.notify_all();
            return;
        }
    }
}

impl Write for BatchedStderr {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.shared.lock();
        if pending.bytes.len() + line.len() > MAX_BUFFERED {
            pending.dropped += 1;
        } else {
            if pending.bytes.is_empty() {
                self.shared.wake.notify_one();
            }
            pending.bytes.extend_from_slice(line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedStderr {
    type Writer = BatchedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        let mut pending = self.shared.lock();
        pending.closed = true;
        self.shared.wake.notify_one();
        // A writer stuck on a stderr nobody reads must not keep the process
        // from exiting: past the wait, it is left behind (and ends with it).
        let (pending, _) = self
            .shared
            .finished
            .wait_timeout_while(pending, EXIT_WAIT, |p| !p.finished)
            .unwrap_or_else(|e| e.into_inner());
        let finished = pending.finished;
        drop(pending);
        if let Some(thread) = self.thread.take().filter(|_| finished) {
            let _ = thread.join();
        }
    }
}

/// A budget for one kind of line that clients cause, e.g. a refused
/// `newidentity`: at most `per_second` of them a second; the rest are
/// counted, and the next line logged says how many were left out. One
/// connection's lines are bounded by the session; this bounds the lines of
/// a flood of short connections (a log line each would grow the log by
/// megabytes a minute).
pub struct LogBudget {
    per_second: u32,
    state: Mutex<BudgetState>,
}

struct BudgetState {
    second_began: Option<std::time::Instant>,
    logged: u32,
    left_out: u64,
}

impl LogBudget {
    /// A budget of `per_second` lines a second.
    pub const fn new(per_second: u32) -> LogBudget {
        LogBudget {
            per_second,
            state: Mutex::new(BudgetState {
                second_began: None,
                logged: 0,
                left_out: 0,
            }),
        }
    }

    /// `Some(n)` if this line is to be logged, `n` being the lines left out
    /// since the last one logged; `None` if it is to be left out.
    pub fn take(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state
            .second_began
            .is_none_or(|began| now.saturating_duration_since(began) >= Duration::from_secs(1))
        {
            state.second_began = Some(now);
            state.logged = 0;
        }
        if state.logged >= self.per_second {
            state.left_out += 1;
            return None;
        }
        state.logged += 1;
        Some(std::mem::take(&mut state.left_out))
    }

    /// Runs `log`, given the lines left out since the last one logged, if
    /// this line is within the budget.
    pub fn log(&self, log: impl FnOnce(u64)) {
        if let Some(left_out) = self.take(std::time::Instant::now()) {
            log(left_out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_budget_leaves_out_lines_past_it_and_counts_them() {
        let budget = LogBudget::new(2);
        let t0 = std::time::Instant::now();
        assert_eq!(budget.take(t0), Some(0));
        assert_eq!(budget.take(t0), Some(0));
        assert_eq!(budget.take(t0 + Duration::from_millis(500)), None);
        assert_eq!(budget.take(t0 + Duration::from_millis(999)), None);
        // The next second: logged again, telling of the two left out.
        assert_eq!(budget.take(t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(budget.take(t0 + Duration::from_millis(1500)), Some(0));
        assert_eq!(budget.take(t0 + Duration::from_millis(1600)), None);
        assert_eq!(budget.take(t0 + Duration::from_secs(5)), Some(1));
    }
    use std::time::Instant;

    /// A `Write` the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn stamp(secs: u64, micros: u32) -> String {
        let mut text = String::new();
        write_stamp(&mut text, Duration::new(secs, micros * 1000)).unwrap();
        text
    }

    #[test]
    fn stamps_read_as_utc_dates_with_microseconds() {
        assert_eq!(stamp(0, 0), "1970-01-01T00:00:00.000000Z");
        // Dates checked with `date -u -d @SECS`.
        assert_eq!(stamp(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(stamp(1_798_342_302, 44_431), "2026-12-27T03:31:42.044431Z");
        assert_eq!(stamp(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
        assert_eq!(stamp(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
        // The same second again, then the next: the cached text is right.
        assert_eq!(stamp(1_798_342_302, 1), "2026-12-27T03:31:42.000001Z");
        assert_eq!(stamp(1_798_342_303, 1), "2026-12-27T03:31:43.000001Z");
    }

    #[test]
    fn lines_reach_the_output_in_order_without_a_flush() {
        let sink = Sink::default();
        let (mut writer, _flush) = spawn(sink.clone()).unwrap();
        for i in 0..1000 {
            writer.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.text() != expected {
            assert!(
                Instant::now() < deadline,
                "lines not written within 10 s; got {} bytes",
                sink.text().len()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn dropping_the_guard_writes_out_what_is_buffered() {
        let sink = Sink::default();
        let (mut writer, flush) = spawn(sink.clone()).unwrap();
        writer.write_all(b"last words\n").unwrap();
        drop(flush);
        assert_eq!(sink.text(), "last words\n");
    }

    #[test]
    fn dropping_the_guard_gives_up_on_an_output_that_never_takes_a_line() {
        /// An output that never returns.
        struct Stuck;
        impl Write for Stuck {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                loop {
                    std::thread::park();
                }
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (mut writer, flush) = spawn(Stuck).unwrap();
        writer.write_all(b"never written\n").unwrap();
        // Dropped on a thread of its own, so that a guard that waits
        // forever fails this test instead of hanging it.
        let (done, dropped) = std::sync::mpsc::channel();
        let start = Instant::now();
        std::thread::spawn(move || {
            drop(flush);
            let _ = done.send(start.elapsed());
        });
        let waited = dropped
            .recv_timeout(EXIT_WAIT * 5)
            .expect("the guard still waits after five times EXIT_WAIT");
        assert!(waited >= EXIT_WAIT, "gave up after {waited:?}");
    }

    #[test]
    fn a_full_buffer_drops_lines_and_says_how_many() {
        /// An output that blocks until released, so that lines pile up.
        struct Stuck(Arc<(Mutex<bool>, Condvar)>, Sink);
        impl Write for Stuck {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                let (released, cv) = &*self.0;
                let mut r = released.lock().unwrap();
                while !*r {
                    r = cv.wait(r).unwrap();
                }
                self.1.write(bytes)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let sink = Sink::default();
        let (mut writer, flush) = spawn(Stuck(gate.clone(), sink.clone())).unwrap();
        // The first line is taken by the writer, which then blocks on it.
        writer.write_all(b"first\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !writer.shared.lock().bytes.is_empty() {
            assert!(Instant::now() < deadline, "the writer never took a line");
            std::thread::sleep(Duration::from_millis(1));
        }
        let line = vec![b'x'; 1023];
        let fits = MAX_BUFFERED / 1024;
        for _ in 0..fits + 3 {
            writer.write_all(&line).unwrap();
            writer.write_all(b"\n").unwrap();
        }
        {
            let (released, cv) = &*gate;
            *released.lock().unwrap() = true;
            cv.notify_all();
        }
        drop(flush);
        let text = sink.text();
        assert!(text.starts_with("first\n"), "{}", &text[..40]);
        assert_eq!(text.matches(&"x".repeat(1023)).count(), fits);
        assert!(
            text.contains("log lines dropped"),
            "no report of the dropped lines"
        );
    }
}
