//! A session's outbound queue: bounded in bytes, drained in batches by one
//! writer task, so a slow reader costs only its own memory and never stalls the
//! room that broadcasts to it.
//!
//! Events other clients cause (their messages, their comings and goings) are
//! coalesced: a writer that wrote less than the outbox's pace ago waits out
//! the rest of it before writing again, and then writes everything queued
//! meanwhile in one go. The first event after a quiet spell goes out at once;
//! a client that gets a stream of them gets one write per pace instead of one
//! per event, which saves a system call and a wake-up of the client for each
//! line it would have had on its own. The session's own answers do not wait:
//! once it has handled a request it flushes ([`Outbox::flush`]), and the
//! answer goes out at once with whatever was queued before it.
//!
//! A reader that keeps up is never dropped for a sender's burst: once a line
//! leaves an outbox more than half full, the session whose request sent it
//! reads no further request until the writer has taken the queue, for at
//! most [`SLOW_READER_GRACE`] from when the outbox first went over half
//! ([`noting_congestion`], [`wait_for_readers`]). The sender is slowed to
//! the pace of its readers; a reader that does not read holds a sender back
//! that long once, then fills its outbox and is dropped. Before, one client's
//! single 4 MB write of chat lines dropped every member of its room,
//! however fast they read: the lines reached their outboxes at memory speed.
//!
//! All the outboxes of a server share an [`OutboxBudget`]: what their queues
//! hold together, a line sent to many queues counted once for as long as
//! any holds it ([`OutboxBudget::share`]; it is one buffer), a line for one
//! queue in full, plus a slot in each queue: about the memory they hold.
//! (Counted in full in every queue, the members of one room that stopped
//! reading spent the budget with little memory: a hostile-client tester's
//! 300 of them and 0.9 MB of messages counted 270 MB at 24 MB of RSS, and a
//! reader that paused for a second was dropped in their stead.) Each outbox's own limit bounds
//! one client; the budget bounds many. Without it, N clients in one room
//! that never read held memory growing as N squared (each event of the room
//! queued in every outbox) until each reached its own limit: 4,000 of them
//! in a main hall held 300 MB. Once the budget is spent, an outbox whose
//! client's transport has taken nothing for [`SLOW_READER_GRACE`] (a write
//! pending all that time) is dropped as too slow when it is given a line;
//! given none, its own writer drops it once it has taken nothing for
//! [`IDLE_READER_GRACE`]. A reader that keeps up takes what it is written,
//! however much a burst queues for it, and however late the server gets to
//! write it; what the budget drops is clients that do not read.
//!
//! Lines are [`Bytes`]: a line (or a block of lines) sent to a whole room is
//! one buffer that every recipient's queue shares, and the writer hands the
//! queued buffers to the transport as they are (vectored writes), never
//! copying its queue into a buffer of its own (a transport without vectored
//! writes gets small lines copied together, a few KiB per write).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest a sender is held back by one reader's outbox over half full
/// (see the module docs), counted from when it went over.
pub const SLOW_READER_GRACE: Duration = Duration::from_secs(1);

/// A sender waits for a reader ([`wait_for_readers`]) only while that
/// reader's transport takes bytes: one that has taken nothing for this long
/// is not reading (a reader that keeps up, even over a slow link, lets its
/// writer on at least every round trip). Without it, a client that joins a
/// busy room and never reads held the room's sender back for the whole
/// [`SLOW_READER_GRACE`]; one such client a second cut the room's
/// throughput 50-fold (an adversarial tester's finding).
pub const STALLED_READER: Duration = Duration::from_millis(250);

/// How long a client given no new line may take none of its output, once
/// the budget is spent, before its writer drops it (see
/// [`Outbox::dropped_for_the_budget`]). Longer than [`SLOW_READER_GRACE`]:
/// a client that reads slowly but steadily (10-40 KB/s through a 4 KiB
/// receive buffer) can leave a TCP writer waiting over a second, since the
/// kernel wakes a writer only once a good part of its send buffer is free;
/// with a 1 s rule here, such readers were dropped about a second after a
/// burst to their otherwise quiet room (found by an adversarial tester).
pub const IDLE_READER_GRACE: Duration = Duration::from_secs(10);

tokio::task_local! {
    /// Outboxes the current request's lines left more than half full.
    static CONGESTED: RefCell<Vec<Arc<Outbox>>>;
}

/// Runs `request` (a session handling one request), and returns with its
/// output the outboxes its lines left more than half full.
pub async fn noting_congestion<F: Future>(request: F) -> (F::Output, Vec<Arc<Outbox>>) {
    CONGESTED
        .scope(RefCell::new(Vec::new()), async move {
            let output = request.await;
            (output, CONGESTED.with(RefCell::take))
        })
        .await
}

/// Notes `outbox`, just given a line, if it is more than half full, for the
/// request under way ([`noting_congestion`]; nothing outside one).
pub fn note_if_congested(outbox: &Arc<Outbox>) {
    if outbox.congested.load(Ordering::Acquire) {
        let _ = CONGESTED.try_with(|noted| noted.borrow_mut().push(outbox.clone()));
    }
}

/// Waits until each of `outboxes` has had its queue taken by its writer,
/// closed, or been over half full for [`SLOW_READER_GRACE`].
pub async fn wait_for_readers(outboxes: &[Arc<Outbox>]) {
    for outbox in outboxes {
        outbox.room_for_more(SLOW_READER_GRACE).await;
    }
}

/// What a queued line costs its server's [`OutboxBudget`] besides its
/// bytes: its slot in the queue, twice over (a queue grows by doubling, so
/// its capacity is up to twice its length).
const SLOT_BYTES: usize = 2 * std::mem::size_of::<Bytes>();

/// The memory all the outboxes of one server may hold together (see the
/// module docs).
#[derive(Debug)]
pub struct OutboxBudget {
    limit: usize,
    /// Bytes charged to the outboxes now: queued, or taken by a writer and
    /// not yet written.
    used: AtomicUsize,
    /// Outboxes dropped for the budget, ever.
    drops: AtomicUsize,
}

impl OutboxBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(OutboxBudget {
            limit,
            used: AtomicUsize::new(0),
            drops: AtomicUsize::new(0),
        })
    }

    /// Bytes charged to the outboxes now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Outboxes dropped because the budget was spent, since the start.
    pub fn drops(&self) -> usize {
        self.drops.load(Ordering::Relaxed)
    }

    /// Whether the outboxes hold more than the budget.
    fn spent(&self) -> bool {
        self.used.load(Ordering::Relaxed) > self.limit
    }

    fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// `line`, for many queues: its bytes are charged once, now, until the
    /// last queue (or writer) holding it lets go; each queue charges only
    /// its slot ([`Outbox::push_shared`]).
    pub fn share(self: &Arc<Self>, line: Bytes) -> SharedLine {
        self.used.fetch_add(line.len(), Ordering::Relaxed);
        let budget = self.clone();
        SharedLine(Bytes::from_owner(Charged { line, budget }))
    }
}

