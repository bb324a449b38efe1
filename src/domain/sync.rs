//! Sync with the external system (seed 002): a transactional outbox.
//!
//! Order changes write a `sync_jobs` row in their own transaction (see
//! `store`). Every node runs [`run`]: it claims due jobs with a lease (so two
//! nodes never deliver one job at once, and a dead node's job is taken over
//! when its lease runs out), POSTs the order to `SYNC_URL` with an
//! `Idempotency-Key`, and retries with exponential backoff and jitter until
//! `SYNC_MAX_ATTEMPTS`. Each attempt tells admins: `sync-success` or
//! `sync-error`. Delivery is at least once; the key makes it idempotent for
//! the receiver.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde_json::{Value, json};

use tokio_util::sync::CancellationToken;

use super::model::order_json;
use super::{Ctx, SyncRules};
use crate::event::{Event, EventKind, iso_now, room};
use crate::metrics as m;
use crate::store::{self, SyncJob, SyncOutcome};

const BATCH: u64 = 16;
/// The most of an error response's body that is read (SPEC §11).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The worker loop, until `stop`; returns at once when `SYNC_URL` is unset.
pub async fn run(ctx: Arc<Ctx>, stop: CancellationToken) {
    let Some(rules) = ctx.rules.sync.clone() else {
        return;
    };
    let Ok(uri) = rules.url.parse::<hyper::Uri>() else {
        return; // validated in config
    };
    // The lease outlives one request (timeout) with room to record the result.
    let lease = rules.timeout + Duration::from_secs(5);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gauges = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if gauges.elapsed() >= Duration::from_secs(2) {
            gauges = tokio::time::Instant::now();
            for s in ["pending", "delivering", "failed"] {
                if let Ok(n) = store::count_sync_jobs(&ctx.db, s).await {
                    metrics::gauge!(m::SYNC_JOBS, "status" => s).set(n as f64);
                }
            }
        }
        let jobs = match store::claim_sync_jobs(&ctx.db, lease, BATCH).await {
            Ok(j) => j,
            Err(e) => {
                tracing::debug!(error = %e, "claiming sync jobs failed");
                continue;
            }
        };
        // Deliver the batch concurrently; the next claim waits for it.
        let mut set = tokio::task::JoinSet::new();
        for job in jobs {
            let ctx = ctx.clone();
            let uri = uri.clone();
            let rules = rules.clone();
            set.spawn(async move { deliver(&ctx, &rules, &uri, job).await });
        }
        while set.join_next().await.is_some() {}
    }
}

async fn deliver(ctx: &Ctx, rules: &SyncRules, uri: &hyper::Uri, job: SyncJob) {
    // A read that fails is not a deleted order: the job waits for its
    // lease and is tried again, rather than delivered with `data: null`.
    let order = match store::get_order(&ctx.db, job.entity_id).await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(job = job.id, error = %e, "reading the order to sync failed; retrying");
            return;
        }
    };
    let body = json!({
        "entity": job.entity,
        "entity_id": job.entity_id,
        "action": job.action,
        "data": order.as_ref().map(order_json).unwrap_or(Value::Null),
    });
    let key = format!("switchboard-sync-{}", job.id);
    let result = post(uri, &key, body.to_string(), rules.timeout).await;
    metrics::counter!(m::SYNC_ATTEMPTS, "result" => if result.is_ok() { "ok" } else { "error" })
        .increment(1);
    let outcome = match &result {
        Ok(()) => SyncOutcome::Delivered,
        Err(e) if job.attempts as u32 >= rules.max_attempts => {
            SyncOutcome::Failed { error: e.clone() }
        }
        Err(e) => SyncOutcome::Retry {
            at: Utc::now()
                + chrono::Duration::from_std(backoff(rules, job.attempts)).unwrap_or_default(),
            error: e.clone(),
        },
    };
    let failed = matches!(outcome, SyncOutcome::Failed { .. });
    match store::finish_sync_job(&ctx.db, &job, outcome).await {
        Ok(Some(_)) => {}
        // Another node took the job over (our lease ran out): it reports.
        Ok(None) => return,
        Err(e) => {
            // The lease runs out and the job is retried: at least once.
            tracing::warn!(job = job.id, error = %e, "recording a sync result failed");
            return;
        }
    }
    match &result {
        Ok(()) => {
            metrics::counter!(m::SYNC_DELIVERED).increment(1);
            let age = (Utc::now() - job.created_at)
                .num_microseconds()
                .unwrap_or(0)
                .max(0);
            metrics::histogram!(m::SYNC_LATENCY).record(age as f64 / 1e6);
        }
        Err(e) => {
            tracing::info!(job = job.id, attempt = job.attempts, error = %e, failed, "sync attempt failed");
            if failed {
                metrics::counter!(m::SYNC_FAILED).increment(1);
            }
        }
    }
    let event = EventKind::Sync {
        ok: result.is_ok(),
        entity: job.entity.clone(),
        entity_id: job.entity_id,
        error: result.err(),
        timestamp: iso_now(),
    };
    if let Err(e) = ctx
        .publish(Event::new(vec![room::ADMIN.to_string()], event))
        .await
    {
        tracing::debug!(error = %e, "sync event not published");
    }
}

/// `SYNC_BACKOFF_MS` doubled per attempt, times a jitter in [0.5, 1.5),
/// capped at 5 minutes.
fn backoff(rules: &SyncRules, attempts: i32) -> Duration {
    let base = rules.backoff.as_secs_f64() * 2f64.powi((attempts - 1).clamp(0, 20));
    let jitter: f64 = rand::rng().random_range(0.5..1.5);
    Duration::from_secs_f64((base * jitter).min(300.0))
}

/// One POST with a timeout over the whole exchange; any non-2xx is an error
/// whose text goes into `sync-error`.
async fn post(uri: &hyper::Uri, key: &str, body: String, timeout: Duration) -> Result<(), String> {
    let exchange = async {
        let host = uri.host().ok_or("SYNC_URL has no host")?;
        let port = uri.port_u16().unwrap_or(80);
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connect {host}:{port}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let req = hyper::Request::post(path)
            .header(
                hyper::header::HOST,
                uri.authority().map(|a| a.as_str()).unwrap_or(host),
            )
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", key)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        if status.is_success() {
            return Ok(()); // the body is not needed
        }
        // An error body is read up to 64 KiB, for the snippet in
        // `sync-error`: a huge one must not take the node's memory.
        let text = http_body_util::Limited::new(resp.into_body(), MAX_ERROR_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let snippet: String = String::from_utf8_lossy(&text).chars().take(200).collect();
        Err(format!("HTTP {}: {snippet}", status.as_u16()))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
    }
}
