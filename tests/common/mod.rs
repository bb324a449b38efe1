//! Test harness: real `redis-server` processes and real nodes on free ports,
//! WebSocket and HTTP clients, test databases. Everything a test starts is
//! stopped by a `Drop` guard, pass or fail.
//!
//! Split by concern; everything is re-exported here, so a test does
//! `mod common;` and `use common::*;`:
//! - [`node`] nodes in-process (`TestNode`, `config`) and as processes of
//!   the binary (`start_server`), `redis-server` guards;
//! - [`ws`] the WebSocket test client and what to do with what it receives;
//! - [`http`] HTTP calls (one-shot, kept-alive, with a token), the orders
//!   and driver calls the scenarios repeat, error bodies, metrics;
//! - [`resume`] `since`, connect-message positions and numbered publishes
//!   (SPEC §10);
//! - [`db`] SQLite and PostgreSQL test databases (`db_variants!`) and raw
//!   queries for assertions.
// Not every test binary uses every helper.
#![allow(dead_code)]

pub mod db;
pub mod http;
pub mod node;
pub mod resume;
pub mod ws;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[allow(unused_imports)]
pub use {db::*, http::*, node::*, resume::*, ws::*};

pub const SECRET: &str = "integration-test-secret-0123456789";
pub const API_KEY: &str = "test-api-key";
pub const WAIT: Duration = Duration::from_secs(10);

/// A pickup point (seed 001's Tashkent example).
pub const PICKUP: (f64, f64) = (41.311081, 69.240562);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A JWT signed with the test secret.
pub fn token(claims: Value) -> String {
    let mut c = claims;
    if c.get("exp").is_none() {
        c["exp"] = json!(jsonwebtoken::get_current_timestamp() + 3600);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &c,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub fn admin() -> String {
    token(json!({"sub": "1", "role": "admin"}))
}
pub fn manager(id: i64, cities: &[i64]) -> String {
    token(json!({"sub": id, "role": "manager", "city_ids": cities}))
}
pub fn driver(id: i64, city: i64) -> String {
    token(json!({"user_id": id, "groups": ["Driver"], "city_id": city}))
}
pub fn user(id: i64) -> String {
    token(json!({"userId": id, "role": "user", "city_id": 1}))
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
