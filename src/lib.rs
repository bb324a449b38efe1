//! switchboard: a horizontally scaled real-time server for order and driver
//! dispatch, speaking three WebSocket dialects on one port.
//!
//! Code map (ARCHITECTURE.md has the full tour):
//! - [`config`] every setting, validated once; [`auth`] JWT → identity, rooms.
//! - [`event`] the canonical event; [`ws::dialect`] renders it per dialect.
//! - [`hub`] this node's sockets and local fan-out; [`broker`] carries events
//!   between nodes (memory or Redis); [`ws`] upgrade and per-socket tasks.
//! - [`domain`] orders and bonuses; [`dispatch`] drivers, offers, deadlines.
//! - [`http`] the HTTP API; [`store`] the database; [`health`] readiness.
//! - [`node`] wires it together: `Node::start(config)` and the drain.

pub mod auth;
pub mod broker;
pub mod config;
pub mod dispatch;
pub mod domain;
pub mod event;
pub mod health;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod store;
pub mod ws;

pub use config::Config;
pub use node::Node;
