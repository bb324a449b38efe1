//! The event outbox: a committed change always reaches the broker (SPEC §10,
//! "Nothing committed is lost on the way to Redis"). Real nodes, a real
//! `redis-server`, SQLite and PostgreSQL:
//! - Redis down while orders are created, completed and paid with bonuses:
//!   every request succeeds, and once Redis is back the sockets receive
//!   every event, in commit order, exactly once;
//! - the relay of a node process killed between publishing and deleting:
//!   the next node takes the lease over when it runs out and publishes what
//!   was left, in order, with the same event ids.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use sea_orm::{DatabaseConnection, EntityTrait};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const RELAY_LEASE: &str = "event-relay";
/// `BONUS_RATE` 0.05 of this total.
const TOTAL: f64 = 1000.0;
const EARNED: f64 = 50.0;
const USED: f64 = 10.0;

/// Stops every relay from draining, as if another relay held the lease
/// (the test's own holder, far in the future), or lets them go again.
async fn pause_relays(conn: &DatabaseConnection, paused: bool) {
    let until = if paused {
        "2999-01-01T00:00:00+00:00"
    } else {
        "1970-01-01T00:00:00+00:00"
    };
    let n = exec(
        conn,
        &format!(
            "UPDATE leases SET holder = 'test-pause', lease_until = '{until}' \
             WHERE name = '{RELAY_LEASE}'"
        ),
    )
    .await;
    assert_eq!(n, 1, "the relay lease row exists once a relay has drained");
}

async fn exec(conn: &DatabaseConnection, sql: &str) -> u64 {
    use sea_orm::ConnectionTrait;
    conn.execute_unprepared(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .rows_affected()
}

async fn outbox_rows(conn: &DatabaseConnection) -> i64 {
    scalar(conn, "SELECT count(*) FROM event_outbox").await
}

/// `(type, order id)` of the order and bonus messages of the rooms dialect.
fn summary(msgs: &[Value]) -> Vec<(String, i64)> {
    msgs.iter()
        .filter_map(|m| {
            let ty = m["type"].as_str()?.to_string();
            let d = &m["data"];
            let id = d["id"]
                .as_i64()
                .or(d["orderId"].as_i64())
                .or(d["operation"]["orderId"].as_i64())?;
            Some((ty, id))
        })
        .collect()
}

/// Reads `c` until `n` messages of `ty` arrived (panics after `within`),
/// then for `quiet` more, to see any duplicate.
async fn read_until(
    c: &mut Client,
    ty: &str,
    n: usize,
    within: Duration,
    quiet: Duration,
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while of_type(&got, ty).len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_seen(left).await {
            Some(Seen::Json(v)) => got.push(v),
            other => panic!(
                "{} of {n} {ty} messages, then {other:?}: {got:?}",
                of_type(&got, ty).len()
            ),
        }
    }
    got.extend(collect_for(c, quiet).await);
    got
}

// ------------------------------------------------------------ Redis down

