//! SPEC §5: `order_number` given by the creator (1–32 characters, unique,
//! 409 when taken; the id as a string by default), and the refund of bonuses
//! used when an order is cancelled or deleted before completion (once, as
//! operation `refunded`, with `bonus-updated`). SQLite and PostgreSQL.

mod common;

use common::*;
use serde_json::{Value, json};

async fn order_numbers(db: TestDb) {
    let node = TestNode::start(config(&db, None, "num")).await;
    let a = node.addr;
    let mut events = connect_ready(a, "/ws", &admin()).await;
    let o = create_order(a, &user(5), json!({"city_id": 1, "order_number": "A-17"})).await;
    assert_eq!(o["order_number"], "A-17");
    let created = events.recv_type("ORDER_CREATED").await;
    assert_eq!(created["payload"]["order_number"], "A-17");
    let (s, b) = call(
        a,
        "GET",
        &format!("/api/orders/{}", id_of(&o)),
        &user(5),
        None,
    )
    .await;
    assert_eq!((s, b["order_number"].clone()), (200, json!("A-17")), "{b}");
    // Taken: 409, and nothing was created.
    let (s, b) = call(
        a,
        "POST",
        "/api/orders",
        &user(6),
        Some(json!({"city_id": 1, "order_number": "A-17"})),
    )
    .await;
    assert_eq!(error_code(s, &b, 409), "conflict");
    // By default the id as a string.
    let d = create_order(a, &user(5), json!({"city_id": 1})).await;
    assert_eq!(d["order_number"], id_of(&d).to_string());
    // A default number is taken too.
    let (s, b) = call(
        a,
        "POST",
        "/api/orders",
        &user(5),
        Some(json!({"city_id": 1, "order_number": id_of(&d).to_string()})),
    )
    .await;
    assert_eq!(error_code(s, &b, 409), "conflict");
    // 1 to 32 characters.
    for bad in [json!(""), json!("x".repeat(33))] {
        let (s, b) = call(
            a,
            "POST",
            "/api/orders",
            &user(5),
            Some(json!({"city_id": 1, "order_number": bad})),
        )
        .await;
        assert_eq!(error_code(s, &b, 400), "bad_request", "{bad}");
    }
    let o = create_order(
        a,
        &user(5),
        json!({"city_id": 1, "order_number": "x".repeat(32)}),
    )
    .await;
    assert_eq!(o["order_number"], "x".repeat(32));
    let conn = db_conn(&db).await;
    assert_eq!(scalar(&conn, "SELECT COUNT(*) FROM orders").await, 3);
}
db_variants!(order_number_given_unique_or_the_id, crate::order_numbers);

async fn balance(a: std::net::SocketAddr, u: i64) -> Value {
    let (s, me) = call(a, "GET", "/api/bonuses/me", &user(u), None).await;
    assert_eq!(s, 200, "{me}");
    me
}

async fn refunds(db: TestDb) {
    let node = TestNode::start(config(&db, None, "refund")).await;
    let a = node.addr;
    const U: i64 = 50;
    let mut ws = connect_ready(a, "/", &user(U)).await;
    // Fund 50.
    let f = create_order(
        a,
        &admin(),
        json!({"city_id": 1, "user_id": U, "total": 1000}),
    )
    .await;
    let (s, b) = call(
        a,
        "PATCH",
        &format!("/api/orders/{}", id_of(&f)),
        &admin(),
        Some(json!({"status": "completed"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    ws.recv_type("bonus-updated").await;

    // Cancel: 20 back, once.
    let c = create_order(
        a,
        &user(U),
        json!({"city_id": 1, "total": 100, "bonuses_used": 20}),
    )
    .await;
    assert_eq!(ws.recv_type("bonus-updated").await["data"]["balance"], 30);
    let (s, b) = call(
        a,
        "PATCH",
        &format!("/api/orders/{}", id_of(&c)),
        &admin(),
        Some(json!({"status": "cancelled"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let m = ws.recv_type("bonus-updated").await;
    assert_eq!(
        m["data"]["operation"],
        json!({"type": "refunded", "amount": 20, "orderId": id_of(&c)}),
        "{m}"
    );
    assert_eq!(m["data"]["balance"], 50, "{m}");
    let (s, b) = call(
        a,
        "PATCH",
        &format!("/api/orders/{}", id_of(&c)),
        &admin(),
        Some(json!({"status": "cancelled"})),
    )
    .await;
    assert_eq!(error_code(s, &b, 409), "conflict");
    // Deleting the cancelled order refunds nothing more.
    let (s, _) = call(
        a,
        "DELETE",
        &format!("/api/orders/{}", id_of(&c)),
        &admin(),
        None,
    )
    .await;
    assert_eq!(s, 204);
    assert_eq!(balance(a, U).await["balance"], 50);

    // Delete before completion: 12.5 back.
    let d = create_order(
        a,
        &user(U),
        json!({"city_id": 1, "total": 100, "bonuses_used": 12.5}),
    )
    .await;
    assert_eq!(ws.recv_type("bonus-updated").await["data"]["balance"], 37.5);
    let (s, _) = call(
        a,
        "DELETE",
        &format!("/api/orders/{}", id_of(&d)),
        &admin(),
        None,
    )
    .await;
    assert_eq!(s, 204);
    let m = ws.recv_type("bonus-updated").await;
    assert_eq!(m["data"]["operation"]["type"], "refunded", "{m}");
    assert_eq!(m["data"]["operation"]["amount"], 12.5, "{m}");
    assert_eq!(m["data"]["balance"], 50, "{m}");

    // A completed order keeps what it used: deleting it refunds nothing.
    let k = create_order(
        a,
        &user(U),
        json!({"city_id": 1, "total": 100, "bonuses_used": 10}),
    )
    .await;
    let (s, b) = call(
        a,
        "PATCH",
        &format!("/api/orders/{}", id_of(&k)),
        &admin(),
        Some(json!({"status": "completed"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, _) = call(
        a,
        "DELETE",
        &format!("/api/orders/{}", id_of(&k)),
        &admin(),
        None,
    )
    .await;
    assert_eq!(s, 204);
    // 50 - 10 used + 5 earned (5 % of the total 100).
    let me = balance(a, U).await;
    assert_eq!(me["balance"], 45, "{me}");
    let refunded: Vec<_> = me["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["type"] == "refunded")
        .map(|o| (o["order_id"].as_i64().unwrap(), o["amount"].clone()))
        .collect();
    assert_eq!(
        refunded.len(),
        2,
        "one refund per cancelled or deleted order: {me}"
    );
    assert!(refunded.contains(&(id_of(&c), json!(20))), "{me}");
    assert!(refunded.contains(&(id_of(&d), json!(12.5))), "{me}");
}
db_variants!(bonuses_used_are_refunded_once, crate::refunds);
