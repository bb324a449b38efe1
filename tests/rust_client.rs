//! The Rust client crate (clients/rust) against real nodes: live events and
//! caches, surviving a node restart, no retry after 4001, and recovery
//! (SPEC §10) across a Redis-backed cluster behind a TCP balancer: resuming
//! on another node after a drain or a SIGKILL, and a resync (with the orders
//! cache's HTTP refetch) when the resume cannot be honoured.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::json;
use switchboard_client::positions::RoomPosition;
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
    // An embedded node keeps history in memory: the restarted one has a new
    // epoch, so the client cannot resume and says so.
    assert_eq!(
        next_matching(
            &mut c,
            |e| matches!(e, ClientEvent::Resync { room, .. } if room == "admin-orders")
        )
        .await,
        ClientEvent::Resync {
            room: "admin-orders".into(),
            reason: "epoch_changed".into()
        }
    );
    node2
        .publish("admin-orders", "after", json!({"ok": 1}))
        .await;
    let ClientEvent::Message(got) = next_matching(&mut c, is_type("after")).await else {
        unreachable!()
    };
    assert_eq!(got["data"], json!({"ok": 1}));
    assert_eq!(got["room"], "admin-orders");
    assert_eq!(
        c.positions
            .lock()
            .unwrap()
            .get("admin-orders")
            .unwrap()
            .offset,
        got["offset"].as_u64().unwrap()
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

/// A TCP balancer: each new connection goes to the port in `target`, which
/// the test moves from node to node; connections made stay where they are.
struct Balancer {
    addr: SocketAddr,
    target: Arc<AtomicU16>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    async fn start(to: SocketAddr) -> Balancer {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let target = Arc::new(AtomicU16::new(to.port()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (t, n) = (target.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                let port = t.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        Balancer {
            addr,
            target,
            connections,
            task,
        }
    }

    fn point_to(&self, to: SocketAddr) {
        self.target.store(to.port(), Ordering::SeqCst);
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Events until `f` matches, and that one.
async fn until_event(c: &mut Client, f: impl Fn(&ClientEvent) -> bool) -> Vec<ClientEvent> {
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let e = c.next_event().await.expect("client ended");
            let done = f(&e);
            seen.push(e);
            if done {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("event did not come; saw {seen:?}"));
    seen
}

/// The type of the ticks published to `room` (the rooms-dialect client is
/// in admin-orders too: each client counts its own room's).
fn tick_type(room: &str) -> String {
    format!("tick:{room}")
}

/// The `n` of each tick of `room` among `events`, with its room and offset.
fn ticks(events: &[ClientEvent], room: &str) -> Vec<(i64, String, u64)> {
    let ty = tick_type(room);
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Message(v) if v["type"] == ty.as_str() => Some((
                switchboard_client::cache::body_of(v)["n"].as_i64()?,
                v["room"].as_str()?.to_string(),
                v["offset"].as_u64()?,
            )),
            _ => None,
        })
        .collect()
}

fn is_tick(room: &str, n: i64) -> impl Fn(&ClientEvent) -> bool {
    let ty = tick_type(room);
    move |e| matches!(e, ClientEvent::Message(v) if v["type"] == ty.as_str() && switchboard_client::cache::body_of(v)["n"] == n)
}

/// A client through the balancer whose first reconnect waits 1–3 s (the
/// test publishes in that gap).
fn slow_client(lb: &Balancer, path: &str, token: &str) -> Client {
    let mut cfg = ClientConfig::new(lb.addr, path, token);
    cfg.base_delay = Duration::from_secs(2);
    cfg.max_delay = Duration::from_secs(4);
    cfg.ping_every = None;
    Client::start(cfg)
}

async fn publish_ticks(addr: SocketAddr, room: &str, from: i64, to: i64) {
    for n in from..=to {
        let (s, b) = publish_body(
            addr,
            json!({"room": room, "type": tick_type(room), "data": {"n": n}}),
        )
        .await;
        assert_eq!(s, 204, "{b}");
    }
}

/// Node A goes away (`stop_a`) while a client of each dialect is on it; the
/// clients come back through the balancer to B with `since` and get ticks
/// 1..10 exactly once, in order, 4..8 of them replayed.
async fn resume_on_the_other_node<F: std::future::Future<Output = ()> + Send + 'static>(
    a: SocketAddr,
    b: SocketAddr,
    stop_a: F,
    want_close: u16,
) {
    let lb = Balancer::start(a).await;
    let mut clients = vec![
        ("events", "admin-orders", slow_client(&lb, "/ws", &admin())),
        ("rooms", "city-9-orders", slow_client(&lb, "/", &admin())),
        (
            "driver",
            "driver-7",
            slow_client(&lb, "/ws/driver/orders/", &driver(7, 1)),
        ),
    ];
    for (name, room, c) in &mut clients {
        let hello = ["CONNECTED", "connected", "connection_established"];
        let seen = until_event(c, |e| matches!(e, ClientEvent::Message(v) if hello.contains(&v["type"].as_str().unwrap_or(""))))
            .await;
        let ClientEvent::Message(v) = seen.last().unwrap() else {
            unreachable!()
        };
        if *name == "rooms" {
            assert!(
                v["data"]["rooms"]["admin-orders"]["epoch"].is_string(),
                "{v}"
            );
            // A room joined by hand resumes through `join-room` with `since`.
            c.join_room(room);
            until_event(
                c,
                |e| matches!(e, ClientEvent::Message(v) if v["type"] == "room-joined"),
            )
            .await;
        }
    }
    let rooms: Vec<&str> = clients.iter().map(|(_, r, _)| *r).collect();
    for r in &rooms {
        publish_ticks(a, r, 1, 3).await;
    }
    let mut logs: Vec<Vec<ClientEvent>> = Vec::new();
    for (_, room, c) in &mut clients {
        logs.push(until_event(c, is_tick(room, 3)).await);
    }
    lb.point_to(b);
    let stopping = tokio::spawn(stop_a);
    for ((name, _, c), log) in clients.iter_mut().zip(&mut logs) {
        let seen = until_event(c, |e| matches!(e, ClientEvent::Disconnected(_))).await;
        assert_eq!(
            seen.last(),
            Some(&ClientEvent::Disconnected(want_close)),
            "{name}"
        );
        log.extend(seen);
    }
    // While every client is between nodes.
    for r in &rooms {
        publish_ticks(b, r, 4, 8).await;
    }
    stopping.await.unwrap();
    // Resumed: the verdict for the client's room (the connect message, or
    // `room-joined` for the room joined by hand) has come.
    for ((_, room, c), log) in clients.iter_mut().zip(&mut logs) {
        log.extend(
            until_event(
                c,
                |e| matches!(e, ClientEvent::Recovered { room: r, .. } if r == room),
            )
            .await,
        );
    }
    for r in &rooms {
        publish_ticks(b, r, 9, 10).await;
    }
    for ((name, room, c), log) in clients.iter_mut().zip(&mut logs) {
        log.extend(until_event(c, is_tick(room, 10)).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        while let Ok(Some(e)) =
            tokio::time::timeout(Duration::from_millis(10), c.next_event()).await
        {
            log.push(e);
        }
        let t = ticks(log, room);
        let ns: Vec<i64> = t.iter().map(|x| x.0).collect();
        assert_eq!(
            ns,
            (1..=10).collect::<Vec<_>>(),
            "{name}: once, in order: {log:?}"
        );
        assert!(t.iter().all(|x| x.1 == *room), "{name}: {t:?}");
        let first = t[0].2;
        let offsets: Vec<u64> = t.iter().map(|x| x.2).collect();
        assert_eq!(offsets, (first..first + 10).collect::<Vec<_>>(), "{name}");
        assert!(
            log.contains(&ClientEvent::Recovered {
                room: room.to_string(),
                missed: 5
            }),
            "{name}: recovered, 5 missed: {log:?}"
        );
        assert!(
            !log.iter().any(|e| matches!(
                e,
                ClientEvent::Resync { .. } | ClientEvent::Duplicate { .. }
            )),
            "{name}: no resync, nothing twice: {log:?}"
        );
        assert_eq!(
            c.positions.lock().unwrap().get(room).unwrap().offset,
            first + 9
        );
    }
}

#[tokio::test]
async fn resumes_on_another_node_after_a_drain() {
    init_tracing();
    let redis = RedisServer::start();
    let db = TestDb::sqlite();
    let mut a = TestNode::start(config(&db, Some(&redis), "a")).await;
    let b = TestNode::start(config(&db, Some(&redis), "b")).await;
    let a_addr = a.addr;
    let node = a.node.take().unwrap();
    resume_on_the_other_node(a_addr, b.addr, async move { node.stop().await }, 1012).await;
}

#[tokio::test]
async fn resumes_on_another_node_after_a_sigkill() {
    init_tracing();
    let redis = RedisServer::start();
    let db = TestDb::sqlite();
    let mut a = start_server(&db, &redis, "a", &[]).await;
    let b = TestNode::start(config(&db, Some(&redis), "b")).await;
    let a_addr = a.addr;
    resume_on_the_other_node(a_addr, b.addr, async move { a.kill() }, 1006).await;
}

#[tokio::test]
async fn a_wrong_epoch_resyncs_the_room_and_the_cache_refetches() {
    init_tracing();
    let redis = RedisServer::start();
    let db = TestDb::sqlite();
    let mut a = TestNode::start(config(&db, Some(&redis), "a")).await;
    let b = TestNode::start(config(&db, Some(&redis), "b")).await;
    let lb = Balancer::start(a.addr).await;
    let mut c = slow_client(&lb, "/ws", &admin());
    until_event(&mut c, is_type("CONNECTED")).await;
    let first = id_of(
        &create_order(
            a.addr,
            &admin(),
            json!({"city_id": 1, "user_id": 5, "total": 100}),
        )
        .await,
    );
    until_event(&mut c, is_type("ORDER_CREATED")).await;
    assert!(c.orders.lock().unwrap().get(first).is_some());

    // The client's epoch no longer matches the room's.
    let offset = c
        .positions
        .lock()
        .unwrap()
        .get("admin-orders")
        .expect("a position")
        .offset;
    c.positions
        .lock()
        .unwrap()
        .set("admin-orders", RoomPosition::new("not-the-epoch", offset));
    lb.point_to(b.addr);
    let node = a.node.take().unwrap();
    let stopping = tokio::spawn(async move { node.stop().await });
    until_event(&mut c, |e| matches!(e, ClientEvent::Disconnected(1012))).await;
    let before = lb.connections.load(Ordering::SeqCst);
    // Missed while away, and not replayable: a new order, the first one deleted.
    let second = id_of(
        &create_order(
            b.addr,
            &admin(),
            json!({"city_id": 1, "user_id": 5, "total": 200}),
        )
        .await,
    );
    let (s, _) = call(
        b.addr,
        "DELETE",
        &format!("/api/orders/{first}"),
        &admin(),
        None,
    )
    .await;
    assert_eq!(s, 204);
    stopping.await.unwrap();

    let log = until_event(&mut c, |e| matches!(e, ClientEvent::OrdersReloaded { .. })).await;
    let resyncs: Vec<&ClientEvent> = log
        .iter()
        .filter(|e| matches!(e, ClientEvent::Resync { .. }))
        .collect();
    assert_eq!(
        resyncs,
        [&ClientEvent::Resync {
            room: "admin-orders".into(),
            reason: "epoch_changed".into()
        }],
        "{log:?}"
    );
    let Some(ClientEvent::OrdersReloaded { rooms, .. }) = log.last() else {
        unreachable!()
    };
    assert_eq!(rooms, &["admin-orders".to_string()]);
    assert_eq!(
        lb.connections.load(Ordering::SeqCst) - before,
        2,
        "the socket's reconnect and one HTTP refetch"
    );
    {
        let orders = c.orders.lock().unwrap();
        assert!(orders.get(second).is_some(), "created meanwhile: refetched");
        assert!(orders.get(first).is_none(), "deleted meanwhile: gone");
    }
    // Live again from the server's position.
    let third = id_of(
        &create_order(
            b.addr,
            &admin(),
            json!({"city_id": 1, "user_id": 5, "total": 300}),
        )
        .await,
    );
    until_event(&mut c, is_type("ORDER_CREATED")).await;
    assert!(c.orders.lock().unwrap().get(third).is_some());
    let pos: RoomPosition = c
        .positions
        .lock()
        .unwrap()
        .get("admin-orders")
        .unwrap()
        .clone();
    assert_ne!(pos.epoch.as_deref(), Some("not-the-epoch"));
}
