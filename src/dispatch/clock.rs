//! `OfferClock`: offer deadlines, and which are due.
//!
//! Redis (cluster mode): `{p}offers:due` is a sorted set of offer ids scored
//! by deadline (unix ms). A Lua script claims due ids atomically by moving
//! them into `{p}offers:lease`, scored by lease expiry, so exactly one node
//! handles each; ids whose lease ran out (their node died mid-expiry) are
//! claimed again by whichever node asks next. `done` drops the lease.
//! Memory (embedded mode): an ordered set behind a mutex.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use super::index::timed;

#[derive(Debug, thiserror::Error)]
#[error("offer clock: {0}")]
pub struct ClockError(pub String);

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

/// Deadlines ordered by time, and each offer's deadline (for cancel).
#[derive(Default)]
struct Deadlines {
    by_time: BTreeSet<(i64, i64)>,
    by_offer: HashMap<i64, i64>,
}

/// What a claim took, and the earliest deadline or lease expiry still
/// pending after it (unix ms), so the caller can sleep until then.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Claimed {
    pub ids: Vec<i64>,
    pub next_ms: Option<i64>,
}

#[derive(Default)]
pub struct MemoryClock {
    inner: Mutex<Deadlines>,
}

impl OfferClock for MemoryClock {
    async fn schedule(&self, offer_id: i64, deadline_ms: i64) -> Result<(), ClockError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = g.by_offer.insert(offer_id, deadline_ms) {
            g.by_time.remove(&(old, offer_id));
        }
        g.by_time.insert((deadline_ms, offer_id));
        Ok(())
    }

    async fn seed(&self, offer_id: i64, deadline_ms: i64) -> Result<(), ClockError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let g = &mut *g;
        if let std::collections::hash_map::Entry::Vacant(e) = g.by_offer.entry(offer_id) {
            e.insert(deadline_ms);
            g.by_time.insert((deadline_ms, offer_id));
        }
        Ok(())
    }

    async fn cancel(&self, offer_id: i64) -> Result<(), ClockError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = g.by_offer.remove(&offer_id) {
            g.by_time.remove(&(old, offer_id));
        }
        Ok(())
    }

    async fn claim_due(&self, now_ms: i64, max: usize) -> Result<Claimed, ClockError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        while out.len() < max {
            let Some(&(deadline, id)) = g.by_time.first() else {
                break;
            };
            if deadline > now_ms {
                break;
            }
            g.by_time.pop_first();
            g.by_offer.remove(&id);
            out.push(id);
        }
        Ok(Claimed {
            ids: out,
            next_ms: g.by_time.first().map(|(deadline, _)| *deadline),
        })
    }

    async fn done(&self, _offer_id: i64) -> Result<(), ClockError> {
        Ok(())
    }
}

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
    hot: crate::store::HotConn,
    due: String,
    lease_key: String,
    lease: Duration,
    claim: redis::Script,
    seed: redis::Script,
}

impl RedisClock {
    pub fn new(pool: deadpool_redis::Pool, prefix: &str, lease: Duration) -> RedisClock {
        RedisClock {
            hot: crate::store::HotConn::new(pool),
            due: format!("{prefix}offers:due"),
            lease_key: format!("{prefix}offers:lease"),
            lease,
            claim: redis::Script::new(CLAIM_LUA),
            seed: redis::Script::new(SEED_LUA),
        }
    }

    async fn conn(&self) -> Result<redis::aio::MultiplexedConnection, ClockError> {
        self.hot.get().await.map_err(ClockError)
    }

    /// A failed command drops the shared connection (the next takes a fresh one).
    fn fail(&self, e: String) -> ClockError {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_clock_claims_due_once() {
        let c = MemoryClock::default();
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
    }
}
