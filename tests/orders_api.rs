//! The orders API and the driver's position, through a real node and real
//! sockets: who sees which order (HTTP and events), the lifecycle and input
//! validation, paging, deletion, and driver locations, availability and
//! staleness. Each case starts what it needs; every case runs on SQLite and
//! PostgreSQL.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const QUIET: Duration = Duration::from_millis(300);

fn embedded(db: &TestDb) -> switchboard::Config {
    let mut c = config(db, None, "solo");
    c.offer_timeout = Duration::from_secs(60);
    c
}

/// Ids of the orders a list answer holds (asserting the list shape).
fn ids(list: &Value) -> Vec<i64> {
    assert!(
        list["next_cursor"].is_null() || list["next_cursor"].is_string(),
        "{list}"
    );
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(id_of)
        .collect()
}

/// Order ids of the order events among `msgs` (any dialect).
fn order_ids_in(msgs: &[Value]) -> HashSet<i64> {
    msgs.iter()
        .filter_map(|m| {
            let body = if m.get("payload").is_some() {
                &m["payload"]
            } else {
                &m["data"]
            };
            body["id"].as_i64().or(body["orderId"].as_i64())
        })
        .collect()
}

fn ids_of_type(msgs: &[Value], ty: &str, body: &str) -> Vec<i64> {
    of_type(msgs, ty)
        .iter()
        .map(|m| m[body]["id"].as_i64().unwrap())
        .collect()
}

// ------------------------------------------------------------ role scoping

/// The tokens of the role-scoping cases: managers 21 (city 1) and 22
/// (city 2), driver 31 (city 1).
fn scoping_tokens() -> (String, String, String) {
    (manager(21, &[1]), manager(22, &[2]), driver(31, 1))
}

/// The orders of the role-scoping cases, after driver `td` (31) reported a
/// position next to the pickup point.
async fn scoping_orders(a: std::net::SocketAddr, td: &str) -> (i64, i64, i64) {
    locate(a, td, PICKUP.0 + 0.003, PICKUP.1).await;

    // o1: user 11, city 1; o2: user 12, city 2; o3: user 11, city 1, with a
    // pickup point next to driver 31 (who gets the offer).
    let o1 = id_of(&create_order(a, &user(11), json!({"city_id": 1, "total": 10})).await);
    let o2 = id_of(&create_order(a, &user(12), json!({"city_id": 2, "total": 10})).await);
    let o3 = id_of(
        &create_order(
            a,
            &user(11),
            json!({"city_id": 1, "latitude_from": PICKUP.0, "longitude_from": PICKUP.1}),
        )
        .await,
    );
    (o1, o2, o3)
}

