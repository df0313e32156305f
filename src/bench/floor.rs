//! The floor of `bench claims`: a server that speaks the client protocol's
//! claims and nothing else, in one process with no cluster, so that the same
//! load generator shows what the workload costs this machine before any
//! cluster-wide agreement.
//!
//! It listens on several ports, one "server" each, with a main hall each. A
//! name is granted if it is not in one shared set, and freed when its
//! client hangs up: contested names are still granted once, so the
//! generator's checks hold. It does what the protocol makes a server do for
//! these requests, the main hall's `roomchange` broadcasts included (on a
//! hang-up too: the room's deletion moves its owner to the main hall, then
//! the owner quits from there), and nothing more: no other request, no name
//! validation or JSON escaping (the generator's names need neither), one
//! set for identities and room ids (the generator's never clash), no limits,
//! no timeouts, no logging. So it is a floor, not chatmesh without its
//! cluster. It is started by the bench (`chatmesh claims-floor`, a hidden
//! command) on loopback only.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::lines::LineReader;

/// Longest request line read.
const MAX_LINE: usize = 1024;

/// What one connection is sent: whole lines.
type Outbox = mpsc::UnboundedSender<Bytes>;

/// Connections in a main hall, by connection number.
type Hall = HashMap<u64, Outbox>;

/// The state shared by every port.
#[derive(Default)]
struct Floor {
    /// Identities and room ids granted and not yet freed.
    names: Mutex<HashSet<String>>,
    next_connection: AtomicU64,
}

/// One port: a server with its main hall.
struct Port {
    hall_name: String,
    hall: Mutex<Hall>,
}

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow)]
    identity: Option<&'a str>,
    #[serde(borrow)]
    roomid: Option<&'a str>,
}

/// Serves the claims protocol on 127.0.0.1 at each of `ports` until killed.
pub async fn serve(ports: &[u16]) -> Result<()> {
    let floor = Arc::new(Floor::default());
    let mut accepting = tokio::task::JoinSet::new();
    for (i, &port) in ports.iter().enumerate() {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
        let port = Arc::new(Port {
            hall_name: format!("MainHall-f{}", i + 1),
            hall: Mutex::default(),
        });
        let floor = floor.clone();
        accepting.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(session(stream, floor.clone(), port.clone()));
                    }
                    // Out of descriptors, say: do not spin on it.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
    }
    println!("claims floor listening on {ports:?}");
    accepting.join_next().await;
    Ok(())
}

fn roomchange(identity: &str, former: &str, room: &str) -> Bytes {
    Bytes::from(format!(
        "{{\"type\":\"roomchange\",\"identity\":\"{identity}\",\"former\":\"{former}\",\"roomid\":\"{room}\"}}\n"
    ))
}

fn broadcast(hall: &Hall, line: &Bytes) {
    for member in hall.values() {
        let _ = member.send(line.clone());
    }
}

impl Port {
    fn hall(&self) -> std::sync::MutexGuard<'_, Hall> {
        self.hall.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Floor {
    /// Takes `name` if it is free.
    fn claim(&self, name: &str) -> bool {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        !names.contains(name) && names.insert(name.to_owned())
    }

    fn free(&self, name: &str) {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        names.remove(name);
    }
}

/// One client: `newidentity`, then `createroom`s until one is granted;
/// hanging up deletes its room and takes it out of the main hall, as a quit
/// does, and frees its names. Each change of the main hall and its
/// broadcast happen under one lock, so every member sees them in one order.
async fn session(stream: TcpStream, floor: Arc<Floor>, port: Arc<Port>) {
    let _ = stream.set_nodelay(true);
    let id = floor.next_connection.fetch_add(1, Ordering::Relaxed);
    let (read, mut write) = stream.into_split();
    let (outbox, mut queued) = mpsc::unbounded_channel::<Bytes>();
    // Everything queued while a write was under way goes out in one write.
    let writer = tokio::spawn(async move {
        let mut batch = Vec::new();
        while let Some(line) = queued.recv().await {
            batch.extend_from_slice(&line);
            while let Ok(line) = queued.try_recv() {
                batch.extend_from_slice(&line);
            }
            if write.write_all(&batch).await.is_err() {
                return;
            }
            batch.clear();
        }
    });
    let mut lines = LineReader::new(read, MAX_LINE);
    let mut identity: Option<String> = None;
    let mut room: Option<String> = None;
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(request) = serde_json::from_slice::<Request>(line) else {
            continue;
        };
        match (request.kind, request.identity, request.roomid, &identity) {
            ("newidentity", Some(name), _, None) => {
                if !floor.claim(name) {
                    let _ = outbox.send(Bytes::from_static(
                        b"{\"type\":\"newidentity\",\"approved\":\"false\"}\n",
                    ));
                    break;
                }
                let _ = outbox.send(Bytes::from_static(
                    b"{\"type\":\"newidentity\",\"approved\":\"true\"}\n",
                ));
                let mut hall = port.hall();
                hall.insert(id, outbox.clone());
                broadcast(&hall, &roomchange(name, "", &port.hall_name));
                identity = Some(name.to_owned());
            }
            ("createroom", _, Some(name), Some(me)) => {
                let granted = room.is_none() && floor.claim(name);
                let approved = if granted { "true" } else { "false" };
                let _ = outbox.send(Bytes::from(format!(
                    "{{\"type\":\"createroom\",\"roomid\":\"{name}\",\"approved\":\"{approved}\"}}\n"
                )));
                if granted {
                    let change = roomchange(me, &port.hall_name, name);
                    let mut hall = port.hall();
                    hall.remove(&id);
                    let _ = outbox.send(change.clone());
                    broadcast(&hall, &change);
                    room = Some(name.to_owned());
                }
            }
            _ => {}
        }
    }
    if let Some(me) = &identity {
        let mut hall = port.hall();
        hall.remove(&id);
        if let Some(room) = &room {
            // The room is deleted: its owner (gone) moves to the main hall...
            broadcast(&hall, &roomchange(me, room, &port.hall_name));
        }
        // ...and quits from there.
        broadcast(&hall, &roomchange(me, &port.hall_name, ""));
        drop(hall);
        floor.free(me);
    }
    if let Some(room) = &room {
        floor.free(room);
    }
    drop(outbox);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::procs::free_ports;
    use crate::bench::wire::{self, chat_claim, connect_plain};

