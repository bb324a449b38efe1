//! `recovery`: SPEC §10's promise, proved by counting. S sockets over the
//! three dialects and K nodes, P publishers keep publishing numbered events
//! to the sockets' rooms through `POST /api/publish`, a fault hits the
//! cluster (`kill`: one node SIGKILLed; `rolling`: every node in turn
//! SIGTERMed, drained, restarted), every socket reconnects elsewhere with
//! `since` and checks its recovery outcome, and at the end every event a
//! publisher got 204 for must have reached every socket in its rooms exactly
//! once, in order per room.
//!
//! Rooms. Sockets are put in groups (`--group-size`); a group shares the
//! room `driver-{1000000+g}`:
//! - `/ws` and the driver endpoint: driver tokens with that `driver_id`, so
//!   the group room and the personal `user-{id}` are their auto rooms;
//! - `/`: admin tokens (auto rooms `admin-orders` and `user-{id}`) that
//!   `join-room` the group room (with `since` when resuming).
//!
//! Events. Each room is published to by one publisher only (publisher
//! `g % P` owns group `g`, its members' personal rooms; publisher 0 owns
//! `admin-orders`), one request at a time, so the acknowledged events of a
//! room have a known order. A group's events cycle through: the group room
//! alone (3 of 6), the group room then a member's personal room (a member
//! on `/ws` or the driver endpoint unless `--joined-cross-rooms`), the
//! personal room then the group room (a socket in both gets it once, by the
//! first of them: SPEC §3), and the personal room alone; every 25th event of
//! publisher 0 goes to `admin-orders` (every `/` socket).
//!
//! Counting, per socket: expected = the acknowledged events addressed to any
//! of its rooms (publishing starts once every socket is in its rooms);
//! lost = expected and never received; duplicated = received more than
//! once; out of order = a frame whose `offset` is not above the last one
//! of its room, or an acknowledged event arriving after a later one of the
//! same room. Events whose publish failed (the node died under it) may or
//! may not have been appended; arriving, they are counted apart
//! (`unacked_delivered`), never as errors.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use switchboard_client::{Incoming, Socket};
use switchboard_testkit::{NodeProcess, RedisServer, mint};
use tokio_util::sync::CancellationToken;

use crate::shared::{API_KEY, HttpConn, Lcg, SECRET, database, node_binary, node_env, wait_ready};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// No fault: the counting alone (a control run).
    None,
    /// SIGKILL one node mid-stream (no drain, like a crashed machine).
    Kill,
    /// Restart every node in turn: SIGTERM (drain, close 1012), wait for it
    /// to exit, start it again, wait until it is ready and every socket is
    /// back in its rooms.
    Rolling,
}

impl Fault {
    fn as_str(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Kill => "kill",
            Fault::Rolling => "rolling",
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Sockets, spread round-robin over `/`, `/ws` and the driver endpoint.
    #[arg(long, default_value_t = 1200)]
    sockets: usize,
    /// Sockets per shared group room.
    #[arg(long, default_value_t = 20)]
    group_size: usize,
    /// Publisher tasks, each with one request in flight.
    #[arg(long, default_value_t = 3)]
    publishers: usize,
    /// Publishes per second, all publishers together.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Seconds of publishing (longer when the fault takes longer: publishing
    /// goes on until one second after the fault is over).
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    #[arg(long, value_enum, default_value = "kill")]
    fault: Fault,
    /// Seconds after the first publish when the fault starts (default: a
    /// quarter of `secs`).
    #[arg(long)]
    fault_at: Option<f64>,
    /// A disconnected socket waits a random 0..this many ms before
    /// reconnecting (clients back off with jitter; it also lets events pile
    /// up to be replayed).
    #[arg(long, default_value_t = 500)]
    reconnect_jitter_ms: u64,
    /// `SHUTDOWN_GRACE_SECS` of the nodes (a fifth of it, at most 5 s, is
    /// the listener's linger after a drain).
    #[arg(long, default_value_t = 10.0)]
    grace_secs: f64,
    /// `HISTORY_SIZE` of the nodes (default: the server's).
    #[arg(long)]
    history_size: Option<usize>,
    /// Also address [group room, personal room] events to `/` sockets. Such
    /// a socket gets its personal room at connect but the group room only
    /// with its `join-room` after it, so on a resume the personal room's
    /// replay (or a live event before the join) and the group room's replay
    /// can both carry the same event: a known duplicate of the server (see
    /// BENCHMARKS.md, "Recovery"). Off by default; `[personal, group]`
    /// events reach `/` sockets either way.
    #[arg(long)]
    joined_cross_rooms: bool,
    /// Gives up (and fails) after this many seconds in all.
    #[arg(long, default_value_t = 120.0)]
    max_secs: f64,
    #[arg(long)]
    database_url: Option<String>,
}

/// Base of the group rooms' driver ids (far from the user ids).
const GROUP_BASE: u64 = 1_000_000;
const BROADCAST_ROOM: &str = "admin-orders";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Rooms,
    Events,
    Driver,
}

