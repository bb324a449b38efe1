//! Helpers shared by the orders, dispatch-cluster and bonus tests: HTTP calls
//! with a token, direct database reads for assertions, collecting what a
//! socket received, and the real `switchboard` binary as a subprocess.
//!
//! Used as `mod support;` next to `mod common;` (it builds on `common`).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use serde_json::{Value, json};
use switchboard_testkit::NodeProcess;

use crate::common::{Client, RedisServer, SECRET, Seen, TestDb, WAIT, http, http_raw};

/// A pickup point (seed 001's Tashkent example).
pub const PICKUP: (f64, f64) = (41.311081, 69.240562);

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Any request with `Authorization: Bearer token`.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    http(
        addr,
        method,
        path,
        &[("authorization", &bearer(token))],
        body,
    )
    .await
}

/// A request whose body is sent as given (malformed JSON and the like).
pub async fn call_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, Value) {
    let (s, bytes) = http_raw(
        addr,
        method,
        path,
        &[("authorization", &bearer(token))],
        Some(body.to_string()),
    )
    .await;
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (s, v)
}

/// Reports a driver's position over HTTP.
pub async fn locate(addr: SocketAddr, token: &str, lat: f64, lon: f64) {
    let (s, b) = call(
        addr,
        "POST",
        "/api/driver/location",
        token,
        Some(json!({"latitude": lat, "longitude": lon})),
    )
    .await;
    assert_eq!(s, 204, "{b}");
}

/// Creates an order; asserts 201 and returns it.
pub async fn create_order(addr: SocketAddr, token: &str, body: Value) -> Value {
    let (s, b) = call(addr, "POST", "/api/orders", token, Some(body)).await;
    assert_eq!(s, 201, "{b}");
    b
}

pub fn id_of(order: &Value) -> i64 {
    order["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("no id in {order}"))
}

/// Asserts the JSON error body of SPEC §6 and returns its code.
pub fn error_code(status: u16, body: &Value, want_status: u16) -> String {
    assert_eq!(status, want_status, "{body}");
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code in {body}"));
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "no error.message in {body}"
    );
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "only `error` at the top: {body}"
    );
    code.to_string()
}

// ---------------------------------------------------------------- database

/// A direct connection to the test database, for assertions.
pub async fn db_conn(db: &TestDb) -> DatabaseConnection {
    Database::connect(&db.url).await.expect("test db reachable")
}

/// One integer from a raw query (`SELECT count(*) …`).
pub async fn scalar(conn: &DatabaseConnection, sql: &str) -> i64 {
    let backend: DbBackend = conn.get_database_backend();
    let row = conn
        .query_one_raw(Statement::from_string(backend, sql.to_string()))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .expect("one row");
    row.try_get_by_index::<i64>(0)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// One text value from a raw query.
pub async fn text(conn: &DatabaseConnection, sql: &str) -> Option<String> {
    let backend: DbBackend = conn.get_database_backend();
    conn.query_one_raw(Statement::from_string(backend, sql.to_string()))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .map(|row| {
            row.try_get_by_index::<String>(0)
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        })
}

/// Status of the one offer of `order_id` (panics unless there is exactly one).
pub async fn only_offer(conn: &DatabaseConnection, order_id: i64) -> (i64, String) {
    let n = scalar(
        conn,
        &format!("SELECT count(*) FROM offers WHERE order_id = {order_id}"),
    )
    .await;
    assert_eq!(n, 1, "offers of order {order_id}");
    let id = scalar(
        conn,
        &format!("SELECT id FROM offers WHERE order_id = {order_id}"),
    )
    .await;
    let status = text(
        conn,
        &format!("SELECT status FROM offers WHERE order_id = {order_id}"),
    )
    .await
    .unwrap();
    (id, status)
}

// ---------------------------------------------------------------- sockets

/// Every JSON message a client receives within `d` (stops early on close).
pub async fn collect_for(c: &mut Client, d: Duration) -> Vec<Value> {
    let deadline = Instant::now() + d;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_seen(left).await {
            Some(Seen::Json(v)) => out.push(v),
            Some(Seen::Close(code)) => panic!("socket closed ({code}) after {out:?}"),
            None => return out,
        }
    }
}

/// What is already queued on a client, without waiting.
pub async fn queued(c: &mut Client) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(s) = c.next_seen(Duration::from_millis(1)).await {
        match s {
            Seen::Json(v) => out.push(v),
            Seen::Close(code) => panic!("socket closed ({code}) after {out:?}"),
        }
    }
    out
}

pub fn of_type<'a>(msgs: &'a [Value], ty: &str) -> Vec<&'a Value> {
    msgs.iter().filter(|m| m["type"] == ty).collect()
}

/// Polls `f` until it returns `Some` or `within` passes.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- subprocess

/// The real `switchboard serve` binary with a clean environment, the tests'
/// settings and `env`, its output in a log file ([`NodeProcess::log_text`]),
/// ready on `/readyz`; SIGKILLed on drop.
pub async fn start_server(
    db: &TestDb,
    redis: &RedisServer,
    node_id: &str,
    env: &[(&str, &str)],
) -> NodeProcess {
    NodeProcess::launch(env!("CARGO_BIN_EXE_switchboard"))
        .clean_env()
        .log_file()
        .wait_ready()
        .within(WAIT)
        .env("REDIS_URL", redis.url())
        .env("DATABASE_URL", &db.url)
        .env("JWT_SECRET", SECRET)
        .env("API_KEYS", crate::common::API_KEY)
        .env("NODE_ID", node_id)
        .env("RUST_LOG", "info")
        .envs(env)
        .start()
        .await
}
