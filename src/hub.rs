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

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;

use crate::broker::{Delivery, Sink};
use crate::event::{Event, room};
use crate::lock::{read, write};
use crate::metrics as m;
use crate::ws::dialect::ALL;
use crate::ws::frame;
use crate::ws::outbox::{ConnId, Outbox, Queued};

const SHARDS: usize = 16;

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

/// The broker hands this node's deliveries to the hub.
impl Sink for Hub {
    fn deliver(&self, room: &str, offset: Option<u64>, event: &Event) {
        Hub::deliver(self, room, offset, event)
    }
    fn deliver_batch(&self, batch: &[Delivery]) {
        Hub::deliver_batch(
            self,
            batch.iter().map(|d| (d.room.as_str(), d.offset, &d.event)),
        )
    }
    fn epoch_changed(&self, room: &str, epoch: u64) {
        let members: Vec<Arc<Outbox>> = read(self.shard(room))
            .get(room)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        for m in members {
            m.forget_floor(room, epoch);
        }
    }
    fn wants(&self, room: &str) -> bool {
        self.has_room(room)
    }
    fn rooms(&self) -> Vec<String> {
        Hub::rooms(self)
    }
}

impl Hub {
    fn shard(&self, room: &str) -> &Shard {
        &self.shards[self.hasher.hash_one(room) as usize % SHARDS]
    }

    /// Adds a member; returns true when it is the room's first local member.
    pub fn add(&self, room: &str, outbox: &Arc<Outbox>) -> bool {
        let mut shard = write(self.shard(room));
        let members = shard.entry(room.into()).or_default();
        let first = members.is_empty();
        members.insert(outbox.id, outbox.clone());
        first
    }

    /// Removes a member; returns true when the room has no local member left.
    pub fn remove(&self, room: &str, id: ConnId) -> bool {
        let mut shard = write(self.shard(room));
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

    pub fn has_room(&self, room: &str) -> bool {
        let shard = read(self.shard(room));
        shard.contains_key(room)
    }

    /// Every room with a local member (re-subscribed after a broker reconnect).
    pub fn rooms(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            let s = read(s);
            out.extend(s.keys().map(|k| k.to_string()));
        }
        out
    }

