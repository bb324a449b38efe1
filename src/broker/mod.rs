//! The seam between nodes: publish an [`Event`] to its rooms, and keep this
//! node subscribed to exactly the rooms that have local members. It also
//! keeps each room's history (SPEC §10): a historical event is appended and
//! published in one atomic step per room, so its offset means the same live
//! and in history; [`Broker::position`] and [`Broker::replay`] read it.
//!
//! Two implementations pass the same contract tests: [`memory::MemoryBroker`]
//! (embedded single-node mode) and [`redis::RedisBroker`] (cluster mode, one
//! pub/sub channel per room). The broker never imports the hub: it hands
//! deliveries to a [`Sink`], which the hub implements.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::sync::Arc;

use crate::event::{Event, StreamPos};

/// One event arriving for one room; `offset` is its place in the room's
/// history (`None` for volatile events or with history off).
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub room: String,
    pub offset: Option<u64>,
    pub event: Event,
}

/// What a room's history holds after a client's position.
#[derive(Debug, Clone, PartialEq)]
pub enum Replay {
    /// Every event after the position, oldest first, each with its offset;
    /// `pos` is the room's position after the last of them.
    Recovered {
        events: Vec<(u64, Event)>,
        pos: StreamPos,
    },
    /// The epoch differs (`epoch_changed`) or events after the position
    /// left the history (`too_old`); `pos` is where the room stands now.
    NotRecovered {
        reason: &'static str,
        pos: StreamPos,
    },
}

/// The all-or-nothing rule of a resume, given the room's position now and
/// the events its history still holds after `since` (oldest first).
pub(crate) fn judge(since: &StreamPos, now: StreamPos, events: Vec<(u64, Event)>) -> Replay {
    if since.epoch != now.epoch || since.offset > now.offset {
        return Replay::NotRecovered {
            reason: "epoch_changed",
            pos: now,
        };
    }
    let complete = since.offset == now.offset
        || (events.first().map(|(o, _)| *o) == Some(since.offset + 1)
            && events.last().map(|(o, _)| *o) == Some(now.offset));
    if !complete {
        return Replay::NotRecovered {
            reason: "too_old",
            pos: now,
        };
    }
    Replay::Recovered { events, pos: now }
}

/// A fresh epoch: random, so a history that was lost never comes back with
/// the same name.
pub(crate) fn new_epoch() -> String {
    use rand::Rng;
    format!("{:016x}", rand::rng().random::<u64>())
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker unavailable: {0}")]
    Redis(#[from] crate::redis_conn::RedisError),
    #[error("broker timed out")]
    Timeout,
}

/// Where a broker hands what it receives on this node.
pub trait Sink: Send + Sync + 'static {
    /// `event` arrived for `room` (once per room of the event), at
    /// `offset` of the room's history when it is historical.
    fn deliver(&self, room: &str, offset: Option<u64>, event: &Event);
    /// Several deliveries that arrived together, in order. A sink may send
    /// them to a socket in one write; by default they go one by one.
    fn deliver_batch(&self, batch: &[Delivery]) {
        for d in batch {
            self.deliver(&d.room, d.offset, &d.event);
        }
    }
    /// `room`'s history started over as `epoch` ([`crate::event::epoch_id`]
    /// of it: Redis restarted empty, the history expired): its offsets start
    /// again from 1, so what a socket was told of an older epoch's offsets
    /// no longer applies.
    fn epoch_changed(&self, _room: &str, _epoch: u64) {}
    /// Whether this node still has a local member in `room`.
    fn wants(&self, room: &str) -> bool;
    /// Every room with a local member.
    fn rooms(&self) -> Vec<String>;
}

pub trait Broker: Send + Sync + 'static {
    /// Publishes `event` to each of its rooms, on every node.
    fn publish(&self, event: Arc<Event>) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Makes this node's subscription to `room` match [`Sink::wants`], and
    /// resolves once it does: after it returns for a wanted room, a publish
    /// anywhere in the cluster reaches this node. Requests are applied in
    /// order against the sink's state at the time, so a join racing a leave
    /// cannot leave the node subscribed to nothing.
    fn reconcile(&self, room: &str) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Connected and subscribed (readiness).
    fn is_healthy(&self) -> bool;

    /// Where `room`'s history stands now (an epoch is made for a room that
    /// has none yet); `None` when history is off (`HISTORY_SIZE=0`).
    fn position(
        &self,
        room: &str,
    ) -> impl Future<Output = Result<Option<StreamPos>, BrokerError>> + Send;

    /// The events of `room` after `since`, if the history still has all of
    /// them; `None` when history is off.
    fn replay(
        &self,
        room: &str,
        since: &StreamPos,
    ) -> impl Future<Output = Result<Option<Replay>, BrokerError>> + Send;
}

/// The broker a node runs with, chosen by `REDIS_URL`.
pub enum AnyBroker {
    Memory(memory::MemoryBroker),
    Redis(redis::RedisBroker),
}

impl Broker for AnyBroker {
    async fn publish(&self, event: Arc<Event>) -> Result<(), BrokerError> {
        match self {
            AnyBroker::Memory(b) => b.publish(event).await,
            AnyBroker::Redis(b) => b.publish(event).await,
        }
    }
    async fn reconcile(&self, room: &str) -> Result<(), BrokerError> {
        match self {
            AnyBroker::Memory(b) => b.reconcile(room).await,
            AnyBroker::Redis(b) => b.reconcile(room).await,
        }
    }
    fn is_healthy(&self) -> bool {
        match self {
            AnyBroker::Memory(b) => b.is_healthy(),
            AnyBroker::Redis(b) => b.is_healthy(),
        }
    }
    async fn position(&self, room: &str) -> Result<Option<StreamPos>, BrokerError> {
        match self {
            AnyBroker::Memory(b) => b.position(room).await,
            AnyBroker::Redis(b) => b.position(room).await,
        }
    }
    async fn replay(&self, room: &str, since: &StreamPos) -> Result<Option<Replay>, BrokerError> {
        match self {
            AnyBroker::Memory(b) => b.replay(room, since).await,
            AnyBroker::Redis(b) => b.replay(room, since).await,
        }
    }
}
