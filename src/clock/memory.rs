//! The embedded offer clock: an ordered set behind a mutex, one for all
//! cities (the city arguments are not used; claims report city 0).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use super::{Claimed, ClockError, Due, OfferClock};
use crate::lock::lock;

/// Deadlines ordered by time, and each offer's deadline (for cancel).
#[derive(Default)]
struct Deadlines {
    by_time: BTreeSet<(i64, i64)>,
    by_offer: HashMap<i64, i64>,
}

#[derive(Default)]
pub struct MemoryClock {
    inner: Mutex<Deadlines>,
}

impl OfferClock for MemoryClock {
    async fn schedule(
        &self,
        _city: i64,
        offer_id: i64,
        deadline_ms: i64,
    ) -> Result<(), ClockError> {
        let mut g = lock(&self.inner);
        if let Some(old) = g.by_offer.insert(offer_id, deadline_ms) {
            g.by_time.remove(&(old, offer_id));
        }
        g.by_time.insert((deadline_ms, offer_id));
        Ok(())
    }

    async fn seed(&self, _city: i64, offer_id: i64, deadline_ms: i64) -> Result<(), ClockError> {
        let mut g = lock(&self.inner);
        let g = &mut *g;
        if let std::collections::hash_map::Entry::Vacant(e) = g.by_offer.entry(offer_id) {
            e.insert(deadline_ms);
            g.by_time.insert((deadline_ms, offer_id));
        }
        Ok(())
    }

    async fn cancel(&self, _city: i64, offer_id: i64) -> Result<(), ClockError> {
        let mut g = lock(&self.inner);
        if let Some(old) = g.by_offer.remove(&offer_id) {
            g.by_time.remove(&(old, offer_id));
        }
        Ok(())
    }

    async fn claim_due(&self, now_ms: i64, max: usize) -> Result<Claimed, ClockError> {
        let mut g = lock(&self.inner);
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
            out.push(Due {
                offer_id: id,
                city: 0,
            });
        }
        Ok(Claimed {
            ids: out,
            next_ms: g.by_time.first().map(|(deadline, _)| *deadline),
        })
    }

    async fn done(&self, _city: i64, _offer_id: i64) -> Result<(), ClockError> {
        Ok(())
    }
}
