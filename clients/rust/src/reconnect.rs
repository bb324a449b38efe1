//! A client that stays connected: exponential backoff with jitter between
//! attempts (at most `max_attempts`, 10 by default, as seed 000 says), no
//! retry after 4001/4003, application pings, and the caches of [`crate::cache`].
//!
//! It follows each room's position ([`crate::positions`]) and resumes by
//! itself on every reconnect: the `since` query parameter names what it has
//! seen, so the server replays what was missed, once, in order (a frame
//! already seen is dropped all the same). A room the server could not
//! recover is signalled as [`ClientEvent::Resync`], and the orders cache
//! refetches that room's orders over HTTP (`GET /api/orders`, every page).
//!
//! One task owns the socket; it selects over the socket's inbound queue (a
//! cancel-safe mpsc receive: the frame reading itself happens in the
//! socket's reader task), outgoing messages, the ping timer and close. A
//! second task does the refetches, so the socket never waits on HTTP.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::cache::{DriverPositions, OrdersCache, is_orders_room};
use crate::positions::{Positions, RoomPosition, Seen};
use crate::{Incoming, Socket, Tls};

/// Close codes after which reconnecting cannot help.
pub const FATAL: [u16; 2] = [4001, 4003];

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub addr: SocketAddr,
    /// Endpoint path without the token, e.g. `/ws`.
    pub path: String,
    pub token: String,
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// `{"type":"ping"}` period; `None` = off.
    pub ping_every: Option<Duration>,
    /// Positions to resume from on the first connection (e.g. a
    /// [`Positions::snapshot`] saved by an earlier run).
    pub since: BTreeMap<String, RoomPosition>,
    /// Refetch a resynced room's orders with `GET /api/orders` on `addr`
    /// (default on, except on the driver endpoint, whose frames are not
    /// orders events).
    pub reload_orders: bool,
    /// `wss://` (and `https://` for the refetch) when set; plain otherwise.
    pub tls: Option<Tls>,
}

