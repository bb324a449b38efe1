//! Golden files: each case of `tests/golden/{rooms,events,driver}.json` is
//! checked by calling the dialect directly (`check`) and over a real socket
//! of a real node (`check_socket`).

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{Value, json};
use switchboard::auth::identity_from_claims;
use switchboard::event::{Event, EventKind, room};
use switchboard::ws::dialect::{Command, Dialect, Reply};

use crate::common::*;

struct Golden {
    dialect: Dialect,
    path: String,
    /// Claims of the socket that sends the `send` cases.
    client: Value,
    cases: Vec<Case>,
}

struct Case {
    name: String,
    input: Input,
    /// The exact JSON the socket gets: an array of messages for `connect`,
    /// `null` for an event the dialect does not carry.
    expected: Value,
}

enum Input {
    /// Connect with a token of these claims; `orders` are the driver's
    /// pending offers for `initial_orders` (only checked directly: a fresh
    /// node has none).
    Connect {
        claims: Value,
        orders: Option<Vec<Value>>,
    },
    /// A canonical event, delivered through `room`.
    Event { event: Event, room: String },
    /// A `POST /api/publish` body, delivered through `room`.
    Publish { body: Value, room: String },
    /// A client message; `expected` is the server's answer.
    Send(String),
}

fn dialect_named(name: &str) -> Dialect {
    match name {
        "rooms" => Dialect::Rooms,
        "events" => Dialect::Events,
        "driver" => Dialect::Driver,
        other => panic!("unknown dialect {other:?} in a golden file"),
    }
}

fn load(file: &str) -> Golden {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let cases = v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let name = c["name"]
                .as_str()
                .expect("every case has a name")
                .to_string();
            let room = || c["room"].as_str().map(String::from);
            let input = if let Some(claims) = c.get("connect") {
                Input::Connect {
                    claims: claims.clone(),
                    orders: c
                        .get("orders")
                        .map(|o| o.as_array().expect("orders").clone()),
                }
            } else if let Some(ev) = c.get("event") {
                Input::Event {
                    event: serde_json::from_value(ev.clone())
                        .unwrap_or_else(|e| panic!("{name}: not an Event: {e}")),
                    room: room().unwrap_or_else(|| panic!("{name}: room")),
                }
            } else if let Some(body) = c.get("publish") {
                Input::Publish {
                    body: body.clone(),
                    room: room().unwrap_or_else(|| panic!("{name}: room")),
                }
            } else if let Some(text) = c.get("send") {
                Input::Send(text.as_str().expect("send is a string").to_string())
            } else {
                panic!("{name}: a case is connect, event, publish or send");
            };
            assert!(c.get("expected").is_some(), "{name}: expected is required");
            Case {
                name,
                input,
                expected: c["expected"].clone(),
            }
        })
        .collect();
    Golden {
        dialect: dialect_named(v["dialect"].as_str().expect("dialect")),
        path: v["path"].as_str().expect("path").to_string(),
        client: v["client"].clone(),
        cases,
    }
}

fn json_of(bytes: &[u8]) -> Value {
    let v: Value = serde_json::from_slice(bytes).expect("the server writes JSON");
    assert!(v.is_object(), "every message is a JSON object: {v}");
    v
}

/// The event `POST /api/publish` makes of a body (as `http::ops::publish`).
fn publish_event(body: &Value) -> Event {
    let mut rooms: Vec<String> = body["room"]
        .as_str()
        .map(String::from)
        .into_iter()
        .collect();
    if let Some(more) = body["rooms"].as_array() {
        rooms.extend(more.iter().map(|r| r.as_str().unwrap().to_string()));
    }
    Event::new(
        rooms,
        EventKind::Custom {
            ty: body["type"].as_str().expect("type").to_string(),
            data: body.get("data").cloned().unwrap_or(Value::Null),
        },
    )
}