    pub fn room_count(&self) -> usize {
        self.shards.iter().map(|s| read(s).len()).sum()
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
    /// Delivers `event` to the local members of `room`; `offset` is its
    /// place in the room's history, when it is historical.
    pub fn deliver(&self, room: &str, offset: Option<u64>, event: &Event) {
        self.deliver_batch([(room, offset, event)]);
    }

    /// Delivers each event to the local members of its room, in order. Each
    /// socket gets its share of the whole batch in one write: frames are
    /// queued first, then every socket that got any is flushed once.
    pub fn deliver_batch<'a>(
        &self,
        batch: impl IntoIterator<Item = (&'a str, Option<u64>, &'a Event)>,
    ) {
        let mut dirty = Vec::new();
        for (room, offset, event) in batch {
            self.queue_event(room, offset, event, &mut dirty);
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
    fn queue_event(
        &self,
        room_name: &str,
        offset: Option<u64>,
        event: &Event,
        dirty: &mut Vec<Arc<Outbox>>,
    ) {
        let idx = event.room_index(room_name).unwrap_or(0);
        let skip: HashSet<ConnId> = event.rooms[..idx]
            .iter()
            .flat_map(|r| {
                let shard = read(self.shard(r));
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
            let shard = read(self.shard(room_name));
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
            let bytes = frames[d].get_or_insert_with(|| {
                let at = offset.map(|o| (room_name, o));
                member
                    .dialect
                    .render_at(event, personal, at)
                    .map(frame::text)
            });
            let Some(b) = bytes else { continue };
            match member.queue_event(b.clone(), room_name, offset) {
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
    use crate::ws::dialect::Dialect;
    use crate::ws::outbox::close_code;
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

    /// Types of the frames queued on `o` (server text frames of < 126
    /// bytes: a 2-byte header).
    fn queued_types(o: &Outbox) -> Vec<String> {
        o.take_queued()
            .iter()
            .map(|f| {
                let v: serde_json::Value = serde_json::from_slice(&f[2..]).unwrap();
                v["type"].as_str().unwrap().to_string()
            })
            .collect()
    }

    fn typed(room: &str, ty: &str) -> Event {
        let mut e = ev(&[room]);
        e.kind = EventKind::Custom {
            ty: ty.into(),
            data: json!({}),
        };
        e
    }

    #[test]
    fn a_new_epoch_lifts_the_floor_of_the_last_resume() {
        let hub = Hub::default();
        let a = Outbox::new(1, Dialect::Events, 8, usize::MAX, None);
        hub.add("r", &a);
        // A resume gave the socket everything up to offset 7.
        a.hold();
        a.release(vec![("r".into(), 0xe1, 7)]);
        hub.deliver("r", Some(3), &typed("r", "old-epoch-straggler"));
        assert!(
            queued_types(&a).is_empty(),
            "at or below the floor: dropped"
        );
        // The same epoch reported again (a node's catch-up that ends after
        // the socket resumed in it) keeps the floor.
        Sink::epoch_changed(&hub, "r", 0xe1);
        hub.deliver("r", Some(4), &typed("r", "replayed-already"));
        assert!(queued_types(&a).is_empty(), "this epoch's floor stays");
        // Redis restarted empty: offsets start over.
        Sink::epoch_changed(&hub, "r", 0xe2);
        hub.deliver("r", Some(1), &typed("r", "new-epoch"));
        assert_eq!(queued_types(&a), vec!["new-epoch"]);
    }

    #[test]
    fn a_failed_join_drops_only_that_rooms_held_frames() {
        let hub = Hub::default();
        let a = Outbox::new(1, Dialect::Events, 8, usize::MAX, None);
        hub.add("kept", &a);
        // join-room "failed" is under way: live frames are held.
        a.hold();
        hub.add("failed", &a);
        hub.deliver("failed", Some(5), &typed("failed", "in-failed"));
        hub.deliver("kept", Some(9), &typed("kept", "in-kept"));
        hub.remove("failed", 1);
        a.release_without("failed");
        assert_eq!(
            queued_types(&a),
            vec!["in-kept"],
            "the failed room's frame would come again with the next join's replay"
        );
    }

    #[test]
    fn multi_room_delivers_once() {
        let hub = Hub::default();
        let a = Outbox::new(1, Dialect::Rooms, 8, usize::MAX, None);
        assert!(hub.add("r1", &a));
        assert!(!hub.add("r1", &Outbox::new(2, Dialect::Rooms, 8, usize::MAX, None)));
        hub.add("r2", &a);
        let e = ev(&["r1", "r2"]);
        hub.deliver("r1", None, &e);
        hub.deliver("r2", None, &e);
        assert_eq!(a.take_queued().len(), 1, "second copy delivered");
        assert!(!hub.remove("r1", 1));
        assert!(hub.remove("r1", 2));
        assert!(!hub.has_room("r1"));
    }

    #[test]
    fn a_batch_reaches_each_socket_once_per_event_in_order() {
        let hub = Hub::default();
        let a = Outbox::new(1, Dialect::Events, 8, usize::MAX, None);
        let b = Outbox::new(2, Dialect::Events, 8, usize::MAX, None);
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
        hub.deliver_batch([
            ("r1", None, &both),
            ("r2", None, &both),
            ("r2", None, &second),
        ]);
        assert_eq!(queued_types(&a), ["t", "second"]);
        assert_eq!(queued_types(&b), ["t", "second"]);
    }

    #[test]
    fn full_queue_closes_only_that_socket() {
        let hub = Hub::default();
        let slow = Outbox::new(1, Dialect::Events, 1, usize::MAX, None);
        let fast = Outbox::new(2, Dialect::Events, 8, usize::MAX, None);
        hub.add("r", &slow);
        hub.add("r", &fast);
        for _ in 0..3 {
            hub.deliver("r", None, &ev(&["r"]));
            assert_eq!(fast.take_queued().len(), 1);
        }
        assert_eq!(
            slow.closer.reason(),
            Some((close_code::SLOW_CONSUMER, "slow consumer"))
        );
        assert!(fast.closer.reason().is_none());
    }
}
