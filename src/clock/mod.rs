//! `OfferClock`: offer deadlines, and which are due.
//!
//! Redis: `offers:due` is a sorted set of offer ids scored by deadline
//! (unix ms). A Lua script claims due ids atomically by moving them into
//! `offers:lease`, scored by lease expiry, so exactly one node handles
//! each; ids whose lease ran out (their node died mid-expiry) are claimed
//! again by whichever node asks next. `done` drops the lease.
//! Memory (embedded mode): an ordered set behind a mutex.
//!
//! Cities (SPEC §12): every operation on one deadline takes the city of
//! the offer's order. On a Redis Cluster each city has its own pair of sets
//! (`sb:{c1}:offers:due`, `sb:{c1}:offers:lease`), and a claim runs the
//! script once per registered city; on one Redis and in memory there is
//! one pair for all cities and the city is not used.
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
        city: i64,
        offer_id: i64,
        deadline_ms: i64,
    ) -> impl Future<Output = Result<(), ClockError>> + Send;
    /// Schedules a deadline the clock may have lost (start-up re-seed):
    /// nothing happens if the offer is already scheduled or claimed, so a
    /// live or dead node's claim keeps its lease.
    fn seed(
        &self,
        city: i64,
        offer_id: i64,
        deadline_ms: i64,
    ) -> impl Future<Output = Result<(), ClockError>> + Send;
    fn cancel(
        &self,
        city: i64,
        offer_id: i64,
    ) -> impl Future<Output = Result<(), ClockError>> + Send;
    /// Claims at most `max` offers due at `now_ms` (and, in Redis, offers
    /// whose claim lease ran out), and tells when the next one falls due.
    fn claim_due(
        &self,
        now_ms: i64,
        max: usize,
    ) -> impl Future<Output = Result<Claimed, ClockError>> + Send;
    /// The claimed offer was handled (`city`: the [`Due::city`] it was
    /// claimed with).
    fn done(&self, city: i64, offer_id: i64)
    -> impl Future<Output = Result<(), ClockError>> + Send;
}

/// What a claim took, and the earliest deadline or lease expiry still
/// pending after it (unix ms), so the caller can sleep until then.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Claimed {
    pub ids: Vec<Due>,
    pub next_ms: Option<i64>,
}

/// A claimed deadline: the offer, and the partition it was claimed from
/// (its city on a cluster; 0 where the clock is not partitioned), which
/// [`OfferClock::done`] takes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub offer_id: i64,
    pub city: i64,
}

pub enum AnyClock {
    Memory(MemoryClock),
    Redis(Box<RedisClock>),
}

impl OfferClock for AnyClock {
    async fn schedule(&self, city: i64, offer_id: i64, deadline_ms: i64) -> Result<(), ClockError> {
        match self {
            AnyClock::Memory(c) => c.schedule(city, offer_id, deadline_ms).await,
            AnyClock::Redis(c) => c.schedule(city, offer_id, deadline_ms).await,
        }
    }
    async fn seed(&self, city: i64, offer_id: i64, deadline_ms: i64) -> Result<(), ClockError> {
        match self {
            AnyClock::Memory(c) => c.seed(city, offer_id, deadline_ms).await,
            AnyClock::Redis(c) => c.seed(city, offer_id, deadline_ms).await,
        }
    }
    async fn cancel(&self, city: i64, offer_id: i64) -> Result<(), ClockError> {
        match self {
            AnyClock::Memory(c) => c.cancel(city, offer_id).await,
            AnyClock::Redis(c) => c.cancel(city, offer_id).await,
        }
    }
    async fn claim_due(&self, now_ms: i64, max: usize) -> Result<Claimed, ClockError> {
        match self {
            AnyClock::Memory(c) => c.claim_due(now_ms, max).await,
            AnyClock::Redis(c) => c.claim_due(now_ms, max).await,
        }
    }
    async fn done(&self, city: i64, offer_id: i64) -> Result<(), ClockError> {
        match self {
            AnyClock::Memory(c) => c.done(city, offer_id).await,
            AnyClock::Redis(c) => c.done(city, offer_id).await,
        }
    }
}

/// One contract, run against both implementations; the lease takeover is
/// the Redis clock's alone (the memory clock lives and dies with its node).
#[cfg(test)]
mod contract {
    use std::time::Duration;

    use super::*;

    fn ids(c: &Claimed) -> Vec<i64> {
        c.ids.iter().map(|d| d.offer_id).collect()
    }

    async fn claimed(c: &impl OfferClock, now_ms: i64, max: usize) -> Vec<i64> {
        ids(&c.claim_due(now_ms, max).await.unwrap())
    }

