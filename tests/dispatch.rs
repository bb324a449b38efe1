//! Orders and dispatch end to end: real nodes, real redis-server, real
//! sockets, on SQLite and PostgreSQL.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

async fn two_node_flow(db: TestDb) {
    let redis = RedisServer::start();
    let mk = |id: &str, timeout: f64| {
        let mut c = config(&db, Some(&redis), id);
        c.offer_timeout = Duration::from_secs_f64(timeout);
        c.offer_lease = Duration::from_secs(1);
        c
    };
    let a = TestNode::start(mk("a", 1.0)).await;
    let b = TestNode::start(mk("b", 1.0)).await;
    a.wait_ready(true).await;
    b.wait_ready(true).await;
    let (ta, tb) = (driver(101, 1), driver(102, 1));
    let mut da = connect_ready(a.addr, "/ws/driver/orders/", &ta).await;
    let mut db_ = connect_ready(b.addr, &format!("/ws/driver/orders/{tb}"), "").await;
    locate(a.addr, &ta, PICKUP.0 + 0.005, PICKUP.1).await;
    locate(b.addr, &tb, PICKUP.0 + 0.02, PICKUP.1).await;
    let mut admin_ws = connect_ready(a.addr, "/ws", &admin()).await;
    let mut creator = connect_ready(b.addr, "/", &user(4)).await;

    let order = create_order(
        b.addr,
        &user(4),
        json!({"city_id": 1, "order_type": "pickup", "address_from": "A", "address_to": "B",
               "latitude_from": PICKUP.0, "longitude_from": PICKUP.1,
               "latitude_to": "41.299496", "longitude_to": "69.240074", "total": 1000}),
    )
    .await;
    let id = order["id"].as_i64().unwrap();
    assert_eq!(order["order_code"], format!("ORD-{id:06}"));
    assert_eq!(order["latitude_from"], "41.311081");

    let created = admin_ws.recv_type("ORDER_CREATED").await;
    assert_eq!(created["payload"]["id"], id);
    let mine = creator.recv_type("order-created").await;
    assert_eq!(mine["data"]["id"], id);

    // Nearest driver A gets the offer, with its distance to pickup.
    let offer = da.recv_type("new_order").await;
    assert_eq!(offer["order"]["id"], id);
    assert_eq!(offer["message"], "New ride request available");
    let dist = offer["order"]["distance_to_pickup_km"].as_f64().unwrap();
    assert!((0.4..0.7).contains(&dist), "{dist}");

    // The deadline passes: A is told, B (next nearest) gets the offer.
    let timeout = da.recv_type("order_timeout").await;
    assert_eq!(
        timeout,
        json!({"type": "order_timeout", "order_id": id, "message": "Order expired or reassigned to another driver"})
    );
    let offer_b = db_.recv_type("new_order").await;
    assert_eq!(offer_b["order"]["id"], id);

    // Accepting an expired offer is a 409 with the error body.
    let (s, body) = call(
        a.addr,
        "POST",
        &format!("/api/driver/orders/{id}/accept"),
        &ta,
        None,
    )
    .await;
    assert_eq!(s, 409, "{body}");
    assert_eq!(body["error"]["code"], "conflict");

    let (s, accepted) = call(
        a.addr,
        "POST",
        &format!("/api/driver/orders/{id}/accept"),
        &tb,
        None,
    )
    .await;
    assert_eq!(s, 200, "{accepted}");
    assert_eq!(accepted["status"], "accepted");
    assert_eq!(accepted["driver_id"], 102);

    // The first offer made the order `offered` (version 2); moving the
    // offer from A to B changed nothing admins see; the accept is version 3.
    let offered = admin_ws.recv_type("ORDER_UPDATED").await;
    assert_eq!(offered["payload"]["dispatch_status"], "offered");
    assert_eq!(offered["payload"]["changed"], json!(["dispatch_status"]));
    assert_eq!(offered["payload"]["version"], 2);
    let upd = admin_ws.recv_type("ORDER_UPDATED").await;
    assert_eq!(upd["payload"]["status"], "accepted");
    assert_eq!(upd["payload"]["dispatch_status"], "assigned");
    assert_eq!(upd["payload"]["version"], 3);
    assert_eq!(
        upd["payload"]["changed"],
        json!(["status", "driver_id", "dispatch_status"])
    );
    let st = creator.recv_type("order-status-updated").await;
    assert_eq!(st["data"]["orderId"], id);
    assert_eq!(st["data"]["newStatus"], "accepted");
    assert_eq!(st["data"]["oldStatus"], "pending");

    // Exactly one expiry happened.
    da.silent_for(Duration::from_millis(300)).await;
}

async fn decline_passes_at_once(db: TestDb) {
    let mut c = config(&db, None, "solo");
    c.offer_timeout = Duration::from_secs(60);
    let n = TestNode::start(c).await;
    let (ta, tb) = (driver(201, 1), driver(202, 1));
    let mut da = connect_ready(n.addr, "/ws/driver/orders/", &ta).await;
    let mut db_ = connect_ready(n.addr, "/ws/driver/orders/", &tb).await;
    locate(n.addr, &ta, PICKUP.0 + 0.001, PICKUP.1).await;
    locate(n.addr, &tb, PICKUP.0 + 0.01, PICKUP.1).await;
    let order = create_order(
        n.addr,
        &admin(),
        json!({"city_id": 1, "user_id": 9, "latitude_from": PICKUP.0, "longitude_from": PICKUP.1}),
    )
    .await;
    let id = order["id"].as_i64().unwrap();
    assert_eq!(da.recv_type("new_order").await["order"]["id"], id);
    // The poll lists the open offer.
    let (s, polled) = call(n.addr, "GET", "/api/driver/orders", &ta, None).await;
    assert_eq!(s, 200);
    assert_eq!(polled["items"][0]["id"], id);
    assert!(polled["items"][0]["offer_expires_at"].is_string());
    let (s, _) = call(
        n.addr,
        "POST",
        &format!("/api/driver/orders/{id}/decline"),
        &ta,
        None,
    )
    .await;
    assert_eq!(s, 204);
    let got = tokio::time::timeout(Duration::from_secs(3), db_.recv_type("new_order"))
        .await
        .expect("B gets the order at once, not at the deadline");
    assert_eq!(got["order"]["id"], id);
    // B reconnects: initial_orders lists its open offer with the distance.
    drop(db_);
    let mut again = Client::connect(n.addr, &format!("/ws/driver/orders/?token={tb}")).await;
    assert_eq!(again.recv().await["type"], "connection_established");
    let init = again.recv().await;
    assert_eq!(init["type"], "initial_orders");
    assert_eq!(init["orders"][0]["id"], id);
    assert!(init["orders"][0]["distance_to_pickup_km"].as_f64().unwrap() > 0.9);
}

db_variants!(driver_flow_across_two_nodes, crate::two_node_flow);
db_variants!(
    decline_passes_the_offer_at_once,
    crate::decline_passes_at_once
);
