//! Resume helpers (SPEC §10): `since` as clients send it, what a connect
//! message says of rooms and recovery, numbered publishes and reading them
//! back with their offsets.

use base64::Engine;
use serde_json::{Value, json};

use super::{Client, publish_body};

/// `since` as a client sends it: base64url, no padding, of the positions.
pub fn since(positions: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(positions.to_string())
}

/// The connect message's `rooms` (in `data`, `payload` or top level).
pub fn rooms_of(connected: &Value) -> Value {
    for body in [&connected["data"], &connected["payload"], connected] {
        if body.get("rooms").is_some() {
            return body["rooms"].clone();
        }
    }
    panic!("no rooms in {connected}")
}

pub fn recovery_of(connected: &Value) -> Value {
    for body in [&connected["data"], &connected["payload"], connected] {
        if body.get("recovery").is_some() {
            return body["recovery"].clone();
        }
    }
    Value::Null
}

/// Publishes `n` numbered events to `room` through the HTTP API.
pub async fn publish_n(addr: std::net::SocketAddr, room: &str, from: u64, n: u64) {
    for i in from..from + n {
        let (s, b) =
            publish_body(addr, json!({"room": room, "type": "seq", "data": {"n": i}})).await;
        assert_eq!(s, 204, "{b}");
    }
}

/// Reads `seq` events until `n` arrived; returns (n, offset) pairs.
pub async fn read_seq(c: &mut Client, n: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    while out.len() < n {
        let v = c.recv().await;
        if v["type"] == "seq" {
            out.push((
                v["data"]["n"].as_u64().unwrap(),
                v["offset"].as_u64().expect("offset"),
            ));
        }
    }
    out
}