    /// The contract in city `k`; `partitioned` (a cluster): claims report
    /// the city; `alone`: no other city has deadlines.
    async fn claims_due_once(c: &impl OfferClock, k: i64, partitioned: bool, alone: bool) {
        let city = if partitioned { k } else { 0 };
        c.schedule(k, 1, 100).await.unwrap();
        c.schedule(k, 2, 200).await.unwrap();
        c.schedule(k, 3, 50).await.unwrap();
        c.cancel(k, 3).await.unwrap();
        assert_eq!(
            c.claim_due(150, 10).await.unwrap(),
            Claimed {
                ids: vec![Due { offer_id: 1, city }],
                next_ms: Some(200)
            }
        );
        assert!(claimed(c, 150, 10).await.is_empty());
        c.schedule(k, 2, 120).await.unwrap();
        assert_eq!(claimed(c, 150, 10).await, vec![2]);
        // A re-seed does not move a deadline that is still scheduled.
        c.schedule(k, 4, 300).await.unwrap();
        c.seed(k, 4, 100).await.unwrap();
        c.seed(k, 5, 140).await.unwrap();
        assert_eq!(claimed(c, 150, 10).await, vec![5]);
        // At most `max` per claim, earliest first.
        for id in 10..15 {
            c.schedule(k, id, 1000 + id).await.unwrap();
        }
        if alone {
            assert_eq!(claimed(c, 2000, 2).await, vec![4, 10]);
            assert_eq!(claimed(c, 2000, 10).await, vec![11, 12, 13, 14]);
        } else {
            // `max` is shared with the other (empty) city: fewer per claim.
            let mut got = Vec::new();
            loop {
                let some = claimed(c, 2000, 2).await;
                assert!(some.len() <= 2, "{some:?}");
                if some.is_empty() && got.len() == 6 {
                    break;
                }
                got.extend(some);
            }
            assert_eq!(got, vec![4, 10, 11, 12, 13, 14]);
        }
        for id in [1, 2, 4, 5, 10, 11, 12, 13, 14] {
            c.done(city, id).await.unwrap();
        }
    }

    #[tokio::test]
    async fn memory_clock() {
        claims_due_once(&MemoryClock::default(), 1, false, true).await;
    }

    /// A claim whose node died is claimed again once its lease ran out,
    /// and a re-seed does not steal a live lease.
    async fn lease_takeover(c: &RedisClock, k: i64) {
        c.schedule(k, 20, 5000).await.unwrap();
        assert_eq!(claimed(c, 5000, 10).await, vec![20]);
        c.seed(k, 20, 5000).await.unwrap();
        assert!(claimed(c, 5001, 10).await.is_empty());
        assert_eq!(claimed(c, 5000 + 30_001, 10).await, vec![20]);
    }

    #[tokio::test]
    async fn redis_clock() {
        let redis = switchboard_testkit::RedisServer::start();
        let pool = crate::redis_conn::Redis::open(&redis.url()).unwrap();
        let c = RedisClock::new(pool, "sbtest:", Duration::from_secs(30));
        claims_due_once(&c, 1, false, true).await;
        lease_takeover(&c, 1).await;
    }

    /// Cities 1 and 2 on different masters of a real cluster: each city's
    /// claim script stays in its `{cN}` slot, the contract passes in each,
    /// and one claim takes what is due in both, within `max`, each once,
    /// each with its city; a node that never wrote a city finds it in the
    /// registry.
    #[tokio::test]
    async fn redis_cluster_clock() {
        let cluster = switchboard_testkit::RedisCluster::start(3);
        assert_ne!(
            cluster.master_of("sbtest:{c1}:offers:due"),
            cluster.master_of("sbtest:{c2}:offers:due")
        );
        let redis = crate::redis_conn::Redis::open(&cluster.url()).unwrap();
        let c = RedisClock::new(redis.clone(), "sbtest:", Duration::from_secs(30));
        claims_due_once(&c, 1, true, true).await;
        claims_due_once(&c, 2, true, false).await;
        lease_takeover(&c, 2).await;
        c.done(2, 20).await.unwrap();
        c.schedule(1, 30, 100).await.unwrap();
        c.schedule(2, 31, 110).await.unwrap();
        c.schedule(2, 32, 120).await.unwrap();
        let other = RedisClock::new(redis, "sbtest:", Duration::from_secs(30));
        let first = other.claim_due(200, 2).await.unwrap();
        assert_eq!(first.ids.len(), 2, "{first:?}");
        let second = other.claim_due(200, 10).await.unwrap();
        let mut all: Vec<Due> = first.ids.iter().chain(&second.ids).copied().collect();
        all.sort_by_key(|d| d.offer_id);
        assert_eq!(
            all,
            vec![
                Due {
                    offer_id: 30,
                    city: 1
                },
                Due {
                    offer_id: 31,
                    city: 2
                },
                Due {
                    offer_id: 32,
                    city: 2
                }
            ]
        );
        assert!(claimed(&c, 200, 10).await.is_empty(), "each once");
        for d in all {
            other.done(d.city, d.offer_id).await.unwrap();
        }
        c.cancel(1, 1).await.unwrap();
    }
}
