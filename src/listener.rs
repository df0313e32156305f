//! The client-facing listeners: TCP (the classic protocol's transport) and QUIC
//! on the same port number. Both hand their byte streams to the one session
//! logic, [`run_session`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::chat::{ChatServer, run_session};

/// Binds TCP on `addr`, then UDP on the port TCP got (so port 0 picks one
/// number free for both). Retries a few times if that UDP port is taken.
pub fn bind_client_ports(
    addr: SocketAddr,
    server_crypto: rustls::ServerConfig,
) -> Result<(TcpListener, quinn::Endpoint)> {
    let quic_config = quic_server_config(server_crypto)?;
    let attempts = if addr.port() == 0 { 20 } else { 1 };
    let mut last_error = None;
    for _ in 0..attempts {
        let tcp = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on TCP {addr}"))?;
        let bound = tcp.local_addr()?;
        match quinn::Endpoint::server(quic_config.clone(), bound) {
            Ok(endpoint) => {
                tcp.set_nonblocking(true)?;
                return Ok((TcpListener::from_std(tcp)?, endpoint));
            }
            Err(e) => last_error = Some(e),
        }
    }
    let e = last_error.expect("at least one attempt");
    Err(e).with_context(|| format!("cannot listen on UDP {addr} for QUIC clients"))
}

fn quic_server_config(crypto: rustls::ServerConfig) -> Result<quinn::ServerConfig> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
        .context("TLS config unusable for QUIC")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // One bidirectional stream per client session; no unidirectional streams.
    transport.max_concurrent_bidi_streams(1u8.into());
    transport.max_concurrent_uni_streams(0u8.into());
    // Clients do not use datagrams: do not buffer any.
    transport.datagram_receive_buffer_size(None);
    // A client line is at most 64 KiB by default; a 256 KiB stream window
    // keeps a few in flight without letting one idle client pin megabytes
    // (the default is 1.25 MB per stream).
    transport.stream_receive_window(quinn::VarInt::from_u32(256 * 1024));
    transport.receive_window(quinn::VarInt::from_u32(512 * 1024));
    transport.send_window(1024 * 1024);
    // Clients keep the connection alive (bundled client: every 10 s); a client
    // silent for 30 s is gone.
    transport.max_idle_timeout(Some(
        Duration::from_secs(30)
            .try_into()
            .expect("30 s is a valid idle timeout"),
    ));
    transport.keep_alive_interval(None);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Accepts TCP clients until `shutdown`.
pub async fn serve_tcp(
    listener: TcpListener,
    chat: Arc<ChatServer>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tasks.spawn(
            tcp_session(stream, peer, chat.clone(), shutdown.clone())
                .instrument(info_span!("client", transport = "tcp", %peer)),
        );
    }
}

async fn tcp_session(
    stream: TcpStream,
    peer: SocketAddr,
    chat: Arc<ChatServer>,
    shutdown: CancellationToken,
) {
    // Chat lines are small and latency matters more than packet count; the
    // outbox already batches writes.
    let _ = stream.set_nodelay(true);
    debug!("connected");
    let (reader, writer) = stream.into_split();
    run_session(chat, reader, writer, peer.ip(), shutdown).await;
    debug!("closed");
}

/// Accepts QUIC clients until `shutdown`, then closes the endpoint.
pub async fn serve_quic(
    endpoint: quinn::Endpoint,
    chat: Arc<ChatServer>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let peer = incoming.remote_address();
        tasks.spawn(
            quic_session(incoming, peer, chat.clone(), shutdown.clone())
                .instrument(info_span!("client", transport = "quic", %peer)),
        );
    }
    endpoint.close(0u32.into(), b"server shutting down");
    // Let the endpoint send the close frames before the process exits, so
    // clients learn at once instead of by idle timeout.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

async fn quic_session(
    incoming: quinn::Incoming,
    peer: SocketAddr,
    chat: Arc<ChatServer>,
    shutdown: CancellationToken,
) {
    let handshake = chat.limits().handshake_timeout;
    let opened = async {
        let connection = incoming.await?;
        let (send, recv) = connection.accept_bi().await?;
        Ok::<_, quinn::ConnectionError>((connection, send, recv))
    };
    let (connection, send, recv) = match tokio::time::timeout(handshake, opened).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => {
            debug!(error = %e, "QUIC client did not open a stream");
            return;
        }
        Err(_) => {
            // Nothing to answer on: a QUIC stream exists for the server only once
            // the client writes to it. The connection closes as it drops.
            info!("QUIC client opened no stream within the handshake timeout; closing");
            return;
        }
    };
    debug!("connected");
    run_session(chat, recv, send, peer.ip(), shutdown).await;
    // Closing at once would discard stream data not yet acknowledged (the last
    // replies); give the client a moment to read them and close first.
    let _ = tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
    connection.close(0u32.into(), b"bye");
    debug!("closed");
}
