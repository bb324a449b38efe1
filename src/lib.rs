//! switchboard: a horizontally scaled real-time server for order and driver
//! dispatch, speaking three WebSocket dialects on one port.
//!
//! What an embedder uses: [`Node::start`] with a [`Config`], [`migrate`],
//! [`auth`] to mint and check tokens, [`event`] to publish, [`broker`] (the
//! seam between nodes), [`ws::dialect`] (the pure wire translations) and
//! [`metrics`] (every metric name). Everything else is crate-private.
//!
//! Layers point one way (ARCHITECTURE.md; `tests/layering.rs` enforces it):
//! - edges: [`node`] wires everything and owns the drain; `http` the API;
//!   `ws` endpoints and the socket task; `health`; `node::app` the edges' state.
//! - rules: `domain` (orders, bonuses, sync, `dispatch`; `Ctx`, `DomainError`).
//! - infrastructure: `hub` (this node's sockets), [`broker`], `store` (the
//!   database), `index`, `clock`, `redis_conn`, [`auth`],
//!   `ws::outbox`, `tls` (certificates, SIGHUP reload, the TLS socket relay).
//! - leaves: [`event`], [`config`], [`metrics`], [`ws::dialect`],
//!   `ws::frame`, `lock`.

pub mod auth;
pub mod broker;
mod clock;
pub mod config;
mod domain;
pub mod event;
mod health;
mod http;
mod hub;
mod index;
mod lock;
pub mod metrics;
pub mod node;
mod redis_conn;
mod store;
mod tls;
pub mod ws;

pub use config::Config;
pub use node::{Node, StartError};
pub use redis_conn::{Redis, RedisError, pool as redis_pool};
pub use store::StoreError;
pub use tls::TlsError;

/// Runs the database migrations alone (`switchboard migrate`).
pub async fn migrate(database_url: &str) -> Result<(), store::StoreError> {
    store::migrate(database_url).await
}
