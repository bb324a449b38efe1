//! The Redis driver index: GEO set, last-seen sorted set, unavailable set,
//! cities, presence and waiting orders (keys in [`super`]); one Lua round
//! trip per lookup, batched position writes.
//!
//! One Redis: one index for all cities, under the names it always had
//! (`sb:drivers:geo`, …, `sb:orders:waiting`); the city arguments are not
//! used and a search looks across cities.
//!
//! Redis Cluster (SPEC §12): partitioned by city. City `N`'s keys carry the
//! hash tag `{cN}` (`sb:{c1}:drivers:geo`, `:drivers:seen`, `:drivers:off`,
//! `:drivers:sock`, `:drivers:http`, `:drivers:city`,
//! `sb:{c1}:orders:waiting`), so each script and each pipeline of the
//! position writer stays in one slot, and different cities spread over the
//! masters. A driver whose token has no city is in `{c0}`. A search for an
//! order looks in its city only; [`Scope::Cities`] and [`Scope::All`] (a
//! manager's and an admin's nearby) run one script per city, in flight
//! together, and merge by distance. [`Scope::All`] goes over the registry
//! `sb:{cities}` ([`CityRegistry`]), where a node adds a city the first
//! time it writes that city's partition.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use futures_util::future::join_all;

use super::{DriverIndex, IndexError, Nearby, Report, Scope, Via, WAITING_NEAR, city_of};
use crate::redis_conn::{CityRegistry, Conn, HotConn, Keys, Redis, RedisError, timed};

/// Searches a small circle first and doubles it up to the full radius:
/// GEOSEARCH sorts everything inside the circle, so with many drivers around
/// a tight first circle is what keeps the lookup fast.
const NEAREST_LUA: &str = r#"
local radius = tonumber(ARGV[3])
local min_seen = tonumber(ARGV[5])
local limit = tonumber(ARGV[6])
local r = math.min(tonumber(ARGV[7]), radius)
local now = tonumber(ARGV[8])
local function online(id)
  local a = redis.call('ZSCORE', KEYS[4], id)
  if a and tonumber(a) > now then return true end
  local b = redis.call('ZSCORE', KEYS[5], id)
  return b and tonumber(b) > now
