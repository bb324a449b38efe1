//! The real-time core end to end: real nodes, real sockets, a real
//! redis-server per test.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn embedded_publish_reaches_all_three_dialects() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "solo")).await;
    let mut rooms = connect_ready(node.addr, "/", &admin()).await;
    let mut events = connect_ready(node.addr, "/ws", &admin()).await;
    let mut drv = connect_ready(node.addr, "/ws/driver/orders/", &driver(7, 1)).await;

    node.publish("admin-orders", "hello", json!({"n": 1})).await;
    assert_eq!(
        rooms.recv().await,
        json!({"type": "hello", "data": {"n": 1}})
    );
    assert_eq!(
        events.recv().await,
        json!({"type": "hello", "payload": {"n": 1}})
    );
    node.publish("driver-7", "hello", json!({"n": 2})).await;
    assert_eq!(drv.recv().await, json!({"type": "hello", "n": 2}));
    rooms.silent_for(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn cross_node_publish_in_all_dialects() {
    init_tracing();
    let redis = RedisServer::start();
    let db = TestDb::sqlite();
    let a = TestNode::start(config(&db, Some(&redis), "a")).await;
    let b = TestNode::start(config(&db, Some(&redis), "b")).await;
    a.wait_ready(true).await;
    b.wait_ready(true).await;
    let mut rooms = connect_ready(a.addr, "/", &admin()).await;
    let mut events = connect_ready(a.addr, "/ws", &admin()).await;
    let mut drv = connect_ready(a.addr, "/ws/driver/orders/", &driver(7, 1)).await;
    b.publish("admin-orders", "hello", json!({"n": 1})).await;
    assert_eq!(
        rooms.recv().await,
        json!({"type": "hello", "data": {"n": 1}})
    );
    assert_eq!(
        events.recv().await,
        json!({"type": "hello", "payload": {"n": 1}})
    );
    b.publish("driver-7", "offer", json!({"x": true})).await;
    assert_eq!(drv.recv().await, json!({"type": "offer", "x": true}));
}
