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

/// One contract, run against both implementations; the lease takeover is
/// the Redis clock's alone (the memory clock lives and dies with its node).
#[cfg(test)]
mod contract {
    use std::time::Duration;

    use super::*;

    async fn claims_due_once(c: &impl OfferClock) {
        c.schedule(1, 100).await.unwrap();
        c.schedule(2, 200).await.unwrap();
        c.schedule(3, 50).await.unwrap();
        c.cancel(3).await.unwrap();
        assert_eq!(
            c.claim_due(150, 10).await.unwrap(),
            Claimed {
                ids: vec![1],
                next_ms: Some(200)
            }
        );
        assert!(c.claim_due(150, 10).await.unwrap().ids.is_empty());
        c.schedule(2, 120).await.unwrap();
        assert_eq!(c.claim_due(150, 10).await.unwrap().ids, vec![2]);
        // A re-seed does not move a deadline that is still scheduled.
        c.schedule(4, 300).await.unwrap();
        c.seed(4, 100).await.unwrap();
        c.seed(5, 140).await.unwrap();
        assert_eq!(c.claim_due(150, 10).await.unwrap().ids, vec![5]);
        // At most `max` per claim, earliest first.
        for id in 10..15 {
            c.schedule(id, 1000 + id).await.unwrap();
        }
        assert_eq!(c.claim_due(2000, 2).await.unwrap().ids, vec![4, 10]);
        assert_eq!(
            c.claim_due(2000, 10).await.unwrap().ids,
            vec![11, 12, 13, 14]
        );
        for id in [1, 2, 4, 5, 10, 11, 12, 13, 14] {
            c.done(id).await.unwrap();
        }
    }

    #[tokio::test]
    async fn memory_clock() {
        claims_due_once(&MemoryClock::default()).await;
    }

    #[tokio::test]
    async fn redis_clock() {
        let redis = switchboard_testkit::RedisServer::start();
        let pool = crate::redis_conn::Redis::open(&redis.url()).unwrap();
        let c = RedisClock::new(pool, "sbtest:", Duration::from_secs(30));
        claims_due_once(&c).await;
        // A claim whose node died is claimed again once its lease ran out,
        // and a re-seed does not steal a live lease.
        c.schedule(20, 5000).await.unwrap();
        assert_eq!(c.claim_due(5000, 10).await.unwrap().ids, vec![20]);
        c.seed(20, 5000).await.unwrap();
        assert!(c.claim_due(5001, 10).await.unwrap().ids.is_empty());
        assert_eq!(c.claim_due(5000 + 30_001, 10).await.unwrap().ids, vec![20]);
    }

    /// The claim script's keys share the `{offers}` slot of a real cluster.
    #[tokio::test]
    async fn redis_cluster_clock() {
        let cluster = switchboard_testkit::RedisCluster::start(3);
        let redis = crate::redis_conn::Redis::open(&cluster.url()).unwrap();
        let c = RedisClock::new(redis, "sbtest:", Duration::from_secs(30));
        claims_due_once(&c).await;
        c.cancel(1).await.unwrap();
    }
}
