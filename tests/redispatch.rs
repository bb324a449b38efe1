//! No stranded order, presence and the scope of positions (SPEC §5,
//! issue 13), on real nodes, SQLite and PostgreSQL, embedded and on Redis.
//!
//! The rule of `ORDER_UPDATED` (never an empty `changed`, a `version`
//! larger than the one before it for that order) is checked on every socket
//! of these tests by the harness.

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::*;

/// A node whose retry pass runs often, with long offers (nothing expires
/// by itself during a test).
fn quick(db: &TestDb, redis: Option<&RedisServer>, id: &str) -> switchboard::Config {
    let mut c = config(db, redis, id);
    c.dispatch_retry = Duration::from_millis(300);
    c.offer_timeout = Duration::from_secs(60);
    c
}

/// The `ORDER_UPDATED`s an admin socket saw. The rule they obey (non-empty
/// `changed`, rising `version`) is checked on every test socket by the
/// harness (`tests/common/ws.rs`).
#[derive(Default)]
struct Updates {
    seen: Vec<Value>,
}

impl Updates {
    /// Reads the admin socket until order `id`'s `dispatch_status` is `want`.
    async fn until(&mut self, admin: &mut Client, id: i64, want: &str) -> Value {
        loop {
            let m = admin.recv_type("ORDER_UPDATED").await;
            self.seen.push(m.clone());
            if m["payload"]["id"] == id && m["payload"]["dispatch_status"] == want {
                return m;
            }
        }
    }

    /// Whatever else arrived.
    async fn finish(&mut self, admin: &mut Client) {
        let rest = collect_for(admin, Duration::from_millis(300)).await;
        self.seen
            .extend(rest.into_iter().filter(|m| m["type"] == "ORDER_UPDATED"));
    }
}

fn order_at(lat: f64, lon: f64) -> Value {
    json!({"city_id": 1, "user_id": 9, "latitude_from": lat, "longitude_from": lon})
}

async fn decline(addr: std::net::SocketAddr, token: &str, order: i64) {
    let (s, b) = call(
        addr,
        "POST",
        &format!("/api/driver/orders/{order}/decline"),
        token,
        None,
    )
    .await;
    assert_eq!(s, 204, "{b}");
}

/// The only driver declines: `no_drivers`. A new driver connects 2 km away
/// on the other node and reports its position by socket: it gets the order
/// within 2 s, with no admin and no timer involved (retry pass slowed down).
async fn new_driver_near_a_waiting_order_gets_it(db: TestDb) {
    let redis = RedisServer::start();
    let mut ca = quick(&db, Some(&redis), "a");
    let mut cb = quick(&db, Some(&redis), "b");
    ca.dispatch_retry = Duration::from_secs(600);
    cb.dispatch_retry = Duration::from_secs(600);
    let a = TestNode::start(ca).await;
    let b = TestNode::start(cb).await;
    a.wait_ready(true).await;
    b.wait_ready(true).await;
    let mut admin_ws = connect_ready(a.addr, "/ws", &admin()).await;
    let mut updates = Updates::default();
    let t1 = driver(501, 1);
    let mut d1 = connect_ready(a.addr, "/ws/driver/orders/", &t1).await;
    locate(a.addr, &t1, PICKUP.0 + 0.003, PICKUP.1).await;

    let order = create_order(a.addr, &admin(), order_at(PICKUP.0, PICKUP.1)).await;
    let id = id_of(&order);
    assert_eq!(order["dispatch_status"], "searching", "{order}");
    assert_eq!(d1.recv_type("new_order").await["order"]["id"], id);
    let offered = updates.until(&mut admin_ws, id, "offered").await;
    assert_eq!(offered["payload"]["changed"], json!(["dispatch_status"]));
    decline(a.addr, &t1, id).await;
    let none = updates.until(&mut admin_ws, id, "no_drivers").await;
    assert_eq!(none["payload"]["changed"], json!(["dispatch_status"]));
    let (s, got) = call(a.addr, "GET", &format!("/api/orders/{id}"), &admin(), None).await;
    assert_eq!((s, &got["dispatch_status"]), (200, &json!("no_drivers")));

    // Driver 2, 2 km north, on node b, reports by socket.
    let t2 = driver(502, 1);
    let mut d2 = connect_ready(b.addr, "/ws/driver/orders/", &t2).await;
    let asked = Instant::now();
    d2.send_json(json!({"type": "location", "latitude": PICKUP.0 + 0.018, "longitude": PICKUP.1}))
        .await;
    let got = d2.recv_type("new_order").await;
    let took = asked.elapsed();
    assert_eq!(got["order"]["id"], id);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let km = got["order"]["distance_to_pickup_km"].as_f64().unwrap();
    assert!((1.8..2.2).contains(&km), "{km}");
    updates.until(&mut admin_ws, id, "offered").await;
    // Driver 1 declined: in its cooldown, it heard nothing more.
    d1.silent_for(Duration::from_millis(200)).await;
    updates.finish(&mut admin_ws).await;
}

