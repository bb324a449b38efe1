//! [`App`]: the state the edges (HTTP handlers, socket tasks, the health
//! loop) share on one node. The rules get only its [`Ctx`]; nothing below
//! the edges imports this module.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Identity, Verifier};
use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::domain::dispatch;
use crate::domain::{Ctx, DomainError};
use crate::event::{Position, iso_now};
use crate::hub::Hub;
use crate::index::{Via, city_of};
use crate::lock::lock;
use crate::metrics as m;
use crate::ws::outbox::{ConnId, Outbox};

/// How long a driver socket's connect waits for its presence to be
/// recorded.
const PRESENCE_WAIT: Duration = Duration::from_millis(500);

/// What readiness is made of; refreshed by the health task every second and
/// at once when the broker loses Redis.
#[derive(Default)]
pub struct Health {
    pub redis_ok: AtomicBool,
    pub db_ok: AtomicBool,
    pub draining: AtomicBool,
}

/// The state shared by every request and socket of one node.
pub struct App {
    pub config: Config,
    /// What the rules use: database, broker, driver index, offer clock.
    pub ctx: Arc<Ctx>,
    pub hub: Arc<Hub>,
    pub verifier: Verifier,
    pub redis: Option<crate::redis_conn::Redis>,
    /// Cancelled when the drain starts: stop accepting, close sockets 1012.
    pub drain: CancellationToken,
    /// Cancelled when the drain is over: background tasks stop.
    pub stop: CancellationToken,
    /// Every connection task, so the drain can wait for them.
    pub tracker: TaskTracker,
    pub health: Health,
    pub metrics: PrometheusHandle,
    pub started_at: String,
    /// A key for `/api/publish` made up in dev mode (no `API_KEYS`).
    pub dev_api_key: Option<String>,
    pub(crate) next_conn: AtomicU64,
    /// Driver positions waiting out `LOCATION_MIN_INTERVAL_MS`.
    pub(crate) locations: LocationGate,
    /// Drivers with a socket open on this node: how many sockets each, and
    /// its city (the first socket's token's; 0 for none), the partition its
    /// presence is in on a cluster (their presence is this node's to
    /// refresh).
    pub(crate) drivers_here: Mutex<HashMap<i64, Here>>,
}

/// A driver with sockets on this node ([`App::drivers_here`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Here {
    pub sockets: u32,
    pub city: i64,
}

/// At most one position per driver per interval is applied and fanned out
/// (SPEC §11); a report inside the interval replaces the pending one, which
/// is applied when the interval is over, so the latest position always
/// arrives. Per node: a driver reports to the node its socket is on.
#[derive(Default)]
pub(crate) struct LocationGate {
    slots: Mutex<HashMap<i64, Slot>>,
}

struct Slot {
    /// When a position of this driver was last applied.
    last: Instant,
    /// The latest report inside the interval, applied at its end.
    pending: Option<(Identity, Position)>,
}

impl LocationGate {
    /// Drops slots of drivers quiet for a while, so the map does not keep
    /// every driver ever seen.
    fn sweep(slots: &mut HashMap<i64, Slot>, interval: Duration) {
        if slots.len() > 4096 {
            let idle = interval.max(Duration::from_secs(1)) * 10;
            slots.retain(|_, s| s.pending.is_some() || s.last.elapsed() < idle);
        }
    }
}

impl App {
    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_ready(&self) -> bool {
        !self.health.draining.load(Ordering::Relaxed)
            && self.health.db_ok.load(Ordering::Relaxed)
            && (self.redis.is_none()
                || (self.health.redis_ok.load(Ordering::Relaxed) && self.ctx.broker.is_healthy()))
    }

    /// Readiness goes false for good: `/readyz` answers 503 from now on.
    /// The one place a node becomes unready (SIGTERM's delay, the drain).
    pub fn mark_unready(&self) {
        self.health.draining.store(true, Ordering::Relaxed);
        metrics::gauge!(m::READY).set(0.0);
    }

    /// Adds a socket to a room; resolves once the room is live cluster-wide.
    pub async fn join(&self, outbox: &Arc<Outbox>, room: &str) -> Result<(), BrokerError> {
        self.hub.add(room, outbox);
        self.ctx.broker.reconcile(room).await
    }

    /// Removes a socket from a room; the last local member out unsubscribes
    /// the node (in the background: nobody waits for it).
    pub fn leave(self: &Arc<Self>, id: ConnId, room: &str) {
        if self.hub.remove(room, id) {
            let app = self.clone();
            let room = room.to_string();
            tokio::spawn(async move {
                let _ = app.ctx.broker.reconcile(&room).await;
            });
        }
    }

