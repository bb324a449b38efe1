//! The embedded driver index: a map behind a mutex, scanned linearly.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{DriverIndex, IndexError, Nearby, haversine_km};
use crate::lock::lock;

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
        lock(&self.drivers)
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
