//! Several nodes on one real redis-server: cross-node delivery, multi-room
//! publishes, refused joins, Redis going away and coming back, and the drain.

mod common;

use common::*;
use serde_json::{Value, json};
use switchboard::event::{Event, EventKind};

async fn cluster(redis: &RedisServer, db: &TestDb, ids: &[&str]) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for id in ids {
        nodes.push(TestNode::start(config(db, Some(redis), id)).await);
    }
    for n in &nodes {
        n.wait_ready(true).await;
    }
    nodes
}

/// The body of a custom publish as each dialect puts it.
fn body_of(v: &Value) -> &Value {
    if v.get("data").is_some() {
        &v["data"]
    } else if v.get("payload").is_some() {
        &v["payload"]
    } else {
        v
    }
}

/// Reads messages until one of type `end`; returns those before it.
async fn until(c: &mut Client, end: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let v = c.recv().await;
        if v["type"] == end {
            return out;
        }
        out.push(v);
    }
}

#[tokio::test]
async fn three_nodes_every_client_gets_every_publish_exactly_once() {
    init_tracing();
    let redis = RedisServer::start();
    let db = TestDb::sqlite();
    let nodes = cluster(&redis, &db, &["n1", "n2", "n3"]).await;
    // On each node, a client of each dialect.
    let mut clients = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        clients.push((
            format!("rooms@n{i}"),
            "staff",
            connect_ready(n.addr, "/", &admin()).await,
        ));
        clients.push((
            format!("events@n{i}"),
            "staff",
            connect_ready(n.addr, "/ws", &admin()).await,
        ));
        clients.push((
            format!("driver@n{i}"),
            "offer",
            connect_ready(n.addr, "/ws/driver/orders/", &driver(7, 1)).await,
        ));
    }
    // Each node publishes to the staff room and to the driver's room.
    for (i, n) in nodes.iter().enumerate() {
        n.publish("admin-orders", "staff", json!({"from": i})).await;
        n.publish("driver-7", "offer", json!({"from": i})).await;
    }
    // Published after every publish above was acknowledged by Redis, so it
    // arrives after all of them on every node.
    nodes[2].publish("admin-orders", "end", json!({})).await;
    nodes[2].publish("driver-7", "end", json!({})).await;
    for (label, ty, c) in &mut clients {
        let got = until(c, "end").await;
        let mut from: Vec<i64> = got
            .iter()
            .map(|v| {
                assert_eq!(v["type"], *ty, "{label}: {v}");
                body_of(v)["from"].as_i64().unwrap()
            })
            .collect();
        from.sort();
        assert_eq!(from, vec![0, 1, 2], "{label} got {got:?}");
    }
    // And nothing after the end marker.
    nodes[0].publish("admin-orders", "fin", json!({})).await;
    nodes[0].publish("driver-7", "fin", json!({})).await;
    for (label, _, c) in &mut clients {
        assert_eq!(c.recv().await["type"], "fin", "{label}");
    }
}