/// A line sent to many queues whose bytes its [`OutboxBudget`] counts once
/// ([`OutboxBudget::share`]).
#[derive(Clone)]
pub struct SharedLine(Bytes);

/// What keeps a shared line's charge: released when the last copy of the
/// line is dropped.
struct Charged {
    line: Bytes,
    budget: Arc<OutboxBudget>,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.line
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.budget.release(self.line.len());
    }
}

/// Why an outbox was dropped for holding too much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Its client let more than the outbox's own limit pile up.
    Limit,
    /// The server's outboxes spent their budget and this client had taken
    /// no output for `grace`: [`SLOW_READER_GRACE`] when it was given a
    /// line, [`IDLE_READER_GRACE`] when its own writer judged it.
    Budget { grace: Duration },
}

/// The queue of lines waiting to be written to one client.
pub struct Outbox {
    state: Mutex<State>,
    wake: Notify,
    /// Wakes senders waiting for the writer to take the queue.
    taken: Notify,
    /// The queue is over half the limit (`State::congested_since` is set).
    congested: AtomicBool,
    /// A wake-up is owed to the writer (see [`Outbox::push_unwoken`]).
    wake_pending: AtomicBool,
    /// The writer waits out the pace, and writes what comes meanwhile when
    /// it is over: new lines need no wake-up. Changed under the state lock.
    pacing: AtomicBool,
    limit: usize,
    /// Least time between two writes of events (zero: no coalescing).
    pace: Duration,
    dropped: CancellationToken,
    /// Fires when the session is told to finish.
    finishing: CancellationToken,
    /// The server's budget for all its outboxes (none: unbounded, tests).
    budget: Option<Arc<OutboxBudget>>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Bytes>,
    bytes: usize,
    /// Write what is queued, then close.
    finishing: bool,
    /// Close now, discarding the queue.
    dead: bool,
    /// Dropped because the client let more than the limit pile up, or took
    /// nothing for the grace while the budget was spent.
    overflowed: Option<Overflow>,
    /// What the queued lines cost the budget (a batch the writer took
    /// carries its own).
    charged: usize,
    /// Since when the client's transport has taken none of the output it
    /// was given (a write pending: a full socket buffer, a closed QUIC flow
    /// control window), if it is so now.
    blocked_since: Option<Instant>,
    /// Write what is queued now, without waiting out the pace.
    urgent: bool,
    /// Since when the queue has been over half the limit.
    congested_since: Option<Instant>,
}

/// How a session's writer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterEnd {
    /// Wrote everything it was given, then closed its side.
    Finished,
    /// The session was dropped while no write was under way.
    Dropped,
    /// The session was dropped, or the transport failed, in the middle of a
    /// write: output is stuck in the connection.
    Interrupted,
}