async fn orders_created_while_redis_is_down(db: TestDb) {
    let mut redis = RedisServer::start();
    let a = TestNode::start(config(&db, Some(&redis), "a")).await;
    let b = TestNode::start(config(&db, Some(&redis), "b")).await;
    a.wait_ready(true).await;
    b.wait_ready(true).await;
    let conn = db_conn(&db).await;
    let user_id = 40;
    // Watchers on node b, connected before the outage and kept through it.
    let mut admin_b = connect_ready(b.addr, "/", &admin()).await;
    let mut user_b = connect_ready(b.addr, "/", &user(user_id)).await;

    // Normal path: a commit on a wakes its relay; b's socket hears it.
    let started = Instant::now();
    let warm = id_of(&create_order(a.addr, &admin(), json!({"city_id": 1, "user_id": 9})).await);
    let answered = started.elapsed();
    assert_eq!(admin_b.recv_type("new-order").await["data"]["id"], warm);
    eprintln!(
        "normal path: 201 after {answered:?}, new-order on the other node after {:?}",
        started.elapsed()
    );

    redis.kill();
    a.wait_ready(false).await;
    b.wait_ready(false).await;

    // Every change commits and answers success: plain orders, orders with a
    // pickup point (dispatch needs the driver index in Redis: it fails and is
    // logged), a completion that credits bonuses, and a bonus debit.
    let mut created = Vec::new();
    for i in 0..12 {
        let mut body = json!({"city_id": 1, "user_id": user_id, "total": TOTAL});
        if i % 3 == 1 {
            body["latitude_from"] = json!(PICKUP.0);
            body["longitude_from"] = json!(PICKUP.1);
        }
        let (s, b) = call(a.addr, "POST", "/api/orders", &admin(), Some(body)).await;
        assert_eq!(s, 201, "order {i} while Redis is down: {b}");
        created.push(id_of(&b));
    }
    let (s, body) = call(
        a.addr,
        "PATCH",
        &format!("/api/orders/{}", created[0]),
        &admin(),
        Some(json!({"status": "completed"})),
    )
    .await;
    assert_eq!(s, 200, "completion while Redis is down: {body}");
    let (s, body) = call(
        a.addr,
        "POST",
        "/api/orders",
        &user(user_id),
        Some(json!({"city_id": 1, "total": 100, "bonuses_used": USED})),
    )
    .await;
    assert_eq!(s, 201, "bonus debit while Redis is down: {body}");
    let paid = id_of(&body);
    created.push(paid);
    assert_eq!(
        scalar(
            &conn,
            &format!("SELECT count(*) FROM bonus_operations WHERE user_id = {user_id}")
        )
        .await,
        2,
        "one credit, one debit"
    );
    // 13 ORDER_CREATED, one ORDER_UPDATED, two bonus-updated.
    let pending = outbox_rows(&conn).await;
    assert_eq!(pending, 16, "every event waits in the outbox");
    // The relays tried, failed and keep the rows, in order.
    eventually(WAIT, "a relay publish error", || async {
        let m = a.node().render_metrics();
        (metric_value(&m, "switchboard_outbox_relay_errors_total{op=\"publish\"}").unwrap_or(0.0)
            > 0.0)
            .then_some(())
    })
    .await;

    // Pub/sub reaches only sockets subscribed at that moment (replaying what
    // a socket missed is history's job, not the outbox's): hold the relays
    // while Redis comes back and the watchers re-subscribe, so what follows
    // counts what the outbox kept, not a race with the subscriptions. A
    // drain already running fails on the dead Redis within the pause.
    pause_relays(&conn, true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();
    a.wait_ready(true).await;
    b.wait_ready(true).await;
    // A watcher that connects after Redis is back, on the other node.
    let mut admin_a = connect_ready(a.addr, "/", &admin()).await;
    admin_b.silent_for(Duration::from_millis(300)).await;
    assert_eq!(outbox_rows(&conn).await, pending, "nothing published yet");

    let released = Instant::now();
    pause_relays(&conn, false).await;
    let mut want_admin: Vec<(String, i64)> = created[..12]
        .iter()
        .map(|id| ("new-order".to_string(), *id))
        .collect();
    want_admin.push(("order-status-updated".into(), created[0]));
    want_admin.push(("new-order".into(), paid));
    let quiet = Duration::from_secs(1);
    for (name, ws) in [("admin on b", &mut admin_b), ("admin on a", &mut admin_a)] {
        let got = read_until(ws, "new-order", 13, WAIT, quiet).await;
        eprintln!(
            "{name}: {} new-order after the release ({:?})",
            of_type(&got, "new-order").len(),
            released.elapsed()
        );
        assert_eq!(
            summary(&got),
            want_admin,
            "{name}: every event once, in commit order"
        );
    }
    let mut want_user: Vec<(String, i64)> = created[..12]
        .iter()
        .map(|id| ("order-created".to_string(), *id))
        .collect();
    want_user.push(("order-status-updated".into(), created[0]));
    want_user.push(("bonus-updated".into(), created[0]));
    want_user.push(("order-created".into(), paid));
    want_user.push(("bonus-updated".into(), paid));
    let got = read_until(&mut user_b, "order-created", 13, WAIT, quiet).await;
    assert_eq!(summary(&got), want_user, "the user's own room, in order");
    let bonus = of_type(&got, "bonus-updated");
    assert_eq!(bonus[0]["data"]["operation"]["type"], "earned");
    assert_eq!(bonus[0]["data"]["balance"], json!(EARNED as i64));
    assert_eq!(bonus[1]["data"]["operation"]["type"], "used");
    assert_eq!(bonus[1]["data"]["balance"], json!((EARNED - USED) as i64));
    eventually(WAIT, "an empty outbox", || async {
        (outbox_rows(&conn).await == 0).then_some(())
    })
    .await;

    // Back to normal: milliseconds from commit to the other node's socket.
    let started = Instant::now();
    let after = id_of(&create_order(a.addr, &admin(), json!({"city_id": 1, "user_id": 9})).await);
    assert_eq!(admin_b.recv_type("new-order").await["data"]["id"], after);
    let took = started.elapsed();
    eprintln!("after the outage: new-order on the other node {took:?} after the POST");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

db_variants!(
    orders_created_while_redis_is_down_reach_every_socket_once_in_order,
    crate::orders_created_while_redis_is_down
);

// ------------------------------------------------------------ relay killed

const ORDERS: usize = 10;

/// Every message on one room's Redis channel, as the broker carries it
/// (`"<offset>:<epoch> <event JSON>"` for a historical event: the offset
/// goes into the value as `_offset`).
async fn watch_channel(redis: &RedisServer, room: &str) -> mpsc::UnboundedReceiver<Value> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(format!("sb:room:{room}")).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = pubsub.into_on_message();
        while let Some(msg) = stream.next().await {
            let raw = msg.get_payload_bytes();
            let (offset, json) = match raw.iter().position(|b| *b == b' ') {
                Some(sp) if raw[0].is_ascii_digit() => (
                    std::str::from_utf8(&raw[..sp])
                        .unwrap()
                        .split(':')
                        .next()
                        .and_then(|o| o.parse::<u64>().ok()),
                    &raw[sp + 1..],
                ),
                _ => (None, raw),
            };
            let mut v: Value = serde_json::from_slice(json).unwrap();
            v["_offset"] = offset.into();
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    rx
}

/// `(order id, event id)` of an ORDER_CREATED as the broker carries it.
fn created(v: &Value) -> (i64, String) {
    assert_eq!(v["kind"]["k"], "order_created", "{v}");
    (
        v["kind"]["order"]["id"].as_i64().unwrap(),
        v["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id: {v}"))
            .to_string(),
    )
}

async fn relay_killed_between_publish_and_delete(db: TestDb) {
    let redis = RedisServer::start();
    let mut seen = watch_channel(&redis, "admin-orders").await;
    let mut doomed = start_server(
        &db,
        &redis,
        "doomed",
        &[("SWITCHBOARD_FAULT", "hang-after-publish")],
    )
    .await;
    let conn = db_conn(&db).await;

    // The first order's event is published, and the relay stops before
    // deleting its row.
    let first =
        id_of(&create_order(doomed.addr, &admin(), json!({"city_id": 1, "user_id": 9})).await);
    let msg = tokio::time::timeout(WAIT, seen.recv())
        .await
        .expect("the first event in time")
        .unwrap();
    let (id, first_key) = created(&msg);
    assert_eq!(id, first);
    assert!(first_key.starts_with("outbox-"), "{first_key}");
    eventually(WAIT, "the relay's fault", || async {
        doomed
            .log_text()
            .contains("fault injection: hanging after publish")
            .then_some(())
    })
    .await;

    // Later orders commit (201) and wait in the outbox: nothing publishes
    // them while the node lives.
    let mut orders = vec![first];
    for _ in 1..ORDERS {
        orders.push(id_of(
            &create_order(doomed.addr, &admin(), json!({"city_id": 1, "user_id": 9})).await,
        ));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        seen.try_recv().is_err(),
        "only the first order was published"
    );
    assert_eq!(
        outbox_rows(&conn).await,
        ORDERS as i64,
        "the first row was not deleted"
    );
    let holder = text(
        &conn,
        &format!("SELECT holder FROM leases WHERE name = '{RELAY_LEASE}'"),
    )
    .await;
    assert!(
        holder.as_deref().is_some_and(|h| h.starts_with("doomed/")),
        "{holder:?}"
    );

    let lease_until = entity::lease::Entity::find_by_id(RELAY_LEASE.to_string())
        .one(&conn)
        .await
        .unwrap()
        .expect("the lease row")
        .lease_until;

    doomed.kill();
    let killed = Instant::now();
    let heir = TestNode::start(config(&db, Some(&redis), "heir")).await;

    // The heir publishes everything the dead relay left, from its first
    // unfinished row on.
    let mut all = vec![(first, first_key.clone())];
    let mut taken_over = None;
    let deadline = Instant::now() + WAIT + Duration::from_secs(5);
    while distinct(&all) < ORDERS {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, seen.recv())
            .await
            .unwrap_or_else(|_| panic!("only {all:?} after the kill"))
            .unwrap();
        taken_over.get_or_insert_with(|| (chrono::Utc::now(), killed.elapsed()));
        all.push(created(&msg));
    }
    // Anything more (a duplicate) would come within this.
    tokio::time::sleep(Duration::from_secs(1)).await;
    while let Ok(msg) = seen.try_recv() {
        all.push(created(&msg));
    }
    let (taken_at, after_kill) = taken_over.unwrap();
    eprintln!(
        "{} events on admin-orders for {ORDERS} orders; the heir's first {after_kill:?} after \
         the kill, {} ms after the dead relay's lease ran out",
        all.len(),
        (taken_at - lease_until).num_milliseconds()
    );
    assert!(
        taken_at >= lease_until,
        "taken over before the dead relay's lease ran out ({lease_until})"
    );

    // In order: every order once in creation order, counting first
    // occurrences; the heir's own publishes in creation order too.
    let mut firsts: Vec<i64> = Vec::new();
    for (order, _) in &all {
        if !firsts.contains(order) {
            firsts.push(*order);
        }
    }
    assert_eq!(firsts, orders, "creation order: {all:?}");
    let heirs: Vec<i64> = all[1..].iter().map(|g| g.0).collect();
    assert!(
        heirs.is_sorted(),
        "the heir's publishes out of order: {all:?}"
    );
    // One id per row; a repeat is only the row published but not deleted,
    // with the same id (the broker keeps it in history once).
    assert_eq!(distinct_keys(&all), ORDERS, "{all:?}");
    let repeats: Vec<_> = all[1..].iter().filter(|g| g.1 == first_key).collect();
    assert_eq!(
        all.len() - ORDERS,
        repeats.len(),
        "only the published-but-not-deleted row may repeat: {all:?}"
    );
    // The broker appended that row once already: its republish enters
    // neither the history nor the channel again.
    assert_eq!(repeats.len(), 0, "{all:?}");

    eventually(WAIT, "an empty outbox", || async {
        (outbox_rows(&conn).await == 0).then_some(())
    })
    .await;
    drop(heir);
}

fn distinct(all: &[(i64, String)]) -> usize {
    all.iter()
        .map(|g| g.0)
        .collect::<std::collections::HashSet<_>>()
        .len()
}

fn distinct_keys(all: &[(i64, String)]) -> usize {
    all.iter()
        .map(|g| g.1.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

db_variants!(
    relay_killed_between_publish_and_delete_loses_nothing,
    crate::relay_killed_between_publish_and_delete
);
