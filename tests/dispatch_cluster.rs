//! Offer expiry across a cluster: many deadlines due at once on three nodes,
//! and a node killed right after claiming a deadline. Real redis-server, real
//! sockets, the real binary for the node that dies; SQLite and PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use sea_orm::EntityTrait;
use serde_json::{Value, json};
use switchboard::event::haversine_km;

const DRIVERS: usize = 200;

/// Driver `i` of the 200: ids 1000.., each alone on a 0.5° grid (≥ 50 km
/// from any other, five times the dispatch radius).
fn grid(i: usize) -> (f64, f64) {
    (10.0 + (i / 20) as f64 * 0.5, 10.0 + (i % 20) as f64 * 0.5)
}

fn driver_id(i: usize) -> i64 {
    1000 + i as i64
}

/// Three nodes, 200 lone drivers spread over them, 200 orders created at
/// once: every offer is due within about a second, and each must expire
/// exactly once — one `new_order` and one `order_timeout` per driver, 200
/// `expired` rows — whichever node claims it.
/// The 200-driver test runs one variant at a time: each holds ~800 sockets
/// at its peak, and two at once would also blur the deadlines on 2 cores.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn three_nodes_expire_each_offer_once(db: TestDb) {
    let _one_at_a_time = HEAVY.lock().await;
    let redis = RedisServer::start();
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        let mut c = config(&db, Some(&redis), id);
        c.offer_timeout = Duration::from_secs(2);
        c.offer_lease = Duration::from_secs(1);
        let n = TestNode::start(c).await;
        n.wait_ready(true).await;
        nodes.push(n);
    }
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    assert!(
        haversine_km(grid(0).0, grid(0).1, grid(1).0, grid(1).1) > 5.0 * 10.0,
        "drivers must be out of each other's radius"
    );

    // Each driver on one node (round-robin).
    let mut clients: Vec<Client> = join_all((0..DRIVERS).map(|i| {
        let addr = addrs[i % 3];
        async move { connect_ready(addr, "/ws/driver/orders/", &driver(driver_id(i), 1)).await }
    }))
    .await;
    // One order at each grid point, while no driver is on the map yet.
    let orders: Vec<i64> = join_all((0..DRIVERS).map(|i| {
        let addr = addrs[(i + 1) % 3];
        async move {
            let (lat, lon) = grid(i);
            let o = create_order(
                addr,
                &admin(),
                json!({"city_id": 1, "user_id": 5000 + i, "latitude_from": lat, "longitude_from": lon, "total": 10}),
            )
            .await;
            id_of(&o)
        }
    }))
    .await;
    // Each driver reports its grid point, all at once: the order waiting
    // there (`no_drivers` since its creation) is offered to it at once
    // (SPEC §5 "No stranded order"), so the deadlines land close together.
    let started = Instant::now();
    join_all((0..DRIVERS).map(|i| {
        let addr = addrs[i % 3];
        async move {
            let (lat, lon) = grid(i);
            locate(addr, &driver(driver_id(i), 1), lat, lon).await
        }
    }))
    .await;
    let conn = db_conn(&db).await;
    let wait = Instant::now() + Duration::from_secs(20);
    while scalar(&conn, "SELECT count(*) FROM offers").await < DRIVERS as i64 {
        assert!(Instant::now() < wait, "not every waiting order was offered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("dispatched {DRIVERS} orders in {:?}", started.elapsed());

    let offers = entity::offer::Entity::find().all(&conn).await.unwrap();
    let first = offers.iter().map(|o| o.expires_at).min().unwrap();
    let last = offers.iter().map(|o| o.expires_at).max().unwrap();
    eprintln!(
        "deadlines spread over {} ms",
        (last - first).num_milliseconds()
    );
    // Every offer was made to its own driver.
    assert_eq!(
        scalar(&conn, "SELECT count(*) FROM offers").await,
        DRIVERS as i64
    );
    let count_expired = || async {
        scalar(
            &conn,
            "SELECT count(*) FROM offers WHERE status = 'expired'",
        )
        .await
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while count_expired().await < DRIVERS as i64 {
        assert!(
            Instant::now() < deadline,
            "only {} of {DRIVERS} offers expired",
            count_expired().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give any duplicate a chance to show: past every lease, and past a
    // reclaim of a lease that ran out.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    assert_eq!(count_expired().await, DRIVERS as i64);
    assert_eq!(
        scalar(&conn, "SELECT count(*) FROM offers").await,
        DRIVERS as i64,
        "nobody else is in radius: no second offer"
    );
    assert_eq!(
        scalar(
            &conn,
            "SELECT count(*) FROM orders WHERE status = 'pending' AND driver_id IS NULL"
        )
        .await,
        DRIVERS as i64
    );
    for (i, c) in clients.iter_mut().enumerate() {
        let got = queued(c).await;
        let want = orders[i];
        let types: Vec<&str> = got.iter().filter_map(|m| m["type"].as_str()).collect();
        assert_eq!(
            types,
            ["new_order", "order_timeout"],
            "driver {} (order {want}) got {got:?}",
            driver_id(i)
        );
        assert_eq!(got[0]["order"]["id"], want, "{got:?}");
        assert_eq!(
            got[1],
            json!({"type": "order_timeout", "order_id": want,
                   "message": "Order expired or reassigned to another driver"})
        );
    }
    // The clock's Redis state is clean: nothing due, nothing leased.
    let mut r = redis.conn().await;
    let due: i64 = redis::cmd("ZCARD")
        .arg("sb:offers:due")
        .query_async(&mut r)
        .await
        .unwrap();
    let leased: i64 = redis::cmd("ZCARD")
        .arg("sb:offers:lease")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!((due, leased), (0, 0), "due and lease sets drained");
}

db_variants!(
    three_nodes_and_200_simultaneous_deadlines_expire_once_each,
    crate::three_nodes_expire_each_offer_once
);

// ------------------------------------------------------------ dead claimer

const NEAR: i64 = 701;
const FAR: i64 = 702;
const LEASE_MS: i64 = 2000;

struct Claimed {
    order_id: i64,
    offer_id: i64,
    /// When the dead node's lease on the deadline runs out (unix ms).
    lease_until: i64,
}

/// Starts the real binary with the hang-after-claim fault, has it offer an
/// order to driver NEAR (FAR is the next nearest), waits until its clock has
/// claimed the deadline, and SIGKILLs it there.
async fn claim_and_die(db: &TestDb, redis: &RedisServer) -> Claimed {
    let mut doomed = start_server(
        db,
        redis,
        "doomed",
        &[
            ("OFFER_TIMEOUT_SECS", "1"),
            ("OFFER_LEASE_SECS", "2"),
            ("SWITCHBOARD_FAULT", "hang-after-claim"),
        ],
    )
    .await;
    locate(doomed.addr, &driver(NEAR, 1), PICKUP.0 + 0.004, PICKUP.1).await;
    locate(doomed.addr, &driver(FAR, 1), PICKUP.0 + 0.02, PICKUP.1).await;
    let order = create_order(
        doomed.addr,
        &admin(),
        json!({"city_id": 1, "user_id": 9, "latitude_from": PICKUP.0, "longitude_from": PICKUP.1}),
    )
    .await;
    let order_id = id_of(&order);
    let conn = db_conn(db).await;
    let (offer_id, status) = only_offer(&conn, order_id).await;
    assert_eq!(status, "open");
    let driver_of_offer = scalar(
        &conn,
        &format!("SELECT driver_id FROM offers WHERE id = {offer_id}"),
    )
    .await;
    assert_eq!(driver_of_offer, NEAR, "the nearest driver gets the offer");

    // The deadline (1 s) passes; the node claims it into the lease set and hangs.
    let r = redis.conn().await;
    let lease_until = eventually(Duration::from_secs(5), "the claim", || {
        let mut r = r.clone();
        async move {
            let s: Option<f64> = redis::cmd("ZSCORE")
                .arg("sb:offers:lease")
                .arg(offer_id)
                .query_async(&mut r)
                .await
                .unwrap();
            s.map(|s| s as i64)
        }
    })
    .await;
    // Hung, not merely slow: nothing ends the offer while the process lives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        doomed
            .log_text()
            .contains("fault injection: hanging after claim"),
        "{}",
        doomed.log_text()
    );
    doomed.kill();

    assert_eq!(only_offer(&conn, order_id).await.1, "open");
    let mut r = r.clone();
    let still_due: Option<f64> = redis::cmd("ZSCORE")
        .arg("sb:offers:due")
        .arg(offer_id)
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(still_due, None, "claimed: moved out of the due set");
    assert!(
        lease_until - chrono::Utc::now().timestamp_millis() > LEASE_MS / 2,
        "the lease must still be running when the next node starts"
    );
    Claimed {
        order_id,
        offer_id,
        lease_until,
    }
}

fn heir_config(db: &TestDb, redis: &RedisServer) -> switchboard::Config {
    let mut c = config(db, Some(redis), "heir");
    // Offers the heir makes (to FAR) outlive the test.
    c.offer_timeout = Duration::from_secs(30);
    c.offer_lease = Duration::from_millis(LEASE_MS as u64);
    c
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Nobody touches the offer after the kill: the next node's clock takes the
/// claim over when the lease runs out (not before: the lease is the dead
/// node's), expires it once, and passes the order to the next driver.
async fn killed_claimer_is_taken_over_after_the_lease(db: TestDb) {
    let redis = RedisServer::start();
    let claimed = claim_and_die(&db, &redis).await;
    let heir = TestNode::start(heir_config(&db, &redis)).await;
    heir.wait_ready(true).await;
    // FAR has no offer yet: connecting it changes nothing.
    let mut far = connect_ready(heir.addr, "/ws/driver/orders/", &driver(FAR, 1)).await;
    let conn = db_conn(&db).await;

    // Still the dead node's until its lease runs out (checked when there is
    // time left to check it; the arrival time below is the real proof).
    let before = claimed.lease_until - 300 - now_ms();
    if before > 0 {
        tokio::time::sleep(Duration::from_millis(before as u64)).await;
        assert_eq!(
            only_offer(&conn, claimed.order_id).await.1,
            "open",
            "expired before the dead node's lease ran out"
        );
    }

    let offer = far.recv_type("new_order").await;
    let at = now_ms();
    assert_eq!(offer["order"]["id"], claimed.order_id);
    assert!(
        at >= claimed.lease_until - 20,
        "taken over {} ms before the lease ran out",
        claimed.lease_until - at
    );
    assert!(
        at - claimed.lease_until < 3000,
        "taken over {} ms after the lease ran out",
        at - claimed.lease_until
    );
    let status = text(
        &conn,
        &format!("SELECT status FROM offers WHERE id = {}", claimed.offer_id),
    )
    .await;
    assert_eq!(status.as_deref(), Some("expired"));
    let open_far = scalar(
        &conn,
        &format!(
            "SELECT count(*) FROM offers WHERE order_id = {} AND driver_id = {FAR} AND status = 'open'",
            claimed.order_id
        ),
    )
    .await;
    assert_eq!(open_far, 1);

    // NEAR, back online, is not shown the offer it lost, nor told twice.
    let mut near = Client::connect(
        heir.addr,
        &format!("/ws/driver/orders/?token={}", driver(NEAR, 1)),
    )
    .await;
    assert_eq!(near.recv().await["type"], "connection_established");
    let init = near.recv().await;
    assert_eq!(init["type"], "initial_orders");
    assert_eq!(init["orders"], json!([]));
    near.silent_for(Duration::from_millis(500)).await;
    far.silent_for(Duration::from_millis(300)).await;
}

/// The driver is connected to the next node while the dead node's lease
/// still runs: it is told exactly once (here by the connect's own check of
/// overdue offers), and the clock's takeover when the lease runs out finds
/// the offer already ended and sends nothing more.
async fn killed_claimer_expires_exactly_once(db: TestDb) {
    let redis = RedisServer::start();
    let claimed = claim_and_die(&db, &redis).await;
    let heir = TestNode::start(heir_config(&db, &redis)).await;
    heir.wait_ready(true).await;
    let mut far = connect_ready(heir.addr, "/ws/driver/orders/", &driver(FAR, 1)).await;
    let mut near = Client::connect(
        heir.addr,
        &format!("/ws/driver/orders/?token={}", driver(NEAR, 1)),
    )
    .await;
    assert_eq!(near.recv().await["type"], "connection_established");
    let mut seen: Vec<Value> = Vec::new();
    // Everything until well past the lease (and the heir's reclaim of it).
    let until = claimed.lease_until + 1500 - now_ms();
    seen.extend(collect_for(&mut near, Duration::from_millis(until.max(0) as u64)).await);
    let timeouts = of_type(&seen, "order_timeout");
    assert_eq!(timeouts.len(), 1, "{seen:?}");
    assert_eq!(
        *timeouts[0],
        json!({"type": "order_timeout", "order_id": claimed.order_id,
               "message": "Order expired or reassigned to another driver"})
    );
    let init = of_type(&seen, "initial_orders");
    assert_eq!(init.len(), 1, "{seen:?}");
    assert_eq!(
        init[0]["orders"],
        json!([]),
        "the overdue offer is not listed"
    );
    assert!(of_type(&seen, "new_order").is_empty(), "{seen:?}");

    let far_seen = queued(&mut far).await;
    let offers = of_type(&far_seen, "new_order");
    assert_eq!(offers.len(), 1, "{far_seen:?}");
    assert_eq!(offers[0]["order"]["id"], claimed.order_id);

    let conn = db_conn(&db).await;
    let status = text(
        &conn,
        &format!("SELECT status FROM offers WHERE id = {}", claimed.offer_id),
    )
    .await;
    assert_eq!(status.as_deref(), Some("expired"));
    assert_eq!(
        scalar(
            &conn,
            &format!(
                "SELECT count(*) FROM offers WHERE order_id = {}",
                claimed.order_id
            )
        )
        .await,
        2,
        "one expired offer, one to the next driver"
    );
    let mut r = redis.conn().await;
    let leased: Option<f64> = redis::cmd("ZSCORE")
        .arg("sb:offers:lease")
        .arg(claimed.offer_id)
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(leased, None, "the dead node's claim is cleared");
}

db_variants!(
    killed_claimer_taken_over_after_lease,
    crate::killed_claimer_is_taken_over_after_the_lease
);
db_variants!(
    killed_claimer_expiry_exactly_once,
    crate::killed_claimer_expires_exactly_once
);