impl Dialect {
    fn of(i: usize) -> Dialect {
        [Dialect::Rooms, Dialect::Events, Dialect::Driver][i % 3]
    }
    pub(crate) fn name(self) -> &'static str {
        match self {
            Dialect::Rooms => "/",
            Dialect::Events => "/ws",
            Dialect::Driver => "/ws/driver/orders/",
        }
    }
    /// The object that holds a message's fields: `data`, `payload`, or the
    /// message itself.
    fn body(self, v: &Value) -> &Value {
        match self {
            Dialect::Rooms => &v["data"],
            Dialect::Events => &v["payload"],
            Dialect::Driver => v,
        }
    }
}

/// One socket: who it is and which rooms it is in.
pub(crate) struct Spec {
    pub(crate) idx: usize,
    pub(crate) dialect: Dialect,
    token: String,
    /// Every room it is in; the auto rooms first.
    pub(crate) rooms: Vec<String>,
    /// The room it joins with `join-room` (rooms dialect only).
    join: Option<String>,
}

fn group_room(g: usize) -> String {
    format!("driver-{}", GROUP_BASE + g as u64)
}

fn user_room(i: usize) -> String {
    format!("user-{}", i + 1)
}

pub(crate) fn specs(sockets: usize, groups: usize) -> Vec<Spec> {
    (0..sockets)
        .map(|i| {
            let dialect = Dialect::of(i);
            let g = i % groups;
            let uid = i as u64 + 1;
            let (token, rooms, join) = match dialect {
                Dialect::Rooms => (
                    mint(SECRET, json!({"sub": uid, "role": "admin"})),
                    vec![BROADCAST_ROOM.to_string(), user_room(i), group_room(g)],
                    Some(group_room(g)),
                ),
                Dialect::Events | Dialect::Driver => (
                    mint(
                        SECRET,
                        json!({"sub": uid, "role": "driver", "driver_id": GROUP_BASE + g as u64, "city_id": 1}),
                    ),
                    vec![user_room(i), group_room(g)],
                    None,
                ),
            };
            Spec {
                idx: i,
                dialect,
                token,
                rooms,
                join,
            }
        })
        .collect()
}

/// What the scenario's tasks share.
pub(crate) struct Shared {
    /// Nodes that take sockets and publishes now.
    pub(crate) live: RwLock<Vec<SocketAddr>>,
    /// Sockets connected to each node.
    pub(crate) per_node: Mutex<HashMap<SocketAddr, usize>>,
    /// Sockets connected and in all their rooms.
    pub(crate) ready: AtomicUsize,
    /// Frames received, all sockets (the quiet detector watches it).
    pub(crate) frames: AtomicU64,
}

impl Shared {
    /// A live node for attempt `n` of socket `seed`, other than `avoid`
    /// when there is another.
    pub(crate) fn pick(&self, seed: usize, avoid: Option<SocketAddr>) -> Option<SocketAddr> {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        let others: Vec<SocketAddr> = live.iter().copied().filter(|a| Some(*a) != avoid).collect();
        if others.is_empty() {
            return live.first().copied();
        }
        Some(others[seed % others.len()])
    }

    pub(crate) fn set_live(&self, addr: SocketAddr, live: bool) {
        let mut l = self.live.write().unwrap_or_else(|e| e.into_inner());
        l.retain(|a| *a != addr);
        if live {
            l.push(addr);
        }
    }

    fn connected(&self, addr: SocketAddr, delta: isize) {
        let mut m = self.per_node.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(addr).or_default();
        *n = n.saturating_add_signed(delta);
    }

    pub(crate) fn on_node(&self, addr: SocketAddr) -> usize {
        let m = self.per_node.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&addr).copied().unwrap_or(0)
    }
}

/// One room as a socket sees it.
struct RoomState {
    epoch: Option<String>,
    /// The last offset received (or the position given at connect).
    offset: u64,
    /// Frames at or below this offset are replays (the position the
    /// reconnect's connect message or `room-joined` gave).
    replay_floor: u64,
    /// Whether this connection's `since` (or `join-room`) named the room.
    asked: bool,
}

/// What one socket counted.
#[derive(Default)]
pub(crate) struct ClientReport {
    /// (room index, event id) in arrival order.
    pub(crate) log: Vec<(u8, u64)>,
    /// Rooms the server said it could not recover on a reconnect: (room
    /// index, when the previous connection ended, when it was told).
    pub(crate) gaps: Vec<(u8, Instant, Instant)>,
    /// Historical frames of other types (order events in `admin-orders`,
    /// driver positions: the soak's other traffic), not counted.
    pub(crate) other_events: u64,
    /// Frames whose offset was not above the last one of their room.
    pub(crate) out_of_order_offsets: u64,
    reconnects: u64,
    connect_failures: u64,
    closes: BTreeMap<u16, u64>,
    recovered: u64,
    not_recovered: u64,
    not_recovered_reasons: BTreeMap<String, u64>,
    missed_reported: u64,
    replayed: u64,
    /// Event frames without `room`/`offset`, or for a room it is not in.
    bad_frames: u64,
    errors: BTreeMap<String, u64>,
}