/// What the dialect makes of `input`, by calling it directly.
fn render(dialect: Dialect, input: &Input) -> Value {
    match input {
        Input::Connect { claims, orders } => {
            let id = identity_from_claims(claims).expect("golden claims are valid");
            let mut out = vec![json_of(&dialect.reply(&Reply::Connected {
                user_id: id.user_id,
                role: id.role.as_str(),
                driver_id: id.driver_id,
                rooms: &[],
                recovery: &[],
            }))];
            if dialect == Dialect::Driver {
                let orders = orders.clone().unwrap_or_default();
                out.push(json_of(&dialect.reply(&Reply::InitialOrders(&orders))));
            }
            Value::Array(out)
        }
        Input::Event { event, room: r } => {
            let direct = dialect
                .render(event, room::is_personal(r))
                .map(|b| json_of(&b));
            // The Redis broker carries the event as JSON: the copy another
            // node renders must render the same.
            let carried: Event =
                serde_json::from_slice(&serde_json::to_vec(event).unwrap()).unwrap();
            let remote = dialect
                .render(&carried, room::is_personal(r))
                .map(|b| json_of(&b));
            assert_eq!(
                direct, remote,
                "rendering changed through the broker's JSON"
            );
            direct.unwrap_or(Value::Null)
        }
        Input::Publish { body, room: r } => {
            let event = publish_event(body);
            assert!(event.rooms.contains(r), "the case's room is a publish room");
            dialect
                .render(&event, room::is_personal(r))
                .map(|b| json_of(&b))
                .unwrap_or(Value::Null)
        }
        // What `ws::conn` answers to each command.
        Input::Send(text) => json_of(&match dialect.parse(text.as_bytes()) {
            Ok(Command::Ping) => dialect.reply(&Reply::Pong),
            Ok(Command::JoinRoom { room, .. }) => dialect.reply(&Reply::RoomJoined {
                room: &room,
                pos: None,
                recovery: None,
            }),
            Ok(Command::LeaveRoom(r)) => dialect.reply(&Reply::RoomLeft(&r)),
            Ok(Command::Location(l)) => panic!("a location has no reply: {l:?}"),
            Err(e) => dialect.reply(&Reply::Error {
                code: e.code(),
                message: &e.to_string(),
            }),
        }),
    }
}

/// The one wire check: `input` in `dialect` gives exactly `expected`.
fn check(dialect: Dialect, input: &Input, expected: &Value) {
    let got = render(dialect, input);
    assert_eq!(
        &got,
        expected,
        "{} dialect\n got:      {got}\n expected: {expected}",
        dialect.as_str()
    );
}

fn check_file(file: &str, must_cover: &[&str]) {
    let g = load(file);
    for case in &g.cases {
        let r = std::panic::catch_unwind(|| check(g.dialect, &case.input, &case.expected));
        if let Err(e) = r {
            std::panic::resume_unwind(Box::new(format!(
                "golden case {:?} of {file} failed: {}",
                case.name,
                e.downcast_ref::<String>().cloned().unwrap_or_default()
            )));
        }
    }
    // The seed's own messages must all be pinned.
    let mut types = Vec::new();
    for case in &g.cases {
        match &case.expected {
            Value::Array(msgs) => types.extend(msgs.iter().map(|m| m["type"].clone())),
            v => types.push(v["type"].clone()),
        }
    }
    for ty in must_cover {
        assert!(
            types.iter().any(|t| t == ty),
            "{file} has no case for seed message {ty:?}"
        );
    }
}

#[test]
fn golden_rooms_dialect_matches_seed_002() {
    check_file(
        "rooms.json",
        &[
            "connected",
            "new-order",
            "order-created",
            "order-status-updated",
            "bonus-updated",
            "sync-success",
            "sync-error",
            "pong",
            "room-joined",
            "room-left",
            "error",
        ],
    );
}

#[test]
fn golden_events_dialect_matches_seed_000() {
    check_file(
        "events.json",
        &[
            "ORDER_CREATED",
            "ORDER_UPDATED",
            "ORDER_DELETED",
            "DRIVER_LOCATION",
            "SYNC_SUCCESS",
            "SYNC_ERROR",
            "CONNECTED",
            "pong",
            "room-joined",
            "ERROR",
        ],
    );
}

#[test]
fn golden_driver_dialect_matches_seed_001() {
    check_file(
        "driver.json",
        &[
            "connection_established",
            "initial_orders",
            "new_order",
            "order_timeout",
            "pong",
            "error",
        ],
    );
}

/// Claims of a socket that is in `room` (and in no room another case uses).
fn claims_in(dialect: Dialect, r: &str) -> Value {
    let num = |s: &str| -> i64 { s.parse().unwrap_or_else(|_| panic!("room {r:?}")) };
    if dialect == Dialect::Driver {
        let id = r
            .strip_prefix("driver-")
            .or_else(|| r.strip_prefix("user-"))
            .unwrap_or_else(|| panic!("a driver socket is in no room {r:?}"));
        return json!({"user_id": num(id), "groups": ["Driver"], "city_id": 1});
    }
    if r == room::ADMIN {
        json!({"sub": 1, "role": "admin"})
    } else if let Some(c) = r
        .strip_prefix("city-")
        .and_then(|s| s.strip_suffix("-orders"))
    {
        json!({"sub": 2, "role": "manager", "city_ids": [num(c)]})
    } else if let Some(u) = r.strip_prefix("user-") {
        json!({"sub": num(u), "role": "user"})
    } else {
        panic!("no identity for room {r:?}")
    }
}

