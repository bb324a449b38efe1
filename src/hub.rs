//! This node's sockets: room → members, and local fan-out.
//!
//! The hub knows nothing of Redis: the broker hands it deliveries through the
//! [`Sink`](crate::broker::Sink) trait, and asks it which rooms still have
//! local members.
//!
//! Concurrency: rooms live in `SHARDS` maps, each behind a `std::sync::RwLock`
//! (never held across an `.await`). Fan-out takes one shard's read lock just
//! long enough to copy the room's member list, queues the frame on each
//! member, and when the whole batch is queued flushes each socket once with
//! a non-blocking vectored write ([`Hub::deliver_batch`]), so it never waits
//! on a socket. A writer (join/leave) only ever holds one shard lock, and fan-out
//! releases a shard before it takes another, so shards cannot deadlock.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::{Buf, Bytes};
use tokio::net::TcpStream;
use tokio::sync::Notify;
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
    /// The client sent something that is not a valid WebSocket frame.
    pub const PROTOCOL_ERROR: u16 = 1002;
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

/// The sending side of one socket.
///
/// Whoever has a frame for the socket writes it **directly** from its own
/// thread (the fan-out loop, the socket's task) with a non-blocking write,
/// under this socket's lock, when nothing is queued ahead of it: a delivery
/// is one syscall, with no task wake-up and no channel hop. Only what the
/// kernel does not take at once (a full send buffer) stays queued; the
/// socket's task flushes that backlog when the socket is writable, in order,
/// with vectored writes. A backlog longer than `SEND_QUEUE_LEN` frames closes the
/// socket as a slow consumer. Every write happens under the lock, so frames
/// never interleave.
pub struct Outbox {
    pub id: ConnId,
    pub dialect: Dialect,
    pub closer: Closer,
    /// `None` only in unit tests: frames then just queue.
    wire: Option<TcpStream>,
    out: Mutex<Out>,
    /// Tells the socket's task that a backlog appeared.
    backlog: Notify,
    cap: usize,
}

#[derive(Default)]
struct Out {
    queue: VecDeque<Bytes>,
    /// The queue's first frame is partly written: it must be finished
    /// before anything else goes out.
    partial: bool,
    /// The close frame is queued: nothing more is accepted.
    sealed: bool,
}

enum Queued {
    Refused,
    /// The socket had nothing queued: it needs a flush after the batch.
    First,
    /// Behind other frames, which someone is already flushing.
    Behind,
}

/// How many frames one vectored write takes at most.
const IOV: usize = 64;

