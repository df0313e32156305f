//! A session's outbound queue: bounded in bytes, drained in batches by one
//! writer task, so a slow reader costs only its own memory and never stalls the
//! room that broadcasts to it.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The queue of lines waiting to be written to one client.
pub struct Outbox {
    state: Mutex<State>,
    wake: Notify,
    limit: usize,
    dropped: CancellationToken,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Bytes>,
    bytes: usize,
    /// Write what is queued, then close.
    finishing: bool,
    /// Close now, discarding the queue.
    dead: bool,
}

impl Outbox {
    /// An empty outbox that holds at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            limit,
            dropped: CancellationToken::new(),
        }
    }

    /// Queues a line. Returns false, and drops the whole session, when the
    /// client has let more than the limit pile up.
    pub fn push(&self, line: Bytes) -> bool {
        let mut state = self.lock();
        if state.dead || state.finishing {
            return !state.dead;
        }
        if state.bytes + line.len() > self.limit {
            state.dead = true;
            state.queue.clear();
            state.bytes = 0;
            drop(state);
            tracing::warn!(
                limit = self.limit,
                "session dropped: client too slow, outbox full"
            );
            self.dropped.cancel();
            self.wake.notify_one();
            return false;
        }
        state.bytes += line.len();
        state.queue.push_back(line);
        drop(state);
        self.wake.notify_one();
        true
    }

    /// Writes what is queued, then closes the connection. Later pushes are ignored.
    pub fn finish(&self) {
        self.lock().finishing = true;
        self.wake.notify_one();
    }

    /// Closes the connection now, discarding what is queued.
    pub fn kill(&self) {
        let mut state = self.lock();
        state.dead = true;
        state.queue.clear();
        state.bytes = 0;
        drop(state);
        self.dropped.cancel();
        self.wake.notify_one();
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

    /// Waits for queued lines and returns them as one buffer (a lone line as
    /// it is, shared with the other recipients); `None` when the writer should
    /// stop (finished and drained, or dead).
    async fn next_batch(&self) -> Option<Bytes> {
        loop {
            {
                let mut state = self.lock();
                if state.dead {
                    return None;
                }
                if state.queue.len() == 1 {
                    state.bytes = 0;
                    return state.queue.pop_front();
                }
                if !state.queue.is_empty() {
                    let mut batch = Vec::with_capacity(state.bytes);
                    for line in state.queue.drain(..) {
                        batch.extend_from_slice(&line);
                    }
                    state.bytes = 0;
                    return Some(batch.into());
                }
                if state.finishing {
                    return None;
                }
            }
            // notify_one keeps a permit when nobody waits, so a push between
            // the check above and this await is not lost.
            self.wake.notified().await;
        }
    }

    /// The writer task of a session: drains the outbox into the transport in
    /// batches (one write per batch) until finished or dropped.
    pub async fn write_to<W: AsyncWrite + Unpin>(&self, mut writer: W) {
        // Each batch is its own exact buffer, freed once written: an idle
        // session holds no write buffer.
        while let Some(batch) = self.next_batch().await {
            let written = async {
                writer.write_all(&batch).await?;
                writer.flush().await
            };
            if let Err(e) = written.await {
                tracing::debug!(error = %e, "client write failed");
                self.kill();
                return;
            }
        }
        let _ = writer.shutdown().await;
        // A session finished from outside (evicted) must stop reading too.
        self.dropped.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drains_in_order_then_finishes() {
        let outbox = Outbox::new(100);
        assert!(outbox.push(Bytes::from_static(b"a\n")));
        assert!(outbox.push(Bytes::from_static(b"b\n")));
        outbox.finish();
        assert!(outbox.push(Bytes::from_static(b"ignored\n")));
        let mut out = Vec::new();
        outbox.write_to(&mut out).await;
        assert_eq!(out, b"a\nb\n");
    }

    #[tokio::test]
    async fn overflow_drops_the_session() {
        let outbox = Outbox::new(10);
        assert!(outbox.push(Bytes::from_static(b"12345\n")));
        assert!(!outbox.push(Bytes::from_static(b"12345\n")));
        assert!(outbox.dropped().is_cancelled());
        let mut out = Vec::new();
        outbox.write_to(&mut out).await;
        assert!(out.is_empty(), "a dropped session's queue is discarded");
    }
}
