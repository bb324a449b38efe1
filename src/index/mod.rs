//! `DriverIndex`: where drivers are, and which are near a point. Two
//! implementations pass one contract ([`contract`] in the tests below):
//! [`redis::RedisIndex`] (cluster mode) and [`memory::MemoryIndex`]
//! (embedded mode).
//!
//! Redis: a GEO set `{p}drivers:geo`, a last-seen sorted set
//! `{p}drivers:seen` (score = unix ms) and a set of drivers who said they are
//! unavailable, `{p}drivers:off`. `nearest` runs one Lua script (one round
//! trip): GEOSEARCH, then drop stale and unavailable drivers. Positions are
//! written in batches by one task per node: one multi-member `GEOADD` +
//! `ZADD` per round trip, however many sockets report.
//! Memory: a map behind a mutex, scanned linearly.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::time::Duration;

pub use crate::event::haversine_km;
use crate::redis_conn::RedisError;
pub use memory::MemoryIndex;
pub use redis::RedisIndex;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("driver index: {0}")]
    Redis(#[from] RedisError),
    #[error("driver index: {0}")]
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nearby {
    pub driver_id: i64,
    pub distance_km: f64,
    pub latitude: f64,
    pub longitude: f64,
}

pub trait DriverIndex: Send + Sync + 'static {
    /// Records a position; the driver is "seen" now.
    fn put(
        &self,
        driver_id: i64,
        lat: f64,
        lon: f64,
    ) -> impl Future<Output = Result<(), IndexError>> + Send;
    fn set_available(
        &self,
        driver_id: i64,
        available: bool,
    ) -> impl Future<Output = Result<(), IndexError>> + Send;
    /// Drivers within `radius_km` that are available and were seen within
    /// `fresh`, nearest first, at most `limit`.
    fn nearest(
        &self,
        lat: f64,
        lon: f64,
        radius_km: f64,
        fresh: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Nearby>, IndexError>> + Send;
    fn position(
        &self,
        driver_id: i64,
    ) -> impl Future<Output = Result<Option<(f64, f64)>, IndexError>> + Send;
}

/// The index a node runs with, chosen by `REDIS_URL`.
pub enum AnyIndex {
    Memory(MemoryIndex),
    Redis(RedisIndex),
}

impl DriverIndex for AnyIndex {
    async fn put(&self, driver_id: i64, lat: f64, lon: f64) -> Result<(), IndexError> {
        match self {
            AnyIndex::Memory(i) => i.put(driver_id, lat, lon).await,
            AnyIndex::Redis(i) => i.put(driver_id, lat, lon).await,
        }
    }
    async fn set_available(&self, driver_id: i64, available: bool) -> Result<(), IndexError> {
        match self {
            AnyIndex::Memory(i) => i.set_available(driver_id, available).await,
            AnyIndex::Redis(i) => i.set_available(driver_id, available).await,
        }
    }
    async fn nearest(
        &self,
        lat: f64,
        lon: f64,
        radius_km: f64,
        fresh: Duration,
        limit: usize,
    ) -> Result<Vec<Nearby>, IndexError> {
        match self {
            AnyIndex::Memory(i) => i.nearest(lat, lon, radius_km, fresh, limit).await,
            AnyIndex::Redis(i) => i.nearest(lat, lon, radius_km, fresh, limit).await,
        }
    }
    async fn position(&self, driver_id: i64) -> Result<Option<(f64, f64)>, IndexError> {
        match self {
            AnyIndex::Memory(i) => i.position(driver_id).await,
            AnyIndex::Redis(i) => i.position(driver_id).await,
        }
    }
}

/// One contract, run against both implementations: the memory index and
/// the Redis one on a `redis-server` of the test's own.
#[cfg(test)]
mod contract {
    use super::*;

    #[test]
    fn haversine_matches_a_known_distance() {
        // Tashkent points from seed 001: about 1.29 km apart.
        let d = haversine_km(41.311081, 69.240562, 41.299496, 69.240074);
        assert!((d - 1.289).abs() < 0.01, "{d}");
    }

    fn ids(n: &[Nearby]) -> Vec<i64> {
        n.iter().map(|n| n.driver_id).collect()
    }

    async fn nearest_filters_and_sorts(i: &impl DriverIndex) {
        let fresh = Duration::from_secs(60);
        i.put(1, 41.30, 69.24).await.unwrap();
        i.put(2, 41.31, 69.24).await.unwrap();
        i.put(3, 45.0, 69.24).await.unwrap();
        i.set_available(2, false).await.unwrap();
        let n = i.nearest(41.30, 69.24, 10.0, fresh, 10).await.unwrap();
        assert_eq!(ids(&n), vec![1], "unavailable and far drivers are skipped");
        i.set_available(2, true).await.unwrap();
        let n = i.nearest(41.309, 69.24, 10.0, fresh, 10).await.unwrap();
        assert_eq!(ids(&n), vec![2, 1], "nearest first");
        assert!((n[0].distance_km - 0.111).abs() < 0.01, "{n:?}");
        assert_eq!(
            ids(&i.nearest(41.309, 69.24, 10.0, fresh, 1).await.unwrap()),
            vec![2]
        );
        // A driver unknown to the index that says "unavailable" stays out
        // once it reports a position.
        i.set_available(4, false).await.unwrap();
        i.put(4, 41.30, 69.24).await.unwrap();
        let n = i.nearest(41.30, 69.24, 10.0, fresh, 10).await.unwrap();
        assert!(!ids(&n).contains(&4), "{n:?}");
        let (lat, lon) = i.position(1).await.unwrap().expect("a position");
        assert!((lat - 41.30).abs() < 1e-4 && (lon - 69.24).abs() < 1e-4);
        assert_eq!(i.position(99).await.unwrap(), None);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let n = i
            .nearest(41.30, 69.24, 10.0, Duration::from_millis(1), 10)
            .await
            .unwrap();
        assert!(n.is_empty(), "stale drivers are skipped: {n:?}");
    }

    #[tokio::test]
    async fn memory_index() {
        nearest_filters_and_sorts(&MemoryIndex::default()).await;
    }

    #[tokio::test]
    async fn redis_index() {
        let redis = switchboard_testkit::RedisServer::start();
        let pool = crate::redis_conn::pool(&redis.url()).unwrap();
        nearest_filters_and_sorts(&RedisIndex::new(pool, "sbtest:")).await;
    }
}