db_variants!(
    new_driver_near_a_waiting_order_gets_it,
    crate::new_driver_near_a_waiting_order_gets_it
);

/// Every driver in cooldown: the order waits, and the retry pass offers it
/// again once the cooldown is over (embedded node).
async fn offered_again_after_the_cooldown(db: TestDb) {
    let mut c = quick(&db, None, "solo");
    c.dispatch_cooldown = Duration::from_millis(1500);
    let n = TestNode::start(c).await;
    let mut admin_ws = connect_ready(n.addr, "/ws", &admin()).await;
    let mut updates = Updates::default();
    let t = driver(511, 1);
    let mut d = connect_ready(n.addr, "/ws/driver/orders/", &t).await;
    locate(n.addr, &t, PICKUP.0 + 0.003, PICKUP.1).await;
    let id = id_of(&create_order(n.addr, &admin(), order_at(PICKUP.0, PICKUP.1)).await);
    assert_eq!(d.recv_type("new_order").await["order"]["id"], id);
    decline(n.addr, &t, id).await;
    let declined = Instant::now();
    updates.until(&mut admin_ws, id, "no_drivers").await;
    // Cooling down: several retry passes and a fresh position change nothing.
    locate(n.addr, &t, PICKUP.0 + 0.002, PICKUP.1).await;
    d.silent_for(Duration::from_millis(1000)).await;
    let again = d.recv_type("new_order").await;
    assert_eq!(again["order"]["id"], id);
    let after = declined.elapsed();
    assert!(
        after >= Duration::from_millis(1400),
        "offered again after {after:?}"
    );
    assert!(
        after < Duration::from_secs(4),
        "offered again only after {after:?}"
    );
    updates.until(&mut admin_ws, id, "offered").await;
    updates.finish(&mut admin_ws).await;
}

db_variants!(
    offered_again_after_the_cooldown,
    crate::offered_again_after_the_cooldown
);

/// Nobody near for `DISPATCH_GIVE_UP_SECS`: `gave_up`, once; a driver
/// coming online then gets nothing; an admin's dispatch revives it.
async fn gives_up_after_the_give_up_time(db: TestDb) {
    let mut c = quick(&db, None, "solo");
    c.dispatch_give_up = Duration::from_millis(1500);
    let n = TestNode::start(c).await;
    let mut admin_ws = connect_ready(n.addr, "/ws", &admin()).await;
    let mut updates = Updates::default();
    let created = Instant::now();
    let id = id_of(&create_order(n.addr, &admin(), order_at(PICKUP.0, PICKUP.1)).await);
    updates.until(&mut admin_ws, id, "no_drivers").await;
    updates.until(&mut admin_ws, id, "gave_up").await;
    let after = created.elapsed();
    assert!(
        after >= Duration::from_millis(1500),
        "gave up after {after:?}"
    );
    let t = driver(521, 1);
    let mut d = connect_ready(n.addr, "/ws/driver/orders/", &t).await;
    locate(n.addr, &t, PICKUP.0 + 0.003, PICKUP.1).await;
    d.silent_for(Duration::from_millis(800)).await;
    let (s, b) = call(
        n.addr,
        "POST",
        &format!("/api/orders/{id}/dispatch"),
        &admin(),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["offer"]["driver_id"], 521, "{b}");
    assert_eq!(d.recv_type("new_order").await["order"]["id"], id);
    updates.until(&mut admin_ws, id, "offered").await;
    updates.finish(&mut admin_ws).await;
    let gave_up = updates
        .seen
        .iter()
        .filter(|m| m["payload"]["dispatch_status"] == "gave_up")
        .count();
    assert_eq!(gave_up, 1, "{:?}", updates.seen);
}

db_variants!(
    gives_up_after_the_give_up_time,
    crate::gives_up_after_the_give_up_time
);

/// How many drivers an admin sees next to the pickup point.
async fn nearby_count(addr: std::net::SocketAddr) -> usize {
    let path = format!("/api/drivers/nearby?lat={}&lon={}", PICKUP.0, PICKUP.1);
    let (_, b) = call(addr, "GET", &path, &admin(), None).await;
    b["items"].as_array().map(Vec::len).unwrap_or(0)
}