struct Client {
    spec: Spec,
    rooms: Vec<RoomState>,
    /// Connected (the connect message arrived) / in every room.
    connected: bool,
    ready: bool,
    report: ClientReport,
    /// When the last connection ended.
    last_end: Option<Instant>,
    /// The reply is a `join-room` asked again after `broker_unavailable`:
    /// sent after a short pause.
    retry_join: bool,
}

impl Client {
    fn new(spec: Spec) -> Client {
        let rooms = spec
            .rooms
            .iter()
            .map(|_| RoomState {
                epoch: None,
                offset: 0,
                replay_floor: 0,
                asked: false,
            })
            .collect();
        Client {
            spec,
            rooms,
            connected: false,
            ready: false,
            report: ClientReport::default(),
            last_end: None,
            retry_join: false,
        }
    }

    fn room_index(&self, name: &str) -> Option<usize> {
        self.spec.rooms.iter().position(|r| r == name)
    }

    /// The upgrade path: token, and `since` for the auto rooms it knows.
    fn path(&mut self) -> String {
        let mut since = serde_json::Map::new();
        for (i, r) in self.spec.rooms.iter().enumerate() {
            let auto = self.spec.join.as_deref() != Some(r.as_str());
            let st = &mut self.rooms[i];
            st.asked = false;
            if let (true, Some(epoch)) = (auto, &st.epoch) {
                since.insert(r.clone(), json!({"epoch": epoch, "offset": st.offset}));
                st.asked = true;
            }
        }
        let mut path = format!("{}?token={}", self.spec.dialect.name(), self.spec.token);
        if !since.is_empty() {
            use base64::Engine;
            let raw = serde_json::to_vec(&Value::Object(since)).expect("json");
            path.push_str("&since=");
            path.push_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw));
        }
        path
    }

    /// Takes a room's position from a connect message or `room-joined`,
    /// and checks the recovery outcome when the room was asked for.
    fn position(&mut self, i: usize, pos: &Value, recovery: &Value) {
        let (Some(epoch), Some(offset)) = (pos["epoch"].as_str(), pos["offset"].as_u64()) else {
            *self.report.errors.entry("no_position".into()).or_default() += 1;
            return;
        };
        let st = &mut self.rooms[i];
        if st.asked {
            st.asked = false;
            if recovery["recovered"].as_bool() == Some(true) {
                self.report.recovered += 1;
                self.report.missed_reported += recovery["missed"].as_u64().unwrap_or(0);
                st.replay_floor = offset;
                return;
            }
            self.report.not_recovered += 1;
            if let Some(end) = self.last_end {
                self.report.gaps.push((i as u8, end, Instant::now()));
            }
            let reason = recovery["reason"].as_str().unwrap_or("no recovery outcome");
            *self
                .report
                .not_recovered_reasons
                .entry(reason.to_string())
                .or_default() += 1;
        }
        // First connect, or a room that could not be recovered: start over
        // from the position given.
        st.epoch = Some(epoch.to_string());
        st.offset = offset;
        st.replay_floor = offset;
    }

    /// Handles one text frame; `Some(text)` is a message to send back.
    fn handle(&mut self, b: &[u8]) -> Option<String> {
        let Ok(v) = serde_json::from_slice::<Value>(b) else {
            *self.report.errors.entry("bad_json".into()).or_default() += 1;
            return None;
        };
        let d = self.spec.dialect;
        match v["type"].as_str().unwrap_or("") {
            "rec" => {
                self.event(&v);
                None
            }
            "connected" | "CONNECTED" | "connection_established" => {
                let body = d.body(&v);
                for i in 0..self.spec.rooms.len() {
                    let name = self.spec.rooms[i].clone();
                    if self.spec.join.as_deref() == Some(name.as_str()) {
                        continue;
                    }
                    self.position(i, &body["rooms"][&name], &body["recovery"][&name]);
                }
                self.connected = true;
                self.join_message()
            }
            "room-joined" => {
                let body = d.body(&v);
                if let Some(i) = body["roomId"].as_str().and_then(|r| self.room_index(r)) {
                    self.position(i, body, &body["recovery"]);
                    self.ready = true;
                }
                None
            }
            "initial_orders" | "pong" => None,
            // The soak's other traffic: order events (historical, with a
            // room) and driver positions.
            t if v.get("room").is_some() || t.to_ascii_lowercase().contains("location") => {
                self.report.other_events += 1;
                None
            }
            "error" | "ERROR" => {
                let code = d.body(&v)["code"].as_str().unwrap_or("?").to_string();
                let retry = code == "broker_unavailable" && self.connected && !self.ready;
                *self.report.errors.entry(code).or_default() += 1;
                // A `join-room` the server could not do (Redis down): it
                // left the socket out of the room; ask again.
                if retry {
                    self.retry_join = true;
                    return self.join_message();
                }
                None
            }
            other => {
                *self
                    .report
                    .errors
                    .entry(format!("unexpected {other}"))
                    .or_default() += 1;
                None
            }
        }
    }

    /// The `join-room` of the joined room, with its position when known.
    fn join_message(&mut self) -> Option<String> {
        let join = self.spec.join.clone()?;
        let i = self.room_index(&join).expect("the joined room is a room");
        let st = &mut self.rooms[i];
        let mut data = json!({"roomId": join});
        st.asked = false;
        if let Some(epoch) = &st.epoch {
            data["since"] = json!({"epoch": epoch, "offset": st.offset});
            st.asked = true;
        }
        Some(json!({"type": "join-room", "data": data}).to_string())
    }

    fn event(&mut self, v: &Value) {
        let id = self.spec.dialect.body(v)["e"].as_u64();
        let (Some(id), Some(room), Some(offset)) = (id, v["room"].as_str(), v["offset"].as_u64())
        else {
            self.report.bad_frames += 1;
            return;
        };
        let Some(i) = self.room_index(room) else {
            self.report.bad_frames += 1;
            return;
        };
        let st = &mut self.rooms[i];
        if offset <= st.offset {
            self.report.out_of_order_offsets += 1;
            // Follow the room from here (after a Redis restart a live
            // socket sees the new epoch's offsets start over): one count
            // per regression, not one per frame until it catches up.
            st.offset = offset;
        } else {
            if offset <= st.replay_floor {
                self.report.replayed += 1;
            }
            st.offset = offset;
        }
        self.report.log.push((i as u8, id));
    }

    fn is_ready(&self) -> bool {
        self.connected && (self.spec.join.is_none() || self.ready)
    }
}

