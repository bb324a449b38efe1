//! Readiness and the node heartbeat: every second, ping Redis and the DB,
//! and (cluster mode) publish this node's line of `/api/stats` to Redis.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::time::timeout;

use crate::metrics as m;
use crate::node::app::App;
use crate::redis_conn::{Keys, Redis, RedisError};

const PERIOD: Duration = Duration::from_secs(1);
/// A node missing this many heartbeats drops out of `/api/stats`.
pub const NODE_TTL_SECS: u64 = 10;

pub async fn run(app: Arc<App>) {
    metrics::gauge!(m::NODE_INFO, "node" => app.config.node_id.clone(), "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => check_once(&app).await,
            _ = app.stop.cancelled() => return,
        }
    }
}

pub async fn check_once(app: &App) {
    let db_ok = matches!(
        timeout(Duration::from_secs(2), app.ctx.db.ping()).await,
        Ok(Ok(()))
    );
    if app.health.db_ok.swap(db_ok, Ordering::Relaxed) != db_ok {
        report("database", db_ok);
    }
    if let Some(redis) = &app.redis {
        let start = Instant::now();
        let ok = timeout(Duration::from_secs(2), heartbeat(app, redis))
            .await
            .map_err(|_| RedisError::Timeout)
            .and_then(|r| r);
        metrics::histogram!(m::REDIS_DURATION, "op" => "heartbeat")
            .record(start.elapsed().as_secs_f64());
        if let Err(e) = &ok {
            metrics::counter!(m::REDIS_ERRORS, "op" => "heartbeat").increment(1);
            tracing::debug!(error = %e, "redis heartbeat failed");
        }
        if app.health.redis_ok.swap(ok.is_ok(), Ordering::Relaxed) != ok.is_ok() {
            report("redis", ok.is_ok());
        }
    }
    metrics::gauge!(m::READY).set(if app.is_ready() { 1.0 } else { 0.0 });
}

fn report(what: &str, ok: bool) {
    if ok {
        tracing::info!("{what} reachable");
    } else {
        tracing::warn!("{what} unreachable: not ready");
    }
}

async fn heartbeat(app: &App, redis: &Redis) -> Result<(), RedisError> {
    let mut conn = redis.get().await?;
    let keys = Keys::new(&app.config.redis_prefix, redis.is_cluster());
    let id = &app.config.node_id;
    let r = redis::pipe()
        .set_ex(keys.node(id), app.node_stats().to_string(), NODE_TTL_SECS)
        .ignore()
        .sadd(keys.nodes(), id)
        .ignore()
        .exec_async(&mut conn)
        .await
        .map_err(|e| RedisError::Command(e.to_string()));
    if r.is_err() {
        redis.broken();
    }
    r
}
