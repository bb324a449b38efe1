//! The seam between nodes: publish an [`Event`] to its rooms, and keep this
//! node subscribed to exactly the rooms that have local members.
//!
//! Two implementations pass the same contract tests: [`memory::MemoryBroker`]
//! (embedded single-node mode) and [`redis::RedisBroker`] (cluster mode, one
//! pub/sub channel per room). The broker never imports the hub: it hands
//! deliveries to a [`Sink`], which the hub implements.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::sync::Arc;

use crate::event::Event;

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
    /// `event` arrived for `room` (once per room of the event).
    fn deliver(&self, room: &str, event: &Event);
    /// Several deliveries that arrived together, in order. A sink may send
    /// them to a socket in one write; by default they go one by one.
    fn deliver_batch(&self, batch: &[(String, Event)]) {
        for (room, event) in batch {
            self.deliver(room, event);
        }
    }
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
}