/// One socket's life: connect, count, and after any disconnect reconnect
/// to another live node with what it has seen, until `stop`.
///
/// With `churn_secs` > 0 the client also ends each connection itself after
/// a random 0.5–1.5 × `churn_secs` and resumes (the soak's churn).
pub(crate) async fn client(
    spec: Spec,
    shared: Arc<Shared>,
    stop: CancellationToken,
    gate: Arc<tokio::sync::Semaphore>,
    jitter_ms: u64,
    churn_secs: f64,
) -> (Spec, ClientReport) {
    let mut c = Client::new(spec);
    let idx = c.spec.idx;
    let mut rng = Lcg(idx as u64 * 7919 + 1);
    let mut attempt = idx / 3;
    let mut avoid = None;
    let mut first = true;
    'life: while !stop.is_cancelled() {
        let Some(addr) = shared.pick(attempt, avoid) else {
            break;
        };
        attempt += 1;
        let path = c.path();
        // The first connects go a few at a time (a thousand upgrades at once
        // would overflow the nodes' accept queues); reconnects do not wait.
        let permit = if first {
            gate.clone().acquire_owned().await.ok()
        } else {
            None
        };
        let connect = Socket::connect(addr, &path, None, 1024);
        let mut sock = match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(s)) => s,
            _ => {
                c.report.connect_failures += 1;
                avoid = Some(addr);
                tokio::select! {
                    _ = stop.cancelled() => break 'life,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
        };
        if !first {
            c.report.reconnects += 1;
        }
        shared.connected(addr, 1);
        let mut permit = permit;
        let life = if churn_secs > 0.0 {
            Duration::from_secs_f64(churn_secs * (0.5 + rng.next_f64()))
        } else {
            Duration::from_secs(86_400 * 365)
        };
        let hang_up = tokio::time::sleep(life);
        tokio::pin!(hang_up);
        let code = loop {
            let m = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    shared.connected(addr, -1);
                    break 'life;
                }
                m = sock.recv() => m,
                // Churn: this client hangs up (1000 from its side).
                _ = &mut hang_up, if c.is_ready() => break 1000,
            };
            match m {
                Some(Incoming::Text(b)) => {
                    shared.frames.fetch_add(1, Ordering::Relaxed);
                    let was = c.is_ready();
                    if let Some(reply) = c.handle(&b) {
                        if std::mem::take(&mut c.retry_join) {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        let _ = sock.send_text(&reply).await;
                    }
                    if !was && c.is_ready() {
                        shared.ready.fetch_add(1, Ordering::SeqCst);
                        permit = None;
                        first = false;
                    }
                }
                Some(Incoming::Close(code)) => break code,
                None => break 1006,
            }
        };
        drop(permit);
        drop(sock);
        c.last_end = Some(Instant::now());
        shared.connected(addr, -1);
        *c.report.closes.entry(code).or_default() += 1;
        if c.is_ready() {
            shared.ready.fetch_sub(1, Ordering::SeqCst);
        }
        // Never in its rooms on that connection: still the first connect.
        c.connected = false;
        c.ready = false;
        avoid = Some(addr);
        let wait = (rng.next_f64() * jitter_ms as f64) as u64;
        tokio::select! {
            _ = stop.cancelled() => break 'life,
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        }
    }
    (c.spec, c.report)
}

/// One publish: its id, rooms, and whether it was answered 204.
pub(crate) struct Published {
    pub(crate) id: u64,
    pub(crate) rooms: Vec<String>,
    pub(crate) acked: bool,
    /// When the publish was sent.
    pub(crate) at: Instant,
}

