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

/// Great-circle distance in km (the same formula Redis GEO uses).
pub fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    const R: f64 = 6372.797560856;
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * R * a.sqrt().asin()
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