async fn order_events_reach_only_scoped_sockets(db: TestDb) {
    let n = TestNode::start(embedded(&db)).await;
    let a = n.addr;
    let (m1, m2, td) = scoping_tokens();
    let mut admin_ws = connect_ready(a, "/ws", &admin()).await;
    let mut m1_rooms = connect_ready(a, "/", &m1).await;
    let mut m1_events = connect_ready(a, "/ws", &m1).await;
    let mut m2_events = connect_ready(a, "/ws", &m2).await;
    let mut u11 = connect_ready(a, "/", &user(11)).await;
    let mut u12 = connect_ready(a, "/", &user(12)).await;
    let mut u12_events = connect_ready(a, "/ws", &user(12)).await;
    let mut d31 = connect_ready(a, "/ws/driver/orders/", &td).await;
    let (o1, o2, o3) = scoping_orders(a, &td).await;
    // Admins see everything (and, being last, mark that the rest is sent).
    let mut seen_admin = Vec::new();
    for _ in 0..3 {
        seen_admin.push(admin_ws.recv_type("ORDER_CREATED").await);
    }
    assert_eq!(
        ids_of_type(&seen_admin, "ORDER_CREATED", "payload"),
        [o1, o2, o3]
    );

    let got = collect_for(&mut m1_events, QUIET).await;
    assert_eq!(
        ids_of_type(&got, "ORDER_CREATED", "payload"),
        [o1, o3],
        "{got:?}"
    );
    assert!(!order_ids_in(&got).contains(&o2), "{got:?}");
    let got = collect_for(&mut m1_rooms, QUIET).await;
    assert_eq!(ids_of_type(&got, "new-order", "data"), [o1, o3], "{got:?}");
    assert!(!order_ids_in(&got).contains(&o2), "{got:?}");
    let got = collect_for(&mut m2_events, QUIET).await;
    assert_eq!(
        ids_of_type(&got, "ORDER_CREATED", "payload"),
        [o2],
        "{got:?}"
    );
    let got = collect_for(&mut u11, QUIET).await;
    assert_eq!(
        ids_of_type(&got, "order-created", "data"),
        [o1, o3],
        "{got:?}"
    );
    assert!(!order_ids_in(&got).contains(&o2), "{got:?}");
    let got = collect_for(&mut u12, QUIET).await;
    assert_eq!(ids_of_type(&got, "order-created", "data"), [o2], "{got:?}");
    let got = collect_for(&mut u12_events, QUIET).await;
    assert_eq!(
        ids_of_type(&got, "ORDER_CREATED", "payload"),
        [o2],
        "{got:?}"
    );
    let got = collect_for(&mut d31, QUIET).await;
    assert_eq!(of_type(&got, "new_order").len(), 1, "{got:?}");
    assert_eq!(got[0]["order"]["id"], o3, "{got:?}");

    // A change of the city-2 order reaches city 2 and its creator only.
    let (s, b) = call(
        a,
        "PATCH",
        &format!("/api/orders/{o2}"),
        &admin(),
        Some(json!({"status": "confirmed"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // Admins also heard o3 become `offered`; the city-2 change follows.
    let upd = loop {
        let m = admin_ws.recv_type("ORDER_UPDATED").await;
        if m["payload"]["id"] != o3 {
            break m;
        }
    };
    assert_eq!(upd["payload"]["id"], o2);
    let got = m2_events.recv_type("ORDER_UPDATED").await;
    assert_eq!(got["payload"]["id"], o2);
    assert_eq!(
        u12.recv_type("order-status-updated").await["data"]["orderId"],
        o2
    );
    m1_events.silent_for(QUIET).await;
    m1_rooms.silent_for(Duration::from_millis(50)).await;
    u11.silent_for(Duration::from_millis(50)).await;
}

db_variants!(
    order_events_reach_only_scoped_sockets,
    crate::order_events_reach_only_scoped_sockets
);

async fn http_reads_are_scoped(db: TestDb) {
    let n = TestNode::start(embedded(&db)).await;
    let a = n.addr;
    let (m1, m2, td) = scoping_tokens();
    let (o1, o2, o3) = scoping_orders(a, &td).await;

    // HTTP reads: managers their cities, users their own orders, drivers
    // what was offered to them; anything else is a 404.
    let read =
        |token: String, path: String| async move { call(a, "GET", &path, &token, None).await };
    let (s, list) = read(m1.clone(), "/api/orders".into()).await;
    assert_eq!(s, 200);
    assert_eq!(ids(&list), [o3, o1]);
    let (s, list) = read(m2.clone(), "/api/orders".into()).await;
    assert_eq!(s, 200);
    assert_eq!(ids(&list), [o2]);
    let (s, list) = read(user(11), "/api/orders".into()).await;
    assert_eq!(s, 200);
    assert_eq!(ids(&list), [o3, o1]);
    let (s, list) = read(user(12), "/api/orders".into()).await;
    assert_eq!(s, 200);
    assert_eq!(ids(&list), [o2]);
    let (s, list) = read(td.clone(), "/api/orders".into()).await;
    assert_eq!(s, 200);
    assert_eq!(ids(&list), [o3], "a driver sees the orders offered to it");
    let (s, list) = read(driver(32, 1), "/api/orders".into()).await;
    assert_eq!(s, 200);
    assert_eq!(ids(&list), Vec::<i64>::new());
    let (s, list) = read(admin(), "/api/orders".into()).await;
    assert_eq!(s, 200);
    assert_eq!(ids(&list), [o3, o2, o1]);

    for (token, visible, hidden) in [
        (m1.clone(), vec![o1, o3], vec![o2]),
        (m2.clone(), vec![o2], vec![o1, o3]),
        (user(11), vec![o1, o3], vec![o2]),
        (user(12), vec![o2], vec![o1, o3]),
        (td.clone(), vec![o3], vec![o1, o2]),
        (admin(), vec![o1, o2, o3], vec![]),
    ] {
        for id in visible {
            let (s, b) = read(token.clone(), format!("/api/orders/{id}")).await;
            assert_eq!(s, 200, "{b}");
            assert_eq!(b["id"], id);
        }
        for id in hidden {
            let (s, b) = read(token.clone(), format!("/api/orders/{id}")).await;
            assert_eq!(error_code(s, &b, 404), "not_found");
        }
    }
    // The driver still sees the order once it has accepted it.
    let (s, b) = call(
        a,
        "POST",
        &format!("/api/driver/orders/{o3}/accept"),
        &td,
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = read(td.clone(), format!("/api/orders/{o3}")).await;
    assert_eq!((s, b["driver_id"].clone()), (200, json!(31)));
}

db_variants!(http_reads_are_scoped, crate::http_reads_are_scoped);

async fn who_may_create_change_and_delete(db: TestDb) {
    let n = TestNode::start(embedded(&db)).await;
    let a = n.addr;
    let (m1, _, td) = scoping_tokens();
    let (o1, o2, _) = scoping_orders(a, &td).await;

    // Who may do what.
    let body = json!({"city_id": 1, "total": 5});
    let other_manager = token(json!({"sub": 7, "role": "manager", "city_ids": [1]}));
    for tok in [td.clone(), m1.clone(), other_manager] {
        let (s, b) = call(a, "POST", "/api/orders", &tok, Some(body.clone())).await;
        assert_eq!(error_code(s, &b, 403), "forbidden");
    }
    let (s, b) = call(
        a,
        "POST",
        "/api/orders",
        &user(11),
        Some(json!({"city_id": 1, "user_id": 12})),
    )
    .await;
    assert_eq!(
        error_code(s, &b, 403),
        "forbidden",
        "a user cannot order for another"
    );
    for token in [user(11), td.clone()] {
        let (s, b) = call(
            a,
            "PATCH",
            &format!("/api/orders/{o1}"),
            &token,
            Some(json!({"status": "confirmed"})),
        )
        .await;
        assert_eq!(error_code(s, &b, 403), "forbidden");
    }
    let (s, b) = call(
        a,
        "PATCH",
        &format!("/api/orders/{o2}"),
        &m1,
        Some(json!({"status": "preparing"})),
    )
    .await;
    assert_eq!(error_code(s, &b, 404), "not_found", "another city's order");
    let (s, b) = call(
        a,
        "PATCH",
        &format!("/api/orders/{o1}"),
        &m1,
        Some(json!({"status": "confirmed"})),
    )
    .await;
    assert_eq!((s, b["status"].clone()), (200, json!("confirmed")), "{b}");
    for token in [user(11), m1.clone(), td.clone()] {
        let (s, b) = call(a, "DELETE", &format!("/api/orders/{o1}"), &token, None).await;
        assert_eq!(error_code(s, &b, 403), "forbidden");
    }
    let (s, b) = call(a, "DELETE", &format!("/api/orders/{o1}"), &admin(), None).await;
    assert_eq!((s, b), (204, Value::Null));
}

db_variants!(
    who_may_create_change_and_delete,
    crate::who_may_create_change_and_delete
);

async fn bad_tokens_get_401_and_wrong_roles_403(db: TestDb) {
    let n = TestNode::start(embedded(&db)).await;
    let a = n.addr;
    let (m1, _, td) = scoping_tokens();
    let (_, o2, _) = scoping_orders(a, &td).await;
    // The city-2 order is confirmed; nothing below may change that.
    let (s, b) = call(
        a,
        "PATCH",
        &format!("/api/orders/{o2}"),
        &admin(),
        Some(json!({"status": "confirmed"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let read =
        |token: String, path: String| async move { call(a, "GET", &path, &token, None).await };

    // No token, a broken one, a forged one, an expired one: 401.
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "1", "role": "admin", "exp": jsonwebtoken::get_current_timestamp() + 60}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-test-secret-at-all"),
    )
    .unwrap();
    let expired = token(
        json!({"sub": "1", "role": "admin", "exp": jsonwebtoken::get_current_timestamp() - 10}),
    );
    for (method, path) in [
        ("GET", "/api/orders".to_string()),
        ("POST", "/api/orders".to_string()),
        ("GET", format!("/api/orders/{o2}")),
        ("PATCH", format!("/api/orders/{o2}")),
        ("DELETE", format!("/api/orders/{o2}")),
        ("POST", format!("/api/orders/{o2}/dispatch")),
        ("GET", "/api/bonuses/me".to_string()),
        ("GET", "/api/driver/orders".to_string()),
        ("GET", "/api/drivers/nearby?lat=41.3&lon=69.2".to_string()),
    ] {
        let (s, b) = http(a, method, &path, &[], Some(json!({"status": "ready"}))).await;
        assert_eq!(error_code(s, &b, 401), "unauthorized", "{method} {path}");
        for bad in ["garbage", forged.as_str(), expired.as_str()] {
            let (s, b) = call(a, method, &path, bad, Some(json!({"status": "ready"}))).await;
            assert_eq!(error_code(s, &b, 401), "unauthorized", "{method} {path}");
        }
    }
    // Driver endpoints are for drivers; dispatch for staff of the city.
    for (method, path) in [
        ("GET", "/api/driver/orders".to_string()),
        ("POST", format!("/api/driver/orders/{o2}/accept")),
        ("POST", format!("/api/driver/orders/{o2}/decline")),
    ] {
        let (s, b) = call(a, method, &path, &user(12), None).await;
        assert_eq!(error_code(s, &b, 403), "forbidden", "{method} {path}");
    }
    let (s, b) = call(
        a,
        "POST",
        &format!("/api/orders/{o2}/dispatch"),
        &user(12),
        None,
    )
    .await;
    assert_eq!(error_code(s, &b, 403), "forbidden");
    let (s, b) = call(a, "POST", &format!("/api/orders/{o2}/dispatch"), &m1, None).await;
    assert_eq!(error_code(s, &b, 404), "not_found", "another city's order");
    // Nothing above changed the city-2 order.
    let (_, b) = read(admin(), format!("/api/orders/{o2}")).await;
    assert_eq!(b["status"], "confirmed");
}

db_variants!(
    bad_tokens_get_401_and_wrong_roles_403,
    crate::bad_tokens_get_401_and_wrong_roles_403
);

// ------------------------------------------------ lifecycle and validation

async fn patch_status(a: std::net::SocketAddr, id: i64, status: &str) -> (u16, Value) {
    call(
        a,
        "PATCH",
        &format!("/api/orders/{id}"),
        &admin(),
        Some(json!({"status": status})),
    )
    .await
}

async fn status_moves_forward_only(db: TestDb) {
    let n = TestNode::start(embedded(&db)).await;
    let a = n.addr;

    // Forward only, skips allowed; back, same, out of a final state: 409.
    let o = id_of(
        &create_order(
            a,
            &admin(),
            json!({"city_id": 1, "user_id": 41, "total": 10}),
        )
        .await,
    );
    let mut version = 1;
    for (to, want) in [
        ("confirmed", 200),
        ("ready", 200),
        ("confirmed", 409),
        ("ready", 409),
        ("pending", 409),
        ("delivered", 200),
        ("cancelled", 409),
        ("picked_up", 409),
        ("completed", 200),
        ("cancelled", 409),
        ("delivered", 409),
        ("completed", 409),
    ] {
        let (s, b) = patch_status(a, o, to).await;
        if want == 200 {
            version += 1;
            assert_eq!(s, 200, "→ {to}: {b}");
            assert_eq!(b["status"], to);
            assert_eq!(b["version"], version, "version grows by one per change");
        } else {
            assert_eq!(error_code(s, &b, want), "conflict", "→ {to}");
        }
    }
    let c = id_of(&create_order(a, &admin(), json!({"city_id": 1, "user_id": 41})).await);
    for (to, want) in [
        ("picked_up", 200),
        ("cancelled", 200),
        ("cancelled", 409),
        ("confirmed", 409),
    ] {
        let (s, b) = patch_status(a, c, to).await;
        assert_eq!(s, want, "→ {to}: {b}");
    }
}

db_variants!(status_moves_forward_only, crate::status_moves_forward_only);

async fn malformed_patches_are_400_and_change_nothing(db: TestDb) {
    let n = TestNode::start(embedded(&db)).await;
    let a = n.addr;

    // Malformed PATCH bodies: 400, and nothing changes.
    let p = id_of(&create_order(a, &admin(), json!({"city_id": 1, "user_id": 41})).await);
    let path = format!("/api/orders/{p}");
    for body in [
        r#"{"status": "flying"}"#,
        r#"{"status": 3}"#,
        r#"{"status": "confirmed""#,
        r#"{}"#,
        r#"{"total": 5}"#,
        r#"{"scheduled_at": "tomorrow"}"#,
        r#"["confirmed"]"#,
        "",
    ] {
        let (s, b) = call_raw(a, "PATCH", &path, &admin(), body).await;
        assert_eq!(error_code(s, &b, 400), "bad_request", "{body}");
    }
    let (s, b) = call(
        a,
        "PATCH",
        &path,
        &admin(),
        Some(json!({"scheduled_at": "2030-01-02T03:04:05Z"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["scheduled_at"], "2030-01-02T03:04:05.000Z");
    assert_eq!(
        (b["status"].clone(), b["version"].clone()),
        (json!("pending"), json!(2))
    );
}

db_variants!(
    malformed_patches_are_400_and_change_nothing,
    crate::malformed_patches_are_400_and_change_nothing
);

async fn create_validation(db: TestDb) {
    let n = TestNode::start(embedded(&db)).await;
    let a = n.addr;

    // Create validation.
    let u = user(42);
    for (body, code) in [
        (json!({"city_id": 1, "latitude_from": 41.3}), "bad_request"),
        (json!({"city_id": 1, "longitude_to": 69.2}), "bad_request"),
        (
            json!({"city_id": 1, "latitude_from": 91, "longitude_from": 69.2}),
            "bad_request",
        ),
        (
            json!({"city_id": 1, "latitude_from": 41.3, "longitude_from": -180.5}),
            "bad_request",
        ),
        (
            json!({"city_id": 1, "latitude_from": "north", "longitude_from": 69.2}),
            "bad_request",
        ),
        (
            json!({"city_id": 1, "latitude_from": [41.3], "longitude_from": 69.2}),
            "bad_request",
        ),
        (json!({"city_id": 1, "total": "lots"}), "bad_request"),
        (json!({"city_id": "one"}), "bad_request"),
        (json!({"city_id": 1, "scheduled_at": "soon"}), "bad_request"),
        (json!([1, 2]), "bad_request"),
    ] {
        let (s, b) = call(a, "POST", "/api/orders", &u, Some(body.clone())).await;
        assert_eq!(error_code(s, &b, 400), code, "{body}");
    }
    for raw in [r#"{"city_id": 1,"#, "not json", ""] {
        let (s, b) = call_raw(a, "POST", "/api/orders", &u, raw).await;
        assert_eq!(error_code(s, &b, 400), "bad_request", "{raw:?}");
    }
    let (s, b) = call(
        a,
        "POST",
        "/api/orders",
        &u,
        Some(json!({"city_id": 1, "total": 10, "bonuses_used": 10.5})),
    )
    .await;
    assert_eq!(error_code(s, &b, 422), "bonuses_exceed_total");
    // Negative amounts break the money rule (SPEC §5): 422, not 400.
    for body in [
        json!({"city_id": 1, "total": -1}),
        json!({"city_id": 1, "total": 10, "bonuses_used": -1}),
    ] {
        let (s, b) = call(a, "POST", "/api/orders", &u, Some(body.clone())).await;
        assert_eq!(error_code(s, &b, 422), "invalid_amount", "{body}");
    }
    let (s, b) = call(
        a,
        "POST",
        "/api/orders",
        &u,
        Some(json!({"city_id": 1, "total": 100, "bonuses_used": 5})),
    )
    .await;
    assert_eq!(
        error_code(s, &b, 422),
        "insufficient_bonuses",
        "user 42 has no bonuses"
    );
    // None of the refused creates left an order behind.
    let (_, list) = call(a, "GET", "/api/orders", &u, None).await;
    assert_eq!(ids(&list), Vec::<i64>::new());
    // Coordinates as decimal strings are fine, and come back as such.
    let ok = create_order(
        a,
        &u,
        json!({"city_id": 1, "latitude_from": "41.3", "longitude_from": "69.2", "latitude_to": 41.25, "longitude_to": 69.21, "total": "12.5"}),
    )
    .await;
    assert_eq!(
        (
            ok["latitude_from"].clone(),
            ok["longitude_to"].clone(),
            ok["total"].clone(),
            ok["status"].clone()
        ),
        (
            json!("41.300000"),
            json!("69.210000"),
            json!(12.5),
            json!("pending")
        )
    );
}

db_variants!(create_validation, crate::create_validation);

async fn paging_returns_each_order_once(db: TestDb) {
    let n = TestNode::start(embedded(&db)).await;
    let a = n.addr;

    // Paging: 7 orders of one user, 3 at a time, each exactly once.
    let u43 = user(43);
    let mut made = Vec::new();
    for i in 0..7 {
        made.push(id_of(
            &create_order(a, &u43, json!({"city_id": 1, "total": i})).await,
        ));
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            None => "/api/orders?limit=3".to_string(),
            Some(c) => format!("/api/orders?limit=3&cursor={c}"),
        };
        let (s, page) = call(a, "GET", &path, &u43, None).await;
        assert_eq!(s, 200, "{page}");
        let got = ids(&page);
        assert!(got.len() <= 3, "{page}");
        seen.extend(got);
        pages += 1;
        assert!(pages <= 4, "paging does not end: {seen:?}");
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), seen.len(), "an order came twice: {seen:?}");
    made.sort();
    assert_eq!(sorted, made);
    for q in [
        "limit=0",
        "limit=201",
        "limit=three",
        "limit=-1",
        "cursor=abc",
        "cursor=1.5",
    ] {
        let (s, b) = call(a, "GET", &format!("/api/orders?{q}"), &u43, None).await;
        assert_eq!(error_code(s, &b, 400), "bad_request", "{q}");
    }
}

db_variants!(
    paging_returns_each_order_once,
    crate::paging_returns_each_order_once
);

async fn delete_and_cancel_tell_the_offered_driver(db: TestDb) {
    let n = TestNode::start(embedded(&db)).await;
    let a = n.addr;

    // Delete: 204; ORDER_DELETED to admins and the creator; the driver
    // holding the offer is told "Order cancelled"; then it is gone.
    let td = driver(51, 1);
    let mut d = connect_ready(a, "/ws/driver/orders/", &td).await;
    locate(a, &td, PICKUP.0 + 0.002, PICKUP.1).await;
    let mut admin_ws = connect_ready(a, "/ws", &admin()).await;
    let mut creator_ws = connect_ready(a, "/ws", &user(44)).await;
    let gone = id_of(
        &create_order(
            a,
            &user(44),
            json!({"city_id": 1, "latitude_from": PICKUP.0, "longitude_from": PICKUP.1}),
        )
        .await,
    );
    assert_eq!(d.recv_type("new_order").await["order"]["id"], gone);
    let (s, b) = call(a, "DELETE", &format!("/api/orders/{gone}"), &admin(), None).await;
    assert_eq!((s, b), (204, Value::Null));
    assert_eq!(
        admin_ws.recv_type("ORDER_DELETED").await,
        json!({"type": "ORDER_DELETED", "payload": {"id": gone}})
    );
    assert_eq!(
        creator_ws.recv_type("ORDER_DELETED").await,
        json!({"type": "ORDER_DELETED", "payload": {"id": gone}})
    );
    assert_eq!(
        d.recv().await,
        json!({"type": "order_timeout", "order_id": gone, "message": "Order cancelled"})
    );
    d.silent_for(QUIET).await;
    for (method, body) in [
        ("GET", None),
        ("PATCH", Some(json!({"status": "ready"}))),
        ("DELETE", None),
    ] {
        let (s, b) = call(a, method, &format!("/api/orders/{gone}"), &admin(), body).await;
        assert_eq!(error_code(s, &b, 404), "not_found", "{method} after delete");
    }
    let (s, b) = call(
        a,
        "POST",
        &format!("/api/driver/orders/{gone}/accept"),
        &td,
        None,
    )
    .await;
    assert_eq!(error_code(s, &b, 409), "conflict");
    let conn = db_conn(&db).await;
    assert_eq!(only_offer(&conn, gone).await.1, "cancelled");

    // Cancelling an offered order tells the driver the same way.
    let cancelled = id_of(
        &create_order(
            a,
            &user(44),
            json!({"city_id": 1, "latitude_from": PICKUP.0, "longitude_from": PICKUP.1}),
        )
        .await,
    );
    assert_eq!(d.recv_type("new_order").await["order"]["id"], cancelled);
    let (s, b) = patch_status(a, cancelled, "cancelled").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        d.recv().await,
        json!({"type": "order_timeout", "order_id": cancelled, "message": "Order cancelled"})
    );
    assert_eq!(only_offer(&conn, cancelled).await.1, "cancelled");
}

db_variants!(
    delete_and_cancel_tell_the_offered_driver,
    crate::delete_and_cancel_tell_the_offered_driver
);

// ------------------------------------------------------- driver positions

/// Nodes for the location scenario: two sharing Redis, or one embedded.
async fn location_nodes(
    db: &TestDb,
    redis: Option<&RedisServer>,
    stale: Duration,
) -> Vec<TestNode> {
    let count = if redis.is_some() { 2 } else { 1 };
    let mut nodes = Vec::new();
    for i in 0..count {
        let mut c = config(db, redis, &format!("loc{i}"));
        c.offer_timeout = Duration::from_secs(60);
        c.driver_stale = stale;
        let n = TestNode::start(c).await;
        n.wait_ready(true).await;
        nodes.push(n);
    }
    nodes
}

async fn nearby(a: std::net::SocketAddr, token: &str, lat: f64, lon: f64) -> Vec<(i64, f64)> {
    let (s, b) = call(
        a,
        "GET",
        &format!("/api/drivers/nearby?lat={lat}&lon={lon}&radius_km=5"),
        token,
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    b["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["driver_id"].as_i64().unwrap(),
                i["distance_km"].as_f64().unwrap(),
            )
        })
        .collect()
}

async fn offers_of(conn: &sea_orm::DatabaseConnection, order: i64) -> i64 {
    scalar(
        conn,
        &format!("SELECT count(*) FROM offers WHERE order_id = {order}"),
    )
    .await
}

/// `base` keeps the ids of the Redis and embedded runs apart.
async fn driver_positions(db: &TestDb, redis: Option<&RedisServer>, base: i64) {
    let nodes = location_nodes(db, redis, Duration::from_secs(60)).await;
    let (a, b) = (nodes[0].addr, nodes[nodes.len() - 1].addr);
    let conn = db_conn(db).await;
    let id = base + 1;
    let td = driver(id, 1);
    let mut d = connect_ready(a, "/ws/driver/orders/", &td).await;
    let mut admin_ws = connect_ready(b, "/ws", &admin()).await;
    let mut m1 = connect_ready(b, "/ws", &manager(base + 2, &[1])).await;
    let mut m2 = connect_ready(b, "/ws", &manager(base + 3, &[2])).await;

    let (lat, lon) = (PICKUP.0 + 0.01, PICKUP.1);
    d.send_json(
        json!({"type": "location", "latitude": lat, "longitude": lon, "heading": 90, "speed": 10}),
    )
    .await;
    for ws in [&mut admin_ws, &mut m1] {
        let got = ws.recv_type("DRIVER_LOCATION").await;
        let p = &got["payload"];
        assert_eq!(p["driverId"], id, "{got}");
        assert!(
            p["latitude"].is_number() && p["longitude"].is_number(),
            "{got}"
        );
        assert_eq!(
            (p["latitude"].as_f64(), p["longitude"].as_f64()),
            (Some(lat), Some(lon)),
            "{got}"
        );
        assert!(p["heading"].is_number() && p["speed"].is_number(), "{got}");
        assert_eq!(
            (p["heading"].as_f64(), p["speed"].as_f64()),
            (Some(90.0), Some(10.0)),
            "{got}"
        );
        let ts = p["timestamp"].as_str().unwrap_or_else(|| panic!("{got}"));
        chrono::DateTime::parse_from_rfc3339(ts).unwrap_or_else(|e| panic!("{ts}: {e}"));
    }
    m2.silent_for(QUIET).await;

    // Nearby (admins and managers): listed, with its distance.
    for token in [admin(), manager(base + 2, &[1])] {
        let near = nearby(a, &token, PICKUP.0, PICKUP.1).await;
        assert_eq!(near.len(), 1, "{near:?}");
        assert_eq!(near[0].0, id);
        assert!(
            (1.05..1.17).contains(&near[0].1),
            "0.01° of latitude is ~1.11 km: {near:?}"
        );
    }
    for token in [user(5), td.clone()] {
        let (s, body) = call(
            a,
            "GET",
            &format!("/api/drivers/nearby?lat={}&lon={}", PICKUP.0, PICKUP.1),
            &token,
            None,
        )
        .await;
        assert_eq!(error_code(s, &body, 403), "forbidden");
    }
    assert!(
        nearby(a, &admin(), PICKUP.0 + 1.0, PICKUP.1)
            .await
            .is_empty(),
        "5 km radius"
    );

    // Unavailable: not listed, not offered.
    let (s, body) = call(
        a,
        "POST",
        "/api/driver/status",
        &td,
        Some(json!({"available": false})),
    )
    .await;
    assert_eq!((s, body), (204, Value::Null));
    assert!(nearby(b, &admin(), PICKUP.0, PICKUP.1).await.is_empty());
    // A position report does not make it available again.
    d.send_json(json!({"type": "location", "latitude": lat, "longitude": lon}))
        .await;
    admin_ws.recv_type("DRIVER_LOCATION").await;
    assert!(nearby(b, &admin(), PICKUP.0, PICKUP.1).await.is_empty());
    let order = id_of(
        &create_order(b, &admin(), json!({"city_id": 1, "user_id": 9, "latitude_from": PICKUP.0, "longitude_from": PICKUP.1})).await,
    );
    d.silent_for(QUIET).await;
    assert_eq!(offers_of(&conn, order).await, 0);
    // Available again: listed, and the next dispatch offers it the order.
    let (s, _) = call(
        a,
        "POST",
        "/api/driver/status",
        &td,
        Some(json!({"available": true})),
    )
    .await;
    assert_eq!(s, 204);
    // Saying "available" makes it eligible: the order waiting near it
    // (`no_drivers`) is offered to it at once (SPEC §5), no admin needed.
    assert_eq!(d.recv_type("new_order").await["order"]["id"], order);
    assert_eq!(offers_of(&conn, order).await, 1);
}

async fn driver_staleness(db: &TestDb, redis: Option<&RedisServer>, base: i64) {
    let conn = db_conn(db).await;
    // Stale: a driver not heard from for `driver_stale` is neither listed
    // nor offered orders; its next report brings it back.
    let stale = Duration::from_millis(1500);
    let nodes = location_nodes(db, redis, stale).await;
    let (a, b) = (nodes[0].addr, nodes[nodes.len() - 1].addr);
    let spot = (PICKUP.0 + 2.0, PICKUP.1); // away from PICKUP
    let ts = driver(base + 4, 1);
    let mut s_ws = connect_ready(a, "/ws/driver/orders/", &ts).await;
    locate(a, &ts, spot.0 + 0.005, spot.1).await;
    assert_eq!(
        nearby(b, &admin(), spot.0, spot.1).await.len(),
        1,
        "fresh: listed"
    );
    tokio::time::sleep(stale + Duration::from_millis(300)).await;
    assert!(
        nearby(b, &admin(), spot.0, spot.1).await.is_empty(),
        "stale: not listed"
    );
    let order = id_of(
        &create_order(
            b,
            &admin(),
            json!({"city_id": 1, "user_id": 9, "latitude_from": spot.0, "longitude_from": spot.1}),
        )
        .await,
    );
    s_ws.silent_for(QUIET).await;
    assert_eq!(offers_of(&conn, order).await, 0);
    // Its next report makes it fresh again, and so eligible: the order
    // waiting next to it (`no_drivers`) is offered to it at once (SPEC §5).
    s_ws.send_json(json!({"type": "location", "latitude": spot.0 + 0.005, "longitude": spot.1}))
        .await;
    assert_eq!(s_ws.recv_type("new_order").await["order"]["id"], order);
    assert_eq!(offers_of(&conn, order).await, 1);
}

async fn driver_location_and_availability(db: TestDb) {
    let redis = RedisServer::start();
    driver_positions(&db, Some(&redis), 600).await;
    driver_positions(&db, None, 650).await;
}

db_variants!(
    driver_location_and_availability,
    crate::driver_location_and_availability
);

async fn stale_drivers_are_not_listed_or_offered(db: TestDb) {
    let redis = RedisServer::start();
    driver_staleness(&db, Some(&redis), 600).await;
    driver_staleness(&db, None, 650).await;
}

db_variants!(
    stale_drivers_are_not_listed_or_offered,
    crate::stale_drivers_are_not_listed_or_offered
);
