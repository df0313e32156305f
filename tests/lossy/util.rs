//! Helpers for the netsim tests: impaired sockets on 127.0.0.1, a paced sender that stamps
//! sequence numbers and send times into datagrams, and a collector that records arrivals.

#![allow(dead_code)] // not every helper is used by every scenario

use std::future::poll_fn;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use chatmesh::netsim::{ImpairHandle, Impairment, bind};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::Mutex as AsyncMutex;

/// Most datagrams a sender lets sit in the receiver's kernel buffer (default buffers hold ~270).
pub const MAX_BACKLOG: u64 = 128;

/// Size of the test datagrams: sequence number, send time, padding.
pub const DATAGRAM_LEN: usize = 64;

/// Time zero shared by senders and receivers, so a datagram can carry its send time.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`].
pub fn now_nanos() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// One socket under test.
pub struct Node {
    pub socket: Arc<dyn AsyncUdpSocket>,
    pub handle: ImpairHandle,
    pub addr: SocketAddr,
    poller: AsyncMutex<Pin<Box<dyn UdpPoller>>>,
}

/// Binds an impaired socket on 127.0.0.1 (port 0); `""` means no impairment.
pub fn node(spec: &str) -> Result<Node> {
    let impairment = if spec.is_empty() {
        None
    } else {
        Some(Impairment::parse(spec).with_context(|| format!("parsing {spec:?}"))?)
    };
    let (socket, handle) = bind("127.0.0.1:0".parse()?, impairment).context("bind")?;
    let addr = socket.local_addr()?;
    let poller = AsyncMutex::new(socket.clone().create_io_poller());
    Ok(Node {
        socket,
        handle,
        addr,
        poller,
    })
}

impl Node {
    /// Sends one transmit, waiting for writability like quinn does.
    pub async fn send_transmit(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        loop {
            match self.socket.try_send(transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut poller = self.poller.lock().await;
                    poll_fn(|cx| poller.as_mut().poll_writable(cx)).await?;
                }
                other => return other,
            }
        }
    }

    /// Sends one test datagram with `seq` and the current time.
    pub async fn send_seq(&self, to: SocketAddr, seq: u64) -> io::Result<()> {
        let payload = stamp(seq);
        self.send_transmit(&Transmit {
            destination: to,
            ecn: None,
            contents: &payload,
            segment_size: None,
            src_ip: None,
        })
        .await
    }

    /// Sends test datagrams numbered `seqs`, holding back while `backlog(sent_so_far)` (the
    /// datagrams sitting in the receiver's kernel buffer) is high: a kernel drop would be real
    /// loss on top of ours. A stall longer than a second gives up waiting and goes on.
    pub async fn send_flow(
        &self,
        to: SocketAddr,
        seqs: std::ops::Range<u64>,
        backlog: impl Fn(u64) -> u64,
    ) -> io::Result<()> {
        for (sent, seq) in seqs.enumerate() {
            let stall = Instant::now();
            while backlog(sent as u64) > MAX_BACKLOG && stall.elapsed() < Duration::from_secs(1) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            self.send_seq(to, seq).await?;
        }
        Ok(())
    }
}

/// A test datagram: sequence number and send time, padded to [`DATAGRAM_LEN`].
pub fn stamp(seq: u64) -> [u8; DATAGRAM_LEN] {
    let mut payload = [0u8; DATAGRAM_LEN];
    payload[..8].copy_from_slice(&seq.to_le_bytes());
    payload[8..16].copy_from_slice(&now_nanos().to_le_bytes());
    payload
}

/// One datagram as the receiving application saw it.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub seq: u64,
    pub from: SocketAddr,
    pub len: usize,
    /// Time between the send stamp and the arrival.
    pub latency: Duration,
}

/// Records every datagram a socket receives, in arrival order, until dropped.
pub struct Collector {
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Starts receiving on `node`'s socket through `AsyncUdpSocket::poll_recv`.
    pub fn start(node: &Node) -> Self {
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let socket = node.socket.clone();
        let sink = arrivals.clone();
        let task = tokio::spawn(async move {
            const BATCH: usize = 8;
            let mut storage = vec![vec![0u8; 64 * 1024]; BATCH];
            loop {
                let mut meta = [RecvMeta::default(); BATCH];
                let received = {
                    let mut bufs: Vec<IoSliceMut<'_>> =
                        storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                    poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta)).await
                };
                let Ok(count) = received else { continue };
                let now = now_nanos();
                let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
                for (m, buf) in meta.iter().zip(&storage).take(count) {
                    let stride = if m.stride == 0 { m.len } else { m.stride };
                    for datagram in buf[..m.len].chunks(stride) {
                        let (Some(seq), Some(sent)) =
                            (read_u64(datagram, 0), read_u64(datagram, 8))
                        else {
                            continue;
                        };
                        sink.push(Arrival {
                            seq,
                            from: m.addr,
                            len: datagram.len(),
                            latency: Duration::from_nanos(now.saturating_sub(sent)),
                        });
                    }
                }
            }
        });
        Collector { arrivals, task }
    }

    /// A copy of the arrivals so far.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many datagrams arrived so far.
    pub fn count(&self) -> usize {
        self.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Forgets the arrivals so far.
    pub fn clear(&self) {
        self.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn read_u64(datagram: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = datagram.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Serializes the socket tests of one binary: on a 2-core machine, parallel tests would starve
/// each other's receivers and turn latency bounds into noise.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: AsyncMutex<()> = AsyncMutex::const_new(());
    SERIAL.lock().await
}

/// Polls `condition` every few milliseconds until it holds or `deadline` passes.
pub async fn wait_for(deadline: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