impl ClientConfig {
    pub fn new(addr: SocketAddr, path: &str, token: &str) -> ClientConfig {
        ClientConfig {
            addr,
            path: path.to_string(),
            token: token.to_string(),
            max_attempts: 10,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            ping_every: Some(Duration::from_secs(25)),
            since: BTreeMap::new(),
            reload_orders: !path.starts_with("/ws/driver/"),
            tls: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    Connected,
    Message(Value),
    Disconnected(u16),
    Reconnecting {
        attempt: u32,
        delay: Duration,
    },
    /// No more attempts: a fatal close code, or `max_attempts` reached.
    GaveUp(u16),
    /// The server replays the `missed` events of `room` (they follow as
    /// messages, before live ones).
    Recovered {
        room: String,
        missed: u64,
    },
    /// `room`'s missed events cannot be replayed (`reason`: the server's
    /// `epoch_changed` / `too_old` / `unavailable`, or `not_recovered`,
    /// `no_position`, `bad_since`: see [`crate::positions`]): refetch what
    /// it carries. The orders cache does so by itself when `reload_orders`
    /// is on.
    Resync {
        room: String,
        reason: String,
    },
    /// A frame the client had already seen (offset ≤ its position), dropped.
    Duplicate {
        room: String,
        offset: u64,
    },
    /// The orders cache was refetched for `rooms`: `orders` orders listed,
    /// `changes` made to the cache.
    OrdersReloaded {
        rooms: Vec<String>,
        orders: usize,
        changes: usize,
    },
    /// The refetch failed; the rooms are tried again with the next resync.
    ReloadFailed {
        rooms: Vec<String>,
        error: String,
    },
}

/// The wait before attempt `n` (1-based): base·2^(n−1), capped, times a
/// jitter factor `j` in [0.5, 1.5).
pub fn backoff_delay(n: u32, base: Duration, max: Duration, j: f64) -> Duration {
    let raw = base
        .saturating_mul(2u32.saturating_pow(n.saturating_sub(1).min(20)))
        .min(max);
    raw.mul_f64(j.clamp(0.5, 1.5))
}

/// Which envelope a path's dialect puts a message body in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Envelope {
    Data,
    Payload,
    Flat,
}

fn envelope_of(path: &str) -> Envelope {
    let path = path.split('?').next().unwrap_or(path);
    if path.starts_with("/ws/driver/orders") {
        Envelope::Flat
    } else if path == "/ws" || path == "/ws/" {
        Envelope::Payload
    } else {
        Envelope::Data
    }
}

fn message(env: Envelope, ty: &str, body: Value) -> String {
    let v = match (env, body) {
        (Envelope::Data, b) => json!({"type": ty, "data": b}),
        (Envelope::Payload, b) => json!({"type": ty, "payload": b}),
        (Envelope::Flat, Value::Object(mut m)) => {
            m.insert("type".into(), ty.into());
            Value::Object(m)
        }
        (Envelope::Flat, b) => json!({"type": ty, "data": b}),
    };
    v.to_string()
}

enum Out {
    Text(String),
    Join(String),
    Leave(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Client {
    events: mpsc::UnboundedReceiver<ClientEvent>,
    outgoing: mpsc::UnboundedSender<Out>,
    pub orders: Arc<Mutex<OrdersCache>>,
    pub drivers: Arc<Mutex<DriverPositions>>,
    /// What the client has seen per room (the next reconnect's `since`).
    pub positions: Arc<Mutex<Positions>>,
    task: tokio::task::JoinHandle<()>,
    reloader: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(r) = &self.reloader {
            r.abort();
        }
    }
}

impl Client {
    pub fn start(config: ClientConfig) -> Client {
        let (ev_tx, events) = mpsc::unbounded_channel();
        let (outgoing, out_rx) = mpsc::unbounded_channel();
        let orders = Arc::new(Mutex::new(OrdersCache::default()));
        let drivers = Arc::new(Mutex::new(DriverPositions::default()));
        let positions = Arc::new(Mutex::new(Positions::with(config.since.clone())));
        let (reload_tx, reloader) = if config.reload_orders {
            let (tx, rx) = mpsc::unbounded_channel();
            let r = Reloader {
                addr: config.addr,
                tls: config.tls.clone(),
                token: config.token.clone(),
                orders: orders.clone(),
                events: ev_tx.clone(),
            };
            (Some(tx), Some(tokio::spawn(r.run(rx))))
        } else {
            (None, None)
        };
        let shared = Shared {
            events: ev_tx,
            orders: orders.clone(),
            drivers: drivers.clone(),
            positions: positions.clone(),
            reload: reload_tx,
        };
        let task = tokio::spawn(run(config, shared, out_rx));
        Client {
            events,
            outgoing,
            orders,
            drivers,
            positions,
            task,
            reloader,
        }
    }

    /// The next event; `None` once the client gave up and all was read.
    pub async fn next_event(&mut self) -> Option<ClientEvent> {
        self.events.recv().await
    }

    /// Queues a text message (sent on the current or next connection).
    pub fn send(&self, text: impl Into<String>) {
        let _ = self.outgoing.send(Out::Text(text.into()));
    }

    /// Joins `room` (`join-room`), again after every reconnect, resuming
    /// from the client's position in it (`since`).
    pub fn join_room(&self, room: &str) {
        let _ = self.outgoing.send(Out::Join(room.to_string()));
    }

