//! The Redis offer clock: a due set and a lease set, claimed by one Lua
//! script so exactly one node handles each deadline. Keys `sb:offers:due`
//! and `sb:offers:lease`; on a Redis Cluster both carry the hash tag
//! `{offers}` (`sb:{offers}:due`, `sb:{offers}:lease`) so the claim script
//! stays in one slot. Not partitioned by city yet: one slot holds every
//! deadline.

use std::time::Duration;

use super::{Claimed, ClockError, OfferClock};
use crate::redis_conn::{Conn, HotConn, Keys, Redis, RedisError, timed};

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
    due: String,
    lease_key: String,
    lease: Duration,
    claim: redis::Script,
    seed: redis::Script,
}

impl RedisClock {
    pub fn new(redis: Redis, prefix: &str, lease: Duration) -> RedisClock {
        let family = Keys::new(prefix, redis.is_cluster()).family("offers");
        RedisClock {
            hot: HotConn::new(redis),
            due: format!("{family}:due"),
            lease_key: format!("{family}:lease"),
            lease,
            claim: redis::Script::new(CLAIM_LUA),
            seed: redis::Script::new(SEED_LUA),
        }
    }

    async fn conn(&self) -> Result<Conn, ClockError> {
        Ok(self.hot.get().await?)
    }

    /// A failed command drops the shared connection (the next takes a fresh one).
    fn fail(&self, e: RedisError) -> ClockError {
        self.hot.broken();
        ClockError(e)
    }
}

impl OfferClock for RedisClock {
    async fn schedule(&self, offer_id: i64, deadline_ms: i64) -> Result<(), ClockError> {
        let mut c = self.conn().await?;
        timed(
            "offer_schedule",
            redis::cmd("ZADD")
                .arg(&self.due)
                .arg(deadline_ms)
                .arg(offer_id)
                .exec_async(&mut c),
        )
        .await
        .map_err(|e| self.fail(e))
    }

    async fn seed(&self, offer_id: i64, deadline_ms: i64) -> Result<(), ClockError> {
        let mut c = self.conn().await?;
        let mut inv = self.seed.prepare_invoke();
        inv.key(&self.due)
            .key(&self.lease_key)
            .arg(offer_id)
            .arg(deadline_ms);
        timed("offer_seed", inv.invoke_async::<i64>(&mut c))
            .await
            .map(|_| ())
            .map_err(|e| self.fail(e))
    }

    async fn cancel(&self, offer_id: i64) -> Result<(), ClockError> {
        let mut c = self.conn().await?;
        let mut p = redis::pipe();
        p.cmd("ZREM").arg(&self.due).arg(offer_id).ignore();
        p.cmd("ZREM").arg(&self.lease_key).arg(offer_id).ignore();
        timed("offer_cancel", p.exec_async(&mut c))
            .await
            .map_err(|e| self.fail(e))
    }

    async fn claim_due(&self, now_ms: i64, max: usize) -> Result<Claimed, ClockError> {
        let mut c = self.conn().await?;
        let mut inv = self.claim.prepare_invoke();
        inv.key(&self.due)
            .key(&self.lease_key)
            .arg(now_ms)
            .arg(now_ms + self.lease.as_millis() as i64)
            .arg(max);
        let mut v: Vec<i64> = timed("offer_claim", inv.invoke_async(&mut c))
            .await
            .map_err(|e| self.fail(e))?;
        let next = if v.is_empty() { -1 } else { v.remove(0) };
        Ok(Claimed {
            ids: v,
            next_ms: (next >= 0).then_some(next),
        })
    }

    async fn done(&self, offer_id: i64) -> Result<(), ClockError> {
        let mut c = self.conn().await?;
        timed(
            "offer_done",
            redis::cmd("ZREM")
                .arg(&self.lease_key)
                .arg(offer_id)
                .exec_async(&mut c),
        )
        .await
        .map_err(|e| self.fail(e))
    }
}
