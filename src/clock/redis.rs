//! The Redis offer clock: a due set and a lease set, claimed by one Lua
//! script so exactly one node handles each deadline.
//!
//! One Redis: `sb:offers:due` and `sb:offers:lease` for all cities (the
//! city arguments are not used; claims report city 0).
//!
//! Redis Cluster (SPEC §12): partitioned by the city of the offer's order,
//! `sb:{c1}:offers:due` and `sb:{c1}:offers:lease` (hash tag `{cN}`, the
//! slot of that city's driver index; `{c0}` for none), so the claim script
//! stays in one slot and cities spread over the masters. A claim goes over
//! the registry `sb:{cities}` (read at most once a second; the cities this
//! node wrote are known at once) and runs one claim script per city, in
//! flight together, sharing `max` between them (the first cities, taken in
//! turn, get the remainder), so a claim never takes more than `max`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::join_all;

use super::{Claimed, ClockError, Due, OfferClock};
use crate::redis_conn::{CityRegistry, Conn, HotConn, Keys, Redis, RedisError, timed};

const CLAIM_LUA: &str = r#"
local now = tonumber(ARGV[1])
local lease_until = tonumber(ARGV[2])
local max = tonumber(ARGV[3])
local out = {}
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, max)
for _, id in ipairs(stale) do
  redis.call('ZADD', KEYS[2], lease_until, id)
  out[#out + 1] = id
end
if #out < max then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, max - #out)
  for _, id in ipairs(due) do
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], lease_until, id)
    out[#out + 1] = id
  end
end
-- The earliest pending deadline or lease expiry goes first (-1: none).
local nxt = -1
local d = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if d[2] then nxt = tonumber(d[2]) end
local l = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if l[2] and (nxt < 0 or tonumber(l[2]) < nxt) then nxt = tonumber(l[2]) end
table.insert(out, 1, nxt)
return out
"#;

/// Re-seeds a deadline unless it is due already or claimed (leased).
const SEED_LUA: &str = r#"
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return 0
end
return redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
"#;

pub struct RedisClock {
    hot: HotConn,
    keys: Keys,
    cities: CityRegistry,
    /// Which city's claim goes first (turns, so a small `max` reaches
    /// every city).
    turn: AtomicUsize,
    lease: Duration,
    claim: redis::Script,
    seed: redis::Script,
}

/// How old the registry of cities may be for a claim.
const CITIES_MAX_AGE: Duration = Duration::from_secs(1);

impl RedisClock {
    pub fn new(redis: Redis, prefix: &str, lease: Duration) -> RedisClock {
        let keys = Keys::new(prefix, redis.is_cluster());
        RedisClock {
            hot: HotConn::new(redis),
            cities: CityRegistry::new(&keys),
            keys,
            turn: AtomicUsize::new(0),
            lease,
            claim: redis::Script::new(CLAIM_LUA),
            seed: redis::Script::new(SEED_LUA),
        }
    }

    /// The due and lease keys of a city (the same for all on one Redis).
    fn keys_of(&self, city: i64) -> (String, String) {
        let family = if self.keys.cluster {
            format!("{}:offers", self.keys.city(city))
        } else {
            self.keys.family("offers")
        };
        (format!("{family}:due"), format!("{family}:lease"))
    }

    async fn conn(&self) -> Result<Conn, ClockError> {
        Ok(self.hot.get().await?)
    }

    /// A connection, with `city` registered (a cluster) before its sets
    /// are written.
    async fn conn_for_write(&self, city: i64) -> Result<Conn, ClockError> {
        let mut c = self.conn().await?;
        if self.keys.cluster {
            self.cities
                .register(&mut c, [city])
                .await
                .map_err(|e| self.fail(e))?;
        }
        Ok(c)
    }

    /// A failed command drops the shared connection (the next takes a fresh one).
    fn fail(&self, e: RedisError) -> ClockError {
        self.hot.broken();
        ClockError(e)
    }

    /// The claim script on one city's sets.
    async fn claim_in(
        &self,
        mut c: Conn,
        city: i64,
        now_ms: i64,
        max: usize,
    ) -> Result<Claimed, RedisError> {
        let (due, lease) = self.keys_of(city);
        let mut inv = self.claim.prepare_invoke();
        inv.key(&due)
            .key(&lease)
            .arg(now_ms)
            .arg(now_ms + self.lease.as_millis() as i64)
            .arg(max);
        let mut v: Vec<i64> = timed("offer_claim", inv.invoke_async(&mut c)).await?;
        let next = if v.is_empty() { -1 } else { v.remove(0) };
        let city = if self.keys.cluster { city } else { 0 };
        Ok(Claimed {
            ids: v
                .into_iter()
                .map(|offer_id| Due { offer_id, city })
                .collect(),
            next_ms: (next >= 0).then_some(next),
        })
    }
}

impl OfferClock for RedisClock {
    async fn schedule(&self, city: i64, offer_id: i64, deadline_ms: i64) -> Result<(), ClockError> {
        let mut c = self.conn_for_write(city).await?;
        timed(
            "offer_schedule",
            redis::cmd("ZADD")
                .arg(self.keys_of(city).0)
                .arg(deadline_ms)
                .arg(offer_id)
                .exec_async(&mut c),
        )
        .await
        .map_err(|e| self.fail(e))
    }

    async fn seed(&self, city: i64, offer_id: i64, deadline_ms: i64) -> Result<(), ClockError> {
        let mut c = self.conn_for_write(city).await?;
        let (due, lease) = self.keys_of(city);
        let mut inv = self.seed.prepare_invoke();
        inv.key(&due).key(&lease).arg(offer_id).arg(deadline_ms);
        timed("offer_seed", inv.invoke_async::<i64>(&mut c))
            .await
            .map(|_| ())
            .map_err(|e| self.fail(e))
    }

    async fn cancel(&self, city: i64, offer_id: i64) -> Result<(), ClockError> {
        let mut c = self.conn().await?;
        let (due, lease) = self.keys_of(city);
        let mut p = redis::pipe();
        p.cmd("ZREM").arg(&due).arg(offer_id).ignore();
        p.cmd("ZREM").arg(&lease).arg(offer_id).ignore();
        timed("offer_cancel", p.exec_async(&mut c))
            .await
            .map_err(|e| self.fail(e))
    }

    async fn claim_due(&self, now_ms: i64, max: usize) -> Result<Claimed, ClockError> {
        let mut c = self.conn().await?;
        if !self.keys.cluster {
            return self
                .claim_in(c, 0, now_ms, max)
                .await
                .map_err(|e| self.fail(e));
        }
        let cities = self
            .cities
            .all(&mut c, CITIES_MAX_AGE)
            .await
            .map_err(|e| self.fail(e))?;
        let n = cities.len();
        if n == 0 || max == 0 {
            return Ok(Claimed::default());
        }
        // `max` shared: `max / n` each, one more for the first `max % n`
        // in this claim's turn order; a city left out this time (more
        // cities than `max`) counts as due now, so the caller polls again.
        let first = self.turn.fetch_add(1, Ordering::Relaxed) % n;
        let mut skipped = false;
        let mut claims = Vec::with_capacity(n.min(max));
        for i in 0..n {
            let share = max / n + usize::from(i < max % n);
            let city = cities[(first + i) % n];
            if share == 0 {
                skipped = true;
            } else {
                claims.push(self.claim_in(c.clone(), city, now_ms, share));
            }
        }
        let mut out = Claimed::default();
        let mut failed = None;
        for r in join_all(claims).await {
            match r {
                Ok(one) => {
                    out.ids.extend(one.ids);
                    out.next_ms = match (out.next_ms, one.next_ms) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                Err(e) => failed = Some(e),
            }
        }
        if skipped {
            out.next_ms = Some(now_ms);
        }
        match failed {
            // What the other cities' claims took is leased: hand it over.
            Some(e) if out.ids.is_empty() => Err(self.fail(e)),
            Some(e) => {
                self.hot.broken();
                tracing::debug!(error = %e, "claiming one city's deadlines failed");
                Ok(out)
            }
            None => Ok(out),
        }
    }

    async fn done(&self, city: i64, offer_id: i64) -> Result<(), ClockError> {
        let mut c = self.conn().await?;
        timed(
            "offer_done",
            redis::cmd("ZREM")
                .arg(self.keys_of(city).1)
                .arg(offer_id)
                .exec_async(&mut c),
        )
        .await
        .map_err(|e| self.fail(e))
    }
}