/// Publisher `j` of `p`: owns groups `g ≡ j (mod p)`, their members'
/// personal rooms and (publisher 0) the broadcast room; publishes at
/// `rate` per second, one request at a time, to the live nodes in turn.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn publisher(
    j: usize,
    p: usize,
    rate: f64,
    members: Arc<Vec<Vec<usize>>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    started: Instant,
    joined_cross_rooms: bool,
) -> (Vec<Published>, BTreeMap<String, u64>) {
    let groups: Vec<usize> = (0..members.len()).filter(|g| g % p == j).collect();
    let mut conns: HashMap<SocketAddr, HttpConn> = HashMap::new();
    let mut out = Vec::new();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut group_events = 0usize;
    for k in 0u64.. {
        let due = started + Duration::from_secs_f64(k as f64 / rate);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(due.into()) => {}
        }
        let id = k * p as u64 + j as u64 + 1;
        let rooms = if groups.is_empty() || (j == 0 && k % 25 == 24) {
            vec![BROADCAST_ROOM.to_string()]
        } else {
            let g = groups[group_events % groups.len()];
            let c = group_events / groups.len();
            group_events += 1;
            let m = &members[g];
            let member = user_room(m[(c / 6) % m.len()]);
            // [group, personal] to a `/` socket: see `--joined-cross-rooms`.
            let other: Vec<usize> = m
                .iter()
                .copied()
                .filter(|i| joined_cross_rooms || Dialect::of(*i) != Dialect::Rooms)
                .collect();
            match c % 6 {
                3 if !other.is_empty() => {
                    vec![group_room(g), user_room(other[(c / 6) % other.len()])]
                }
                4 => vec![member, group_room(g)],
                5 => vec![member],
                _ => vec![group_room(g)],
            }
        };
        let body = json!({"rooms": rooms, "type": "rec", "data": {"e": id}}).to_string();
        let Some(addr) = shared.pick(k as usize + j, None) else {
            break;
        };
        let at = Instant::now();
        let result = async {
            let conn = match conns.entry(addr) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(HttpConn::open(addr).await?)
                }
            };
            conn.post("/api/publish", API_KEY, body).await
        };
        let acked = match tokio::time::timeout(Duration::from_secs(10), result).await {
            Ok(Ok(204)) => true,
            Ok(Ok(status)) => {
                *failures.entry(format!("status {status}")).or_default() += 1;
                false
            }
            Ok(Err(_)) => {
                *failures.entry("connection".into()).or_default() += 1;
                conns.remove(&addr);
                false
            }
            Err(_) => {
                *failures.entry("timeout".into()).or_default() += 1;
                conns.remove(&addr);
                false
            }
        };
        out.push(Published {
            id,
            rooms,
            acked,
            at,
        });
    }
    (out, failures)
}

/// What the fault did.
#[derive(Default)]
struct FaultReport {
    /// Sockets connected to the node(s) when each was killed or SIGTERMed.
    sockets_on_faulted: usize,
    nodes_faulted: usize,
    /// Seconds after the first publish: start and end of the fault.
    started_at: f64,
    done_at: f64,
    /// Per restarted node: seconds from SIGTERM to exit, and to ready again.
    restarts: Vec<(f64, f64)>,
    /// Nodes that did not exit within the grace period (SIGKILLed).
    stuck: usize,
}

