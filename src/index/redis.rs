//! The Redis driver index: GEO set, last-seen sorted set, unavailable set;
//! one Lua round trip per lookup, batched position writes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{DriverIndex, IndexError, Nearby};
use crate::redis_conn::{HotConn, RedisError, timed};

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
    hot: Arc<HotConn>,
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
    done: oneshot::Sender<Result<(), RedisError>>,
}

/// Writes positions in batches: whatever queued while the previous batch
/// was in flight (up to `PUT_BATCH`) goes as one `GEOADD` and one `ZADD`
/// with many members, in one round trip. Per driver, positions keep their
/// order (a later one in the same `GEOADD` wins). Ends when the index is
/// dropped.
async fn write_positions(
    hot: Arc<HotConn>,
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
        let hot = Arc::new(HotConn::new(pool));
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
        Ok(self.hot.get().await?)
    }

    /// A failed command drops the shared connection (the next takes a fresh one).
    fn fail(&self, e: RedisError) -> IndexError {
        self.hot.broken();
        IndexError::Redis(e)
    }
}

impl DriverIndex for RedisIndex {
    async fn put(&self, driver_id: i64, lat: f64, lon: f64) -> Result<(), IndexError> {
        let stopped = || IndexError::Failed("position writer stopped".into());
        let (done, outcome) = oneshot::channel();
        self.puts
            .send(Put {
                driver_id,
                lat,
                lon,
                done,
            })
            .map_err(|_| stopped())?;
        Ok(outcome.await.map_err(|_| stopped())??)
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
                        .map_err(|e| IndexError::Failed(format!("bad number {s:?}: {e}")))
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
