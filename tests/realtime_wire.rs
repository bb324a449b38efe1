//! The three wire dialects against the seeds' own examples, and what one
//! node does with bad tokens, bad input, slow readers and silent clients.
//!
//! Golden cases live in `tests/golden/{rooms,events,driver}.json`. Each case
//! is checked twice: by calling the dialect directly (`check`), and over a
//! real socket of a real node (`check_socket`).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use fastwebsockets::{Frame, OpCode, Payload};
use serde_json::{Value, json};
use switchboard::auth::identity_from_claims;
use switchboard::event::{Event, EventKind, room};
use switchboard::ws::dialect::{Command, Dialect, Reply};

// ---------------------------------------------------------------------------
// Golden files

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
            Ok(Command::JoinRoom(r)) => dialect.reply(&Reply::RoomJoined(&r)),
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
            assert_eq!(&c.recv().await, want, "{}", case.name);
        }
        c.send_json(json!({"type": "ping"})).await;
        assert_eq!(c.recv().await, json!({"type": "pong"}), "{}", case.name);
    }

    // Client messages and their answers, on one socket.
    let mut c = connect_ready(node.addr, &g.path, &token(g.client.clone())).await;
    for case in &g.cases {
        if let Input::Send(text) = &case.input {
            c.send_text(text).await;
            assert_eq!(c.recv().await, case.expected, "{}", case.name);
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
            assert_eq!(c.recv().await, case.expected, "{}", case.name);
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

// ---------------------------------------------------------------------------
// Shapes shared by the behaviour tests below

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

// ---------------------------------------------------------------------------
// Refusals: bad, expired, missing tokens → one error, close 4001; a
// non-driver on the driver endpoint → close 4003.

fn bad_tokens() -> Vec<(&'static str, Option<String>, &'static str)> {
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    let other_key = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "1", "role": "admin", "groups": ["Driver"], "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(b"some-other-secret-0123456789"),
    )
    .unwrap();
    let expired = token(json!({
        "sub": "1", "role": "driver", "exp": jsonwebtoken::get_current_timestamp() - 60
    }));
    vec![
        (
            "bad signature",
            Some(other_key),
            "invalid token: InvalidSignature",
        ),
        ("expired", Some(expired), "token expired"),
        (
            "garbage",
            Some("not-a-jwt".into()),
            "invalid token: InvalidToken",
        ),
        ("missing", None, "missing token"),
    ]
}

/// Expects exactly one message, `want`, then a close frame with `code`.
async fn expect_refusal(c: &mut Client, want: &Value, code: u16, what: &str) {
    match c.next_seen(WAIT).await {
        Some(Seen::Json(v)) => assert_eq!(&v, want, "{what}"),
        other => panic!("{what}: expected an error message, got {other:?}"),
    }
    match c.next_seen(WAIT).await {
        Some(Seen::Close(got)) => assert_eq!(got, code, "{what}"),
        other => panic!("{what}: expected close {code}, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_expired_and_missing_tokens_get_an_error_then_4001_everywhere() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "auth")).await;
    let mut checked = 0;
    for (dialect, path) in ENDPOINTS {
        for (kind, tok, message) in bad_tokens() {
            let want = error_msg(dialect, "unauthorized", message);
            // In the query.
            let p = match &tok {
                Some(t) => format!("{path}?token={t}"),
                None => path.to_string(),
            };
            let mut c = Client::connect(node.addr, &p).await;
            expect_refusal(
                &mut c,
                &want,
                4001,
                &format!("{kind} token in the query of {p}"),
            )
            .await;
            // In `Authorization: Bearer`.
            let header = tok.as_ref().map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> = header
                .iter()
                .map(|h| ("authorization", h.as_str()))
                .collect();
            let mut c =
                Client::connect_with(node.addr, path, &headers, ClientOpts::default()).await;
            expect_refusal(
                &mut c,
                &want,
                4001,
                &format!("{kind} bearer token on {path}"),
            )
            .await;
            checked += 2;
            // In the driver path, with and without the trailing slash.
            if let (Dialect::Driver, Some(t)) = (dialect, &tok) {
                for p in [format!("{path}{t}"), format!("{path}{t}/")] {
                    let mut c = Client::connect(node.addr, &p).await;
                    expect_refusal(&mut c, &want, 4001, &format!("{kind} token in path {p}")).await;
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 3 * 4 * 2 + 3 * 2);

    // The same places with a good token connect: the refusals above were
    // about the token, not about where it was put.
    for (dialect, path) in ENDPOINTS {
        let (good, _) = member(dialect);
        let first_type = match dialect {
            Dialect::Rooms => "connected",
            Dialect::Events => "CONNECTED",
            Dialect::Driver => "connection_established",
        };
        let bearer = format!("Bearer {good}");
        let mut places = vec![
            Client::connect(node.addr, &format!("{path}?token={good}")).await,
            Client::connect_with(
                node.addr,
                path,
                &[("authorization", bearer.as_str())],
                ClientOpts::default(),
            )
            .await,
        ];
        if dialect == Dialect::Driver {
            places.push(Client::connect(node.addr, &format!("{path}{good}")).await);
            places.push(Client::connect(node.addr, &format!("{path}{good}/")).await);
            places
                .push(Client::connect(node.addr, &format!("/ws/driver/orders?token={good}")).await);
        }
        for c in &mut places {
            assert_eq!(c.recv().await["type"], first_type, "{path}");
        }
    }
}

#[tokio::test]
async fn non_drivers_on_the_driver_endpoint_are_closed_4003() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "forbid")).await;
    let want = error_msg(
        Dialect::Driver,
        "forbidden",
        "the driver endpoint is for drivers only",
    );
    for (who, tok) in [
        ("user", user(3)),
        ("admin", admin()),
        ("manager", manager(4, &[1])),
    ] {
        let bearer = format!("Bearer {tok}");
        let mut c = Client::connect(node.addr, &format!("/ws/driver/orders/?token={tok}")).await;
        expect_refusal(&mut c, &want, 4003, &format!("{who} in the query")).await;
        let mut c = Client::connect(node.addr, &format!("/ws/driver/orders/{tok}")).await;
        expect_refusal(&mut c, &want, 4003, &format!("{who} in the path")).await;
        let mut c = Client::connect_with(
            node.addr,
            "/ws/driver/orders/",
            &[("authorization", bearer.as_str())],
            ClientOpts::default(),
        )
        .await;
        expect_refusal(&mut c, &want, 4003, &format!("{who} as bearer")).await;
    }
    // A driver is let in (and a user on the other endpoints).
    connect_ready(node.addr, "/ws/driver/orders/", &driver(3, 1)).await;
    connect_ready(node.addr, "/", &user(3)).await;
}

// ---------------------------------------------------------------------------
// Bad input: an error in the dialect's shape, and the socket goes on.

const MAX_FRAME: usize = 1024;

#[tokio::test]
async fn bad_input_gets_an_error_and_the_socket_keeps_working() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "bad-input");
    cfg.max_frame_bytes = MAX_FRAME;
    let node = TestNode::start(cfg).await;
    for (dialect, path) in ENDPOINTS {
        let (tok, r) = member(dialect);
        let mut victim = connect_ready(node.addr, path, &tok).await;
        let mut bystander = connect_ready(node.addr, path, &tok).await;

        // Over the limit but well under the hard cap; valid JSON (a ping),
        // so a pong would mean the limit was not applied.
        let big = format!(
            r#"{{"type":"ping","pad":"{}"}}"#,
            "x".repeat(MAX_FRAME + 100)
        );
        let bad: Vec<(&str, Frame<'_>)> = vec![
            ("bad_json", Frame::text(Payload::Borrowed(b"{\"type\":"))),
            ("bad_json", Frame::text(Payload::Borrowed(b"hello"))),
            (
                "unknown_type",
                Frame::text(Payload::Borrowed(br#"{"type":"dance","data":{}}"#)),
            ),
            (
                "binary_not_supported",
                Frame::binary(Payload::Borrowed(br#"{"type":"ping"}"#)),
            ),
            (
                "frame_too_large",
                Frame::text(Payload::Owned(big.into_bytes())),
            ),
        ];
        for (code, frame) in bad {
            victim.send_frame(frame).await;
            let got = victim.recv().await;
            assert_error(dialect, &got, code);
            // Still answering.
            victim.send_json(json!({"type": "ping"})).await;
            assert_eq!(
                victim.recv().await,
                json!({"type": "pong"}),
                "{path} after {code}"
            );
        }
        // Still receiving publishes, and so is the bystander, which saw
        // nothing of the victim's errors.
        node.publish(r, "after-bad-input", json!({"n": 1})).await;
        for c in [&mut victim, &mut bystander] {
            let got = c.recv().await;
            assert_eq!(got["type"], "after-bad-input", "{path}: {got}");
        }
        bystander.send_json(json!({"type": "ping"})).await;
        assert_eq!(bystander.recv().await, json!({"type": "pong"}));
        // The limit is about size, not about large-ish frames as such.
        let fits = format!(
            r#"{{"type":"ping","pad":"{}"}}"#,
            "x".repeat(MAX_FRAME - 40)
        );
        assert!(fits.len() <= MAX_FRAME);
        victim.send_text(&fits).await;
        assert_eq!(victim.recv().await, json!({"type": "pong"}), "{path}");
    }
}

#[tokio::test]
async fn a_frame_over_the_hard_cap_gets_an_error_then_close_1009() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "hard-cap");
    cfg.max_frame_bytes = MAX_FRAME;
    let node = TestNode::start(cfg).await;
    // `hard_cap` in ws::conn: max(4 × MAX_FRAME_BYTES, 256 KiB).
    let hard_cap = (4 * MAX_FRAME).max(256 * 1024);
    for (dialect, path) in ENDPOINTS {
        let (tok, r) = member(dialect);
        let mut victim = connect_ready(node.addr, path, &tok).await;
        let mut bystander = connect_ready(node.addr, path, &tok).await;
        let mut huge = br#"{"type":"ping","pad":""#.to_vec();
        huge.resize(hard_cap + 1024, b'x');
        huge.extend_from_slice(b"\"}");
        // The server stops reading at the header: write from another task.
        let writing = victim.spawn_send(OpCode::Text, huge);
        let got = victim.recv().await;
        assert_error(dialect, &got, "frame_too_large");
        match victim.next_seen(WAIT).await {
            Some(Seen::Close(code)) => assert_eq!(code, 1009, "{path}"),
            other => panic!("{path}: expected close 1009, got {other:?}"),
        }
        let _ = writing.await;
        // Nobody else noticed.
        node.publish(r, "after-hard-cap", json!({})).await;
        assert_eq!(bystander.recv().await["type"], "after-hard-cap");
        bystander.send_json(json!({"type": "ping"})).await;
        assert_eq!(bystander.recv().await, json!({"type": "pong"}));
    }
}

#[tokio::test]
async fn fragmented_messages_are_reassembled_and_bad_frames_closed_1002() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "frames")).await;
    for (dialect, path) in ENDPOINTS {
        let (tok, r) = member(dialect);
        let mut c = connect_ready(node.addr, path, &tok).await;
        // `{"type":"ping"}` in three frames, a control frame in between.
        let parts: [&[u8]; 3] = [b"{\"ty", b"pe\":\"pi", b"ng\"}"];
        let frames = [
            (false, OpCode::Text, parts[0]),
            (true, OpCode::Ping, &b"hb"[..]),
            (false, OpCode::Continuation, parts[1]),
            (true, OpCode::Continuation, parts[2]),
        ];
        for (fin, op, payload) in frames {
            c.send_frame(Frame::new(fin, op, None, Payload::Borrowed(payload)))
                .await;
        }
        assert_eq!(c.recv().await, json!({"type": "pong"}), "{path}");
        // A continuation with nothing to continue is an error, not a close.
        c.send_frame(Frame::new(
            true,
            OpCode::Continuation,
            None,
            Payload::Borrowed(b"x"),
        ))
        .await;
        assert_error(dialect, &c.recv().await, "bad_message");
        c.send_json(json!({"type": "ping"})).await;
        assert_eq!(c.recv().await, json!({"type": "pong"}), "{path}");

        // An unmasked client frame cannot be trusted to be in sync: an
        // error in the dialect's shape, then close 1002; others unaffected.
        let mut bystander = connect_ready(node.addr, path, &tok).await;
        c.send_unmasked(Frame::text(Payload::Borrowed(br#"{"type":"ping"}"#)))
            .await;
        assert_error(dialect, &c.recv().await, "bad_frame");
        match c.next_seen(WAIT).await {
            Some(Seen::Close(code)) => assert_eq!(code, 1002, "{path}"),
            other => panic!("{path}: expected close 1002, got {other:?}"),
        }
        node.publish(r, "after-bad-frame", json!({})).await;
        assert_eq!(bystander.recv().await["type"], "after-bad-frame");
    }
}

// ---------------------------------------------------------------------------
// Slow consumers and keepalive

#[tokio::test]
async fn a_reader_that_falls_behind_gets_its_backlog_in_order() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "backlog")).await;
    let mut lagging = Client::connect_parked(node.addr, &format!("/?token={}", admin()), 1).await;
    // 400 × 40 KB = 16 MB: more than loopback's socket buffers take, so
    // most of it waits in the server's backlog (under SEND_QUEUE_LEN frames)
    // until the client reads again.
    let n = 400;
    let pad = "b".repeat(40_000);
    let mut http = HttpConn::open(node.addr).await;
    for seq in 0..n {
        let (s, b) = http
            .publish_body(
                json!({"room": "admin-orders", "type": "bulk", "data": {"seq": seq, "pad": pad}}),
            )
            .await;
        assert_eq!(s, 204, "publish {seq} failed: {b}");
    }
    let got = lagging.read_parked(n, Duration::from_secs(20)).await;
    for (i, v) in got.iter().enumerate() {
        assert_eq!(v["data"]["seq"], i, "lost or reordered");
        assert_eq!(v["data"]["pad"].as_str().map(str::len), Some(40_000));
    }
    assert_eq!(node.node().socket_count(), 1, "closed as a slow consumer");
}

