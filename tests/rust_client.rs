//! The Rust client crate (clients/rust) against real nodes: live events and
//! caches, surviving a node restart, and no retry after 4001.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use switchboard_client::reconnect::{Client, ClientConfig, ClientEvent};

async fn next_matching(c: &mut Client, f: impl Fn(&ClientEvent) -> bool) -> ClientEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            let e = c.next_event().await.expect("client ended");
            if f(&e) {
                return e;
            }
        }
    })
    .await
    .expect("event did not come")
}

fn is_type(ty: &'static str) -> impl Fn(&ClientEvent) -> bool {
    move |e| matches!(e, ClientEvent::Message(v) if v["type"] == ty)
}

#[tokio::test]
async fn caches_follow_orders_and_drivers() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "n")).await;
    let mut c = Client::start(ClientConfig::new(node.addr, "/ws", &admin()));
    next_matching(&mut c, is_type("CONNECTED")).await;
    let auth = format!("Bearer {}", admin());
    let (s, o) = http(
        node.addr,
        "POST",
        "/api/orders",
        &[("authorization", &auth)],
        Some(json!({"city_id": 1, "user_id": 3})),
    )
    .await;
    assert_eq!(s, 201);
    let id = o["id"].as_i64().unwrap();
    next_matching(&mut c, is_type("ORDER_CREATED")).await;
    assert_eq!(
        c.orders.lock().unwrap().get(id).unwrap()["status"],
        "pending"
    );
    http(
        node.addr,
        "PATCH",
        &format!("/api/orders/{id}"),
        &[("authorization", &auth)],
        Some(json!({"status": "ready"})),
    )
    .await;
    next_matching(&mut c, is_type("ORDER_UPDATED")).await;
    assert_eq!(c.orders.lock().unwrap().get(id).unwrap()["version"], 2);
    let d = format!("Bearer {}", driver(9, 1));
    http(
        node.addr,
        "POST",
        "/api/driver/location",
        &[("authorization", &d)],
        Some(json!({"latitude": 41.3, "longitude": 69.2})),
    )
    .await;
    next_matching(&mut c, is_type("DRIVER_LOCATION")).await;
    assert_eq!(c.drivers.lock().unwrap().by_driver[&9].latitude, 41.3);
    http(
        node.addr,
        "DELETE",
        &format!("/api/orders/{id}"),
        &[("authorization", &auth)],
        None,
    )
    .await;
    next_matching(&mut c, is_type("ORDER_DELETED")).await;
    assert!(c.orders.lock().unwrap().get(id).is_none());
}

#[tokio::test]
async fn survives_a_node_restart() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut node = TestNode::start(config(&db, None, "n")).await;
    let addr = node.addr;
    let mut cfg = ClientConfig::new(addr, "/", &admin());
    cfg.base_delay = Duration::from_millis(50);
    cfg.max_delay = Duration::from_millis(200);
    let mut c = Client::start(cfg);
    next_matching(&mut c, is_type("connected")).await;
    node.stop().await;
    assert_eq!(
        next_matching(&mut c, |e| matches!(e, ClientEvent::Disconnected(_))).await,
        ClientEvent::Disconnected(1012)
    );
    next_matching(&mut c, |e| matches!(e, ClientEvent::Reconnecting { .. })).await;
    let mut again = config(&db, None, "n2");
    again.listen = addr;
    let node2 = TestNode::start(again).await;
    next_matching(&mut c, is_type("connected")).await;
    node2
        .publish("admin-orders", "after", json!({"ok": 1}))
        .await;
    let got = next_matching(&mut c, is_type("after")).await;
    assert_eq!(
        got,
        ClientEvent::Message(json!({"type": "after", "data": {"ok": 1}}))
    );
}

#[tokio::test]
async fn no_retry_after_4001() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "n")).await;
    let mut cfg = ClientConfig::new(node.addr, "/ws/driver/orders/", "not-a-jwt");
    cfg.base_delay = Duration::from_millis(10);
    let mut c = Client::start(cfg);
    let mut seen = Vec::new();
    while let Some(e) = tokio::time::timeout(WAIT, c.next_event())
        .await
        .expect("events")
    {
        seen.push(e);
    }
    assert!(matches!(&seen[0], ClientEvent::Connected));
    assert!(
        matches!(&seen[1], ClientEvent::Message(v) if v["type"] == "error" && v["code"] == "unauthorized"),
        "{seen:?}"
    );
    assert_eq!(
        seen[2..],
        [ClientEvent::Disconnected(4001), ClientEvent::GaveUp(4001)]
    );
}

#[tokio::test]
async fn gives_up_after_max_attempts() {
    let mut cfg = ClientConfig::new(
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        "/ws",
        "t",
    );
    cfg.max_attempts = 3;
    cfg.base_delay = Duration::from_millis(5);
    let mut c = Client::start(cfg);
    let mut attempts = Vec::new();
    while let Some(e) = tokio::time::timeout(WAIT, c.next_event())
        .await
        .expect("events")
    {
        match e {
            ClientEvent::Reconnecting { attempt, .. } => attempts.push(attempt),
            ClientEvent::GaveUp(code) => {
                assert_eq!(code, 1006);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(attempts, vec![1, 2, 3]);
}