    /// A driver socket opened: the driver is online (SPEC §5 "Presence");
    /// if it just came online, the orders waiting near it are tried.
    /// Recorded before the connect message, so that a position sent right
    /// after it finds the driver online; a Redis that does not answer holds
    /// the connect for at most [`PRESENCE_WAIT`] (the refresh loop records
    /// the driver later).
    /// `city_id`: the city of the driver's token.
    pub async fn driver_socket_opened(&self, driver_id: i64, city_id: Option<i64>) {
        let city = city_of(city_id);
        let first = {
            let mut here = lock(&self.drivers_here);
            let h = here.entry(driver_id).or_insert(Here { sockets: 0, city });
            h.sockets += 1;
            h.sockets == 1
        };
        if !first {
            return;
        }
        let ids = [driver_id];
        let online = dispatch::drivers_online(&self.ctx, city, &ids, Via::Socket);
        match tokio::time::timeout(PRESENCE_WAIT, online).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(driver = driver_id, error = %e, "presence not recorded")
            }
            Err(_) => tracing::debug!(driver = driver_id, "presence not recorded in time"),
        }
    }

    /// A driver socket closed; the driver's last one on this node ends its
    /// socket presence at once.
    pub fn driver_socket_closed(&self, driver_id: i64) {
        let last = {
            let mut here = lock(&self.drivers_here);
            match here.get_mut(&driver_id) {
                Some(h) if h.sockets > 1 => {
                    h.sockets -= 1;
                    None
                }
                Some(_) => here.remove(&driver_id),
                None => None,
            }
        };
        if let Some(Here { city, .. }) = last {
            let ctx = self.ctx.clone();
            tokio::spawn(async move {
                if let Err(e) = dispatch::driver_offline(&ctx, city, driver_id).await {
                    // Its presence runs out by itself (SOCKET_PRESENCE_TTL).
                    tracing::debug!(driver = driver_id, error = %e, "presence not cleared");
                }
            });
        }
    }

    /// Refreshes, every [`dispatch::PRESENCE_REFRESH`], the presence of the
    /// drivers whose sockets this node holds: a node that dies stops, and
    /// its drivers go offline within [`dispatch::SOCKET_PRESENCE_TTL`].
    /// One refresh per city (each its own partition on a cluster).
    pub async fn run_presence(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(dispatch::PRESENCE_REFRESH) => {}
                _ = self.stop.cancelled() => return,
            }
            let mut by_city: HashMap<i64, Vec<i64>> = HashMap::new();
            for (id, h) in lock(&self.drivers_here).iter() {
                by_city.entry(h.city).or_default().push(*id);
            }
            for (city, ids) in by_city {
                if let Err(e) = dispatch::drivers_online(&self.ctx, city, &ids, Via::Socket).await {
                    tracing::debug!(city, error = %e, "presence refresh failed");
                }
            }
        }
    }

    /// A driver's open offers for `initial_orders`.
    pub async fn initial_orders(&self, identity: &Identity) -> Result<Vec<Value>, DomainError> {
        dispatch::open_offers(&self.ctx, identity).await
    }

    /// A driver reported its position (socket or HTTP): applied now, or
    /// held until the driver's interval is over (see [`LocationGate`]).
    pub async fn driver_location(
        self: &Arc<Self>,
        who: &Identity,
        loc: Position,
    ) -> Result<(), DomainError> {
        let interval = self.config.limits.location_interval;
        if interval.is_zero() {
            return dispatch::driver_location(&self.ctx, who, loc).await;
        }
        let wait = {
            let mut slots = lock(&self.locations.slots);
            LocationGate::sweep(&mut slots, interval);
            let now = Instant::now();
            let slot = slots.entry(who.driver_id).or_insert(Slot {
                last: now.checked_sub(interval).unwrap_or(now),
                pending: None,
            });
            let since = now.duration_since(slot.last);
            if slot.pending.is_none() && since >= interval {
                slot.last = now;
                None
            } else {
                if slot.pending.replace((who.clone(), loc)).is_some() {
                    metrics::counter!(m::LOCATIONS_COALESCED).increment(1);
                    return Ok(()); // the waiting task applies this one
                }
                Some(interval.saturating_sub(since))
            }
        };
        let Some(wait) = wait else {
            return dispatch::driver_location(&self.ctx, who, loc).await;
        };
        let app = self.clone();
        let driver = who.driver_id;
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let next = {
                let mut slots = lock(&app.locations.slots);
                slots.get_mut(&driver).and_then(|s| {
                    s.last = Instant::now();
                    s.pending.take()
                })
            };
            if let Some((who, loc)) = next
                && let Err(e) = dispatch::driver_location(&app.ctx, &who, loc).await
            {
                tracing::debug!(driver, error = %e, "a held position could not be applied");
            }
        });
        Ok(())
    }

    /// This node's line of `/api/stats`.
    pub fn node_stats(&self) -> Value {
        json!({
            "node_id": self.config.node_id,
            "sockets": self.hub.socket_count(),
            "rooms": self.hub.room_count(),
            "messages_out": self.hub.frames_out(),
            "started_at": self.started_at,
            "last_seen": iso_now(),
        })
    }
}