#[tokio::test]
async fn a_publish_to_several_rooms_reaches_each_socket_once_across_nodes() {
    init_tracing();
    let redis = RedisServer::start();
    let db = TestDb::sqlite();
    let nodes = cluster(&redis, &db, &["a", "b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    // Admins on A are in admin-orders (automatically) and join city-1-orders.
    let mut admin_rooms = connect_ready(a.addr, "/", &admin()).await;
    admin_rooms
        .send_json(json!({"type": "join-room", "data": {"roomId": "city-1-orders"}}))
        .await;
    assert_eq!(
        admin_rooms.recv().await,
        json!({"type": "room-joined", "data": {"roomId": "city-1-orders"}})
    );
    let mut admin_events = connect_ready(a.addr, "/ws", &admin()).await;
    admin_events
        .send_json(json!({"type": "join-room", "payload": {"roomId": "city-1-orders"}}))
        .await;
    assert_eq!(
        admin_events.recv().await,
        json!({"type": "room-joined", "payload": {"roomId": "city-1-orders"}})
    );
    // Managers of city 1 are only in the second room, on both nodes.
    let mut mgr_a = connect_ready(a.addr, "/", &manager(10, &[1])).await;
    let mut mgr_b = connect_ready(b.addr, "/ws", &manager(11, &[1])).await;

    let both = ["admin-orders", "city-1-orders"];
    let reversed = ["city-1-orders", "admin-orders"];
    for (publisher, rooms, n) in [(b, both, 1), (b, reversed, 2), (a, both, 3)] {
        let (s, body) = publish_body(
            publisher.addr,
            json!({"rooms": rooms, "type": "multi", "data": {"n": n}}),
        )
        .await;
        assert_eq!(s, 204, "{body}");
    }
    let (s, body) = publish_body(b.addr, json!({"rooms": both, "type": "end", "data": {}})).await;
    assert_eq!(s, 204, "{body}");
    // Every socket is in city-1-orders: this one arrives last everywhere.
    b.publish("city-1-orders", "fin", json!({})).await;
    for (label, c) in [
        ("admin / on A", &mut admin_rooms),
        ("admin /ws on A", &mut admin_events),
        ("manager / on A", &mut mgr_a),
        ("manager /ws on B", &mut mgr_b),
    ] {
        let got = until(c, "fin").await;
        let seq: Vec<Value> = got
            .iter()
            .map(|v| json!([v["type"], body_of(v)["n"]]))
            .collect();
        assert_eq!(
            seq,
            vec![
                json!(["multi", 1]),
                json!(["multi", 2]),
                json!(["multi", 3]),
                json!(["end", null])
            ],
            "{label}"
        );
    }
}

#[tokio::test]
async fn refused_joins_are_errors_and_deliver_nothing() {
    init_tracing();
    let redis = RedisServer::start();
    let db = TestDb::sqlite();
    let nodes = cluster(&redis, &db, &["a", "b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);

    // Rightful members on A, so A is subscribed to every room tried below:
    // a refused join that still added the socket would hear the publishes.
    let mut city2 = connect_ready(a.addr, "/", &manager(20, &[2])).await;
    let mut user6 = connect_ready(a.addr, "/", &user(6)).await;
    let mut driver8 = connect_ready(a.addr, "/ws/driver/orders/", &driver(8, 1)).await;

    // (socket, join message, expected error, own room for the final marker)
    let mut tries = vec![
        (
            "manager of city 1 on /",
            connect_ready(a.addr, "/", &manager(10, &[1])).await,
            json!({"type": "join-room", "data": {"roomId": "city-2-orders"}}),
            json!({"type": "error", "data": {"code": "join_refused", "message": "not allowed to join room \"city-2-orders\""}}),
            "city-1-orders",
        ),
        (
            "manager of city 1 on /ws",
            connect_ready(a.addr, "/ws", &manager(11, &[1])).await,
            json!({"type": "JOIN_ROOM", "payload": {"roomId": "city-2-orders"}}),
            json!({"type": "ERROR", "payload": {"code": "join_refused", "message": "not allowed to join room \"city-2-orders\""}}),
            "city-1-orders",
        ),
        (
            "user 5 on /",
            connect_ready(a.addr, "/", &user(5)).await,
            json!({"type": "join-room", "data": {"roomId": "user-6"}}),
            json!({"type": "error", "data": {"code": "join_refused", "message": "not allowed to join room \"user-6\""}}),
            "user-5",
        ),
        (
            "user 5 on /ws",
            connect_ready(a.addr, "/ws", &user(5)).await,
            json!({"type": "join-room", "payload": {"roomId": "admin-orders"}}),
            json!({"type": "ERROR", "payload": {"code": "join_refused", "message": "not allowed to join room \"admin-orders\""}}),
            "user-5",
        ),
        (
            "driver 7 on the driver socket",
            connect_ready(a.addr, "/ws/driver/orders/", &driver(7, 1)).await,
            json!({"type": "join-room", "roomId": "driver-8"}),
            json!({"type": "error", "code": "join_refused", "message": "not allowed to join room \"driver-8\""}),
            "driver-7",
        ),
    ];
    for (who, c, join, want, _) in &mut tries {
        c.send_json(join.clone()).await;
        assert_eq!(&c.recv().await, want, "{who}");
    }
    for r in ["city-2-orders", "user-6", "driver-8", "admin-orders"] {
        b.publish(r, "secret", json!({"room": r})).await;
    }
    for (who, c) in [
        ("city 2 manager", &mut city2),
        ("user 6", &mut user6),
        ("driver 8", &mut driver8),
    ] {
        assert_eq!(c.recv().await["type"], "secret", "{who}");
    }
    for (who, c, _, _, own) in &mut tries {
        b.publish(own, "fin", json!({})).await;
        let got = c.recv().await;
        assert_eq!(got["type"], "fin", "{who} got {got}");
    }
}

#[tokio::test]
async fn nodes_survive_redis_restarting_and_resubscribe_by_themselves() {
    init_tracing();
    let mut redis = RedisServer::start();
    let db = TestDb::sqlite();
    let nodes = cluster(&redis, &db, &["a", "b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut staff_a = connect_ready(a.addr, "/", &admin()).await;
    let mut staff_b = connect_ready(b.addr, "/ws", &admin()).await;
    let mut driver_a = connect_ready(a.addr, "/ws/driver/orders/", &driver(7, 1)).await;
    let mut driver_b = connect_ready(b.addr, "/ws/driver/orders/", &driver(7, 1)).await;
    a.publish("admin-orders", "before", json!({})).await;
    assert_eq!(staff_a.recv().await["type"], "before");
    assert_eq!(staff_b.recv().await["type"], "before");

    redis.kill();
    for n in [a, b] {
        n.wait_ready(false).await;
        let (s, body) = http(n.addr, "GET", "/readyz", &[], None).await;
        assert_eq!(s, 503, "{body}");
        assert_eq!(body["ready"], false, "{body}");
        assert_eq!(body["redis"], false, "{body}");
        // Publishing while Redis is down: 503 with the JSON error body.
        let (s, body) = publish_body(
            n.addr,
            json!({"room": "admin-orders", "type": "lost", "data": {}}),
        )
        .await;
        assert_eq!(s, 503, "{body}");
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }

    redis.restart();
    a.wait_ready(true).await;
    b.wait_ready(true).await;
    // The sockets opened before the outage hear publishes from either node.
    a.publish("admin-orders", "after", json!({"from": "a"}))
        .await;
    b.publish("driver-7", "after", json!({"from": "b"})).await;
    for (who, c) in [
        ("staff on A", &mut staff_a),
        ("staff on B", &mut staff_b),
        ("driver on A", &mut driver_a),
        ("driver on B", &mut driver_b),
    ] {
        let got = c.recv().await;
        assert_eq!(got["type"], "after", "{who}: {got}");
    }
    // The publishes refused during the outage never turn up later.
    a.publish("admin-orders", "fin", json!({})).await;
    assert_eq!(staff_a.recv().await["type"], "fin");
    assert_eq!(staff_b.recv().await["type"], "fin");
}

/// While Redis is down a socket is never left in a room silently: a connect
/// whose rooms cannot be joined gets `broker_unavailable` and close 1013
/// (reconnect later, with `since`), and a `join-room` that fails gets
/// `broker_unavailable`, no `room-joined`, and leaves the socket out of the
/// room until it asks again.
#[tokio::test]
async fn while_redis_is_down_joins_fail_plainly() {
    init_tracing();
    let mut redis = RedisServer::start();
    let db = TestDb::sqlite();
    let nodes = cluster(&redis, &db, &["a", "b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut staff = connect_ready(a.addr, "/", &admin()).await;
    redis.kill();
    a.wait_ready(false).await;

    let mut late = Client::connect(a.addr, &format!("/ws?token={}", admin())).await;
    let err = late.recv().await;
    assert_eq!(err["type"], "ERROR", "{err}");
    assert_eq!(err["payload"]["code"], "broker_unavailable", "{err}");
    assert_eq!(
        late.closed().await,
        1013,
        "a connect that is not in its rooms"
    );

    staff
        .send_json(json!({"type": "join-room", "data": {"roomId": "city-2-orders"}}))
        .await;
    let err = staff.recv().await;
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["data"]["code"], "broker_unavailable", "{err}");
    let msg = err["data"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("join-room again"), "{err}");

    redis.restart();
    a.wait_ready(true).await;
    b.wait_ready(true).await;
    // Not in the room: a publish to it does not reach the socket.
    b.publish("city-2-orders", "not-joined", json!({})).await;
    b.publish("admin-orders", "marker", json!({})).await;
    let got = staff.recv().await;
    assert_eq!(
        got["type"], "marker",
        "the failed join left no membership: {got}"
    );
    // Asked again, it is joined.
    staff
        .send_json(json!({"type": "join-room", "data": {"roomId": "city-2-orders"}}))
        .await;
    assert_eq!(staff.recv().await["type"], "room-joined");
    b.publish("city-2-orders", "joined", json!({})).await;
    assert_eq!(staff.recv().await["type"], "joined");
}

#[tokio::test]
async fn drain_closes_sockets_1012_after_flushing_and_leaves_other_nodes_alone() {
    init_tracing();
    let redis = RedisServer::start();
    let db = TestDb::sqlite();
    let mut nodes = cluster(&redis, &db, &["a", "b"]).await;
    let mut on_a = vec![
        (
            "rooms",
            true,
            connect_ready(nodes[0].addr, "/", &admin()).await,
        ),
        (
            "events",
            true,
            connect_ready(nodes[0].addr, "/ws", &admin()).await,
        ),
        (
            "driver",
            false,
            connect_ready(nodes[0].addr, "/ws/driver/orders/", &driver(7, 1)).await,
        ),
    ];
    let mut on_b = connect_ready(nodes[1].addr, "/", &admin()).await;

    // A message queued just before the drain still goes out, then 1012.
    // (Handed to A's hub directly: a publish through Redis reaches the hub
    // asynchronously, possibly after the drain started.)
    let last = Event::new(
        vec!["admin-orders".into()],
        EventKind::Custom {
            ty: "last".into(),
            data: json!({}),
        },
    );
    nodes[0].node().deliver_local("admin-orders", &last);
    nodes[0].node.as_ref().unwrap().shutdown();
    assert!(!nodes[0].node().is_ready(), "a draining node is not ready");
    assert_ne!(
        readyz_status(nodes[0].addr).await,
        Some(200),
        "readyz says ready while draining"
    );
    for (label, staff, c) in &mut on_a {
        if *staff {
            assert_eq!(c.recv().await["type"], "last", "{label}");
        }
        match c.next_seen(WAIT).await {
            Some(Seen::Close(code)) => assert_eq!(code, 1012, "{label}"),
            other => panic!("{label}: expected close 1012, got {other:?}"),
        }
    }
    // The drain finishes (the harness' grace period is 5 s).
    tokio::time::timeout(WAIT, nodes[0].stop())
        .await
        .expect("drain finished");
    // The other node never noticed.
    nodes[1]
        .publish("admin-orders", "still-here", json!({}))
        .await;
    assert_eq!(on_b.recv().await["type"], "still-here");
}

/// SPEC §1: `/readyz` is "not draining": a probe during the drain is
/// answered 503 (the node keeps accepting for a short linger), and a new
/// WebSocket upgrade is refused with 503.
#[tokio::test]
async fn readyz_answers_503_while_draining() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "draining")).await;
    let _c = connect_ready(node.addr, "/", &admin()).await;
    node.wait_ready(true).await;
    node.node.as_ref().unwrap().shutdown();
    assert_eq!(readyz_status(node.addr).await, Some(503));
    let (s, body) = http(node.addr, "GET", "/healthz", &[], None).await;
    assert_eq!(s, 200, "{body}");
}
