//! Redis connections shared by the Redis implementations of the seams
//! (broker, driver index, offer clock) and the health check: the bounded
//! pool, [`HotConn`] for hot paths, and [`timed`], which times a call and
//! counts its failures.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::lock::lock;
use crate::metrics as m;

/// A Redis call that failed: the pool could not give a connection, the
/// command failed, or it timed out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisError {
    #[error("redis pool: {0}")]
    Pool(String),
    #[error("redis: {0}")]
    Command(String),
    #[error("redis timed out")]
    Timeout,
}

/// How long one Redis call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A pool of multiplexed Redis connections with bounded waits, so a hung
/// Redis turns into errors (and 503s) instead of stuck requests.
pub fn pool(url: &str) -> Result<deadpool_redis::Pool, RedisError> {
    let mut cfg = deadpool_redis::Config::from_url(url);
    let mut pool = deadpool_redis::PoolConfig::new(16);
    pool.timeouts.wait = Some(Duration::from_secs(2));
    pool.timeouts.create = Some(Duration::from_secs(2));
    pool.timeouts.recycle = Some(Duration::from_secs(2));
    cfg.pool = Some(pool);
    cfg.create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .map_err(|e| RedisError::Pool(e.to_string()))
}

/// A shared multiplexed Redis connection for hot paths (positions, offer
/// deadlines): each call clones it (no pool checkout, no recycle PING per
/// command — CRATES.md measured that as a full extra round trip) and
/// concurrent commands pipeline on it. After an error it is dropped and the
/// next call takes a fresh one from the pool.
pub(crate) struct HotConn {
    pool: deadpool_redis::Pool,
    current: std::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl HotConn {
    pub(crate) fn new(pool: deadpool_redis::Pool) -> HotConn {
        HotConn {
            pool,
            current: std::sync::Mutex::new(None),
        }
    }

    pub(crate) async fn get(&self) -> Result<redis::aio::MultiplexedConnection, RedisError> {
        if let Some(c) = lock(&self.current).clone() {
            return Ok(c);
        }
        let obj = self
            .pool
            .get()
            .await
            .map_err(|e| RedisError::Pool(e.to_string()))?;
        let c = (*obj).clone();
        *lock(&self.current) = Some(c.clone());
        Ok(c)
    }

    /// Forget the connection after an error.
    pub(crate) fn broken(&self) {
        *lock(&self.current) = None;
    }
}

/// Times a Redis call and counts its errors under `op`.
pub(crate) async fn timed<T, E: std::fmt::Display>(
    op: &'static str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, RedisError> {
    let start = Instant::now();
    let r = tokio::time::timeout(CALL_TIMEOUT, f).await;
    metrics::histogram!(m::REDIS_DURATION, "op" => op).record(start.elapsed().as_secs_f64());
    let r = match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(RedisError::Command(e.to_string())),
        Err(_) => Err(RedisError::Timeout),
    };
    if r.is_err() {
        metrics::counter!(m::REDIS_ERRORS, "op" => op).increment(1);
    }
    r
}
