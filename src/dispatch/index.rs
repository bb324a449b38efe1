//! `DriverIndex`: where drivers are, and which are near a point.
//!
//! Redis (cluster mode): a GEO set `{p}drivers:geo`, a last-seen sorted set
//! `{p}drivers:seen` (score = unix ms) and a set of drivers who said they are
//! unavailable, `{p}drivers:off`. `nearest` runs one Lua script (one round
//! trip): GEOSEARCH, then drop stale and unavailable drivers. Positions are
//! written in batches by one task per node (`write_positions`): one
//! multi-member `GEOADD` + `ZADD` per round trip, however many sockets report.
//! Memory (embedded mode): a map behind a mutex, scanned linearly.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::metrics as m;

#[derive(Debug, thiserror::Error)]
#[error("driver index: {0}")]
pub struct IndexError(pub String);

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

struct Entry {
    lat: f64,
    lon: f64,
    seen: Instant,
    available: bool,
}

#[derive(Default)]
pub struct MemoryIndex {
    drivers: Mutex<HashMap<i64, Entry>>,
}

impl MemoryIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Entry>> {
        self.drivers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DriverIndex for MemoryIndex {
    async fn put(&self, driver_id: i64, lat: f64, lon: f64) -> Result<(), IndexError> {
        let mut d = self.lock();
        let e = d.entry(driver_id).or_insert(Entry {
            lat,
            lon,
            seen: Instant::now(),
            available: true,
        });
        e.lat = lat;
        e.lon = lon;
        e.seen = Instant::now();
        Ok(())
    }

    async fn set_available(&self, driver_id: i64, available: bool) -> Result<(), IndexError> {
        if let Some(e) = self.lock().get_mut(&driver_id) {
            e.available = available;
        } else if !available {
            // Unknown driver saying "unavailable": remember it for when it
            // reports a position.
            self.lock().insert(
                driver_id,
                Entry {
                    lat: 0.0,
                    lon: 0.0,
                    seen: Instant::now() - Duration::from_secs(86400 * 365),
                    available: false,
                },
            );
        }
        Ok(())
    }

    async fn nearest(
        &self,
        lat: f64,
        lon: f64,
        radius_km: f64,
        fresh: Duration,
        limit: usize,
    ) -> Result<Vec<Nearby>, IndexError> {
        let now = Instant::now();
        let mut out: Vec<Nearby> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.available && now.duration_since(e.seen) <= fresh)
            .map(|(id, e)| Nearby {
                driver_id: *id,
                distance_km: haversine_km(lat, lon, e.lat, e.lon),
                latitude: e.lat,
                longitude: e.lon,
            })
            .filter(|n| n.distance_km <= radius_km)
            .collect();
        out.sort_by(|a, b| {
            a.distance_km
                .total_cmp(&b.distance_km)
                .then(a.driver_id.cmp(&b.driver_id))
        });
        out.truncate(limit);
        Ok(out)
    }

    async fn position(&self, driver_id: i64) -> Result<Option<(f64, f64)>, IndexError> {
        Ok(self
            .lock()
            .get(&driver_id)
            .filter(|e| e.seen.elapsed() < Duration::from_secs(86400 * 364))
            .map(|e| (e.lat, e.lon)))
    }
}