impl Outbox {
    /// An empty outbox that holds at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            taken: Notify::new(),
            congested: AtomicBool::new(false),
            wake_pending: AtomicBool::new(false),
            pacing: AtomicBool::new(false),
            limit,
            pace: Duration::ZERO,
            dropped: CancellationToken::new(),
            finishing: CancellationToken::new(),
            budget: None,
        }
    }

    /// This outbox with its lines charged to `budget`, shared with the
    /// server's other outboxes.
    pub fn budgeted(mut self, budget: &Arc<OutboxBudget>) -> Self {
        self.budget = Some(budget.clone());
        self
    }

    /// This outbox with events coalesced to at most one write per `pace`
    /// (see the module docs).
    pub fn paced(mut self, pace: Duration) -> Self {
        self.pace = pace;
        self
    }

    /// Queues a line and wakes the writer, which writes it within the pace.
    /// Drops the whole session when the client has let more than the limit
    /// pile up; returns false once the session is dropped.
    pub fn push(&self, line: Bytes) -> bool {
        if self.queue(line, true) {
            self.wake();
        }
        !self.dropped.is_cancelled()
    }

    /// [`Outbox::push`] of a line many queues share: the budget is charged
    /// only its slot here (its bytes are charged once, by the line).
    pub fn push_shared(&self, line: &SharedLine) -> bool {
        if self.queue(line.0.clone(), false) {
            self.wake();
        }
        !self.dropped.is_cancelled()
    }

    /// Has the writer write what is queued now, without waiting out the
    /// pace: the session's answer to its own client is in it.
    pub fn flush(&self) {
        let mut state = self.lock();
        if state.queue.is_empty() {
            return;
        }
        state.urgent = true;
        drop(state);
        self.wake.notify_one();
    }

    /// Queues a line without waking the writer. Returns true when the caller
    /// must see to a wake-up ([`Outbox::wake`]): the line was queued and no
    /// earlier one is already waiting for its wake-up (so a session appears
    /// once in a backlog of wake-ups however many lines it gets meanwhile).
    /// Drops the whole session (waking the writer to stop) on overflow.
    pub fn push_unwoken(&self, line: &SharedLine) -> bool {
        self.queue(line.0.clone(), false) && !self.wake_pending.swap(true, Ordering::AcqRel)
    }

    /// Wakes the writer to write what is queued (within the pace).
    pub fn wake(&self) {
        self.wake_pending.store(false, Ordering::Release);
        // A writer waiting out the pace writes the new lines with the rest
        // when its time comes: waking it now would only send it back to wait.
        if !self.pacing.load(Ordering::Acquire) {
            self.wake.notify_one();
        }
    }

    /// Queues `line`, charging the budget its slot, and its bytes too if
    /// `charge_bytes` (a line not shared: see [`OutboxBudget::share`]).
    fn queue(&self, line: Bytes, charge_bytes: bool) -> bool {
        let mut state = self.lock();
        if state.dead || state.finishing {
            return false;
        }
        let over_budget = self.budget.as_ref().is_some_and(|budget| {
            budget.spent()
                && state
                    .blocked_since
                    .is_some_and(|since| since.elapsed() >= SLOW_READER_GRACE)
        });
        // A line is taken while the queue is under the limit, whatever its
        // size, so the queue may pass the limit by one line or block: a
        // block one server event makes (a room's deletion moving all its
        // members, a `who` of a big room) can outgrow the limit, and a
        // reader that keeps up must not be dropped for it (every member of
        // a deleted room of 1,600 was, at a 128 KiB outbox). Such a block is
        // bounded by the server's own state and shared by its recipients; a
        // client that does not read is dropped at the next line.
        if state.bytes >= self.limit || over_budget {
            let reason = if over_budget {
                Overflow::Budget {
                    grace: SLOW_READER_GRACE,
                }
            } else {
                Overflow::Limit
            };
            self.overflow(state, reason);
            return false;
        }
        if let Some(budget) = &self.budget {
            let charge = SLOT_BYTES + if charge_bytes { line.len() } else { 0 };
            state.charged += charge;
            budget.used.fetch_add(charge, Ordering::Relaxed);
        }
        state.bytes += line.len();
        state.queue.push_back(line);
        if state.bytes > self.limit / 2 && state.congested_since.is_none() {
            state.congested_since = Some(Instant::now());
            self.congested.store(true, Ordering::Release);
        }
        true
    }

    /// Waits until the writer has taken the queue (or the session ended),
    /// if it is over half the limit: for at most `grace` from when it went
    /// over, and no longer once its client's transport has taken nothing
    /// for [`STALLED_READER`].
    async fn room_for_more(&self, grace: Duration) {
        loop {
            let taken = self.taken.notified();
            tokio::pin!(taken);
            // Registered before the check: a take between the two still wakes it.
            taken.as_mut().enable();
            let until = {
                let state = self.lock();
                match state.congested_since {
                    Some(since) if !state.dead && !state.finishing => match state.blocked_since {
                        // Its client takes nothing: no reason to wait.
                        Some(blocked) => (since + grace).min(blocked + STALLED_READER),
                        None => since + grace,
                    },
                    _ => return,
                }
            };
            if Instant::now() >= until {
                return;
            }
            // Woken by a take, by its writer blocking, or at `until`: each
            // is checked again (the writer may have taken bytes since).
            tokio::select! {
                _ = taken => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Writes what is queued, then closes the connection. Later pushes are ignored.
    pub fn finish(&self) {
        self.lock().finishing = true;
        self.finishing.cancel();
        self.wake.notify_one();
        self.taken.notify_waiters();
    }

    /// Fires when the session was told to finish (evicted, or ending): it
    /// reads no more, whether or not its client takes the last lines.
    pub fn finishing(&self) -> &CancellationToken {
        &self.finishing
    }

    /// Drops the session as too slow, for `reason`.
    fn overflow(&self, mut state: std::sync::MutexGuard<'_, State>, reason: Overflow) {
        state.overflowed = Some(reason);
        if let Some(budget) = &self.budget
            && matches!(reason, Overflow::Budget { .. })
        {
            budget.drops.fetch_add(1, Ordering::Relaxed);
        }
        self.discard(&mut state);
        drop(state);
        // Logged by the session itself, in its own span: this may run in
        // the span of whichever client's line overflowed it.
        self.dropped.cancel();
        self.wake.notify_one();
        self.taken.notify_waiters();
    }

    /// While the writer waits on a write: returns once the session is
    /// dropped for the budget, its client having taken nothing for
    /// [`IDLE_READER_GRACE`] while the budget is spent (checked at least
    /// once a grace). The rule for a line queued ([`Outbox::queue`]), for a
    /// client given nothing more: idle clients that never read would
    /// otherwise keep what they hold over the budget until someone speaks
    /// to them.
    ///
    /// Polled beside the write, in the writer's task: it is polled again
    /// whenever the write is, so while the write waits for anything but the
    /// client (its turn, a yield), it sets no timer; one is set only once
    /// the client's transport stops taking bytes ([`State::blocked_since`]).
    async fn dropped_for_the_budget(&self) {
        let Some(budget) = &self.budget else {
            return std::future::pending().await;
        };
        // The timer of the current blocked spell (since when), once set.
        let mut timer: Option<(Instant, std::pin::Pin<Box<tokio::time::Sleep>>)> = None;
        std::future::poll_fn(|cx| {
            let state = self.lock();
            let Some(since) = state.blocked_since else {
                timer = None;
                return Poll::Pending;
            };
            let blocked_for = since.elapsed();
            // A closing session has its own bound (the handshake timeout
            // for its last lines, then a reset).
            if !state.dead && !state.finishing && budget.spent() && blocked_for >= IDLE_READER_GRACE
            {
                self.overflow(
                    state,
                    Overflow::Budget {
                        grace: IDLE_READER_GRACE,
                    },
                );
                return Poll::Ready(());
            }
            drop(state);
            // Checked once blocked for the grace, then every grace.
            let due = if blocked_for < IDLE_READER_GRACE {
                since + IDLE_READER_GRACE
            } else {
                Instant::now() + IDLE_READER_GRACE
            };
            let sleep = match &mut timer {
                Some((spell, sleep)) if *spell == since && !sleep.is_elapsed() => sleep,
                Some((spell, sleep)) => {
                    *spell = since;
                    sleep.as_mut().reset(due);
                    sleep
                }
                None => {
                    &mut timer
                        .insert((since, Box::pin(tokio::time::sleep_until(due))))
                        .1
                }
            };
            if sleep.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        })
        .await
    }

    /// Marks the outbox dead and frees its queue.
    fn discard(&self, state: &mut State) {
        state.dead = true;
        state.queue.clear();
        state.bytes = 0;
        if let Some(budget) = &self.budget {
            budget.release(std::mem::take(&mut state.charged));
        }
    }

    /// Closes the connection now, discarding what is queued.
    pub fn kill(&self) {
        let mut state = self.lock();
        self.discard(&mut state);
        drop(state);
        self.dropped.cancel();
        self.wake.notify_one();
        self.taken.notify_waiters();
    }

    /// Why the session was dropped as too slow, if it was.
    pub fn overflowed(&self) -> Option<Overflow> {
        self.lock().overflowed
    }

    /// The lines queued now, in order (tests).
    #[cfg(test)]
    pub(crate) fn queued(&self) -> Vec<Bytes> {
        self.lock().queue.iter().cloned().collect()
    }

    /// Empties the queue, as a writer would (tests).
    #[cfg(test)]
    pub(crate) fn clear_for_test(&self) {
        let mut state = self.lock();
        state.queue.clear();
        state.bytes = 0;
        if let Some(budget) = &self.budget {
            budget.release(std::mem::take(&mut state.charged));
        }
        state.congested_since = None;
        self.congested.store(false, Ordering::Release);
        self.taken.notify_waiters();
    }

    /// Whether the session was told to finish (tests).
    #[cfg(test)]
    pub(crate) fn is_finishing(&self) -> bool {
        self.lock().finishing
    }

    /// Fires when the session was dropped (overflow, kill, write error).
    pub fn dropped(&self) -> &CancellationToken {
        &self.dropped
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent
        // (every update is a single push/clear), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for queued lines and takes them all (the lines themselves are
    /// not copied: a line sent to many clients stays one shared buffer);
    /// `None` when the writer should stop (finished and drained, or dead).
    ///
    /// Lines are taken at once when they are urgent ([`Outbox::flush`]), the
    /// session is finishing, or the last write (`last_write`) was at least
    /// the pace ago; otherwise once the pace since the last write is over.
    async fn next_batch(&self, last_write: Option<Instant>) -> Option<Batch<'_>> {
        loop {
            let due = {
                let mut state = self.lock();
                if state.dead {
                    return None;
                }
                if state.queue.is_empty() {
                    if state.finishing {
                        return None;
                    }
                    None
                } else {
                    let due = last_write
                        .map(|at| at + self.pace)
                        .filter(|&due| !state.urgent && !state.finishing && due > Instant::now());
                    if due.is_none() {
                        state.bytes = 0;
                        state.urgent = false;
                        self.pacing.store(false, Ordering::Release);
                        if state.congested_since.take().is_some() {
                            self.congested.store(false, Ordering::Release);
                            self.taken.notify_waiters();
                        }
                        return Some(Batch {
                            lines: std::mem::take(&mut state.queue),
                            charged: std::mem::take(&mut state.charged),
                            outbox: self,
                        });
                    }
                    self.pacing.store(true, Ordering::Release);
                    due
                }
            };
            // notify_one keeps a permit when nobody waits, so a push between
            // the check above and this await is not lost.
            match due {
                Some(due) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    /// The writer task of a session: drains the outbox into the transport
    /// until finished or dropped, taking a [`WriteTurns`] turn for each big
    /// write.
    ///
    /// A drop stops a write under way: a client that does not read (a zero
    /// TCP window) would otherwise keep the writer, and so its connection,
    /// forever.
    pub async fn write_to<W: AsyncWrite + Unpin>(
        &self,
        writer: W,
        turns: &WriteTurns,
    ) -> WriterEnd {
        // A batch is the queue itself, freed once written: an idle session
        // holds no write buffer, and a busy one no copy of its lines.
        let mut writer = Watched {
            inner: writer,
            outbox: self,
            blocked: false,
        };
        let mut last_write = None;
        while let Some(mut batch) = self.next_batch(last_write).await {
            // Cancelling the write loses only what the drop discards anyway.
            // Polled only once the write is pending (biased), so a write
            // that completes at once sets no timer.
            let written = tokio::select! {
                biased;
                _ = self.dropped.cancelled() => return WriterEnd::Interrupted,
                written = write_batch(&mut writer, &mut batch.lines, turns) => written,
                () = self.dropped_for_the_budget() => return WriterEnd::Interrupted,
            };
            if let Err(e) = written {
                tracing::debug!(error = %e, "client write failed");
                self.kill();
                return WriterEnd::Interrupted;
            }
            if !self.pace.is_zero() {
                last_write = Some(Instant::now());
            }
        }
        let _ = writer.shutdown().await;
        // A session finished from outside (evicted) must stop reading too.
        let dropped = self.dropped.is_cancelled();
        self.dropped.cancel();
        if dropped {
            WriterEnd::Dropped
        } else {
            WriterEnd::Finished
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
            budget.release(state.charged);
        }
    }
}

/// A client's transport, noting in its outbox since when it has taken
/// nothing (see [`State::blocked_since`]): the sign of a client that does
/// not read, as opposed to a writer the server itself has not run yet.
struct Watched<'a, W> {
    inner: W,
    outbox: &'a Outbox,
    blocked: bool,
}

impl<W> Watched<'_, W> {
    fn note<T>(&mut self, poll: Poll<T>) -> Poll<T> {
        let blocked = poll.is_pending();
        if blocked != self.blocked {
            self.blocked = blocked;
            self.outbox.lock().blocked_since = blocked.then(Instant::now);
            if blocked {
                // Senders waiting for this reader now wait less.
                self.outbox.taken.notify_waiters();
            }
        }
        poll
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Watched<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(poll)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.note(poll)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Lines a writer took from its outbox: once they are written (or given
/// up), their charge to the budget is released.
struct Batch<'a> {
    lines: VecDeque<Bytes>,
    charged: usize,
    outbox: &'a Outbox,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if let Some(budget) = &self.outbox.budget {
            budget.release(self.charged);
        }
    }
}

/// Turns for big writes, shared by every session of a server.
///
/// One fan-out (a crowded room deleted) can wake thousands of writers that
/// each have a big block to write. If they all queued in the scheduler at
/// once, every other task (the request of a client elsewhere, its reply)
/// would wait behind all of their writes. So at most a few sessions write a
/// big chunk at a time and the rest wait here, off the run queue; small writes
/// (a reply, a chat line) never wait for a turn.
pub struct WriteTurns(Semaphore);

impl WriteTurns {
    /// Sessions that may write a big chunk at once: enough to keep the
    /// transports busy, few enough that a round of them is quick.
    pub const CONCURRENT: usize = 16;

    /// Turns for one server.
    pub fn new() -> Self {
        WriteTurns(Semaphore::new(Self::CONCURRENT))
    }
}

impl Default for WriteTurns {
    fn default() -> Self {
        Self::new()
    }
}

/// Lines handed to the transport in one vectored write, at most.
const WRITE_SLICES: usize = 64;

/// Bytes handed to the transport per write, and written between two yields
/// to the scheduler, so that a big block is written a chunk per turn.
const WRITE_CHUNK: usize = 32 * 1024;

/// Writes of at least this many bytes wait for a turn.
const BIG_WRITE: usize = 4 * 1024;

/// A transport without vectored writes gets consecutive small lines copied
/// into one buffer of at most this size per write (a line that size or
/// bigger is handed over as it is).
const COALESCE: usize = 8 * 1024;

/// Writes `batch` in order straight from the queued buffers, several lines
/// per vectored write, then flushes. A transport without vectored writes
/// (QUIC streams) gets small lines a few KiB at a time, copied together,
/// and big ones as they are.
async fn write_batch<W: AsyncWrite + Unpin>(
    writer: &mut W,
    batch: &mut VecDeque<Bytes>,
    turns: &WriteTurns,
) -> std::io::Result<()> {
    let vectored = writer.is_write_vectored();
    let mut coalesced = Vec::new();
    let mut since_yield = 0;
    loop {
        while batch.front().is_some_and(Bytes::is_empty) {
            batch.pop_front();
        }
        let Some(front) = batch.front() else {
            break;
        };
        let written = if !vectored && front.len() < COALESCE && batch.len() > 1 {
            coalesced.clear();
            for line in batch.iter() {
                if coalesced.len() + line.len() > COALESCE {
                    break;
                }
                coalesced.extend_from_slice(line);
            }
            writer.write(&coalesced).await?
        } else {
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
            let mut count = 0;
            let mut total = 0;
            for line in batch.iter() {
                if count == WRITE_SLICES || total == WRITE_CHUNK {
                    break;
                }
                let take = line.len().min(WRITE_CHUNK - total);
                slices[count] = IoSlice::new(&line[..take]);
                count += 1;
                total += take;
            }
            let slices = &slices[..count];
            if total >= BIG_WRITE {
                write_in_turn(writer, slices, turns).await?
            } else {
                writer.write_vectored(slices).await?
            }
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        consume(batch, written);
        since_yield += written;
        if since_yield >= WRITE_CHUNK && !batch.is_empty() {
            since_yield = 0;
            tokio::task::yield_now().await;
        }
    }
    writer.flush().await
}

/// One big write, holding a turn only while the transport takes the bytes at
/// once: a client too slow to take them gives its turn back while it waits.
async fn write_in_turn<W: AsyncWrite + Unpin>(
    writer: &mut W,
    slices: &[IoSlice<'_>],
    turns: &WriteTurns,
) -> std::io::Result<usize> {
    // The semaphore is never closed; should it be, writes go on without turns.
    let turn = turns.0.acquire().await.ok();
    let mut write = std::pin::pin!(writer.write_vectored(slices));
    match std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
        Poll::Ready(written) => written,
        Poll::Pending => {
            drop(turn);
            write.await
        }
    }
}

/// Drops the first `written` bytes of `batch`: whole lines, then the start
/// of a line (a cheap view into the same shared buffer).
fn consume(batch: &mut VecDeque<Bytes>, mut written: usize) {
    while written > 0 {
        let Some(front) = batch.front_mut() else {
            return;
        };
        if front.len() <= written {
            written -= front.len();
            batch.pop_front();
        } else {
            front.advance(written);
            return;
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    /// Pushes `bytes` bytes within a request and returns the outboxes it
    /// noted as congested.
    async fn push_noting(outbox: &Arc<Outbox>, bytes: usize) -> Vec<Arc<Outbox>> {
        let ((), noted) = noting_congestion(async {
            outbox.push(Bytes::from(vec![b'x'; bytes]));
            note_if_congested(outbox);
        })
        .await;
        noted
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_waits_no_longer_for_a_reader_whose_transport_takes_nothing() {
        let outbox = Arc::new(Outbox::new(100));
        let writer = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.write_to(Stuck, &WriteTurns::new()).await }
        });
        // The writer takes a first line and its client takes none of it.
        outbox.push(Bytes::from(vec![b'x'; 10]));
        tokio::task::yield_now().await;
        let blocked = Instant::now();
        tokio::time::sleep(STALLED_READER / 2).await;
        let noted = push_noting(&outbox, 60).await;
        assert_eq!(noted.len(), 1);
        wait_for_readers(&noted).await;
        assert_eq!(blocked.elapsed(), STALLED_READER, "not the whole grace");
        // Once stalled, it holds no sender at all.
        let noted = push_noting(&outbox, 1).await;
        let start = Instant::now();
        wait_for_readers(&noted).await;
        assert_eq!(start.elapsed(), Duration::ZERO);

        // A reader that takes a little now and then is waited for (up to
        // the grace), until it stops taking.
        let (mut client, server) = tokio::io::duplex(16);
        let outbox = Arc::new(Outbox::new(100));
        let trickled = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.write_to(server, &WriteTurns::new()).await }
        });
        outbox.push(Bytes::from(vec![b'x'; 400]));
        tokio::task::yield_now().await;
        let start = Instant::now();
        let noted = push_noting(&outbox, 60).await;
        assert_eq!(noted.len(), 1);
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0; 16];
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let _ = client.read(&mut buf).await;
            }
            client
        });
        wait_for_readers(&noted).await;
        assert_eq!(start.elapsed(), Duration::from_millis(100) + STALLED_READER);
        trickled.abort();
        drop(reader.await);

        // A writer that blocks while a sender waits cuts the wait short too.
        let outbox = Arc::new(Outbox::new(100));
        assert_eq!(push_noting(&outbox, 60).await.len(), 1);
        let noted = push_noting(&outbox, 1).await;
        let start = Instant::now();
        let _second = tokio::spawn({
            let outbox = outbox.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                outbox.write_to(Stuck, &WriteTurns::new()).await
            }
        });
        // The writer takes the queue at 100 ms (a new spell) and blocks;
        // the new lines then wait for it for the stall, not the grace.
        wait_for_readers(&noted).await;
        let noted = push_noting(&outbox, 60).await;
        wait_for_readers(&noted).await;
        assert_eq!(start.elapsed(), Duration::from_millis(100) + STALLED_READER);
        writer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_waits_for_a_reader_over_half_full_until_its_queue_is_taken_or_the_grace_is_over()
     {
        let outbox = Arc::new(Outbox::new(100));
        assert!(
            push_noting(&outbox, 50).await.is_empty(),
            "half full is not over"
        );
        let noted = push_noting(&outbox, 1).await;
        assert_eq!(noted.len(), 1);
        // Nobody takes the queue (a reader that does not read): the sender
        // waits out the grace, once.
        let start = Instant::now();
        wait_for_readers(&noted).await;
        assert_eq!(start.elapsed(), SLOW_READER_GRACE);
        let noted = push_noting(&outbox, 1).await;
        wait_for_readers(&noted).await;
        assert_eq!(
            start.elapsed(),
            SLOW_READER_GRACE,
            "the grace runs from when it went over"
        );

        // Taken by the writer: a new episode, which ends when the queue is
        // taken again.
        assert!(outbox.next_batch(None).await.is_some());
        assert!(push_noting(&outbox, 40).await.is_empty());
        let noted = push_noting(&outbox, 40).await;
        let writer = {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                outbox.next_batch(None).await.map(|batch| batch.lines.len())
            })
        };
        let start = Instant::now();
        wait_for_readers(&noted).await;
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert_eq!(writer.await.unwrap(), Some(2));

        // Outside a request nothing is noted; a dropped session holds no one.
        outbox.push(Bytes::from(vec![b'x'; 60]));
        note_if_congested(&outbox);
        let noted = push_noting(&outbox, 1).await;
        outbox.kill();
        let start = Instant::now();
        wait_for_readers(&noted).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    /// A client that never reads: every write waits for ever.
    struct Stuck;

    impl AsyncWrite for Stuck {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Pending
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn drains_in_order_then_finishes() {
        let outbox = Outbox::new(100);
        assert!(outbox.push(Bytes::from_static(b"a\n")));
        assert!(outbox.push(Bytes::from_static(b"b\n")));
        outbox.finish();
        assert!(outbox.push(Bytes::from_static(b"ignored\n")));
        let mut out = Vec::new();
        outbox.write_to(&mut out, &WriteTurns::new()).await;
        assert_eq!(out, b"a\nb\n");
    }

    #[tokio::test]
    async fn overflow_drops_the_session() {
        let outbox = Outbox::new(10);
        assert!(outbox.push(Bytes::from_static(b"12345\n")));
        // Under the limit before it: taken, and the queue is over the limit.
        assert!(outbox.push(Bytes::from_static(b"12345\n")));
        assert_eq!(outbox.overflowed(), None);
        assert!(!outbox.push(Bytes::from_static(b"1\n")));
        assert!(outbox.dropped().is_cancelled());
        assert_eq!(outbox.overflowed(), Some(Overflow::Limit));
        let mut out = Vec::new();
        let end = outbox.write_to(&mut out, &WriteTurns::new()).await;
        assert!(out.is_empty(), "a dropped session's queue is discarded");
        assert_eq!(end, WriterEnd::Dropped);
    }

    #[tokio::test]
    async fn a_block_over_the_limit_is_taken_while_the_queue_has_room() {
        let outbox = Outbox::new(10);
        assert!(outbox.push(Bytes::from_static(b"ok\n")));
        assert!(outbox.push(Bytes::from_static(b"a block of 26 bytes, one\n")));
        assert_eq!(outbox.overflowed(), None);
        // Taken by the writer: the queue is empty again.
        let batch = outbox.next_batch(None).await.expect("the lines");
        assert_eq!(batch.lines.len(), 2);
        drop(batch);
        assert!(outbox.push(Bytes::from_static(b"another block, 26 bytes\n")));
        // Not read meanwhile: the next line drops it.
        assert!(!outbox.push(Bytes::from_static(b"1\n")));
        assert_eq!(outbox.overflowed(), Some(Overflow::Limit));
    }

    #[tokio::test]
    async fn a_drop_stops_a_write_that_never_completes() {
        let outbox = Arc::new(Outbox::new(100));
        let writer = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.write_to(Stuck, &WriteTurns::new()).await }
        });
        assert!(outbox.push(Bytes::from_static(b"hello\n")));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "the writer is stuck in its write");
        // One block over the limit fits a queue under it; the next line does not.
        assert!(outbox.push(Bytes::from(vec![b'x'; 101])));
        assert!(!outbox.push(Bytes::from_static(b"more\n")), "overflow");
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
        assert_eq!(
            end.expect("the drop ends the writer").expect("no panic"),
            WriterEnd::Interrupted
        );
    }

    /// A transport that takes at most `max` bytes per call and remembers
    /// where the bytes it was handed live, and what each call took when.
    struct Recorder {
        out: Vec<u8>,
        max: usize,
        vectored: bool,
        /// Address and length of every buffer handed over.
        seen: Vec<(usize, usize)>,
        calls: Timed,
    }

    impl Recorder {
        fn new(max: usize, vectored: bool) -> Self {
            Recorder {
                out: Vec::new(),
                max,
                vectored,
                seen: Vec::new(),
                calls: Timed::default(),
            }
        }

        /// Records a write call that took `out[from..]`.
        fn called(&mut self, from: usize, written: usize) -> Poll<std::io::Result<usize>> {
            let took = self.out[from..].to_vec();
            self.calls.0.lock().unwrap().push((Instant::now(), took));
            Poll::Ready(Ok(written))
        }

        fn take(&mut self, buf: &[u8], room: usize) -> usize {
            self.seen.push((buf.as_ptr() as usize, buf.len()));
            let n = buf.len().min(room);
            self.out.extend_from_slice(&buf[..n]);
            n
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let (max, from) = (self.max, self.out.len());
            let written = self.take(buf, max);
            self.called(from, written)
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            if !self.vectored {
                let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
                return self.poll_write(cx, first);
            }
            let (mut written, from) = (0, self.out.len());
            for buf in bufs {
                let room = self.max - written;
                written += self.take(buf, room);
                if written == self.max {
                    break;
                }
            }
            self.called(from, written)
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_writer_hands_shared_lines_to_the_transport_without_copying() {
        // A block shared with other recipients, between two small lines.
        let block = Bytes::from(b"0123456789\n".repeat(10_000));
        let range = block.as_ptr() as usize..block.as_ptr() as usize + block.len();
        for (max, vectored) in [(usize::MAX, true), (3000, true), (777, false)] {
            let outbox = Outbox::new(1 << 20);
            assert!(outbox.push(Bytes::from_static(b"first\n")));
            assert!(outbox.push(block.clone()));
            assert!(outbox.push(Bytes::from_static(b"last\n")));
            outbox.finish();
            let mut transport = Recorder::new(max, vectored);
            outbox.write_to(&mut transport, &WriteTurns::new()).await;
            let mut expected = b"first\n".to_vec();
            expected.extend_from_slice(&block);
            expected.extend_from_slice(b"last\n");
            assert!(transport.out == expected, "max {max}: every byte, in order");
            let from_block: usize = transport
                .seen
                .iter()
                .filter(|(at, _)| range.contains(at))
                .map(|(_, len)| *len)
                .max()
                .unwrap_or(0);
            assert!(
                from_block > 0,
                "max {max}: the transport was handed the shared block itself"
            );
            let largest = transport.seen.iter().map(|(_, len)| *len).max();
            assert!(
                largest <= Some(WRITE_CHUNK),
                "max {max}: at most a chunk per write, got {largest:?}"
            );
        }
    }

    #[test]
    fn a_session_owes_one_wake_up_however_many_lines_it_gets() {
        let budget = OutboxBudget::new(1_000);
        let line = |text: &'static [u8]| budget.share(Bytes::from_static(text));
        let outbox = Outbox::new(100);
        assert!(outbox.push_unwoken(&line(b"a\n")));
        assert!(
            !outbox.push_unwoken(&line(b"b\n")),
            "a wake-up is already owed"
        );
        outbox.wake();
        assert!(outbox.push_unwoken(&line(b"c\n")));
        assert_eq!(outbox.queued().len(), 3);
    }

    /// A line many outboxes share is charged to the budget once, with a slot
    /// in each, for as long as any of them holds it: a hostile-client
    /// tester's 300 members of one room that never read, given 0.9 MB of
    /// messages, counted 270 MB (each line in full in every queue) against
    /// 24 MB of memory, spent the budget, and got a reader that paused for
    /// a second dropped in their stead.
    #[tokio::test]
    async fn a_line_many_outboxes_share_is_charged_once() {
        let budget = OutboxBudget::new(1 << 20);
        let outboxes: Vec<_> = (0..300)
            .map(|_| Arc::new(Outbox::new(1 << 20).budgeted(&budget)))
            .collect();
        let shared = budget.share(line(60_000));
        for outbox in &outboxes {
            assert!(outbox.push_shared(&shared));
        }
        drop(shared);
        assert_eq!(budget.used(), 60_000 + 300 * SLOT_BYTES);
        assert!(!budget.spent());
        // One of them takes its line: only its slot comes back.
        let mut sink = Vec::new();
        outboxes[0].finish();
        let end = outboxes[0].write_to(&mut sink, &WriteTurns::new()).await;
        assert_eq!(end, WriterEnd::Finished);
        assert_eq!(sink.len(), 60_000);
        assert_eq!(budget.used(), 60_000 + 299 * SLOT_BYTES);
        // The rest are dropped: all of it is back.
        for outbox in &outboxes[1..] {
            outbox.kill();
        }
        assert_eq!(budget.used(), 0);
        // A line for one outbox alone is charged in full there.
        outboxes[0].push(line(100));
        assert_eq!(budget.used(), 0, "a finished outbox takes nothing");
        let single = Outbox::new(1 << 20).budgeted(&budget);
        single.push(line(100));
        assert_eq!(budget.used(), 100 + SLOT_BYTES);
    }

    #[tokio::test]
    async fn big_writes_wait_for_a_turn_and_small_ones_do_not() {
        let turns = Arc::new(WriteTurns::new());
        let all_turns = turns
            .0
            .acquire_many(WriteTurns::CONCURRENT as u32)
            .await
            .expect("open semaphore");
        let write = |line: Bytes| {
            let turns = turns.clone();
            tokio::spawn(async move {
                let outbox = Outbox::new(1 << 20);
                outbox.push(line);
                outbox.finish();
                let mut out = Vec::new();
                outbox.write_to(&mut out, &turns).await;
                out.len()
            })
        };
        let small = write(Bytes::from_static(b"a reply\n"));
        let big = write(Bytes::from(vec![b'x'; BIG_WRITE]));
        let written = tokio::time::timeout(std::time::Duration::from_secs(5), small).await;
        assert_eq!(written.expect("in time").expect("no panic"), 8);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !big.is_finished(),
            "a big write waits while every turn is taken"
        );
        drop(all_turns);
        let written = tokio::time::timeout(std::time::Duration::from_secs(5), big).await;
        assert_eq!(written.expect("in time").expect("no panic"), BIG_WRITE);
    }

    /// When a write call came, and the bytes it got.
    type Write = (Instant, Vec<u8>);

    /// The write calls a [`Recorder`] took, shared with the test.
    #[derive(Clone, Default)]
    struct Timed(Arc<std::sync::Mutex<Vec<Write>>>);

    impl Timed {
        fn writes(&self) -> Vec<Write> {
            self.0.lock().unwrap().clone()
        }

        /// Waits until the writer has made `n` writes. The clock is paused
        /// and jumps to the next timer whenever every task waits, so each
        /// step here lets the writer run first: its writes keep their times.
        async fn until(&self, n: usize) -> Vec<Write> {
            for _ in 0..10_000 {
                if self.writes().len() >= n {
                    return self.writes();
                }
                tokio::time::sleep(std::time::Duration::from_micros(100)).await;
            }
            panic!("{n} writes expected, got {:?}", self.writes());
        }
    }

    const PACE: std::time::Duration = std::time::Duration::from_millis(10);

    /// A writer task draining `outbox` into a [`Recorder`]; its write calls.
    fn spawn_writer(outbox: &Arc<Outbox>) -> Timed {
        let transport = Recorder::new(usize::MAX, true);
        let calls = transport.calls.clone();
        let outbox = outbox.clone();
        tokio::spawn(async move { outbox.write_to(transport, &WriteTurns::new()).await });
        calls
    }

    fn paced_writer() -> (Arc<Outbox>, Timed) {
        let outbox = Arc::new(Outbox::new(1 << 20).paced(PACE));
        let calls = spawn_writer(&outbox);
        (outbox, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn events_within_the_pace_go_out_together_once_it_is_over() {
        let (outbox, transport) = paced_writer();
        let pushed = Instant::now();
        outbox.push(Bytes::from_static(b"a\n"));
        let writes = transport.until(1).await;
        assert_eq!(
            writes[0],
            (pushed, b"a\n".to_vec()),
            "the first event goes at once"
        );
        outbox.push(Bytes::from_static(b"b\n"));
        outbox.push(Bytes::from_static(b"c\n"));
        let writes = transport.until(2).await;
        assert_eq!(
            writes[1],
            (writes[0].0 + PACE, b"b\nc\n".to_vec()),
            "the next ones together, a pace after the last write"
        );
        // A quiet spell: the next event goes at once again.
        tokio::time::sleep(PACE * 3).await;
        let pushed = Instant::now();
        outbox.push(Bytes::from_static(b"d\n"));
        let writes = transport.until(3).await;
        assert_eq!(writes[2], (pushed, b"d\n".to_vec()));
        assert_eq!(writes.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_writes_what_waits_for_the_pace_at_once() {
        let (outbox, transport) = paced_writer();
        outbox.push(Bytes::from_static(b"event\n"));
        let first = transport.until(1).await[0].0;
        outbox.push(Bytes::from_static(b"event\n"));
        // The writer waits out the pace when the answer comes.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(transport.writes().len(), 1, "the event waits for the pace");
        let answered = Instant::now();
        assert!(answered < first + PACE);
        outbox.push(Bytes::from_static(b"reply\n"));
        outbox.flush();
        let writes = transport.until(2).await;
        assert_eq!(writes[1], (answered, b"event\nreply\n".to_vec()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_finishing_session_writes_its_last_lines_without_waiting_for_the_pace() {
        let (outbox, transport) = paced_writer();
        outbox.push(Bytes::from_static(b"a\n"));
        let first = transport.until(1).await[0].0;
        let finished = Instant::now();
        assert!(finished < first + PACE);
        outbox.push(Bytes::from_static(b"bye\n"));
        outbox.finish();
        let writes = transport.until(2).await;
        assert_eq!(writes[1], (finished, b"bye\n".to_vec()));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_pace_every_event_goes_out_at_once() {
        let outbox = Arc::new(Outbox::new(1 << 20));
        let transport = spawn_writer(&outbox);
        for (i, line) in [b"a\n", b"b\n", b"c\n"].into_iter().enumerate() {
            let pushed = Instant::now();
            outbox.push(Bytes::from_static(line));
            let writes = transport.until(i + 1).await;
            assert_eq!(writes[i], (pushed, line.to_vec()));
        }
    }

    #[tokio::test]
    async fn small_lines_go_out_together_on_a_transport_without_vectored_writes() {
        let outbox = Outbox::new(1 << 20);
        let mut expected = Vec::new();
        for i in 0..1000 {
            let line = Bytes::from(format!("line {i}\n"));
            expected.extend_from_slice(&line);
            outbox.push(line);
        }
        outbox.finish();
        let mut transport = Recorder::new(usize::MAX, false);
        outbox.write_to(&mut transport, &WriteTurns::new()).await;
        assert!(transport.out == expected, "every line, in order");
        assert!(
            transport.seen.len() < 10,
            "1000 small lines in a few writes, not {}",
            transport.seen.len()
        );
    }

    fn line(bytes: usize) -> Bytes {
        Bytes::from(vec![b'x'; bytes])
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_drops_only_outboxes_whose_client_took_nothing_for_the_grace() {
        let budget = OutboxBudget::new(2_000);
        let outbox = || Arc::new(Outbox::new(1 << 20).budgeted(&budget));
        // A reader whose writer the server has not run for a while: lines
        // queue up, but its transport never refused any.
        let reader = outbox();
        // Clients that do not read: their writes wait for ever.
        let slow: Vec<Arc<Outbox>> = (0..3).map(|_| outbox()).collect();
        for outbox in &slow {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.write_to(Stuck, &WriteTurns::new()).await });
        }
        let step = Duration::from_millis(100);
        let mut spent_at = None;
        for round in 0u32.. {
            assert!(round < 100, "the budget never dropped anyone");
            for outbox in std::iter::once(&reader).chain(&slow) {
                outbox.push(line(100));
            }
            // The writers run: the slow ones' writes are pending from the
            // first round on.
            tokio::task::yield_now().await;
            assert_eq!(reader.overflowed(), None, "the reader, round {round}");
            if budget.spent() && spent_at.is_none() {
                spent_at = Some(step * round);
            }
            // None dropped before its write was pending for the grace,
            // though the budget was spent long before.
            let dropped = slow.iter().filter(|o| o.overflowed().is_some()).count();
            assert!(
                dropped == 0 || step * round >= SLOW_READER_GRACE,
                "{dropped} dropped at {:?}",
                step * round
            );
            if dropped == slow.len() {
                break;
            }
            tokio::time::advance(step).await;
        }
        assert!(spent_at.unwrap() < SLOW_READER_GRACE / 2, "{spent_at:?}");
        for outbox in &slow {
            assert_eq!(
                outbox.overflowed(),
                Some(Overflow::Budget {
                    grace: SLOW_READER_GRACE
                })
            );
        }
        assert_eq!(budget.drops(), 3);
        // The slow ones' writers are gone, and with them their charges: what
        // is left is the reader's queue.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let queued = reader
            .queued()
            .iter()
            .map(|l| l.len() + SLOT_BYTES)
            .sum::<usize>();
        assert_eq!(budget.used(), queued);
        // A write pending, but within budget: kept.
        let big = OutboxBudget::new(1 << 20);
        let stuck = Arc::new(Outbox::new(1 << 20).budgeted(&big));
        tokio::spawn({
            let stuck = stuck.clone();
            async move { stuck.write_to(Stuck, &WriteTurns::new()).await }
        });
        assert!(stuck.push(line(100)));
        tokio::task::yield_now().await;
        tokio::time::advance(SLOW_READER_GRACE * 2).await;
        assert!(stuck.push(line(100)));
        assert_eq!(stuck.overflowed(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_took_nothing_is_dropped_once_the_budget_is_spent_though_given_nothing_more()
     {
        let budget = OutboxBudget::new(1_000);
        let idle = Arc::new(Outbox::new(1 << 20).budgeted(&budget));
        let writer = tokio::spawn({
            let idle = idle.clone();
            async move { idle.write_to(Stuck, &WriteTurns::new()).await }
        });
        // A line whose write stays pending: within budget, kept however long.
        assert!(idle.push(line(100)));
        tokio::task::yield_now().await;
        tokio::time::advance(IDLE_READER_GRACE * 3).await;
        assert_eq!(idle.overflowed(), None);
        // Another session's lines spend the budget; the idle client is given
        // nothing more, yet is dropped within a grace, not before the grace
        // since its write went pending (the test's start).
        let other = Outbox::new(1 << 20).budgeted(&budget);
        for _ in 0..10 {
            assert!(other.push(line(100)));
        }
        assert!(budget.spent());
        // A client whose write went pending just now is kept well past the
        // 1 s rule for a line queued: a slow reader may take that long.
        let fresh = Arc::new(Outbox::new(1 << 20).budgeted(&budget));
        let fresh_writer = tokio::spawn({
            let fresh = fresh.clone();
            async move { fresh.write_to(Stuck, &WriteTurns::new()).await }
        });
        assert!(fresh.push(line(100)));
        tokio::time::sleep(SLOW_READER_GRACE * 2).await;
        assert_eq!(fresh.overflowed(), None);
        tokio::time::advance(IDLE_READER_GRACE).await;
        let end = tokio::time::timeout(Duration::from_millis(1), writer)
            .await
            .expect("the idle client's writer ended")
            .expect("the writer did not panic");
        assert_eq!(end, WriterEnd::Interrupted);
        assert_eq!(
            idle.overflowed(),
            Some(Overflow::Budget {
                grace: IDLE_READER_GRACE
            })
        );
        let end = tokio::time::timeout(SLOW_READER_GRACE, fresh_writer)
            .await
            .expect("the fresh client's writer ended")
            .expect("the writer did not panic");
        assert_eq!(end, WriterEnd::Interrupted);
        assert_eq!(
            fresh.overflowed(),
            Some(Overflow::Budget {
                grace: IDLE_READER_GRACE
            })
        );
        assert_eq!(budget.drops(), 2);
        // What the idle clients held is back; the other keeps its queue.
        tokio::task::yield_now().await;
        assert_eq!(other.overflowed(), None);
        assert_eq!(budget.used(), 10 * (100 + SLOT_BYTES));
    }

    #[tokio::test(start_paused = true)]
    async fn a_closing_client_is_left_to_its_own_bound_by_the_budget() {
        let budget = OutboxBudget::new(1_000);
        let closing = Arc::new(Outbox::new(1 << 20).budgeted(&budget));
        let writer = tokio::spawn({
            let closing = closing.clone();
            async move { closing.write_to(Stuck, &WriteTurns::new()).await }
        });
        assert!(closing.push(line(100)));
        tokio::task::yield_now().await;
        // Its last lines are pending when it is told to finish; then the
        // budget is spent and its client takes nothing for many graces.
        closing.finish();
        let other = Outbox::new(1 << 20).budgeted(&budget);
        for _ in 0..10 {
            assert!(other.push(line(100)));
        }
        assert!(budget.spent());
        tokio::time::sleep(IDLE_READER_GRACE * 3).await;
        // The session's own handshake timeout ends it, not the budget.
        assert_eq!(closing.overflowed(), None);
        assert_eq!(budget.drops(), 0);
        assert!(!writer.is_finished());
        writer.abort();
    }

    #[tokio::test]
    async fn the_budget_gets_back_what_is_written_discarded_or_dropped() {
        let budget = OutboxBudget::new(1 << 20);
        // Written.
        let outbox = Outbox::new(1 << 20).budgeted(&budget);
        outbox.push(line(100));
        outbox.finish();
        outbox.write_to(&mut Vec::new(), &WriteTurns::new()).await;
        assert_eq!(budget.used(), 0);
        // Killed.
        let outbox = Outbox::new(1 << 20).budgeted(&budget);
        outbox.push(line(100));
        outbox.kill();
        assert_eq!(budget.used(), 0);
        // Dropped with lines queued: the outbox no longer counts either.
        let outbox = Outbox::new(1 << 20).budgeted(&budget);
        outbox.push(line(100));
        drop(outbox);
        assert_eq!(budget.used(), 0);
        // Taken by a writer stuck in its write: still held until the
        // session is dropped.
        let outbox = Arc::new(Outbox::new(1 << 20).budgeted(&budget));
        outbox.push(line(100));
        let writer = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.write_to(Stuck, &WriteTurns::new()).await }
        });
        while !outbox.lock().queue.is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(budget.used(), 100 + SLOT_BYTES);
        outbox.kill();
        assert_eq!(writer.await.unwrap(), WriterEnd::Interrupted);
        assert_eq!(budget.used(), 0);
    }
}
