//! This node's sockets: room → members, and local fan-out.
//!
//! The hub knows nothing of Redis: the broker hands it deliveries through the
//! [`Sink`](crate::broker::Sink) trait, and asks it which rooms still have
//! local members.
//!
//! Concurrency: rooms live in `SHARDS` maps, each behind a `std::sync::RwLock`
//! (never held across an `.await`). Fan-out takes one shard's read lock and
//! `try_send`s into each member's bounded queue, so it never waits on a
//! socket. A writer (join/leave) only ever holds one shard lock, and fan-out
//! releases a shard before it takes another, so shards cannot deadlock.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{Event, room};
use crate::metrics as m;
use crate::ws::dialect::{ALL, Dialect};
use crate::ws::frame;

pub type ConnId = u64;

const SHARDS: usize = 16;

/// Close codes the server uses; one catalogue (ARCHITECTURE.md repeats it).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Drain: the node is restarting, reconnect elsewhere.
    pub const SERVICE_RESTART: u16 = 1012;
    /// No pong arrived between two server pings.
    pub const PING_TIMEOUT: u16 = 4000;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const FORBIDDEN: u16 = 4003;
    /// The socket's send queue overflowed: it reads slower than we send.
    pub const SLOW_CONSUMER: u16 = 4008;
}

/// Closes a connection once; the first reason wins.
#[derive(Default)]
pub struct Closer {
    token: CancellationToken,
    reason: Mutex<Option<(u16, &'static str)>>,
}

impl Closer {
    pub fn close(&self, code: u16, reason: &'static str) {
        // Poisoning cannot happen: nothing panics while holding this lock.
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some((code, reason));
        }
        drop(r);
        self.token.cancel();
    }
    pub fn reason(&self) -> Option<(u16, &'static str)> {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

/// The sending side of one socket: a bounded queue of encoded frames.
pub struct Outbox {
    pub id: ConnId,
    pub dialect: Dialect,
    tx: mpsc::Sender<Bytes>,
    pub closer: Closer,
}

impl Outbox {
    pub fn new(
        id: ConnId,
        dialect: Dialect,
        queue_len: usize,
    ) -> (Arc<Outbox>, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(queue_len);
        (
            Arc::new(Outbox {
                id,
                dialect,
                tx,
                closer: Closer::default(),
            }),
            rx,
        )
    }

    /// Queues a frame without waiting. A full queue closes the socket as a
    /// slow consumer: it must not hold up anyone else. Returns whether the
    /// frame was queued.
    pub fn push(&self, frame: Bytes) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.closer.token().is_cancelled() {
                    metrics::counter!(m::SLOW_CONSUMERS, "dialect" => self.dialect.as_str())
                        .increment(1);
                }
                self.closer
                    .close(close_code::SLOW_CONSUMER, "slow consumer");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

type Members = HashMap<ConnId, Arc<Outbox>>;
type Shard = RwLock<HashMap<Box<str>, Members>>;

pub struct Hub {
    shards: Box<[Shard]>,
    hasher: RandomState,
    sockets: AtomicUsize,
    /// Event frames queued to sockets since start (`/api/stats`).
    frames_out: AtomicU64,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            sockets: AtomicUsize::new(0),
            frames_out: AtomicU64::new(0),
        }
    }
}

impl Hub {
    fn shard(&self, room: &str) -> &Shard {
        &self.shards[self.hasher.hash_one(room) as usize % SHARDS]
    }

    /// Adds a member; returns true when it is the room's first local member.
    pub fn add(&self, room: &str, outbox: &Arc<Outbox>) -> bool {
        let mut shard = self.shard(room).write().unwrap_or_else(|p| p.into_inner());
        let members = shard.entry(room.into()).or_default();
        let first = members.is_empty();
        members.insert(outbox.id, outbox.clone());
        first
    }

    /// Removes a member; returns true when the room has no local member left.
    pub fn remove(&self, room: &str, id: ConnId) -> bool {
        let mut shard = self.shard(room).write().unwrap_or_else(|p| p.into_inner());
        let Some(members) = shard.get_mut(room) else {
            return false;
        };
        members.remove(&id);
        if members.is_empty() {
            shard.remove(room);
            true
        } else {
            false
        }
    }

    pub fn is_member(&self, room: &str, id: ConnId) -> bool {
        let shard = self.shard(room).read().unwrap_or_else(|p| p.into_inner());
        shard.get(room).is_some_and(|m| m.contains_key(&id))
    }