/// Searches a small circle first and doubles it up to the full radius:
/// GEOSEARCH sorts everything inside the circle, so with many drivers around
/// a tight first circle is what keeps the lookup fast.
const NEAREST_LUA: &str = r#"
local radius = tonumber(ARGV[3])
local min_seen = tonumber(ARGV[5])
local limit = tonumber(ARGV[6])
local r = math.min(tonumber(ARGV[7]), radius)
while true do
  local res = redis.call('GEOSEARCH', KEYS[1], 'FROMLONLAT', ARGV[1], ARGV[2],
    'BYRADIUS', r, 'km', 'ASC', 'COUNT', ARGV[4], 'WITHCOORD', 'WITHDIST')
  local out = {}
  for _, e in ipairs(res) do
    local id = e[1]
    local seen = redis.call('ZSCORE', KEYS[2], id)
    if seen and tonumber(seen) >= min_seen and redis.call('SISMEMBER', KEYS[3], id) == 0 then
      out[#out + 1] = {id, e[2], e[3][1], e[3][2]}
      if #out >= limit then return out end
    end
  end
  if r >= radius then return out end
  r = math.min(r * 2, radius)
end
"#;

pub struct RedisIndex {
    hot: Arc<crate::store::HotConn>,
    geo: String,
    seen: String,
    off: String,
    nearest: redis::Script,
    /// Positions on their way to the batch writer ([`write_positions`]).
    puts: mpsc::UnboundedSender<Put>,
}

/// One position for the batch writer, and where its outcome goes.
struct Put {
    driver_id: i64,
    lat: f64,
    lon: f64,
    done: oneshot::Sender<Result<(), String>>,
}

/// Writes positions in batches: whatever queued while the previous batch
/// was in flight (up to `PUT_BATCH`) goes as one `GEOADD` and one `ZADD`
/// with many members, in one round trip. Per driver, positions keep their
/// order (a later one in the same `GEOADD` wins). Ends when the index is
/// dropped.
async fn write_positions(
    hot: Arc<crate::store::HotConn>,
    geo: String,
    seen: String,
    mut rx: mpsc::UnboundedReceiver<Put>,
) {
    const PUT_BATCH: usize = 512;
    let mut batch = Vec::with_capacity(PUT_BATCH);
    while rx.recv_many(&mut batch, PUT_BATCH).await > 0 {
        let ms = now_ms();
        let mut geoadd = redis::cmd("GEOADD");
        let mut zadd = redis::cmd("ZADD");
        geoadd.arg(&geo);
        zadd.arg(&seen);
        for p in &batch {
            geoadd.arg(p.lon).arg(p.lat).arg(p.driver_id);
            zadd.arg(ms).arg(p.driver_id);
        }
        let mut pipe = redis::pipe();
        pipe.add_command(geoadd).ignore().add_command(zadd).ignore();
        let r = match hot.get().await {
            Ok(mut c) => timed("geo_put", pipe.exec_async(&mut c)).await,
            Err(e) => Err(e),
        };
        if r.is_err() {
            hot.broken();
        }
        for p in batch.drain(..) {
            let _ = p.done.send(r.clone());
        }
    }
}

fn now_ms() -> i64 {
    crate::event::now_us() / 1000
}

impl RedisIndex {
    /// Starts the position writer task: call within the runtime.
    pub fn new(pool: deadpool_redis::Pool, prefix: &str) -> RedisIndex {
        let hot = Arc::new(crate::store::HotConn::new(pool));
        let geo = format!("{prefix}drivers:geo");
        let seen = format!("{prefix}drivers:seen");
        let (puts, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_positions(hot.clone(), geo.clone(), seen.clone(), rx));
        RedisIndex {
            hot,
            geo,
            seen,
            off: format!("{prefix}drivers:off"),
            nearest: redis::Script::new(NEAREST_LUA),
            puts,
        }
    }

    async fn conn(&self) -> Result<redis::aio::MultiplexedConnection, IndexError> {
        self.hot.get().await.map_err(IndexError)
    }

    /// A failed command drops the shared connection (the next takes a fresh one).
    fn fail(&self, e: String) -> IndexError {
        self.hot.broken();
        IndexError(e)
    }
}

/// Times a Redis call and counts its errors under `op`.
pub(crate) async fn timed<T, E: std::fmt::Display>(
    op: &'static str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(3), f).await;
    metrics::histogram!(m::REDIS_DURATION, "op" => op).record(start.elapsed().as_secs_f64());
    let r = match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_string()),
    };
    if r.is_err() {
        metrics::counter!(m::REDIS_ERRORS, "op" => op).increment(1);
    }
    r
}