    /// Leaves `room` and forgets its position.
    pub fn leave_room(&self, room: &str) {
        let _ = self.outgoing.send(Out::Leave(room.to_string()));
    }
}

/// What the socket task shares with the [`Client`] and the reloader.
struct Shared {
    events: mpsc::UnboundedSender<ClientEvent>,
    orders: Arc<Mutex<OrdersCache>>,
    drivers: Arc<Mutex<DriverPositions>>,
    positions: Arc<Mutex<Positions>>,
    reload: Option<mpsc::UnboundedSender<String>>,
}

impl Shared {
    /// One text frame: positions (a duplicate is dropped), caches, events.
    fn on_text(&self, v: Value, manual: &BTreeSet<String>) {
        let seen = lock(&self.positions).observe(&v, manual);
        if let Seen::Duplicate { room, offset } = seen {
            let _ = self.events.send(ClientEvent::Duplicate { room, offset });
            return;
        }
        lock(&self.orders).apply(&v);
        lock(&self.drivers).apply(&v);
        let _ = self.events.send(ClientEvent::Message(v));
        let Seen::Verdicts(verdicts) = seen else {
            return;
        };
        for (room, missed) in verdicts.recovered {
            let _ = self.events.send(ClientEvent::Recovered { room, missed });
        }
        for (room, reason) in verdicts.resync {
            if let Some(r) = &self.reload
                && is_orders_room(&room)
            {
                let _ = r.send(room.clone());
            }
            let _ = self.events.send(ClientEvent::Resync { room, reason });
        }
    }
}

async fn run(config: ClientConfig, shared: Shared, mut outgoing: mpsc::UnboundedReceiver<Out>) {
    let env = envelope_of(&config.path);
    let join = |positions: &Mutex<Positions>, room: &str| {
        let mut body = json!({"roomId": room});
        if let Some(since) = lock(positions).since_for(room) {
            body["since"] = since;
        }
        message(env, "join-room", body)
    };
    let sep = if config.path.contains('?') { '&' } else { '?' };
    let base = format!("{}{sep}token={}", config.path, config.token);
    // Rooms joined by hand: joined again on every connection.
    let mut manual = BTreeSet::new();
    // Messages queued while there was no socket: sent on the next one.
    let mut queued: Vec<String> = Vec::new();
    let mut attempt = 0u32;
    loop {
        // Resume: what this client has seen, for the rooms the server puts it in.
        let path = match lock(&shared.positions).begin(&manual) {
            Some(since) => format!("{base}&since={since}"),
            None => base.clone(),
        };
        let code = match Socket::connect_with(config.addr, &path, None, 1024, config.tls.as_ref())
            .await
        {
            Err(_) => 1006,
            Ok(mut sock) => {
                attempt = 0;
                let _ = shared.events.send(ClientEvent::Connected);
                let mut ping = config
                    .ping_every
                    .map(|p| tokio::time::interval_at(tokio::time::Instant::now() + p, p));
                let mut broken = false;
                for room in &manual {
                    broken |= sock
                        .send_text(&join(&shared.positions, room))
                        .await
                        .is_err();
                }
                for text in std::mem::take(&mut queued) {
                    broken |= sock.send_text(&text).await.is_err();
                }
                let code = loop {
                    if broken {
                        break 1006;
                    }
                    let tick = async {
                        match ping.as_mut() {
                            Some(p) => {
                                p.tick().await;
                            }
                            None => std::future::pending::<()>().await,
                        }
                    };
                    tokio::select! {
                        m = sock.recv() => match m {
                            Some(Incoming::Text(b)) => {
                                let Ok(v) = serde_json::from_slice::<Value>(&b) else { continue };
                                if v.get("type").and_then(Value::as_str) == Some("pong") {
                                    continue;
                                }
                                shared.on_text(v, &manual);
                            }
                            Some(Incoming::Close(c)) => break c,
                            None => break 1006,
                        },
                        o = outgoing.recv() => {
                            let text = match o {
                                Some(Out::Text(text)) => text,
                                Some(Out::Join(room)) => {
                                    manual.insert(room.clone());
                                    join(&shared.positions, &room)
                                }
                                Some(Out::Leave(room)) => {
                                    manual.remove(&room);
                                    lock(&shared.positions).forget(&room);
                                    message(env, "leave-room", json!({"roomId": room}))
                                }
                                None => return, // the Client was dropped
                            };
                            broken = sock.send_text(&text).await.is_err();
                        }
                        _ = tick => broken = sock.send_text(r#"{"type":"ping"}"#).await.is_err(),
                    }
                };
                let _ = shared.events.send(ClientEvent::Disconnected(code));
                code
            }
        };
        if FATAL.contains(&code) || attempt >= config.max_attempts {
            let _ = shared.events.send(ClientEvent::GaveUp(code));
            return;
        }
        attempt += 1;
        let j = rand::rng().random_range(0.5..1.5);
        let delay = backoff_delay(attempt, config.base_delay, config.max_delay, j);
        let _ = shared
            .events
            .send(ClientEvent::Reconnecting { attempt, delay });
        // Joins and leaves asked for meanwhile are taken into account.
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                o = outgoing.recv() => match o {
                    Some(Out::Join(room)) => {
                        manual.insert(room);
                    }
                    Some(Out::Leave(room)) => {
                        manual.remove(&room);
                        lock(&shared.positions).forget(&room);
                    }
                    Some(Out::Text(text)) => queued.push(text),
                    None => return,
                },
            }
        }
    }
}

/// Refetches the orders of resynced rooms, one request chain at a time;
/// the rooms that arrive meanwhile are gathered into the next.
struct Reloader {
    addr: SocketAddr,
    tls: Option<Tls>,
    token: String,
    orders: Arc<Mutex<OrdersCache>>,
    events: mpsc::UnboundedSender<ClientEvent>,
}

/// At most this many pages of 200 orders per refetch; a longer list is
/// applied without removals.
const MAX_PAGES: usize = 50;

impl Reloader {
    async fn run(self, mut rooms: mpsc::UnboundedReceiver<String>) {
        let mut failed: BTreeSet<String> = BTreeSet::new();
        while let Some(first) = rooms.recv().await {
            // The resyncs of one connect message come together.
            tokio::task::yield_now().await;
            let mut batch = std::mem::take(&mut failed);
            batch.insert(first);
            while let Ok(r) = rooms.try_recv() {
                batch.insert(r);
            }
            let batch: Vec<String> = batch.into_iter().collect();
            lock(&self.orders).begin_reload();
            match self.fetch().await {
                Ok((items, complete)) => {
                    let changes = lock(&self.orders).replace(&items, &batch, complete);
                    let _ = self.events.send(ClientEvent::OrdersReloaded {
                        rooms: batch,
                        orders: items.len(),
                        changes: changes.len(),
                    });
                }
                Err(error) => {
                    // Drop the live-change notes; keep the rooms for next time.
                    lock(&self.orders).replace(&[], &[], false);
                    failed.extend(batch.iter().cloned());
                    let _ = self.events.send(ClientEvent::ReloadFailed {
                        rooms: batch,
                        error,
                    });
                }
            }
        }
    }