/// A driver whose socket closed is offline at once: no offer, though its
/// last position is fresh. Embedded and on Redis.
async fn closed_socket_gets_no_offer(db: &TestDb, redis: Option<&RedisServer>, base: i64) {
    let n = TestNode::start(quick(db, redis, "solo")).await;
    n.wait_ready(true).await;
    let t = driver(base, 1);
    let d = connect_ready(n.addr, "/ws/driver/orders/", &t).await;
    d.send_json(json!({"type": "location", "latitude": PICKUP.0 + 0.003, "longitude": PICKUP.1}))
        .await;
    eventually(WAIT, "the driver listed", || async {
        (nearby_count(n.addr).await == 1).then_some(())
    })
    .await;
    drop(d);
    eventually(WAIT, "the driver gone", || async {
        (nearby_count(n.addr).await == 0).then_some(())
    })
    .await;
    let order = create_order(n.addr, &admin(), order_at(PICKUP.0, PICKUP.1)).await;
    let id = id_of(&order);
    let conn = db_conn(db).await;
    let (s, got) = call(n.addr, "GET", &format!("/api/orders/{id}"), &admin(), None).await;
    assert_eq!((s, &got["dispatch_status"]), (200, &json!("no_drivers")));
    assert_eq!(
        scalar(
            &conn,
            &format!("SELECT count(*) FROM offers WHERE order_id = {id}")
        )
        .await,
        0
    );
}

async fn closed_socket_gets_no_offer_both(db: TestDb) {
    closed_socket_gets_no_offer(&db, None, 531).await;
    let redis = RedisServer::start();
    closed_socket_gets_no_offer(&db, Some(&redis), 532).await;
}

db_variants!(
    closed_socket_gets_no_offer,
    crate::closed_socket_gets_no_offer_both
);

/// A driver that uses only the HTTP API (position + poll) is online and gets
/// offers; the poll shows them.
async fn http_only_driver_gets_offers(db: TestDb) {
    let redis = RedisServer::start();
    let n = TestNode::start(quick(&db, Some(&redis), "solo")).await;
    n.wait_ready(true).await;
    let t = driver(541, 1);
    locate(n.addr, &t, PICKUP.0 + 0.003, PICKUP.1).await;
    let id = id_of(&create_order(n.addr, &admin(), order_at(PICKUP.0, PICKUP.1)).await);
    let (s, polled) = call(n.addr, "GET", "/api/driver/orders", &t, None).await;
    assert_eq!(s, 200, "{polled}");
    assert_eq!(polled["items"][0]["id"], id, "{polled}");
    assert_eq!(polled["items"][0]["dispatch_status"], "offered");
}

db_variants!(
    http_only_driver_gets_offers,
    crate::http_only_driver_gets_offers
);

/// A driver on a node that is SIGKILLed goes offline within 15 s: it is no
/// longer listed, and an order next to it gets no offer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_of_a_killed_node_goes_offline_within_15_s() {
    init_tracing();
    let db = TestDb::sqlite();
    let redis = RedisServer::start();
    let mut doomed = start_server(&db, &redis, "doomed", &[]).await;
    let n = TestNode::start(quick(&db, Some(&redis), "survivor")).await;
    n.wait_ready(true).await;
    let t = driver(551, 1);
    let d = connect_ready(doomed.addr, "/ws/driver/orders/", &t).await;
    d.send_json(json!({"type": "location", "latitude": PICKUP.0 + 0.003, "longitude": PICKUP.1}))
        .await;
    eventually(WAIT, "the driver listed", || async {
        (nearby_count(n.addr).await == 1).then_some(())
    })
    .await;
    doomed.kill();
    let killed = Instant::now();
    eventually(Duration::from_secs(16), "the driver offline", || async {
        (nearby_count(n.addr).await == 0).then_some(())
    })
    .await;
    let took = killed.elapsed();
    assert!(took <= Duration::from_secs(15), "offline after {took:?}");
    let id = id_of(&create_order(n.addr, &admin(), order_at(PICKUP.0, PICKUP.1)).await);
    let conn = db_conn(&db).await;
    assert_eq!(
        scalar(
            &conn,
            &format!("SELECT count(*) FROM offers WHERE order_id = {id}")
        )
        .await,
        0
    );
    drop(d);
}