impl DriverIndex for RedisIndex {
    async fn put(&self, driver_id: i64, lat: f64, lon: f64) -> Result<(), IndexError> {
        let stopped = || IndexError("position writer stopped".into());
        let (done, outcome) = oneshot::channel();
        self.puts
            .send(Put {
                driver_id,
                lat,
                lon,
                done,
            })
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?.map_err(IndexError)
    }

    async fn set_available(&self, driver_id: i64, available: bool) -> Result<(), IndexError> {
        let mut c = self.conn().await?;
        let cmd = if available { "SREM" } else { "SADD" };
        timed(
            "driver_status",
            redis::cmd(cmd)
                .arg(&self.off)
                .arg(driver_id)
                .exec_async(&mut c),
        )
        .await
        .map_err(|e| self.fail(e))
    }

    async fn nearest(
        &self,
        lat: f64,
        lon: f64,
        radius_km: f64,
        fresh: Duration,
        limit: usize,
    ) -> Result<Vec<Nearby>, IndexError> {
        let mut c = self.conn().await?;
        let min_seen = now_ms() - fresh.as_millis() as i64;
        // Look past stale/unavailable drivers: fetch more than we keep.
        let window = limit * 4 + 50;
        let mut inv = self.nearest.prepare_invoke();
        inv.key(&self.geo)
            .key(&self.seen)
            .key(&self.off)
            .arg(lon)
            .arg(lat)
            .arg(radius_km)
            .arg(window)
            .arg(min_seen)
            .arg(limit)
            .arg((radius_km / 16.0).max(0.5));
        let rows: Vec<(i64, String, String, String)> =
            timed("geo_nearest", inv.invoke_async(&mut c))
                .await
                .map_err(|e| self.fail(e))?;
        rows.into_iter()
            .map(|(id, dist, lon, lat)| {
                let f = |s: &str| {
                    s.parse::<f64>()
                        .map_err(|e| IndexError(format!("bad number {s:?}: {e}")))
                };
                Ok(Nearby {
                    driver_id: id,
                    distance_km: f(&dist)?,
                    latitude: f(&lat)?,
                    longitude: f(&lon)?,
                })
            })
            .collect()
    }

    async fn position(&self, driver_id: i64) -> Result<Option<(f64, f64)>, IndexError> {
        let mut c = self.conn().await?;
        let pos: Vec<Option<(f64, f64)>> = timed(
            "geo_pos",
            redis::cmd("GEOPOS")
                .arg(&self.geo)
                .arg(driver_id)
                .query_async(&mut c),
        )
        .await
        .map_err(|e| self.fail(e))?;
        Ok(pos
            .into_iter()
            .next()
            .flatten()
            .map(|(lon, lat)| (lat, lon)))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haversine_matches_a_known_distance() {
        // Tashkent points from seed 001: about 1.29 km apart.
        let d = haversine_km(41.311081, 69.240562, 41.299496, 69.240074);
        assert!((d - 1.289).abs() < 0.01, "{d}");
    }

    #[tokio::test]
    async fn memory_nearest_filters_and_sorts() {
        let i = MemoryIndex::default();
        i.put(1, 41.30, 69.24).await.unwrap();
        i.put(2, 41.31, 69.24).await.unwrap();
        i.put(3, 45.0, 69.24).await.unwrap();
        i.set_available(2, false).await.unwrap();
        let n = i
            .nearest(41.30, 69.24, 10.0, Duration::from_secs(60), 10)
            .await
            .unwrap();
        assert_eq!(n.iter().map(|n| n.driver_id).collect::<Vec<_>>(), vec![1]);
        i.set_available(2, true).await.unwrap();
        let n = i
            .nearest(41.305, 69.24, 10.0, Duration::from_secs(60), 10)
            .await
            .unwrap();
        assert_eq!(n.len(), 2);
        let n = i
            .nearest(41.30, 69.24, 10.0, Duration::ZERO, 10)
            .await
            .unwrap();
        assert!(n.is_empty(), "stale drivers are skipped");
    }
}
