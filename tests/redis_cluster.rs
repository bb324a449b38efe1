//! SPEC §12 on a real Redis Cluster (`REDIS_URL=redis+cluster://…`): two
//! in-process nodes on three masters started by the testkit's
//! `RedisCluster` guard. Cross-node delivery in all three dialects with the
//! rooms on different masters (sharded pub/sub), history and resume with
//! `since` on the other node, dispatch + offer expiry exactly once, and the
//! driver index and offer clock partitioned by city (`{c1}`, `{c2}`).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use serde_json::{Value, json};

fn cluster_config(db: &TestDb, cluster: &RedisCluster, id: &str) -> switchboard::Config {
    let mut c = config(db, None, id);
    c.redis_url = Some(cluster.url());
    c
}

async fn nodes(db: &TestDb, cluster: &RedisCluster, ids: &[&str]) -> Vec<TestNode> {
    let mut out = Vec::new();
    for id in ids {
        out.push(TestNode::start(cluster_config(db, cluster, id)).await);
    }
    for n in &out {
        n.wait_ready(true).await;
    }
    out
}

/// The master that serves a room's channel (and its history).
fn master_of_room(cluster: &RedisCluster, room: &str) -> u16 {
    cluster.master_of(&format!("sb:room:{{{room}}}"))
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
async fn two_nodes_deliver_every_dialect_with_rooms_on_different_masters() {
    init_tracing();
    let cluster = RedisCluster::start(3);
    let db = TestDb::sqlite();
    let rooms = ["admin-orders", "city-1-orders", "driver-7", "user-4"];
    let masters: HashSet<u16> = rooms.iter().map(|r| master_of_room(&cluster, r)).collect();
    assert!(
        masters.len() >= 2,
        "the test's rooms should land on different masters"
    );
    let ns = nodes(&db, &cluster, &["a", "b"]).await;
    let (a, b) = (&ns[0], &ns[1]);
    let mut clients = vec![
        (
            "rooms@a",
            "admin-orders",
            connect_ready(a.addr, "/", &admin()).await,
        ),
        (
            "events@b",
            "admin-orders",
            connect_ready(b.addr, "/ws", &admin()).await,
        ),
        (
            "manager rooms@b",
            "city-1-orders",
            connect_ready(b.addr, "/", &manager(10, &[1])).await,
        ),
        (
            "driver@a",
            "driver-7",
            connect_ready(a.addr, "/ws/driver/orders/", &driver(7, 1)).await,
        ),
        (
            "driver@b",
            "driver-7",
            connect_ready(b.addr, "/ws/driver/orders/", &driver(7, 1)).await,
        ),
        (
            "user events@a",
            "user-4",
            connect_ready(a.addr, "/ws", &user(4)).await,
        ),
    ];
    // Each node publishes to every room; then an end marker per room.
    for (i, n) in ns.iter().enumerate() {
        for r in rooms {
            n.publish(r, "hello", json!({"from": i, "to": r})).await;
        }
    }
    for r in rooms {
        b.publish(r, "end", json!({})).await;
    }
    for (label, room, c) in &mut clients {
        let got = until(c, "end").await;
        let mut from: Vec<i64> = got
            .iter()
            .map(|v| {
                assert_eq!(v["type"], "hello", "{label}: {v}");
                assert_eq!(body_of(v)["to"], *room, "{label}: {v}");
                body_of(v)["from"].as_i64().unwrap()
            })
            .collect();
        from.sort();
        assert_eq!(from, vec![0, 1], "{label} got {got:?}");
    }
    // A two-room publish reaches a socket in both rooms once.
    let (s, body) = publish_body(
        a.addr,
        json!({"rooms": ["city-1-orders", "admin-orders"], "type": "both", "data": {}}),
    )
    .await;
    assert_eq!(s, 204, "{body}");
    b.publish("admin-orders", "fin", json!({})).await;
    let mut admin_b = connect_ready(b.addr, "/", &admin()).await;
    admin_b
        .send_json(json!({"type": "join-room", "data": {"roomId": "city-1-orders"}}))
        .await;
    assert_eq!(admin_b.recv().await["type"], "room-joined");
    let (s, body) = publish_body(
        a.addr,
        json!({"rooms": ["city-1-orders", "admin-orders"], "type": "both", "data": {}}),
    )
    .await;
    assert_eq!(s, 204, "{body}");
    b.publish("admin-orders", "fin", json!({})).await;
    let got = until(&mut admin_b, "fin").await;
    assert_eq!(
        got.iter().filter(|v| v["type"] == "both").count(),
        1,
        "{got:?}"
    );
}

/// `since` as a client sends it: base64url, no padding.
/// History lives in the room's slot: a socket that left node A resumes on
/// node B with `since` and gets exactly what it missed, then live.
#[tokio::test]
async fn a_socket_resumes_on_the_other_node_from_the_rooms_stream() {
    init_tracing();
    let cluster = RedisCluster::start(3);
    let db = TestDb::sqlite();
    let ns = nodes(&db, &cluster, &["a", "b"]).await;
    let (a, b) = (&ns[0], &ns[1]);
    let path = format!("/?token={}", user(7));
    let mut c = Client::connect_positions(a.addr, &path).await;
    let hello = c.recv().await;
    let epoch = rooms_of(&hello)["user-7"]["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    assert_eq!(rooms_of(&hello)["user-7"]["offset"], 0);
    publish_n(b.addr, "user-7", 1, 3).await;
    assert_eq!(read_seq(&mut c, 3).await, vec![(1, 1), (2, 2), (3, 3)]);
    drop(c);

    // Missed while away: 4..=8, published through both nodes.
    publish_n(a.addr, "user-7", 4, 2).await;
    publish_n(b.addr, "user-7", 6, 3).await;
    let pos = json!({"user-7": {"epoch": epoch, "offset": 3}});
    let mut c = Client::connect_positions(b.addr, &format!("{path}&since={}", since(&pos))).await;
    let hello = c.recv().await;
    assert_eq!(
        recovery_of(&hello)["user-7"],
        json!({"recovered": true, "missed": 5})
    );
    assert_eq!(
        rooms_of(&hello)["user-7"],
        json!({"epoch": epoch, "offset": 8})
    );
    assert_eq!(
        read_seq(&mut c, 5).await,
        (4..=8).map(|i| (i, i)).collect::<Vec<_>>()
    );
    publish_n(a.addr, "user-7", 9, 1).await;
    assert_eq!(read_seq(&mut c, 1).await, vec![(9, 9)]);
    c.silent_for(Duration::from_millis(200)).await;

    // The stream is on the room's master, under the room's hash tag.
    let master = master_of_room(&cluster, "user-7");
    let len: i64 = redis::from_redis_value(
        cluster
            .on(master, redis::cmd("XLEN").arg("sb:hist:{user-7}"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(len, 9);
}

const DRIVERS: usize = 24;

/// Driver `i`: alone on a 0.5° grid (far outside everyone's radius).
fn grid(i: usize) -> (f64, f64) {
    (10.0 + (i / 6) as f64 * 0.5, 10.0 + (i % 6) as f64 * 0.5)
}

fn driver_id(i: usize) -> i64 {
    1000 + i as i64
}

/// Dispatch through city 1's index and expiry through city 1's clock
/// (`{c1}`) on the cluster: each offer is made once and expires once,
/// whichever node claims its deadline.
#[tokio::test]
async fn two_nodes_dispatch_and_expire_each_offer_once() {
    init_tracing();
    let cluster = RedisCluster::start(3);
    let db = TestDb::sqlite();
    let mut ns = Vec::new();
    for id in ["a", "b"] {
        let mut c = cluster_config(&db, &cluster, id);
        c.offer_timeout = Duration::from_secs(2);
        c.offer_lease = Duration::from_secs(1);
        let n = TestNode::start(c).await;
        n.wait_ready(true).await;
        ns.push(n);
    }
    let addrs: Vec<_> = ns.iter().map(|n| n.addr).collect();
    let mut clients: Vec<Client> = join_all((0..DRIVERS).map(|i| {
        let addr = addrs[i % 2];
        async move { connect_ready(addr, "/ws/driver/orders/", &driver(driver_id(i), 1)).await }
    }))
    .await;
    join_all((0..DRIVERS).map(|i| {
        let addr = addrs[(i + 1) % 2];
        async move {
            let (lat, lon) = grid(i);
            locate(addr, &driver(driver_id(i), 1), lat, lon).await
        }
    }))
    .await;
    let orders: Vec<i64> = join_all((0..DRIVERS).map(|i| {
        let addr = addrs[i % 2];
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
    let conn = db_conn(&db).await;
    let expired = || async {
        scalar(
            &conn,
            "SELECT count(*) FROM offers WHERE status = 'expired'",
        )
        .await
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while expired().await < DRIVERS as i64 {
        assert!(
            Instant::now() < deadline,
            "only {} of {DRIVERS} offers expired",
            expired().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past every lease: a duplicate would show now.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(expired().await, DRIVERS as i64);
    assert_eq!(
        scalar(&conn, "SELECT count(*) FROM offers").await,
        DRIVERS as i64,
        "one offer per order, nobody else in radius"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        let got = queued(c).await;
        let types: Vec<&str> = got.iter().filter_map(|m| m["type"].as_str()).collect();
        assert_eq!(
            types,
            ["new_order", "order_timeout"],
            "driver {} got {got:?}",
            driver_id(i)
        );
        assert_eq!(got[0]["order"]["id"], orders[i]);
    }
    // The clock's keys share city 1's slot, and are drained.
    let master = cluster.master_of("sb:{c1}:offers:due");
    assert_eq!(master, cluster.master_of("sb:{c1}:offers:lease"));
    assert_eq!(master, cluster.master_of("sb:{c1}:drivers:geo"));
    for k in ["sb:{c1}:offers:due", "sb:{c1}:offers:lease"] {
        let n: i64 =
            redis::from_redis_value(cluster.on(master, redis::cmd("ZCARD").arg(k)).unwrap())
                .unwrap();
        assert_eq!(n, 0, "{k} drained");
    }
    let geo: i64 = redis::from_redis_value(
        cluster
            .on(
                cluster.master_of("sb:{c1}:drivers:geo"),
                redis::cmd("ZCARD").arg("sb:{c1}:drivers:geo"),
            )
            .unwrap(),
    )
    .unwrap();
    assert_eq!(geo, DRIVERS as i64, "positions in city 1's slot");
}

/// A command on the master that serves `key`'s slot.
fn on_master_of<T: redis::FromRedisValue>(
    cluster: &RedisCluster,
    key: &str,
    cmd: &redis::Cmd,
) -> T {
    redis::from_redis_value(cluster.on(cluster.master_of(key), cmd).unwrap()).unwrap()
}

async fn nearby_ids(addr: std::net::SocketAddr, token: &str) -> Vec<i64> {
    let (s, b) = call(
        addr,
        "GET",
        "/api/drivers/nearby?lat=41.30&lon=69.24&radius_km=5",
        token,
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let mut ids: Vec<i64> = b["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["driver_id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

/// SPEC §12: positions, presence and deadlines partitioned by city. Cities
/// 1 and 2 hash to different masters (`{c1}`, `{c2}`); a driver of each,
/// side by side (the city-2 driver nearer the pickup), on different nodes.
/// An order of city 1 is offered to the city-1 driver only, once; its
/// deadline expires once across the two nodes; then the order waits in
/// city 1 (nobody else there). The keys are where the README says, and
/// nothing is left under `{drivers}` or `{offers}`. An admin's nearby
/// lists both cities' drivers, a manager's only its cities'.
#[tokio::test]
async fn cities_are_partitions_on_their_own_masters() {
    init_tracing();
    let cluster = RedisCluster::start(3);
    assert_ne!(
        cluster.master_of("sb:{c1}:drivers:geo"),
        cluster.master_of("sb:{c2}:drivers:geo"),
        "cities 1 and 2 on different masters"
    );
    let db = TestDb::sqlite();
    let mut ns = Vec::new();
    for id in ["a", "b"] {
        let mut c = cluster_config(&db, &cluster, id);
        c.offer_timeout = Duration::from_secs(2);
        c.offer_lease = Duration::from_secs(1);
        let n = TestNode::start(c).await;
        n.wait_ready(true).await;
        ns.push(n);
    }
    let (a, b) = (ns[0].addr, ns[1].addr);
    let (one, two) = (driver(501, 1), driver(502, 2));
    let mut d1 = connect_ready(a, "/ws/driver/orders/", &one).await;
    let mut d2 = connect_ready(b, "/ws/driver/orders/", &two).await;
    locate(b, &one, 41.30, 69.24).await;
    locate(a, &two, 41.3004, 69.24).await;

    for node in [a, b] {
        assert_eq!(
            nearby_ids(node, &admin()).await,
            vec![501, 502],
            "admin: every city"
        );
        assert_eq!(
            nearby_ids(node, &manager(9, &[2])).await,
            vec![502],
            "manager of city 2"
        );
        assert_eq!(
            nearby_ids(node, &manager(9, &[1])).await,
            vec![501],
            "manager of city 1"
        );
        assert_eq!(nearby_ids(node, &manager(9, &[1, 2])).await, vec![501, 502]);
    }

    // Nearer the city-2 driver than the city-1 one.
    let order = id_of(
        &create_order(
            a,
            &admin(),
            json!({"city_id": 1, "user_id": 77, "latitude_from": 41.3003, "longitude_from": 69.24, "total": 10}),
        )
        .await,
    );
    let conn = db_conn(&db).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while scalar(
        &conn,
        "SELECT count(*) FROM offers WHERE status = 'expired'",
    )
    .await
        < 1
    {
        assert!(Instant::now() < deadline, "the offer did not expire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past the lease: a second expiry would show now.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        scalar(&conn, "SELECT count(*) FROM offers").await,
        1,
        "one offer"
    );
    assert_eq!(
        scalar(
            &conn,
            "SELECT count(*) FROM offers WHERE status = 'expired' AND driver_id = 501"
        )
        .await,
        1,
        "to the city-1 driver, expired once"
    );
    let got = queued(&mut d1).await;
    let types: Vec<&str> = got.iter().filter_map(|m| m["type"].as_str()).collect();
    assert_eq!(types, ["new_order", "order_timeout"], "{got:?}");
    assert_eq!(got[0]["order"]["id"], order);
    assert_eq!(
        queued(&mut d2).await,
        Vec::<Value>::new(),
        "nothing for city 2"
    );

    // The keys, on the masters of their slots.
    for (key, member) in [
        ("sb:{c1}:drivers:geo", 501),
        ("sb:{c1}:drivers:seen", 501),
        ("sb:{c1}:drivers:sock", 501),
        ("sb:{c1}:drivers:http", 501),
        ("sb:{c2}:drivers:geo", 502),
        ("sb:{c2}:drivers:sock", 502),
        ("sb:{c1}:orders:waiting", order),
    ] {
        let score: Option<f64> =
            on_master_of(&cluster, key, redis::cmd("ZSCORE").arg(key).arg(member));
        assert!(score.is_some(), "{member} in {key}");
    }
    for (key, member) in [("sb:{c1}:drivers:geo", 502), ("sb:{c2}:drivers:geo", 501)] {
        let score: Option<f64> =
            on_master_of(&cluster, key, redis::cmd("ZSCORE").arg(key).arg(member));
        assert!(score.is_none(), "{member} not in {key}");
    }
    let exists: i64 = on_master_of(
        &cluster,
        "sb:{c1}:drivers:geo",
        redis::cmd("EXISTS").arg("sb:{c1}:drivers:geo"),
    );
    assert_eq!(exists, 1);
    for key in [
        "sb:{c1}:offers:due",
        "sb:{c1}:offers:lease",
        "sb:{c2}:offers:due",
    ] {
        let n: i64 = on_master_of(&cluster, key, redis::cmd("ZCARD").arg(key));
        assert_eq!(n, 0, "{key} drained");
    }
    let mut cities: Vec<i64> = on_master_of(
        &cluster,
        "sb:{cities}",
        redis::cmd("SMEMBERS").arg("sb:{cities}"),
    );
    cities.sort_unstable();
    assert_eq!(cities, vec![1, 2], "the registry");
    for tag in ["{drivers}", "{offers}"] {
        let pattern = format!("sb:{tag}*");
        let left: Vec<String> = on_master_of(
            &cluster,
            &format!("sb:{tag}:x"),
            redis::cmd("KEYS").arg(&pattern),
        );
        assert!(left.is_empty(), "{left:?}");
    }

    // An admin assigns the city-2 driver, now 1.1 km north of the pickup,
    // to the city-1 order: the offer's distance comes from the driver's own
    // partition (it used to be looked up in the order's city only: 0 km).
    locate(a, &two, 41.3103, 69.24).await;
    let (s, body) = call(
        b,
        "PATCH",
        &format!("/api/orders/{order}"),
        &admin(),
        Some(json!({"driver_id": 502})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let offered = d2.recv_type("new_order").await;
    assert_eq!(offered["order"]["id"], order);
    let km = offered["order"]["distance_to_pickup_km"]
        .as_f64()
        .unwrap_or_else(|| panic!("no distance in {offered}"));
    assert!((km - 1.11).abs() < 0.02, "distance {km} km, want 1.11");
}

/// A master failover under a stream of publishes, with real sockets: the
/// master of `admin-orders` is SIGKILLed (3 masters + 1 replica each) while
/// node a publishes to it. A socket on node b stays connected; a socket on
/// node a is dropped before the kill and resumes on node b with `since`
/// afterwards. Node b is ready again afterwards. Counted: acknowledged
/// publishes neither socket got (lost), and repeats (dup).
#[tokio::test]
async fn a_master_failover_loses_nothing_recovery_cannot_replay() {
    init_tracing();
    let mut cluster = RedisCluster::start_with(3, 1);
    let db = TestDb::sqlite();
    let ns = nodes(&db, &cluster, &["a", "b"]).await;
    let (a, b) = (ns[0].addr, ns[1].addr);
    let room = "admin-orders";
    let doomed = master_of_room(&cluster, room);

    let mut stays = connect_ready_positions(b, "/", &admin()).await;
    let mut leaves = Client::connect_positions(a, &format!("/?token={}", admin())).await;
    let hello = leaves.recv().await;
    let epoch = rooms_of(&hello)[room]["epoch"]
        .as_str()
        .unwrap()
        .to_string();

    const N: u64 = 300;
    let publisher = tokio::spawn(async move {
        let (mut acked, mut retries) = (Vec::new(), 0u64);
        for n in 1..=N {
            loop {
                let (s, _) =
                    publish_body(a, json!({"room": room, "type": "seq", "data": {"n": n}})).await;
                if s == 204 {
                    acked.push(n);
                    break;
                }
                retries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (acked, retries)
    });
    let readiness = tokio::spawn(async move {
        let mut dipped = false;
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if readyz_status(b).await == Some(503) {
                dipped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        dipped
    });

    // The leaving socket sees the first 20, then goes away.
    let mut seen_leaves: Vec<u64> = Vec::new();
    let mut last_offset = 0;
    while seen_leaves.len() < 20 {
        let v = leaves.recv().await;
        if v["type"] == "seq" {
            seen_leaves.push(v["data"]["n"].as_u64().unwrap());
            last_offset = v["offset"].as_u64().unwrap();
        }
    }
    drop(leaves);
    // Redis replicates asynchronously: what the replica has not received
    // when its master dies is gone, epoch included (README "Known limits").
    // On a loaded machine the lag can reach the whole run so far, so the
    // kill waits until the replica holds at least what its master held
    // here; publishes keep flowing meanwhile and through the kill.
    replica_caught_up(doomed).await;
    cluster.kill(doomed);
    let killed = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    while master_of_room(&cluster, room) == doomed {
        assert!(Instant::now() < deadline, "no failover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failover = killed.elapsed();
    let (acked, retries) = publisher.await.unwrap();
    let dipped = readiness.await.unwrap();
    ns[1].wait_ready(true).await;

    // The socket that stayed: everything, live or filled from history.
    let mut seen_stays: Vec<u64> = Vec::new();
    while seen_stays.last() != Some(&N) {
        let v = stays.recv().await;
        if v["type"] == "seq" {
            seen_stays.push(v["data"]["n"].as_u64().unwrap());
        }
    }
    // The socket that left resumes on node b.
    let pos = json!({room: {"epoch": epoch, "offset": last_offset}});
    let mut back =
        Client::connect_positions(b, &format!("/?token={}&since={}", admin(), since(&pos))).await;
    let hello = back.recv().await;
    let verdict = recovery_of(&hello)[room].clone();
    eprintln!(
        "resume verdict {verdict}, position now {}",
        rooms_of(&hello)[room]
    );
    assert_eq!(verdict["recovered"], true, "{verdict}");
    while seen_leaves.last() != Some(&N) {
        let v = back.recv().await;
        if v["type"] == "seq" {
            seen_leaves.push(v["data"]["n"].as_u64().unwrap());
        }
    }
    let count = |seen: &[u64]| {
        let set: HashSet<u64> = seen.iter().copied().collect();
        let lost = acked.iter().filter(|n| !set.contains(n)).count();
        (lost, seen.len() - set.len())
    };
    let (lost_stays, dup_stays) = count(&seen_stays);
    let (lost_leaves, dup_leaves) = count(&seen_leaves);
    eprintln!(
        "failover after {failover:?}; readiness dipped: {dipped}; {} acknowledged, {retries} publish retries; \
         stayed: {lost_stays} lost, {dup_stays} dup; resumed ({verdict}): {lost_leaves} lost, {dup_leaves} dup",
        acked.len()
    );
    assert_eq!((lost_stays, lost_leaves), (0, 0), "nothing lost");
    // A publish answered with an error may still have landed; its retry is
    // then a second event (`/api/publish` has no id).
    assert!(
        dup_stays as u64 <= retries && dup_leaves as u64 <= retries,
        "duplicates beyond the retried publishes"
    );
    // Readiness dips when the subscriber is told of the lost connection
    // (a disconnection push) and cannot re-subscribe until the failover; the
    // redis crate sometimes repairs the subscription before telling, so the
    // dip is reported, not required. Ready again is required (above).
    let _ = dipped;
}