/// A manager sees only its cities' drivers nearby; a driver reads only the
/// orders it holds an open offer for or is assigned to.
async fn positions_and_orders_are_scoped(db: TestDb) {
    let n = TestNode::start(quick(&db, None, "solo")).await;
    let (t1, t2) = (driver(561, 1), driver(562, 2));
    locate(n.addr, &t1, PICKUP.0 + 0.003, PICKUP.1).await;
    locate(n.addr, &t2, PICKUP.0 + 0.004, PICKUP.1).await;
    let ids = |b: &Value| -> Vec<i64> {
        b["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["driver_id"].as_i64().unwrap())
            .collect()
    };
    let url = format!("/api/drivers/nearby?lat={}&lon={}", PICKUP.0, PICKUP.1);
    let (s, b) = call(n.addr, "GET", &url, &admin(), None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(ids(&b), vec![561, 562]);
    let (_, b) = call(n.addr, "GET", &url, &manager(71, &[1]), None).await;
    assert_eq!(ids(&b), vec![561]);
    let (_, b) = call(n.addr, "GET", &url, &manager(72, &[2, 3]), None).await;
    assert_eq!(ids(&b), vec![562]);

    // Driver 561 (nearest) gets the offer and may read the order...
    let id = id_of(&create_order(n.addr, &admin(), order_at(PICKUP.0, PICKUP.1)).await);
    let path = format!("/api/orders/{id}");
    let (s, _) = call(n.addr, "GET", &path, &t1, None).await;
    assert_eq!(s, 200);
    let (s, _) = call(n.addr, "GET", &path, &t2, None).await;
    assert_eq!(s, 404, "never offered");
    // ...until it declines (the offer passes to 562, who may read it now).
    decline(n.addr, &t1, id).await;
    let (s, _) = call(n.addr, "GET", &path, &t1, None).await;
    assert_eq!(s, 404, "a declined offer is not a read grant");
    let (_, list) = call(n.addr, "GET", "/api/orders", &t1, None).await;
    assert_eq!(list["items"], json!([]), "{list}");
    let (s, _) = call(n.addr, "GET", &path, &t2, None).await;
    assert_eq!(s, 200);
    // Assigned: readable for good.
    let (s, b) = call(
        n.addr,
        "POST",
        &format!("/api/driver/orders/{id}/accept"),
        &t2,
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["dispatch_status"], "assigned");
    let (s, _) = call(n.addr, "GET", &path, &t2, None).await;
    assert_eq!(s, 200);
}

db_variants!(
    positions_and_orders_are_scoped,
    crate::positions_and_orders_are_scoped
);

/// Orders that exist before the `dispatch_status` migration get the status
/// their row and open offers imply.
async fn migration_derives_the_dispatch_status(db: TestDb) {
    use migration::{Migrator, MigratorTrait};
    use sea_orm::ConnectionTrait;
    let conn = db_conn(&db).await;
    Migrator::up(&conn, Some(5)).await.unwrap();
    let now = "'2026-01-01T00:00:00Z'";
    let order = |id: i64, status: &str, driver: &str, pickup: &str| {
        format!(
            "INSERT INTO orders (id, order_number, order_type, status, user_id, city_id, driver_id, \
             address_from, address_to, latitude_from, longitude_from, total_cents, \
             bonuses_used_cents, bonuses_earned_cents, created_at, updated_at, version) \
             VALUES ({id}, '{id}', 'delivery', '{status}', 5, 1, {driver}, '', '', {pickup}, \
             0, 0, 0, {now}, {now}, 1)"
        )
    };
    let p = "'41.3', '69.2'";
    for sql in [
        order(1, "pending", "NULL", p),
        order(2, "pending", "NULL", p),
        order(3, "accepted", "7", p),
        order(4, "pending", "NULL", "NULL, NULL"),
        order(5, "completed", "8", p),
        order(6, "cancelled", "NULL", p),
        format!(
            "INSERT INTO offers (order_id, driver_id, status, distance_km, created_at, expires_at) \
             VALUES (2, 9, 'open', 1.0, {now}, {now})"
        ),
    ] {
        conn.execute_unprepared(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    Migrator::up(&conn, None).await.unwrap();
    for (id, want) in [
        (1, "searching"),
        (2, "offered"),
        (3, "assigned"),
        (4, "none"),
        (5, "none"),
        (6, "none"),
    ] {
        let got = text(
            &conn,
            &format!("SELECT dispatch_status FROM orders WHERE id = {id}"),
        )
        .await;
        assert_eq!(got.as_deref(), Some(want), "order {id}");
    }
}

db_variants!(
    dispatch_status_migration,
    crate::migration_derives_the_dispatch_status
);