    /// The floor grants a name once across its ports, frees it when its
    /// client hangs up, and sends the main hall's roomchanges.
    #[tokio::test]
    async fn grants_each_name_once_across_ports_and_frees_it_on_hang_up() {
        let ports = free_ports(2).expect("free ports");
        let floor_ports = ports.clone();
        let server = tokio::spawn(async move { serve(&floor_ports).await });
        let listening = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut first = loop {
            if let Ok(connection) = connect_plain(ports[0]).await {
                break connection;
            }
            assert!(!server.is_finished(), "the floor did not start");
            assert!(
                std::time::Instant::now() < listening,
                "the floor never listened"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        let (reader, writer) = (&mut first.0, &mut first.1);
        assert!(
            chat_claim(reader, writer, "newidentity", "identity", "Adel")
                .await
                .unwrap()
        );
        let arrived = wire::chat_reply(reader, "roomchange", "arriving")
            .await
            .unwrap();
        assert_eq!(arrived["roomid"], "MainHall-f1");

        // The same identity on the other port: refused, and closed.
        let (mut reader2, mut writer2) = connect_plain(ports[1]).await.unwrap();
        assert!(
            !chat_claim(
                &mut reader2,
                &mut writer2,
                "newidentity",
                "identity",
                "Adel"
            )
            .await
            .unwrap()
        );
        assert!(
            reader2.next_line().await.unwrap().is_none(),
            "closed after a refusal"
        );

        // A room id: granted once, announced to its creator.
        assert!(
            chat_claim(reader, writer, "createroom", "roomid", "jokes")
                .await
                .unwrap()
        );
        let moved = wire::chat_reply(reader, "roomchange", "moving")
            .await
            .unwrap();
        assert_eq!(
            (moved["former"].as_str(), moved["roomid"].as_str()),
            (Some("MainHall-f1"), Some("jokes"))
        );
        let (mut reader3, mut writer3) = connect_plain(ports[1]).await.unwrap();
        assert!(
            chat_claim(
                &mut reader3,
                &mut writer3,
                "newidentity",
                "identity",
                "Maria"
            )
            .await
            .unwrap()
        );
        assert!(
            !chat_claim(&mut reader3, &mut writer3, "createroom", "roomid", "jokes")
                .await
                .unwrap()
        );

        // Hanging up deletes the room, moving its owner to the main hall,
        // then quits from there: the main hall hears both.
        let (mut watcher, mut watcher_writer) = connect_plain(ports[0]).await.unwrap();
        assert!(
            chat_claim(
                &mut watcher,
                &mut watcher_writer,
                "newidentity",
                "identity",
                "Watch"
            )
            .await
            .unwrap()
        );
        drop(first);
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let line = wire::chat_reply(&mut watcher, "roomchange", "watching")
                .await
                .unwrap();
            seen.push((
                line["identity"].to_string(),
                line["former"].to_string(),
                line["roomid"].to_string(),
            ));
        }
        let change =
            |i: &str, f: &str, r: &str| (format!("{i:?}"), format!("{f:?}"), format!("{r:?}"));
        assert_eq!(
            seen,
            [
                change("Watch", "", "MainHall-f1"),
                change("Adel", "jokes", "MainHall-f1"),
                change("Adel", "MainHall-f1", ""),
            ]
        );

        // Hanging up frees both names.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let (mut r, mut w) = connect_plain(ports[1]).await.unwrap();
            if chat_claim(&mut r, &mut w, "newidentity", "identity", "Adel")
                .await
                .unwrap()
            {
                assert!(
                    chat_claim(&mut r, &mut w, "createroom", "roomid", "jokes")
                        .await
                        .unwrap()
                );
                break;
            }
            assert!(std::time::Instant::now() < deadline, "Adel never freed");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        server.abort();
    }
}