    pub fn has_room(&self, room: &str) -> bool {
        let shard = self.shard(room).read().unwrap_or_else(|p| p.into_inner());
        shard.contains_key(room)
    }

    /// Every room with a local member (re-subscribed after a broker reconnect).
    pub fn rooms(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            let s = s.read().unwrap_or_else(|p| p.into_inner());
            out.extend(s.keys().map(|k| k.to_string()));
        }
        out
    }

    pub fn room_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn socket_opened(&self) {
        self.sockets.fetch_add(1, Ordering::Relaxed);
    }
    pub fn socket_closed(&self) {
        self.sockets.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn socket_count(&self) -> usize {
        self.sockets.load(Ordering::Relaxed)
    }
    pub fn frames_out(&self) -> u64 {
        self.frames_out.load(Ordering::Relaxed)
    }

    /// Delivers `event` to the local members of `room`, skipping members of a
    /// room earlier in the event's list (they get it through that room: a
    /// multi-room publish reaches each socket once). Each dialect present
    /// renders the event once; every socket of it gets the same bytes.
    pub fn deliver(&self, room_name: &str, event: &Event) {
        let idx = event.room_index(room_name).unwrap_or(0);
        let skip: HashSet<ConnId> = event.rooms[..idx]
            .iter()
            .flat_map(|r| {
                let shard = self.shard(r).read().unwrap_or_else(|p| p.into_inner());
                shard
                    .get(r.as_str())
                    .map(|m| m.keys().copied().collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .collect();
        let personal = room::is_personal(room_name);
        let mut frames: [Option<Option<Bytes>>; 3] = [None, None, None];
        let mut sent = [0u64; 3];
        {
            let shard = self
                .shard(room_name)
                .read()
                .unwrap_or_else(|p| p.into_inner());
            let Some(members) = shard.get(room_name) else {
                return;
            };
            for member in members.values() {
                if skip.contains(&member.id) {
                    continue;
                }
                let d = member.dialect.index();
                let bytes = frames[d]
                    .get_or_insert_with(|| member.dialect.render(event, personal).map(frame::text));
                if let Some(b) = bytes
                    && member.push(b.clone())
                {
                    sent[d] += 1;
                }
            }
        }
        self.frames_out
            .fetch_add(sent.iter().sum(), Ordering::Relaxed);
        let mut any = false;
        for d in ALL {
            if sent[d.index()] > 0 {
                any = true;
                metrics::counter!(m::WS_MESSAGES_OUT, "dialect" => d.as_str(), "kind" => event.kind.metric_name())
                    .increment(sent[d.index()]);
            }
        }
        if any {
            let lat = (crate::event::now_us() - event.at_us).max(0) as f64 / 1e6;
            metrics::histogram!(m::DELIVERY_LATENCY).record(lat);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use serde_json::json;

    fn ev(rooms: &[&str]) -> Event {
        Event::new(
            rooms.iter().map(|r| r.to_string()).collect(),
            EventKind::Custom {
                ty: "t".into(),
                data: json!({}),
            },
        )
    }

    #[test]
    fn multi_room_delivers_once() {
        let hub = Hub::default();
        let (a, mut rx) = Outbox::new(1, Dialect::Rooms, 8);
        assert!(hub.add("r1", &a));
        assert!(!hub.add("r1", &Outbox::new(2, Dialect::Rooms, 8).0));
        hub.add("r2", &a);
        let e = ev(&["r1", "r2"]);
        hub.deliver("r1", &e);
        hub.deliver("r2", &e);
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "second copy delivered");
        assert!(!hub.remove("r1", 1));
        assert!(hub.remove("r1", 2));
        assert!(!hub.has_room("r1"));
    }

    #[test]
    fn full_queue_closes_only_that_socket() {
        let hub = Hub::default();
        let (slow, _rx_slow) = Outbox::new(1, Dialect::Events, 1);
        let (fast, mut rx_fast) = Outbox::new(2, Dialect::Events, 8);
        hub.add("r", &slow);
        hub.add("r", &fast);
        for _ in 0..3 {
            hub.deliver("r", &ev(&["r"]));
            assert!(rx_fast.try_recv().is_ok());
        }
        assert_eq!(
            slow.closer.reason(),
            Some((close_code::SLOW_CONSUMER, "slow consumer"))
        );
        assert!(fast.closer.reason().is_none());
    }
}
