//! The three wire dialects against the seeds' own examples, and what one
//! node does with bad tokens, bad input, slow readers and silent clients.
//! One test binary, a module per concern:
//! - `golden`: the cases of `tests/golden/{rooms,events,driver}.json`, each
//!   checked by calling the dialect directly and over a real socket;
//! - `refusals`: bad, expired and missing tokens, the wrong role;
//! - `bad_input`: malformed messages and frames;
//! - `slow_and_silent`: slow consumers and keepalive.
//!
//! This file holds the shapes those modules share.

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod golden;
mod refusals;
mod rfc6455;
mod slow_and_silent;

use serde_json::{Value, json};
use switchboard::ws::dialect::Dialect;

use common::*;

// Shapes shared by the behaviour tests (refusals, bad_input, slow_and_silent).

const ENDPOINTS: [(Dialect, &str); 3] = [
    (Dialect::Rooms, "/"),
    (Dialect::Events, "/ws"),
    (Dialect::Driver, "/ws/driver/orders/"),
];

/// An error message in the dialect's own shape (SPEC §4), exactly.
fn error_msg(dialect: Dialect, code: &str, message: &str) -> Value {
    match dialect {
        Dialect::Rooms => json!({"type": "error", "data": {"code": code, "message": message}}),
        Dialect::Events => json!({"type": "ERROR", "payload": {"code": code, "message": message}}),
        Dialect::Driver => json!({"type": "error", "code": code, "message": message}),
    }
}

/// Asserts `v` is an error of `code` in the dialect's shape (any message).
fn assert_error(dialect: Dialect, v: &Value, code: &str) {
    let message = match dialect {
        Dialect::Rooms => &v["data"]["message"],
        Dialect::Events => &v["payload"]["message"],
        Dialect::Driver => &v["message"],
    };
    let message = message
        .as_str()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| panic!("no error message in {v}"));
    assert_eq!(v, &error_msg(dialect, code, message));
}

/// Claims of a socket allowed on the endpoint, in a room it can be sent to.
fn member(dialect: Dialect) -> (String, &'static str) {
    match dialect {
        Dialect::Driver => (driver(7, 1), "driver-7"),
        _ => (admin(), "admin-orders"),
    }
}
