//! `OfferClock`: offer deadlines, and which are due.
//!
//! Redis (cluster mode): `{p}offers:due` is a sorted set of offer ids scored
//! by deadline (unix ms). A Lua script claims due ids atomically by moving
//! them into `{p}offers:lease`, scored by lease expiry, so exactly one node
//! handles each; ids whose lease ran out (their node died mid-expiry) are
//! claimed again by whichever node asks next. `done` drops the lease.
//! Memory (embedded mode): an ordered set behind a mutex.
//!
//! Both implementations pass one contract (the tests of [`memory`] and
//! [`redis`]).

pub mod memory;
pub mod redis;

use std::future::Future;

use crate::redis_conn::RedisError;
pub use memory::MemoryClock;
pub use redis::RedisClock;

#[derive(Debug, thiserror::Error)]
#[error("offer clock: {0}")]
pub struct ClockError(#[from] pub RedisError);

pub trait OfferClock: Send + Sync + 'static {
    fn schedule(
        &self,
        offer_id: i64,
        deadline_ms: i64,
    ) -> impl Future<Output = Result<(), ClockError>> + Send;
    /// Schedules a deadline the clock may have lost (start-up re-seed):
    /// nothing happens if the offer is already scheduled or claimed, so a
    /// live or dead node's claim keeps its lease.
    fn seed(
        &self,
        offer_id: i64,
        deadline_ms: i64,
    ) -> impl Future<Output = Result<(), ClockError>> + Send;
    fn cancel(&self, offer_id: i64) -> impl Future<Output = Result<(), ClockError>> + Send;
    /// Claims at most `max` offers due at `now_ms` (and, in Redis, offers
    /// whose claim lease ran out), and tells when the next one falls due.
    fn claim_due(
        &self,
        now_ms: i64,
        max: usize,
    ) -> impl Future<Output = Result<Claimed, ClockError>> + Send;
    /// The claimed offer was handled.
    fn done(&self, offer_id: i64) -> impl Future<Output = Result<(), ClockError>> + Send;
}

/// What a claim took, and the earliest deadline or lease expiry still
/// pending after it (unix ms), so the caller can sleep until then.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Claimed {
    pub ids: Vec<i64>,
    pub next_ms: Option<i64>,
}

pub enum AnyClock {
    Memory(MemoryClock),
    Redis(RedisClock),
}

impl OfferClock for AnyClock {
    async fn schedule(&self, offer_id: i64, deadline_ms: i64) -> Result<(), ClockError> {
        match self {
            AnyClock::Memory(c) => c.schedule(offer_id, deadline_ms).await,
            AnyClock::Redis(c) => c.schedule(offer_id, deadline_ms).await,
        }
    }
    async fn seed(&self, offer_id: i64, deadline_ms: i64) -> Result<(), ClockError> {
        match self {
            AnyClock::Memory(c) => c.seed(offer_id, deadline_ms).await,
            AnyClock::Redis(c) => c.seed(offer_id, deadline_ms).await,
        }
    }
    async fn cancel(&self, offer_id: i64) -> Result<(), ClockError> {
        match self {
            AnyClock::Memory(c) => c.cancel(offer_id).await,
            AnyClock::Redis(c) => c.cancel(offer_id).await,
        }
    }
    async fn claim_due(&self, now_ms: i64, max: usize) -> Result<Claimed, ClockError> {
        match self {
            AnyClock::Memory(c) => c.claim_due(now_ms, max).await,
            AnyClock::Redis(c) => c.claim_due(now_ms, max).await,
        }
    }
    async fn done(&self, offer_id: i64) -> Result<(), ClockError> {
        match self {
            AnyClock::Memory(c) => c.done(offer_id).await,
            AnyClock::Redis(c) => c.done(offer_id).await,
        }
    }
}