/// The node processes and what restarting one needs. Fields drop in
/// order: the nodes before their Redis.
struct Cluster {
    nodes: Vec<NodeProcess>,
    redis: RedisServer,
    bin: std::path::PathBuf,
    db_url: String,
    extra: Vec<(&'static str, String)>,
    restarts: usize,
}

impl Cluster {
    async fn start_node(&mut self, i: usize) -> anyhow::Result<NodeProcess> {
        let id = format!("lg{i}r{}", self.restarts);
        self.restarts += 1;
        let env = node_env(&id, &self.redis.url(), &self.db_url, &self.extra);
        let node = NodeProcess::start(&self.bin, &env).await;
        wait_ready(node.addr, Duration::from_secs(30)).await?;
        Ok(node)
    }
}

pub(crate) async fn wait_all_ready(shared: &Shared, sockets: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while shared.ready.load(Ordering::SeqCst) < sockets {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Waits until every socket is in its rooms and no frame arrived for 1.5 s;
/// false when that did not happen `within`.
pub(crate) async fn wait_quiet(shared: &Shared, sockets: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut last = shared.frames.load(Ordering::Relaxed);
    let mut still_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = shared.frames.load(Ordering::Relaxed);
        if now != last {
            last = now;
            still_since = Instant::now();
        }
        let all_in = shared.ready.load(Ordering::SeqCst) == sockets;
        if all_in && still_since.elapsed() >= Duration::from_millis(1500) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
    }
}

async fn fault(
    a: &Args,
    cluster: &mut Cluster,
    shared: &Shared,
    started: Instant,
) -> anyhow::Result<FaultReport> {
    let mut r = FaultReport {
        started_at: started.elapsed().as_secs_f64(),
        ..FaultReport::default()
    };
    match a.fault {
        Fault::None => {}
        Fault::Kill => {
            // The middle node, so that index 0 is not special.
            let victim = &mut cluster.nodes[a.nodes / 2];
            shared.set_live(victim.addr, false);
            r.sockets_on_faulted = shared.on_node(victim.addr);
            r.nodes_faulted = 1;
            victim.kill();
        }
        Fault::Rolling => {
            let grace = Duration::from_secs_f64(a.grace_secs + 5.0);
            for i in 0..cluster.nodes.len() {
                let old = &mut cluster.nodes[i];
                shared.set_live(old.addr, false);
                r.sockets_on_faulted += shared.on_node(old.addr);
                r.nodes_faulted += 1;
                let t = Instant::now();
                let pid = old.pid().context("node runs")?;
                let status = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()?;
                if !status.success() {
                    bail!("kill -TERM {pid} failed");
                }
                if old.wait_exit(grace).await.is_none() {
                    r.stuck += 1;
                    old.kill();
                }
                let exited = t.elapsed().as_secs_f64();
                let new = cluster.start_node(i).await?;
                shared.set_live(new.addr, true);
                cluster.nodes[i] = new;
                r.restarts.push((exited, t.elapsed().as_secs_f64()));
                // A rolling deploy waits for the new pod to be ready; here
                // also for every socket to be back in its rooms.
                wait_all_ready(shared, a.sockets, Duration::from_secs(30)).await;
            }
        }
    }
    r.done_at = started.elapsed().as_secs_f64();
    Ok(r)
}

/// The scenario, bounded by `--max-secs`: past it everything it started
/// is dropped (the guards kill the processes) and the run fails.
pub async fn run(a: Args) -> anyhow::Result<()> {
    let max = Duration::from_secs_f64(a.max_secs);
    match tokio::time::timeout(max, scenario(a)).await {
        Ok(r) => r,
        Err(_) => bail!("recovery: gave up after {max:?} (--max-secs)"),
    }
}

async fn scenario(a: Args) -> anyhow::Result<()> {
    if a.fault != Fault::None && a.nodes < 2 {
        bail!("a fault needs at least 2 nodes");
    }
    if a.sockets == 0 || a.group_size == 0 || a.publishers == 0 || a.rate <= 0.0 {
        bail!("sockets, group size, publishers and rate must be positive");
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let redis = RedisServer::start();
    let (db_url, _dir) = database(a.database_url.clone())?;
    let mut extra = vec![
        ("SHUTDOWN_GRACE_SECS", a.grace_secs.to_string()),
        ("SEND_QUEUE_LEN", "4096".to_string()),
    ];
    if let Some(h) = a.history_size {
        extra.push(("HISTORY_SIZE", h.to_string()));
    }
    let mut cluster = Cluster {
        bin: node_binary()?,
        redis,
        db_url,
        extra,
        nodes: Vec::new(),
        restarts: 0,
    };
    for i in 0..a.nodes {
        let n = cluster.start_node(i).await?;
        cluster.nodes.push(n);
    }
    let shared = Arc::new(Shared {
        live: RwLock::new(cluster.nodes.iter().map(|n| n.addr).collect()),
        per_node: Mutex::new(HashMap::new()),
        ready: AtomicUsize::new(0),
        frames: AtomicU64::new(0),
    });

    // Sockets.
    let groups = a.sockets.div_ceil(a.group_size);
    let mut members = vec![Vec::new(); groups];
    for i in 0..a.sockets {
        members[i % groups].push(i);
    }
    let members = Arc::new(members);
    let specs = specs(a.sockets, groups);
    let mut by_dialect: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &specs {
        *by_dialect.entry(s.dialect.name()).or_default() += 1;
    }
    let stop = CancellationToken::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let clients: Vec<_> = specs
        .into_iter()
        .map(|s| {
            tokio::spawn(client(
                s,
                shared.clone(),
                stop.clone(),
                gate.clone(),
                a.reconnect_jitter_ms,
                0.0,
            ))
        })
        .collect();
    let t_connect = Instant::now();
    if !wait_all_ready(&shared, a.sockets, Duration::from_secs(60)).await {
        stop.cancel();
        bail!(
            "only {} of {} sockets got into their rooms within 60 s",
            shared.ready.load(Ordering::SeqCst),
            a.sockets
        );
    }
    let connect_secs = t_connect.elapsed().as_secs_f64();

    // Publishers, then the fault, then publishing goes on until `secs` and
    // one second after the fault is over.
    let started = Instant::now();
    let stop_publishing = CancellationToken::new();
    let pubs: Vec<_> = (0..a.publishers)
        .map(|j| {
            tokio::spawn(publisher(
                j,
                a.publishers,
                a.rate / a.publishers as f64,
                members.clone(),
                shared.clone(),
                stop_publishing.clone(),
                started,
                a.joined_cross_rooms,
            ))
        })
        .collect();
    let fault_at = a.fault_at.unwrap_or(a.secs / 4.0);
    tokio::time::sleep_until((started + Duration::from_secs_f64(fault_at)).into()).await;
    let fr = match fault(&a, &mut cluster, &shared, started).await {
        Ok(r) => r,
        Err(e) => {
            stop_publishing.cancel();
            stop.cancel();
            return Err(e.context("the fault could not be applied"));
        }
    };
    let publish_until =
        started + Duration::from_secs_f64(a.secs).max(Duration::from_secs_f64(fr.done_at + 1.0));
    tokio::time::sleep_until(publish_until.into()).await;
    stop_publishing.cancel();
    let mut events = Vec::new();
    let mut publish_failures: BTreeMap<String, u64> = BTreeMap::new();
    for p in pubs {
        let (e, f) = p.await?;
        events.extend(e);
        for (k, v) in f {
            *publish_failures.entry(k).or_default() += v;
        }
    }
    let publish_secs = started.elapsed().as_secs_f64();

    // Quiet: every socket in its rooms and no frame for 1.5 s (bounded).
    let quiet = wait_quiet(&shared, a.sockets, Duration::from_secs(30)).await;
    let not_ready = a.sockets - shared.ready.load(Ordering::SeqCst).min(a.sockets);
    stop.cancel();
    let mut reports = Vec::new();
    for c in clients {
        reports.push(c.await?);
    }
    let duration = started.elapsed().as_secs_f64();
    drop(cluster);

    // Counting.
    let mut by_id: HashMap<u64, &Published> = HashMap::new();
    let mut acked_by_room: HashMap<&str, Vec<u64>> = HashMap::new();
    for e in &events {
        by_id.insert(e.id, e);
        if e.acked {
            for r in &e.rooms {
                acked_by_room.entry(r.as_str()).or_default().push(e.id);
            }
        }
    }
    let acked = events.iter().filter(|e| e.acked).count() as u64;
    let mut t = Totals::default();
    for (spec, rep) in &reports {
        t.add(spec, rep, &acked_by_room, &by_id);
    }
    let pass = t.lost == 0
        && t.duplicated == 0
        && t.out_of_order == 0
        && t.not_recovered == 0
        && t.misrouted == 0
        && t.bad_frames == 0
        && quiet;

    println!(
        "recovery: {} sockets {:?} on {} nodes, {} groups of ≤ {}, {} publishers at {}/s for {publish_secs:.1} s, fault {} at {:.1} s (done at {:.1} s, {} node(s), {} sockets on them)",
        a.sockets,
        by_dialect,
        a.nodes,
        groups,
        a.group_size,
        a.publishers,
        a.rate,
        a.fault.as_str(),
        fr.started_at,
        fr.done_at,
        fr.nodes_faulted,
        fr.sockets_on_faulted
    );
    println!(
        "  events published {}, acknowledged {acked}, failed {publish_failures:?}; sockets in their rooms after {connect_secs:.1} s",
        events.len()
    );
    println!(
        "  deliveries expected {}, delivered {}: lost {}, duplicated {}, out of order {}, unacknowledged but delivered {}, misrouted {}, bad frames {}",
        t.expected,
        t.delivered,
        t.lost,
        t.duplicated,
        t.out_of_order,
        t.unacked_delivered,
        t.misrouted,
        t.bad_frames
    );
    println!(
        "  reconnects {} (failed attempts {}), closes {:?}; rooms recovered {}, not recovered {} {:?}; replayed {} (server said missed {})",
        t.reconnects,
        t.connect_failures,
        t.closes,
        t.recovered,
        t.not_recovered,
        t.reasons,
        t.replayed,
        t.missed_reported
    );
    if !t.errors.is_empty() {
        println!("  error messages: {:?}", t.errors);
    }
    if !fr.restarts.is_empty() {
        println!(
            "  restarts (s from SIGTERM to exit, to ready again): {:?}; stuck {}",
            fr.restarts, fr.stuck
        );
    }
    for line in t.dup_samples.iter().chain(&t.samples) {
        println!("  ! {line}");
    }
    if !quiet {
        println!("  NOT QUIET: {not_ready} sockets not in their rooms when the wait ended");
    }
    println!(
        "{}",
        json!({"scenario": "recovery", "fault": a.fault.as_str(), "nodes": a.nodes, "sockets": a.sockets,
               "dialects": by_dialect, "groups": groups, "publishers": a.publishers, "rate": a.rate,
               "secs": a.secs, "events_published": events.len(), "events_acknowledged": acked,
               "publish_failures": publish_failures, "deliveries_expected": t.expected,
               "delivered": t.delivered, "lost": t.lost, "duplicated": t.duplicated,
               "out_of_order": t.out_of_order, "unacked_delivered": t.unacked_delivered,
               "misrouted": t.misrouted, "bad_frames": t.bad_frames, "errors": t.errors,
               "reconnects": t.reconnects, "connect_failures": t.connect_failures, "closes": t.closes,
               "recovered": t.recovered, "not_recovered": t.not_recovered,
               "not_recovered_reasons": t.reasons, "replayed": t.replayed,
               "missed_reported": t.missed_reported, "nodes_faulted": fr.nodes_faulted,
               "sockets_on_faulted_nodes": fr.sockets_on_faulted, "fault_at_s": fr.started_at,
               "fault_done_s": fr.done_at, "restarts": fr.restarts, "stuck": fr.stuck,
               "connect_s": connect_secs, "publish_s": publish_secs, "duration_s": duration,
               "quiet": quiet, "not_ready": not_ready, "pass": pass})
    );
    if !pass {
        bail!(
            "recovery failed: lost {}, duplicated {}, out of order {}, not recovered {}, misrouted {}, bad frames {}, quiet {quiet}",
            t.lost,
            t.duplicated,
            t.out_of_order,
            t.not_recovered,
            t.misrouted,
            t.bad_frames
        );
    }
    Ok(())
}

#[derive(Default)]
pub(crate) struct Totals {
    pub(crate) expected: u64,
    pub(crate) delivered: u64,
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) out_of_order: u64,
    pub(crate) unacked_delivered: u64,
    pub(crate) misrouted: u64,
    pub(crate) bad_frames: u64,
    pub(crate) reconnects: u64,
    pub(crate) connect_failures: u64,
    pub(crate) closes: BTreeMap<u16, u64>,
    pub(crate) recovered: u64,
    pub(crate) not_recovered: u64,
    pub(crate) reasons: BTreeMap<String, u64>,
    pub(crate) replayed: u64,
    pub(crate) missed_reported: u64,
    pub(crate) errors: BTreeMap<String, u64>,
    /// The first few anomalies, spelled out.
    pub(crate) samples: Vec<String>,
    /// The first few duplicates, apart (losses cannot crowd them out).
    pub(crate) dup_samples: Vec<String>,
}

/// Keeps `what` if `into` has fewer than 10.
fn keep_sample(into: &mut Vec<String>, what: String) {
    if into.len() < 10 {
        into.push(what);
    }
}

impl Totals {
    fn sample(&mut self, what: String) {
        keep_sample(&mut self.samples, what);
    }

    fn sample_dup(&mut self, what: String) {
        keep_sample(&mut self.dup_samples, what);
    }

    pub(crate) fn add(
        &mut self,
        spec: &Spec,
        rep: &ClientReport,
        acked_by_room: &HashMap<&str, Vec<u64>>,
        by_id: &HashMap<u64, &Published>,
    ) {
        let mut expected: HashSet<u64> = HashSet::new();
        for r in &spec.rooms {
            if let Some(ids) = acked_by_room.get(r.as_str()) {
                expected.extend(ids);
            }
        }
        let mut count: HashMap<u64, u32> = HashMap::new();
        // Per room: the last acknowledged id (each room has one publisher,
        // whose ids grow).
        let mut last_acked = vec![0u64; spec.rooms.len()];
        for &(room, id) in &rep.log {
            *count.entry(id).or_default() += 1;
            match by_id.get(&id) {
                Some(e) if e.rooms.iter().any(|r| spec.rooms.contains(r)) => {
                    if e.acked {
                        let last = &mut last_acked[room as usize];
                        if id <= *last {
                            self.out_of_order += 1;
                        }
                        *last = (*last).max(id);
                    }
                }
                _ => self.misrouted += 1,
            }
        }
        let via = |id: u64| -> Vec<&str> {
            rep.log
                .iter()
                .filter(|(_, i)| *i == id)
                .map(|(r, _)| spec.rooms[*r as usize].as_str())
                .collect()
        };
        for (id, n) in &count {
            if *n > 1 {
                let rooms = by_id.get(id).map(|e| e.rooms.clone()).unwrap_or_default();
                self.sample_dup(format!(
                    "socket {} ({}) got event {id} (to {rooms:?}) {n} times, through {:?}",
                    spec.idx,
                    spec.dialect.name(),
                    via(*id)
                ));
            }
            self.duplicated += u64::from(n - 1);
            if expected.contains(id) {
                self.delivered += 1;
            } else if by_id.get(id).is_some_and(|e| !e.acked) {
                self.unacked_delivered += 1;
            }
        }
        self.expected += expected.len() as u64;
        for id in expected.iter().filter(|id| !count.contains_key(id)) {
            self.lost += 1;
            let rooms = by_id.get(id).map(|e| e.rooms.clone()).unwrap_or_default();
            self.sample(format!(
                "socket {} ({}) never got event {id} (to {rooms:?})",
                spec.idx,
                spec.dialect.name()
            ));
        }
        self.out_of_order += rep.out_of_order_offsets;
        self.bad_frames += rep.bad_frames;
        self.reconnects += rep.reconnects;
        self.connect_failures += rep.connect_failures;
        for (k, v) in &rep.closes {
            *self.closes.entry(*k).or_default() += v;
        }
        self.recovered += rep.recovered;
        self.not_recovered += rep.not_recovered;
        for (k, v) in &rep.not_recovered_reasons {
            *self.reasons.entry(k.clone()).or_default() += v;
        }
        self.replayed += rep.replayed;
        self.missed_reported += rep.missed_reported;
        for (k, v) in &rep.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }
}
