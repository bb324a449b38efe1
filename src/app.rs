//! [`App`]: the state the edges (HTTP handlers, socket tasks, the health
//! loop) share on one node. The rules get only its [`Ctx`]; nothing below
//! the edges imports this module.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Identity, Verifier};
use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::dispatch;
use crate::domain::{Ctx, DomainError};
use crate::event::{Position, iso_now};
use crate::hub::Hub;
use crate::metrics as m;
use crate::ws::outbox::{ConnId, Outbox};

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
    pub redis: Option<deadpool_redis::Pool>,
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

    /// A driver's open offers for `initial_orders`.
    pub async fn initial_orders(&self, identity: &Identity) -> Result<Vec<Value>, DomainError> {
        dispatch::open_offers(&self.ctx, identity).await
    }

    /// A driver reported its position over its socket.
    pub async fn driver_location(&self, id: &Identity, loc: Position) -> Result<(), DomainError> {
        dispatch::driver_location(&self.ctx, id, loc).await
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