end
while true do
  local res = redis.call('GEOSEARCH', KEYS[1], 'FROMLONLAT', ARGV[1], ARGV[2],
    'BYRADIUS', r, 'km', 'ASC', 'COUNT', ARGV[4], 'WITHCOORD', 'WITHDIST')
  local out = {}
  for _, e in ipairs(res) do
    local id = e[1]
    local seen = redis.call('ZSCORE', KEYS[2], id)
    if seen and tonumber(seen) >= min_seen and redis.call('SISMEMBER', KEYS[3], id) == 0
      and online(id) then
      out[#out + 1] = {id, e[2], e[3][1], e[3][2], redis.call('HGET', KEYS[6], id) or ''}
      if #out >= limit then return out end
    end
  end
  if r >= radius then return out end
  r = math.min(r * 2, radius)
end
"#;

/// Marks drivers online until ARGV[2] (never shortening), returns those
/// that were offline by both kinds of presence. KEYS: this kind's set, the
/// other kind's. ARGV: now ms, until ms, driver ids. Entries expired for an
/// hour are dropped on the way, so the sets hold only recent drivers.
const ONLINE_LUA: &str = r#"
local now = tonumber(ARGV[1])
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local a = redis.call('ZSCORE', KEYS[1], id)
  local b = redis.call('ZSCORE', KEYS[2], id)
  if not ((a and tonumber(a) > now) or (b and tonumber(b) > now)) then
    out[#out + 1] = id
  end
  redis.call('ZADD', KEYS[1], 'GT', ARGV[2], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3600000)
return out
"#;

/// The waiting orders near each reported position, in the batch's round
/// trip; nothing is searched while no order waits. KEYS: the waiting set.
/// ARGV: (lon, lat, driver id, radius km) per report. Returns
/// {driver id, {order ids}} for the reports with waiting orders near.
const WAITING_LUA: &str = r#"
if redis.call('ZCARD', KEYS[1]) == 0 then return {} end
local out = {}
for i = 1, #ARGV, 4 do
  local res = redis.call('GEOSEARCH', KEYS[1], 'FROMLONLAT', ARGV[i], ARGV[i + 1],
    'BYRADIUS', ARGV[i + 3], 'km', 'ASC', 'COUNT', ARGV_COUNT)
  if #res > 0 then out[#out + 1] = {ARGV[i + 2], res} end
end
return out
"#;

pub struct RedisIndex {
    hot: Arc<HotConn>,
    parts: Arc<Parts>,
    nearest: redis::Script,
    online: redis::Script,
    /// Positions on their way to the batch writer ([`write_positions`]).
    puts: mpsc::UnboundedSender<Put>,
}

/// How old the registry of cities may be for a search of every city.
const CITIES_MAX_AGE: Duration = Duration::from_secs(1);

/// Key names per city: one set for all cities on one Redis, a partition
/// per city on a cluster.
struct Parts {
    keys: Keys,
    cities: CityRegistry,
}

/// The keys of one partition.
struct Part {
    geo: String,
    seen: String,
    off: String,
    sock: String,
    http: String,
    city: String,
    waiting: String,
}

impl Parts {
    /// The partition a city's keys are in: 0 (the only one) on one Redis.
    fn part_of(&self, city: i64) -> i64 {
        if self.keys.cluster { city } else { 0 }
    }

    fn of(&self, city: i64) -> Part {
        let (d, waiting) = if self.keys.cluster {
            let c = self.keys.city(city);
            (format!("{c}:drivers"), format!("{c}:orders:waiting"))
        } else {
            (
                self.keys.family("drivers"),
                format!("{}orders:waiting", self.keys.prefix),
            )
        };
        Part {
            geo: format!("{d}:geo"),
            seen: format!("{d}:seen"),
            off: format!("{d}:off"),
            sock: format!("{d}:sock"),
            http: format!("{d}:http"),
            city: format!("{d}:city"),
            waiting,
        }
    }

    /// Registers the cities about to be written (a cluster only).
    async fn register(
        &self,
        c: &mut Conn,
        cities: impl IntoIterator<Item = i64>,
    ) -> Result<(), RedisError> {
        if self.keys.cluster {
            self.cities.register(c, cities).await
        } else {
            Ok(())
        }
    }

    /// The partitions a search in `scope` runs in.
    async fn scope(&self, c: &mut Conn, scope: Scope<'_>) -> Result<Vec<i64>, RedisError> {
        if !self.keys.cluster {
            return Ok(vec![0]);
        }
        let mut cities = match scope {
            Scope::City(city) => vec![city],
            Scope::Cities(cities) => cities.to_vec(),
            Scope::All => self.cities.all(c, CITIES_MAX_AGE).await?,
        };
        cities.sort_unstable();
        cities.dedup();
        Ok(cities)
    }
}

/// One position for the batch writer, and where its outcome goes (the
/// waiting orders near it).
struct Put {
    report: Report,
    done: oneshot::Sender<Result<Vec<i64>, RedisError>>,
}

/// A reporting driver and the waiting orders near it.
type NearDriver = (i64, Vec<i64>);

/// Writes positions in batches: whatever queued while the previous batch
/// was in flight (up to `PUT_BATCH`) goes as one `GEOADD`, one `ZADD`, one
/// `HSET` of cities and the waiting-orders script per partition, one
/// pipeline per partition (one on one Redis; one per city on a cluster,
/// all in flight together). Per driver, positions keep their order (a
/// later one in the same `GEOADD` wins). Ends when the index is dropped.
async fn write_positions(
    hot: Arc<HotConn>,
    parts: Arc<Parts>,
    mut rx: mpsc::UnboundedReceiver<Put>,
) {
    const PUT_BATCH: usize = 512;
    let waiting = WAITING_LUA.replace("ARGV_COUNT", &WAITING_NEAR.to_string());
    let mut batch = Vec::with_capacity(PUT_BATCH);
    while rx.recv_many(&mut batch, PUT_BATCH).await > 0 {
        let ms = now_ms();
        let mut by_part: HashMap<i64, Vec<Put>> = HashMap::new();
        for p in batch.drain(..) {
            by_part
                .entry(parts.part_of(city_of(p.report.city_id)))
                .or_default()
                .push(p);
        }
        let conn = match hot.get().await {
            Ok(mut c) => match parts.register(&mut c, by_part.keys().copied()).await {
                Ok(()) => Ok(c),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let c = match conn {
            Ok(c) => c,
            Err(e) => {
                hot.broken();
                for p in by_part.into_values().flatten() {
                    let _ = p.done.send(Err(e.clone()));
                }
                continue;
            }
        };
        let writes = by_part.into_iter().map(|(part, puts)| {
            let mut c = c.clone();
            let keys = parts.of(part);
            let waiting = &waiting;
            async move {
                let r = write_part(&mut c, &keys, waiting, ms, &puts).await;
                (puts, r)
            }
        });
        let mut failed = false;
        for (puts, r) in join_all(writes).await {
            let found: HashMap<i64, Vec<i64>> = match &r {
                Ok((rows,)) => rows.iter().cloned().collect(),
                Err(_) => {
                    failed = true;
                    HashMap::new()
                }
            };
            for p in puts {
                let _ = p.done.send(match &r {
                    Ok(_) => Ok(found.get(&p.report.driver_id).cloned().unwrap_or_default()),
                    Err(e) => Err(e.clone()),
                });
            }
        }
        if failed {
            hot.broken();
        }
    }
}

/// One partition's share of a batch: one pipeline, one slot.
async fn write_part(
    c: &mut Conn,
    keys: &Part,
    waiting: &str,
    ms: i64,
    batch: &[Put],
) -> Result<(Vec<NearDriver>,), RedisError> {
    let mut geoadd = redis::cmd("GEOADD");
    let mut zadd = redis::cmd("ZADD");
    let mut hset = redis::cmd("HSET");
    geoadd.arg(&keys.geo);
    zadd.arg(&keys.seen);
    hset.arg(&keys.city);
    let mut cities = 0;
    let mut near = redis::cmd("EVAL");
    near.arg(waiting).arg(1).arg(&keys.waiting);
    for p in batch {
        let r = &p.report;
        geoadd.arg(r.lon).arg(r.lat).arg(r.driver_id);
        zadd.arg(ms).arg(r.driver_id);
        if let Some(c) = r.city_id {
            hset.arg(r.driver_id).arg(c);
            cities += 1;
        }
        near.arg(r.lon).arg(r.lat).arg(r.driver_id).arg(r.radius_km);
    }
    let mut pipe = redis::pipe();
    pipe.add_command(geoadd).ignore().add_command(zadd).ignore();
    if cities > 0 {
        pipe.add_command(hset).ignore();
    }
    // EVAL, not EVALSHA: inside a pipeline a NOSCRIPT (a restarted
    // Redis) could not be retried; Redis caches the compiled script.
    pipe.add_command(near);
    timed("geo_put", pipe.query_async(c)).await
}

fn now_ms() -> i64 {
    crate::event::now_us() / 1000
}

impl RedisIndex {
    /// Starts the position writer task: call within the runtime.
    pub fn new(redis: Redis, prefix: &str) -> RedisIndex {
        let keys = Keys::new(prefix, redis.is_cluster());
        let parts = Arc::new(Parts {
            cities: CityRegistry::new(&keys),
            keys,
        });
        let hot = Arc::new(HotConn::new(redis));
        let (puts, rx) = mpsc::unbounded_channel();
        let index = RedisIndex {
            hot: hot.clone(),
            parts: parts.clone(),
            nearest: redis::Script::new(NEAREST_LUA),
            online: redis::Script::new(ONLINE_LUA),
            puts,
        };
        tokio::spawn(write_positions(hot, parts, rx));
        index
    }

    async fn conn(&self) -> Result<Conn, IndexError> {
        Ok(self.hot.get().await?)
    }

    /// A connection, with `city` registered (a cluster) before its
    /// partition is written.
    async fn conn_for_write(&self, city: i64) -> Result<Conn, IndexError> {
        let mut c = self.conn().await?;
        self.parts
            .register(&mut c, [city])
            .await
            .map_err(|e| self.fail(e))?;
        Ok(c)
    }

    /// One command on the shared connection, timed as `op`; `write`: the
    /// city whose partition it writes (registered first on a cluster).
    async fn run<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        write: Option<i64>,
        cmd: &redis::Cmd,
    ) -> Result<T, IndexError> {
        let mut c = match write {
            Some(city) => self.conn_for_write(city).await?,
            None => self.conn().await?,
        };
        timed(op, cmd.query_async(&mut c))
            .await
            .map_err(|e| self.fail(e))
    }

    /// A failed command drops the shared connection (the next takes a fresh one).
    fn fail(&self, e: RedisError) -> IndexError {
        self.hot.broken();
        IndexError::Redis(e)
    }

    /// The nearest-driver script in one partition.
    #[allow(clippy::too_many_arguments)]
    async fn nearest_in(
        &self,
        mut c: Conn,
        part: i64,
        lat: f64,
        lon: f64,
        radius_km: f64,
        fresh: Duration,
        limit: usize,
    ) -> Result<Vec<Nearby>, IndexError> {
        let keys = self.parts.of(part);
        let min_seen = now_ms() - fresh.as_millis() as i64;
        // Look past stale/unavailable drivers: fetch more than we keep.
        let window = limit * 4 + 50;
        let mut inv = self.nearest.prepare_invoke();
        inv.key(&keys.geo)
            .key(&keys.seen)
            .key(&keys.off)
            .key(&keys.sock)
            .key(&keys.http)
            .key(&keys.city)
            .arg(lon)
            .arg(lat)
            .arg(radius_km)
            .arg(window)
            .arg(min_seen)
            .arg(limit)
            .arg((radius_km / 16.0).max(0.5))
            .arg(now_ms());
        let rows: Vec<(i64, String, String, String, String)> =
            timed("geo_nearest", inv.invoke_async(&mut c))
                .await
                .map_err(|e| self.fail(e))?;
        rows.into_iter()
            .map(|(id, dist, lon, lat, city)| {
                let f = |s: &str| {
                    s.parse::<f64>()
                        .map_err(|e| IndexError::Failed(format!("bad number {s:?}: {e}")))
                };
                Ok(Nearby {
                    driver_id: id,
                    distance_km: f(&dist)?,
                    latitude: f(&lat)?,
                    longitude: f(&lon)?,
                    city_id: city.parse().ok(),
                })
            })
            .collect()
    }
}

impl DriverIndex for RedisIndex {
    async fn put(&self, report: Report) -> Result<Vec<i64>, IndexError> {
        let stopped = || IndexError::Failed("position writer stopped".into());
        let (done, outcome) = oneshot::channel();
        self.puts
            .send(Put { report, done })
            .map_err(|_| stopped())?;
        Ok(outcome.await.map_err(|_| stopped())??)
    }

    async fn set_available(
        &self,
        city: i64,
        driver_id: i64,
        available: bool,
    ) -> Result<(), IndexError> {
        let mut cmd = redis::cmd(if available { "SREM" } else { "SADD" });
        cmd.arg(&self.parts.of(city).off).arg(driver_id);
        self.run("driver_status", Some(city), &cmd).await
    }

    async fn nearest(
        &self,
        scope: Scope<'_>,
        lat: f64,
        lon: f64,
        radius_km: f64,
        fresh: Duration,
        limit: usize,
    ) -> Result<Vec<Nearby>, IndexError> {
        let mut c = self.conn().await?;
        let parts = self
            .parts
            .scope(&mut c, scope)
            .await
            .map_err(|e| self.fail(e))?;
        if let [part] = parts[..] {
            return self
                .nearest_in(c, part, lat, lon, radius_km, fresh, limit)
                .await;
        }
        // One script per city, in flight together; merged by distance.
        let found = join_all(
            parts
                .iter()
                .map(|part| self.nearest_in(c.clone(), *part, lat, lon, radius_km, fresh, limit)),
        )
        .await;
        let mut all = Vec::new();
        for f in found {
            all.extend(f?);
        }
        all.sort_by(|a, b| {
            a.distance_km
                .total_cmp(&b.distance_km)
                .then(a.driver_id.cmp(&b.driver_id))
        });
        // A driver whose token changed city may linger in the old one:
        // each driver once, at its nearest.
        let mut seen = std::collections::HashSet::new();
        all.retain(|n| seen.insert(n.driver_id));
        all.truncate(limit);
        Ok(all)
    }

    async fn position(&self, city: i64, driver_id: i64) -> Result<Option<(f64, f64)>, IndexError> {
        let mut cmd = redis::cmd("GEOPOS");
        cmd.arg(&self.parts.of(city).geo).arg(driver_id);
        let pos: Vec<Option<(f64, f64)>> = self.run("geo_pos", None, &cmd).await?;
        Ok(pos
            .into_iter()
            .next()
            .flatten()
            .map(|(lon, lat)| (lat, lon)))
    }

    async fn locate(&self, city: i64, driver_id: i64) -> Result<Option<(f64, f64)>, IndexError> {
        if let Some(p) = self.position(city, driver_id).await? {
            return Ok(Some(p));
        }
        if !self.parts.keys.cluster {
            return Ok(None);
        }
        // The other cities' partitions, in flight together.
        let mut c = self.conn().await?;
        let others: Vec<i64> = self
            .parts
            .scope(&mut c, Scope::All)
            .await
            .map_err(|e| self.fail(e))?
            .into_iter()
            .filter(|p| *p != city)
            .collect();
        let found = join_all(others.iter().map(|p| self.position(*p, driver_id))).await;
        for f in found {
            if let Some(p) = f? {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    async fn online(
        &self,
        city: i64,
        ids: &[i64],
        via: Via,
        ttl: Duration,
    ) -> Result<Vec<i64>, IndexError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.parts.of(city);
        let (this, other) = match via {
            Via::Socket => (&keys.sock, &keys.http),
            Via::Http => (&keys.http, &keys.sock),
        };
        let now = now_ms();
        let mut came = Vec::new();
        let mut c = self.conn_for_write(city).await?;
        // Bounded scripts: a node refreshing 100k drivers must not block
        // Redis for one long call.
        for chunk in ids.chunks(1000) {
            let mut inv = self.online.prepare_invoke();
            inv.key(this)
                .key(other)
                .arg(now)
                .arg(now + ttl.as_millis() as i64);
            for id in chunk {
                inv.arg(id);
            }
            let mut ids: Vec<i64> = timed("presence", inv.invoke_async(&mut c))
                .await
                .map_err(|e| self.fail(e))?;
            came.append(&mut ids);
        }
        Ok(came)
    }

    async fn offline(&self, city: i64, driver_id: i64) -> Result<(), IndexError> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(&self.parts.of(city).sock).arg(driver_id);
        self.run("presence", None, &cmd).await
    }

    async fn wait_order(
        &self,
        city: i64,
        order_id: i64,
        lat: f64,
        lon: f64,
    ) -> Result<(), IndexError> {
        let mut cmd = redis::cmd("GEOADD");
        cmd.arg(&self.parts.of(city).waiting)
            .arg(lon)
            .arg(lat)
            .arg(order_id);
        self.run("waiting", Some(city), &cmd).await
    }

    async fn unwait_order(&self, city: i64, order_id: i64) -> Result<(), IndexError> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(&self.parts.of(city).waiting).arg(order_id);
        self.run("waiting", None, &cmd).await
    }

    async fn waiting_near(
        &self,
        city: i64,
        lat: f64,
        lon: f64,
        radius_km: f64,
    ) -> Result<Vec<i64>, IndexError> {
        let mut cmd = redis::cmd("GEOSEARCH");
        cmd.arg(&self.parts.of(city).waiting)
            .arg("FROMLONLAT")
            .arg(lon)
            .arg(lat)
            .arg("BYRADIUS")
            .arg(radius_km)
            .arg("km")
            .arg("ASC")
            .arg("COUNT")
            .arg(WAITING_NEAR);
        self.run("waiting", None, &cmd).await
    }
}
