//! The embedded driver index: maps behind a mutex, scanned linearly. One
//! index for all cities: the city arguments are not used, and a search
//! looks across cities whatever its [`Scope`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{DriverIndex, IndexError, Nearby, Report, Scope, Via, WAITING_NEAR, haversine_km};
use crate::lock::lock;

struct Entry {
    lat: f64,
    lon: f64,
    seen: Instant,
    available: bool,
    city_id: Option<i64>,
}

/// Until when a driver is online, per kind of presence.
#[derive(Default, Clone, Copy)]
struct Presence {
    socket: Option<Instant>,
    http: Option<Instant>,
}

impl Presence {
    fn online(&self, now: Instant) -> bool {
        self.socket.is_some_and(|t| t > now) || self.http.is_some_and(|t| t > now)
    }
}

#[derive(Default)]
struct State {
    drivers: HashMap<i64, Entry>,
    presence: HashMap<i64, Presence>,
    /// Orders waiting for a driver: pickup point.
    waiting: HashMap<i64, (f64, f64)>,
}

impl State {
    fn waiting_near(&self, lat: f64, lon: f64, radius_km: f64) -> Vec<i64> {
        let mut near: Vec<(f64, i64)> = self
            .waiting
            .iter()
            .map(|(id, (olat, olon))| (haversine_km(lat, lon, *olat, *olon), *id))
            .filter(|(d, _)| *d <= radius_km)
            .collect();
        near.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        near.into_iter()
            .take(WAITING_NEAR)
            .map(|(_, id)| id)
            .collect()
    }
}

#[derive(Default)]
pub struct MemoryIndex {
    state: Mutex<State>,
}

impl MemoryIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl DriverIndex for MemoryIndex {
    async fn put(&self, r: Report) -> Result<Vec<i64>, IndexError> {
        let mut s = self.lock();
        let e = s.drivers.entry(r.driver_id).or_insert(Entry {
            lat: r.lat,
            lon: r.lon,
            seen: Instant::now(),
            available: true,
            city_id: r.city_id,
        });
        e.lat = r.lat;
        e.lon = r.lon;
        e.seen = Instant::now();
        e.city_id = r.city_id;
        Ok(if s.waiting.is_empty() {
            Vec::new()
        } else {
            s.waiting_near(r.lat, r.lon, r.radius_km)
        })
    }

    async fn set_available(
        &self,
        _city: i64,
        driver_id: i64,
        available: bool,
    ) -> Result<(), IndexError> {
        let mut s = self.lock();
        if let Some(e) = s.drivers.get_mut(&driver_id) {
            e.available = available;
        } else if !available {
            // Unknown driver saying "unavailable": remember it for when it
            // reports a position.
            s.drivers.insert(
                driver_id,
                Entry {
                    lat: 0.0,
                    lon: 0.0,
                    seen: Instant::now() - Duration::from_secs(86400 * 365),
                    available: false,
                    city_id: None,
                },
            );
        }
        Ok(())
    }

    async fn nearest(
        &self,
        _scope: Scope<'_>,
        lat: f64,
        lon: f64,
        radius_km: f64,
        fresh: Duration,
        limit: usize,
    ) -> Result<Vec<Nearby>, IndexError> {
        let now = Instant::now();
        let s = self.lock();
        let mut out: Vec<Nearby> = s
            .drivers
            .iter()
            .filter(|(id, e)| {
                e.available
                    && now.duration_since(e.seen) <= fresh
                    && s.presence.get(id).is_some_and(|p| p.online(now))
            })
            .map(|(id, e)| Nearby {
                driver_id: *id,
                distance_km: haversine_km(lat, lon, e.lat, e.lon),
                latitude: e.lat,
                longitude: e.lon,
                city_id: e.city_id,
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

    async fn position(&self, _city: i64, driver_id: i64) -> Result<Option<(f64, f64)>, IndexError> {
        Ok(self
            .lock()
            .drivers
            .get(&driver_id)
            .filter(|e| e.seen.elapsed() < Duration::from_secs(86400 * 364))
            .map(|e| (e.lat, e.lon)))
    }

    async fn online(
        &self,
        _city: i64,
        ids: &[i64],
        via: Via,
        ttl: Duration,
    ) -> Result<Vec<i64>, IndexError> {
        let now = Instant::now();
        let until = now + ttl;
        let mut s = self.lock();
        let mut came = Vec::new();
        for id in ids {
            let p = s.presence.entry(*id).or_default();
            if !p.online(now) {
                came.push(*id);
            }
            let slot = match via {
                Via::Socket => &mut p.socket,
                Via::Http => &mut p.http,
            };
            *slot = Some(slot.map_or(until, |t| t.max(until)));
        }
        Ok(came)
    }

    async fn offline(&self, _city: i64, driver_id: i64) -> Result<(), IndexError> {
        if let Some(p) = self.lock().presence.get_mut(&driver_id) {
            p.socket = None;
        }
        Ok(())
    }

    async fn wait_order(
        &self,
        _city: i64,
        order_id: i64,
        lat: f64,
        lon: f64,
    ) -> Result<(), IndexError> {
        self.lock().waiting.insert(order_id, (lat, lon));
        Ok(())
    }

    async fn unwait_order(&self, _city: i64, order_id: i64) -> Result<(), IndexError> {
        self.lock().waiting.remove(&order_id);
        Ok(())
    }

    async fn waiting_near(
        &self,
        _city: i64,
        lat: f64,
        lon: f64,
        radius_km: f64,
    ) -> Result<Vec<i64>, IndexError> {
        Ok(self.lock().waiting_near(lat, lon, radius_km))
    }
}