/// A frame as a seed client reads it: without the fields SPEC §10 adds
/// (checked here when present: a historical frame names its room and
/// carries an integer offset; connect messages and `room-joined` carry
/// positions). The seeds' clients ignore these fields.
fn as_seed_reads(mut v: Value, room: Option<&str>) -> Value {
    let Some(obj) = v.as_object_mut() else {
        return v;
    };
    if let Some(r) = obj.remove("room") {
        assert_eq!(Some(r.as_str().expect("room is a string")), room, "{obj:?}");
        assert!(
            obj.remove("offset")
                .expect("room goes with offset")
                .is_u64()
        );
    }
    let ty = obj
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if [
        "connected",
        "CONNECTED",
        "connection_established",
        "room-joined",
    ]
    .contains(&ty.as_str())
    {
        for key in ["data", "payload"] {
            if let Some(b) = obj.get_mut(key).and_then(Value::as_object_mut) {
                strip_positions(b);
            }
        }
        strip_positions(obj);
    }
    v
}

fn strip_positions(body: &mut serde_json::Map<String, Value>) {
    if let Some(rooms) = body.remove("rooms") {
        for (_, p) in rooms.as_object().expect("rooms is an object") {
            assert!(p["epoch"].is_string() && p["offset"].is_u64(), "{p}");
        }
    }
    body.remove("recovery");
    if body.contains_key("epoch") {
        assert!(body.remove("epoch").unwrap().is_string());
        assert!(
            body.remove("offset")
                .expect("epoch goes with offset")
                .is_u64()
        );
    }
}

/// Runs every case of a golden file over real sockets of a real node.
async fn check_socket(file: &str) {
    init_tracing();
    let g = load(file);
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "golden")).await;
    let with_token = |claims: &Value| format!("{}?token={}", g.path, token(claims.clone()));

    // Connect messages, exactly and nothing more before the pong.
    for case in &g.cases {
        let Input::Connect { claims, orders } = &case.input else {
            continue;
        };
        if orders.as_ref().is_some_and(|o| !o.is_empty()) {
            continue; // a fresh node has no offers to list
        }
        let mut c = Client::connect(node.addr, &with_token(claims)).await;
        for want in case.expected.as_array().unwrap() {
            assert_eq!(&as_seed_reads(c.recv().await, None), want, "{}", case.name);
        }
        c.send_json(json!({"type": "ping"})).await;
        assert_eq!(c.recv().await, json!({"type": "pong"}), "{}", case.name);
    }

    // Client messages and their answers, on one socket.
    let mut c = connect_ready(node.addr, &g.path, &token(g.client.clone())).await;
    for case in &g.cases {
        if let Input::Send(text) = &case.input {
            c.send_text(text).await;
            assert_eq!(
                as_seed_reads(c.recv().await, None),
                case.expected,
                "{}",
                case.name
            );
        }
    }
    drop(c);

    // Events and publishes, each to a socket in the case's room only.
    let mut sockets: HashMap<String, (Client, String)> = HashMap::new();
    for case in &g.cases {
        let r = match &case.input {
            Input::Event { room, .. } | Input::Publish { room, .. } => room.clone(),
            _ => continue,
        };
        let claims = claims_in(g.dialect, &r);
        let key = claims.to_string();
        if !sockets.contains_key(&key) {
            let c = connect_ready(node.addr, &g.path, &token(claims)).await;
            sockets.insert(key.clone(), (c, r.clone()));
        }
        match &case.input {
            Input::Event { event, .. } => {
                // Only to this room, so no other socket of the test hears it.
                let mut e = event.clone();
                e.rooms = vec![r.clone()];
                e.at_us = switchboard::event::now_us();
                node.node().publish(e).await.expect("publish");
            }
            Input::Publish { body, .. } => {
                let (s, b) = publish_body(node.addr, body.clone()).await;
                assert_eq!(s, 204, "{}: {b}", case.name);
            }
            _ => unreachable!(),
        }
        let c = &mut sockets.get_mut(&key).unwrap().0;
        if case.expected.is_null() {
            // Nothing for this dialect: the next message is a marker sent after.
            node.publish(&r, "golden-marker", json!({"after": case.name}))
                .await;
            let got = c.recv().await;
            assert_eq!(
                got["type"], "golden-marker",
                "{}: expected nothing, got {got}",
                case.name
            );
        } else {
            let got = as_seed_reads(c.recv().await, Some(&r));
            assert_eq!(got, case.expected, "{}", case.name);
        }
    }
    // Nothing arrived twice: each socket's next message is a final marker.
    for (c, r) in sockets.values_mut() {
        node.publish(r, "golden-end", json!({})).await;
        let got = c.recv().await;
        assert_eq!(got["type"], "golden-end", "extra message on {r}: {got}");
    }
}

#[tokio::test]
async fn golden_rooms_dialect_over_a_socket() {
    check_socket("rooms.json").await;
}

#[tokio::test]
async fn golden_events_dialect_over_a_socket() {
    check_socket("events.json").await;
}

#[tokio::test]
async fn golden_driver_dialect_over_a_socket() {
    check_socket("driver.json").await;
}