#[tokio::test]
async fn a_slow_consumer_is_dropped_while_a_fast_one_gets_everything() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "slow");
    cfg.send_queue_len = 16;
    let node = TestNode::start(cfg).await;
    // Never reads after its `connected` message.
    let mut slow = Client::connect_parked(node.addr, &format!("/?token={}", admin()), 1).await;
    let mut fast = connect_ready(node.addr, "/", &admin()).await;
    assert_eq!(node.node().socket_count(), 2);

    let pad = "p".repeat(4096);
    let mut http = HttpConn::open(node.addr).await;
    let mut sent = 0u64;
    let mut received = 0u64;
    // At least 2000 publishes of ~4 KiB; more if the kernel buffers of the
    // slow socket have not filled yet (they are sized by the kernel).
    while sent < 2000 || (node.node().socket_count() > 1 && sent < 20_000) {
        let (s, b) = http
            .publish_body(
                json!({"room": "admin-orders", "type": "tick", "data": {"seq": sent, "pad": pad}}),
            )
            .await;
        assert_eq!(s, 204, "publish {sent} failed: {b}");
        sent += 1;
        // Read as we go, so the fast reader is never the slow one.
        while let Some(Seen::Json(v)) = fast.next_seen(Duration::ZERO).await {
            assert_eq!(
                v["data"]["seq"], received,
                "fast client lost or reordered a message"
            );
            received += 1;
        }
    }
    while received < sent {
        let v = fast.recv().await;
        assert_eq!(
            v["data"]["seq"], received,
            "fast client lost or reordered a message"
        );
        received += 1;
    }
    assert_eq!(received, sent);
    // The slow socket is gone on the server, counted in the metric, and its
    // TCP connection ends once the client reads what was buffered.
    let deadline = std::time::Instant::now() + WAIT;
    while node.node().socket_count() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "slow socket not closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, metrics) = http.request("GET", "/metrics", &[], None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    let slow_total = metric_value(
        &metrics,
        "switchboard_slow_consumers_total{dialect=\"rooms\"}",
    );
    assert!(
        slow_total.is_some_and(|n| n >= 1.0),
        "switchboard_slow_consumers_total not counted:\n{metrics}"
    );
    let (frames, ended) = slow.drain_parked(WAIT).await;
    assert!(ended, "the slow socket's connection did not end");
    assert!(
        (frames as u64) < sent,
        "the slow socket got everything: not slow"
    );
    // The fast one is still fine.
    fast.send_json(json!({"type": "ping"})).await;
    assert_eq!(fast.recv().await, json!({"type": "pong"}));
}

#[tokio::test]
async fn server_keepalive_closes_silent_sockets_4000_and_keeps_ponging_ones() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "keepalive");
    cfg.ping_interval = Duration::from_millis(300);
    let node = TestNode::start(cfg).await;
    let silent_opts = ClientOpts {
        auto_pong: false,
        ..ClientOpts::default()
    };
    let mut silent = Vec::new();
    let mut ponging = Vec::new();
    for (dialect, path) in ENDPOINTS {
        let (tok, _) = member(dialect);
        let p = format!("{path}?token={tok}");
        silent.push((
            path,
            Client::connect_with(node.addr, &p, &[], silent_opts).await,
        ));
        ponging.push((path, connect_ready(node.addr, path, &tok).await));
    }
    for (path, c) in &mut silent {
        assert_eq!(c.closed().await, 4000, "{path}");
    }
    // Several ping intervals later the ponging sockets are still open.
    for (path, c) in &mut ponging {
        c.silent_for(Duration::from_millis(300)).await;
        c.send_json(json!({"type": "ping"})).await;
        assert_eq!(c.recv().await, json!({"type": "pong"}), "{path}");
    }
    assert_eq!(node.node().socket_count(), 3);
}
