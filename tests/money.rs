//! Money (SPEC §5): exact to two decimals, rendered as JSON numbers with no
//! trailing `.0` in every dialect and the HTTP API; `total` and
//! `bonuses_used` finite, 0..=1e9, else 422; balances exact over many small
//! operations. Real nodes, SQLite and PostgreSQL.
//!
//! Frames are checked as text: the test client parses each frame into a
//! `serde_json::Value`, which keeps integers and floats apart (`1500` vs
//! `1500.0`), so its text has the frame's number tokens.

mod common;

use common::*;
use serde_json::{Value, json};

/// The HTTP response body exactly as sent.
async fn raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    tok: &str,
    body: Value,
) -> (u16, String) {
    let (s, bytes) = http_raw(
        addr,
        method,
        path,
        &[("authorization", &bearer(tok))],
        Some(body.to_string()),
    )
    .await;
    (s, String::from_utf8(bytes.to_vec()).unwrap())
}

fn has(text: &str, needle: &str) {
    assert!(text.contains(needle), "{needle} not in {text}");
}

async fn amounts_render_as_plain_numbers(db: TestDb) {
    let redis = RedisServer::start();
    let node = TestNode::start(config(&db, Some(&redis), "money")).await;
    node.wait_ready(true).await;
    let a = node.addr;
    let drv = driver(301, 1);
    let mut d = connect_ready(a, "/ws/driver/orders/", &drv).await;
    locate(a, &drv, PICKUP.0 + 0.01, PICKUP.1).await;
    let mut events = connect_ready(a, "/ws", &admin()).await;
    let mut rooms = connect_ready(a, "/", &user(300)).await;

    // 1500 earns 75 (5 %) on completion.
    let (s, text) = raw(
        a,
        "POST",
        "/api/orders",
        &user(300),
        json!({"city_id": 1, "total": 1500}),
    )
    .await;
    assert_eq!(s, 201, "{text}");
    has(&text, r#""total":1500,"#);
    has(&text, r#""bonuses_earned":75,"#);
    has(&text, r#""bonuses_used":0,"#);
    let first: Value = serde_json::from_str(&text).unwrap();
    let created = events.recv_type("ORDER_CREATED").await.to_string();
    has(&created, r#""total":1500,"#);
    has(&created, r#""bonuses_earned":75,"#);
    let (s, text) = raw(
        a,
        "PATCH",
        &format!("/api/orders/{}", id_of(&first)),
        &admin(),
        json!({"status": "completed"}),
    )
    .await;
    assert_eq!(s, 200, "{text}");
    has(&text, r#""total":1500,"#);
    let updated = events.recv_type("ORDER_UPDATED").await.to_string();
    has(&updated, r#""total":1500,"#);
    let bonus = rooms.recv_type("bonus-updated").await.to_string();
    has(&bonus, r#""balance":75,"#);
    has(&bonus, r#""amount":75,"#);

    // 12.5 with 12.5 of bonuses, dispatched to the driver.
    let (s, text) = raw(
        a,
        "POST",
        "/api/orders",
        &user(300),
        json!({"city_id": 1, "total": "12.50", "bonuses_used": 12.5,
               "latitude_from": PICKUP.0, "longitude_from": PICKUP.1}),
    )
    .await;
    assert_eq!(s, 201, "{text}");
    has(&text, r#""total":12.5,"#);
    has(&text, r#""bonuses_used":12.5,"#);
    has(&text, r#""bonuses_earned":0.63,"#);
    let offer = d.recv_type("new_order").await.to_string();
    has(&offer, r#""total":12.5,"#);
    let mine = rooms.recv_type("order-created").await.to_string();
    has(&mine, r#""total":12.5,"#);
    let bonus = rooms.recv_type("bonus-updated").await.to_string();
    has(&bonus, r#""balance":62.5,"#);
    has(&bonus, r#""amount":12.5,"#);

    let (s, text) = raw(a, "GET", "/api/bonuses/me", &user(300), Value::Null).await;
    assert_eq!(s, 200, "{text}");
    has(&text, r#""balance":62.5"#);
    has(&text, r#""amount":75,"#);
    has(&text, r#""amount":12.5,"#);
    assert!(!text.contains(".0,") && !text.contains(".0}"), "{text}");
}
db_variants!(
    amounts_are_plain_json_numbers,
    crate::amounts_render_as_plain_numbers
);

async fn out_of_range_amounts_are_refused(db: TestDb) {
    let node = TestNode::start(config(&db, None, "money")).await;
    for body in [
        json!({"city_id": 1, "total": 1_000_000_000.01}),
        json!({"city_id": 1, "total": 1e12}),
        json!({"city_id": 1, "total": -1}),
        json!({"city_id": 1, "total": "-0.5"}),
        json!({"city_id": 1, "total": "NaN"}),
        json!({"city_id": 1, "total": "Infinity"}),
        json!({"city_id": 1, "total": "-inf"}),
        json!({"city_id": 1, "total": 10, "bonuses_used": -1}),
        json!({"city_id": 1, "total": 10, "bonuses_used": "nan"}),
    ] {
        let (s, b) = call(
            node.addr,
            "POST",
            "/api/orders",
            &admin(),
            Some(body.clone()),
        )
        .await;
        assert_eq!(error_code(s, &b, 422), "invalid_amount", "{body}");
    }
    // The limit itself is fine.
    let o = create_order(
        node.addr,
        &admin(),
        json!({"city_id": 1, "total": 1_000_000_000}),
    )
    .await;
    assert_eq!(o["total"].to_string(), "1000000000");
    let conn = db_conn(&db).await;
    assert_eq!(scalar(&conn, "SELECT COUNT(*) FROM orders").await, 1);
}
db_variants!(
    amounts_out_of_range_are_422,
    crate::out_of_range_amounts_are_refused
);

async fn balance_exact_over_many_small_operations(db: TestDb) {
    const N: usize = 1000;
    let node = TestNode::start(config(&db, None, "money")).await;
    let a = node.addr;
    let u = user(310);
    // Fund 100 (5 % of 2000).
    let o = create_order(
        a,
        &admin(),
        json!({"city_id": 1, "user_id": 310, "total": 2000}),
    )
    .await;
    let (s, b) = call(
        a,
        "PATCH",
        &format!("/api/orders/{}", id_of(&o)),
        &admin(),
        Some(json!({"status": "completed"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // 1000 debits of 0.07 (a double cannot hold 0.07: summed as doubles
    // the balance drifts off 30).
    let mut conn = HttpConn::open(a).await;
    let auth = bearer(&u);
    for _ in 0..N {
        let (s, b) = conn
            .request(
                "POST",
                "/api/orders",
                &[("authorization", &auth)],
                Some(json!({"city_id": 1, "total": 0.1, "bonuses_used": 0.07})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        assert_eq!(b["bonuses_used"].to_string(), "0.07");
    }
    let (s, text) = raw(a, "GET", "/api/bonuses/me?limit=1", &u, Value::Null).await;
    assert_eq!(s, 200, "{text}");
    let me: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(me["balance"].to_string(), "30");
    assert_eq!(me["items"][0]["balance_after"].to_string(), "30");
    let db_conn = db_conn(&db).await;
    assert_eq!(
        scalar(
            &db_conn,
            "SELECT balance_cents FROM bonus_accounts WHERE user_id = 310"
        )
        .await,
        3000
    );
    assert_eq!(
        scalar(&db_conn, "SELECT CAST(SUM(amount_cents) AS BIGINT) FROM bonus_operations WHERE user_id = 310 AND kind = 'used'").await,
        7000
    );
    // The next debit of 30.01 is short by a cent.
    let (s, b) = call(
        a,
        "POST",
        "/api/orders",
        &u,
        Some(json!({"city_id": 1, "total": 40, "bonuses_used": 30.01})),
    )
    .await;
    assert_eq!(error_code(s, &b, 422), "insufficient_bonuses");
}
db_variants!(
    balances_stay_exact,
    crate::balance_exact_over_many_small_operations
);

/// Rows written as doubles before the cents migration come out exact.
async fn migration_converts_existing_rows_exactly(db: TestDb) {
    use migration::{Migrator, MigratorTrait};
    use sea_orm::ConnectionTrait;
    let conn = db_conn(&db).await;
    Migrator::up(&conn, Some(3)).await.unwrap();
    let now = "'2026-01-01T00:00:00Z'";
    // 0.1 + 0.2 and friends: what summing doubles left in a balance.
    let (total, used, earned, balance) = (1234.56, 0.1 + 0.2, 61.73, 0.07 * 3.0);
    for sql in [
        format!(
            "INSERT INTO orders (order_type, status, user_id, city_id, address_from, address_to, \
             total, bonuses_used, bonuses_earned, created_at, updated_at, version) \
             VALUES ('delivery', 'pending', 5, 1, '', '', {total:?}, {used:?}, {earned:?}, {now}, {now}, 1)"
        ),
        format!(
            "INSERT INTO bonus_accounts (user_id, balance, updated_at) VALUES (5, {balance:?}, {now})"
        ),
        format!(
            "INSERT INTO bonus_operations (user_id, order_id, kind, amount, balance_after, created_at) \
             VALUES (5, 1, 'used', {used:?}, {balance:?}, {now})"
        ),
    ] {
        conn.execute_unprepared(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    Migrator::up(&conn, None).await.unwrap();
    for (sql, want) in [
        ("SELECT total_cents FROM orders", 123_456),
        ("SELECT bonuses_used_cents FROM orders", 30),
        ("SELECT bonuses_earned_cents FROM orders", 6_173),
        ("SELECT balance_cents FROM bonus_accounts", 21),
        ("SELECT amount_cents FROM bonus_operations", 30),
        ("SELECT balance_after_cents FROM bonus_operations", 21),
    ] {
        assert_eq!(scalar(&conn, sql).await, want, "{sql}");
    }
    // And the node shows them as such.
    let node = TestNode::start(config(&db, None, "money")).await;
    let (s, b) = call(node.addr, "GET", "/api/orders/1", &admin(), None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["total"].to_string(), "1234.56");
    assert_eq!(b["bonuses_used"].to_string(), "0.3");
    let (_, me) = call(node.addr, "GET", "/api/bonuses/me", &user(5), None).await;
    assert_eq!(me["balance"].to_string(), "0.21");
}
db_variants!(
    cents_migration_is_exact,
    crate::migration_converts_existing_rows_exactly
);