impl Outbox {
    pub fn new(
        id: ConnId,
        dialect: Dialect,
        queue_len: usize,
        wire: Option<TcpStream>,
    ) -> Arc<Outbox> {
        Arc::new(Outbox {
            id,
            dialect,
            closer: Closer::default(),
            wire,
            out: Mutex::new(Out::default()),
            backlog: Notify::new(),
            cap: queue_len.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Out> {
        // Nothing that can fail leaves `Out` half-updated, so a poisoned
        // lock's state is still sound.
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stream(&self) -> Option<&TcpStream> {
        self.wire.as_ref()
    }

    /// Sends one frame without waiting: written now when nothing is queued
    /// ahead, else left behind the frames that are (see [`Outbox::queue`]).
    pub fn push(&self, frame: Bytes) {
        if let Queued::First = self.queue(frame) {
            self.flush_batch();
        }
    }

    /// Queues a frame without writing it. `First` makes the caller the one
    /// who flushes (after the rest of its batch, if any, so a socket gets its
    /// share of a batch in one write); behind other frames it goes out with
    /// them. A backlog over the limit closes the socket as a slow consumer:
    /// it must not hold up anyone else.
    fn queue(&self, frame: Bytes) -> Queued {
        let mut out = self.lock();
        if out.sealed || self.closer.token().is_cancelled() {
            return Queued::Refused;
        }
        if out.queue.len() >= self.cap {
            drop(out);
            self.slow_consumer();
            return Queued::Refused;
        }
        let first = out.queue.is_empty();
        out.queue.push_back(frame);
        if first { Queued::First } else { Queued::Behind }
    }

    /// Writes what is queued; a rest the kernel did not take is left to the
    /// socket's task.
    fn flush_batch(&self) {
        match self.flush() {
            Ok(true) => {}
            Ok(false) => self.backlog.notify_one(),
            Err(_) => self.closer.close(close_code::NORMAL, ""),
        }
    }

    fn slow_consumer(&self) {
        if !self.closer.token().is_cancelled() {
            metrics::counter!(m::SLOW_CONSUMERS, "dialect" => self.dialect.as_str()).increment(1);
        }
        self.closer
            .close(close_code::SLOW_CONSUMER, "slow consumer");
    }

    pub fn has_backlog(&self) -> bool {
        !self.lock().queue.is_empty()
    }

    /// Resolves when a backlog may have appeared (the socket's task then
    /// waits for the socket to be writable and calls [`Outbox::flush`]).
    pub async fn backlog_appeared(&self) {
        self.backlog.notified().await
    }

    /// Writes as much of the backlog as the socket takes now, in vectored
    /// writes. `Ok(true)` when nothing is left.
    pub fn flush(&self) -> io::Result<bool> {
        let mut out = self.lock();
        let Some(wire) = &self.wire else {
            return Ok(out.queue.is_empty());
        };
        while !out.queue.is_empty() {
            let mut iov = [IoSlice::new(&[]); IOV];
            let k = out.queue.len().min(IOV);
            for (slot, frame) in iov.iter_mut().zip(out.queue.iter()) {
                *slot = IoSlice::new(frame);
            }
            let mut n = match wire.try_write_vectored(&iov[..k]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            while n > 0 {
                let first = out.queue.front_mut().expect("wrote more than was queued");
                if n >= first.len() {
                    n -= first.len();
                    out.queue.pop_front();
                    out.partial = false;
                } else {
                    first.advance(n);
                    out.partial = true;
                    n = 0;
                }
            }
        }
        Ok(true)
    }

    /// Queues the close frame as the last thing this socket sends. With
    /// `keep_queue` the backlog goes out first (drain, or an error that
    /// explains the close); otherwise it is dropped, except a frame already
    /// partly written, which must be finished for the close frame to parse.
    pub fn seal(&self, close_frame: Bytes, keep_queue: bool) {
        let mut out = self.lock();
        if out.sealed {
            return;
        }
        out.sealed = true;
        if !keep_queue {
            let keep = usize::from(out.partial);
            out.queue.truncate(keep);
        }
        out.queue.push_back(close_frame);
    }

    /// Frames waiting in the backlog (unit tests read deliveries here).
    #[cfg(test)]
    fn take_queued(&self) -> Vec<Bytes> {
        self.lock().queue.drain(..).collect()
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

    /// Delivers `event` to the local members of `room`; see
    /// [`Hub::deliver_batch`].
    pub fn deliver(&self, room: &str, event: &Event) {
        self.deliver_batch([(room, event)]);
    }

    /// Delivers each event to the local members of its room, in order. Each
    /// socket gets its share of the whole batch in one write: frames are
    /// queued first, then every socket that got any is flushed once.
    pub fn deliver_batch<'a>(&self, batch: impl IntoIterator<Item = (&'a str, &'a Event)>) {
        let mut dirty = Vec::new();
        for (room, event) in batch {
            self.queue_event(room, event, &mut dirty);
        }
        for outbox in dirty {
            outbox.flush_batch();
        }
    }

    /// Queues `event` to the local members of `room`, skipping members of a
    /// room earlier in the event's list (they get it through that room: a
    /// multi-room publish reaches each socket once). Each dialect present
    /// renders the event once; every socket of it gets the same bytes.
    /// Sockets that need a flush are added to `dirty`.
    fn queue_event(&self, room_name: &str, event: &Event, dirty: &mut Vec<Arc<Outbox>>) {
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
        // Copied out so the shard is not locked while writing to sockets.
        let members: Vec<Arc<Outbox>> = {
            let shard = self
                .shard(room_name)
                .read()
                .unwrap_or_else(|p| p.into_inner());
            let Some(members) = shard.get(room_name) else {
                return;
            };
            members
                .values()
                .filter(|m| !skip.contains(&m.id))
                .cloned()
                .collect()
        };
        for member in members {
            let d = member.dialect.index();
            let bytes = frames[d]
                .get_or_insert_with(|| member.dialect.render(event, personal).map(frame::text));
            let Some(b) = bytes else { continue };
            match member.queue(b.clone()) {
                Queued::Refused => continue,
                Queued::First => dirty.push(member),
                Queued::Behind => {}
            }
            sent[d] += 1;
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
        let a = Outbox::new(1, Dialect::Rooms, 8, None);
        assert!(hub.add("r1", &a));
        assert!(!hub.add("r1", &Outbox::new(2, Dialect::Rooms, 8, None)));
        hub.add("r2", &a);
        let e = ev(&["r1", "r2"]);
        hub.deliver("r1", &e);
        hub.deliver("r2", &e);
        assert_eq!(a.take_queued().len(), 1, "second copy delivered");
        assert!(!hub.remove("r1", 1));
        assert!(hub.remove("r1", 2));
        assert!(!hub.has_room("r1"));
    }

    #[test]
    fn a_batch_reaches_each_socket_once_per_event_in_order() {
        let hub = Hub::default();
        let a = Outbox::new(1, Dialect::Events, 8, None);
        let b = Outbox::new(2, Dialect::Events, 8, None);
        hub.add("r1", &a);
        hub.add("r2", &a);
        hub.add("r2", &b);
        let both = ev(&["r1", "r2"]);
        let mut second = ev(&["r2"]);
        second.kind = EventKind::Custom {
            ty: "second".into(),
            data: json!({}),
        };
        // As the broker hands them over: one entry per room of each event.
        hub.deliver_batch([("r1", &both), ("r2", &both), ("r2", &second)]);
        let types = |o: &Outbox| -> Vec<String> {
            o.take_queued()
                .iter()
                .map(|f| {
                    // Server text frames of < 126 bytes: a 2-byte header.
                    let v: serde_json::Value = serde_json::from_slice(&f[2..]).unwrap();
                    v["type"].as_str().unwrap().to_string()
                })
                .collect()
        };
        assert_eq!(types(&a), ["t", "second"]);
        assert_eq!(types(&b), ["t", "second"]);
    }

    #[test]
    fn full_queue_closes_only_that_socket() {
        let hub = Hub::default();
        let slow = Outbox::new(1, Dialect::Events, 1, None);
        let fast = Outbox::new(2, Dialect::Events, 8, None);
        hub.add("r", &slow);
        hub.add("r", &fast);
        for _ in 0..3 {
            hub.deliver("r", &ev(&["r"]));
            assert_eq!(fast.take_queued().len(), 1);
        }
        assert_eq!(
            slow.closer.reason(),
            Some((close_code::SLOW_CONSUMER, "slow consumer"))
        );
        assert!(fast.closer.reason().is_none());
    }
}
