//! Operations routes: index, health, readiness, metrics, stats, and the
//! server-to-server publish API.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, Resp, empty, identity, json_response, read_json};
use crate::event::{Event, EventKind, room};
use crate::node::app::App;

pub fn index(app: &App) -> Resp {
    json_response(
        StatusCode::OK,
        &json!({
            "name": "switchboard",
            "node_id": app.config.node_id,
            "websocket": {
                "/": "rooms dialect (seed 002): {type, data}",
                "/ws": "events dialect (seed 000): {type, payload}",
                "/ws/driver/orders/": "driver dialect (seed 001)",
            },
            "token": "pass ?token=JWT",
        }),
    )
}

pub fn healthz() -> Resp {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

pub fn readyz(app: &App) -> Resp {
    use std::sync::atomic::Ordering::Relaxed;
    let ready = app.is_ready();
    let body = json!({
        "ready": ready,
        "draining": app.health.draining.load(Relaxed),
        "db": app.health.db_ok.load(Relaxed),
        "redis": app.redis.as_ref().map(|_| app.health.redis_ok.load(Relaxed) && {
            use crate::broker::Broker;
            app.ctx.broker.is_healthy()
        }),
    });
    json_response(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &body,
    )
}

pub fn metrics(app: &App) -> Resp {
    let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(
        app.metrics.render(),
    )));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// Constant-time comparison, so a wrong key leaks nothing through timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn check_api_key<B>(app: &App, req: &Request<B>) -> Result<(), ApiError> {
    let given = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::Unauthorized("X-API-Key header required".into()))?;
    let ok = app
        .config
        .api_keys
        .iter()
        .map(|k| k.expose())
        .chain(app.dev_api_key.as_deref())
        .any(|k| same(k.as_bytes(), given.as_bytes()));
    if ok {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("invalid X-API-Key".into()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    room: Option<String>,
    rooms: Option<Vec<String>>,
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    data: Value,
    /// Not kept in room history (SPEC §10): no offset, never replayed.
    #[serde(default)]
    volatile: bool,
}

/// `POST /api/publish {room | rooms, type, data}` → 204 once the broker took it.
pub async fn publish(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    check_api_key(app, &req)?;
    let body: PublishBody = read_json(req).await?;
    let mut rooms: Vec<String> = body
        .room
        .into_iter()
        .chain(body.rooms.into_iter().flatten())
        .collect();
    // A room named twice (anywhere in the list) is one room: a socket gets
    // the event once whatever the order or repetition of the rooms.
    let mut seen = std::collections::HashSet::new();
    rooms.retain(|r| seen.insert(r.clone()));
    if rooms.is_empty() {
        return Err(ApiError::BadRequest("room (or rooms) is required".into()));
    }
    if rooms.len() > 100 {
        return Err(ApiError::BadRequest("at most 100 rooms per publish".into()));
    }
    if let Some(bad) = rooms.iter().find(|r| !room::is_valid(r)) {
        return Err(ApiError::BadRequest(format!(
            "invalid room name {bad:?}: use letters, digits, - _ : . (at most 128)"
        )));
    }
    if body.ty.is_empty() || body.ty.len() > 128 {
        return Err(ApiError::BadRequest(
            "type must be 1 to 128 characters".into(),
        ));
    }
    let mut event = Event::new(
        rooms,
        EventKind::Custom {
            ty: body.ty,
            data: body.data,
        },
    );
    event.volatile = body.volatile;
    app.ctx.publish(event).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// `GET /api/stats` (admin): every live node's sockets and rooms.
pub async fn stats(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let who = identity(app, &req)?;
    if !who.role.is_staff() {
        return Err(ApiError::Forbidden("admins only".into()));
    }
    let mut nodes = match &app.redis {
        None => vec![app.node_stats()],
        Some(redis) => cluster_nodes(app, redis).await?,
    };
    nodes.sort_by(|a, b| a["node_id"].as_str().cmp(&b["node_id"].as_str()));
    let sockets: u64 = nodes.iter().filter_map(|n| n["sockets"].as_u64()).sum();
    let messages_out: u64 = nodes
        .iter()
        .filter_map(|n| n["messages_out"].as_u64())
        .sum();
    Ok(json_response(
        StatusCode::OK,
        &json!({"nodes": nodes, "sockets": sockets, "messages_out": messages_out, "node_id": app.config.node_id}),
    ))
}

async fn cluster_nodes(
    app: &App,
    redis: &crate::redis_conn::Redis,
) -> Result<Vec<Value>, ApiError> {
    // Redis's own text goes to the log, not to the client (SPEC §11).
    let unavailable = |e: String| {
        tracing::warn!(error = %e, "cluster stats: redis unavailable");
        ApiError::Unavailable("redis unavailable, retry later".into())
    };
    let k = crate::redis_conn::Keys::new(&app.config.redis_prefix, redis.is_cluster());
    let mut conn = redis.get().await.map_err(|e| unavailable(e.to_string()))?;
    let ids: Vec<String> = redis::cmd("SMEMBERS")
        .arg(k.nodes())
        .query_async(&mut conn)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    if ids.is_empty() {
        return Ok(vec![app.node_stats()]);
    }
    let keys: Vec<String> = ids.iter().map(|id| k.node(id)).collect();
    let lines: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let mut out = Vec::new();
    for (id, line) in ids.iter().zip(lines) {
        match line.and_then(|l| serde_json::from_str::<Value>(&l).ok()) {
            Some(v) => out.push(v),
            None => {
                // Its heartbeat expired: the node is gone.
                let _: Result<(), _> = redis::cmd("SREM")
                    .arg(k.nodes())
                    .arg(id)
                    .query_async(&mut conn)
                    .await;
            }
        }
    }
    Ok(out)
}