    /// Every page of `GET /api/orders` on one kept-alive connection.
    async fn fetch(&self) -> Result<(Vec<Value>, bool), String> {
        let io = crate::connect_stream(self.addr, None, self.tls.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        let conn = tokio::spawn(conn);
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        let mut complete = false;
        for _ in 0..MAX_PAGES {
            let mut path = "/api/orders?limit=200".to_string();
            if let Some(c) = &cursor {
                path.push_str("&cursor=");
                path.push_str(&percent_encode(c));
            }
            let req = hyper::Request::get(path.as_str())
                .header("host", self.addr.to_string())
                .header("authorization", format!("Bearer {}", self.token))
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let res = send.send_request(req).await.map_err(|e| e.to_string())?;
            let status = res.status();
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                conn.abort();
                return Err(format!("GET /api/orders: {status}"));
            }
            let page: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
            if let Some(list) = page.get("items").and_then(Value::as_array) {
                items.extend(list.iter().cloned());
            }
            cursor = page
                .get("next_cursor")
                .and_then(Value::as_str)
                .map(str::to_string);
            if cursor.is_none() {
                complete = true;
                break;
            }
        }
        conn.abort();
        Ok((items, complete))
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let b = Duration::from_millis(100);
        let m = Duration::from_secs(1);
        assert_eq!(backoff_delay(1, b, m, 1.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(3, b, m, 1.0), Duration::from_millis(400));
        assert_eq!(backoff_delay(30, b, m, 1.0), m);
        assert_eq!(backoff_delay(1, b, m, 0.5), Duration::from_millis(50));
    }

    #[test]
    fn join_room_in_each_dialect() {
        let body = json!({"roomId": "x", "since": {"epoch": "E", "offset": 3}});
        assert_eq!(
            message(envelope_of("/"), "join-room", body.clone()),
            r#"{"data":{"roomId":"x","since":{"epoch":"E","offset":3}},"type":"join-room"}"#
        );
        assert_eq!(
            message(envelope_of("/ws?x=1"), "join-room", json!({"roomId": "x"})),
            r#"{"payload":{"roomId":"x"},"type":"join-room"}"#
        );
        assert_eq!(
            message(
                envelope_of("/ws/driver/orders/"),
                "join-room",
                json!({"roomId": "x"})
            ),
            r#"{"roomId":"x","type":"join-room"}"#
        );
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
    }
}
