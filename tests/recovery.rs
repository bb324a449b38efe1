//! SPEC §10 over real sockets: positions in the connect message, `room` and
//! `offset` on frames, resume with `since` (replay before live, no gap, no
//! duplicate), all-or-nothing per room, once across rooms, `bad_since`,
//! volatile events, and `join-room` with `since` on `/`. Embedded nodes and
//! two nodes over a real `redis-server`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn a_resumed_socket_gets_what_it_missed_once_then_live() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "rec")).await;
    let path = format!("/?token={}", user(7));
    let mut c = Client::connect_positions(node.addr, &path).await;
    let hello = c.recv().await;
    assert_eq!(hello["type"], "connected");
    let rooms = rooms_of(&hello);
    let epoch = rooms["user-7"]["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    assert_eq!(rooms["user-7"]["offset"], 0, "a fresh room is at 0");
    assert_eq!(
        recovery_of(&hello),
        Value::Null,
        "nothing asked, nothing told"
    );

    publish_n(node.addr, "user-7", 1, 3).await;
    let got = read_seq(&mut c, 3).await;
    assert_eq!(got, vec![(1, 1), (2, 2), (3, 3)]);
    let frame_room = {
        publish_n(node.addr, "user-7", 4, 1).await;
        let v = c.recv().await;
        assert_eq!(v["offset"], 4);
        v["room"].clone()
    };
    assert_eq!(frame_room, "user-7");
    drop(c);

    // Missed while away: 5..=9.
    publish_n(node.addr, "user-7", 5, 5).await;
    let pos = json!({"user-7": {"epoch": epoch, "offset": 4}});
    let mut c =
        Client::connect_positions(node.addr, &format!("{path}&since={}", since(&pos))).await;
    let hello = c.recv().await;
    assert_eq!(
        recovery_of(&hello)["user-7"],
        json!({"recovered": true, "missed": 5})
    );
    assert_eq!(
        rooms_of(&hello)["user-7"],
        json!({"epoch": epoch, "offset": 9})
    );
    let replayed = read_seq(&mut c, 5).await;
    assert_eq!(replayed, (5..=9).map(|i| (i, i)).collect::<Vec<_>>());
    // Then live, with the next offset.
    publish_n(node.addr, "user-7", 10, 1).await;
    assert_eq!(read_seq(&mut c, 1).await, vec![(10, 10)]);
    c.silent_for(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn all_or_nothing_epoch_changed_too_old_and_bad_since() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "rec");
    cfg.history.size = 3;
    let node = TestNode::start(cfg).await;
    let path = format!("/ws?token={}", user(8));
    let mut c = Client::connect_positions(node.addr, &path).await;
    let hello = c.recv().await;
    assert_eq!(hello["type"], "CONNECTED");
    let epoch = rooms_of(&hello)["user-8"]["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    drop(c);
    publish_n(node.addr, "user-8", 1, 5).await; // history keeps 3..=5

    // Each case publishes one more event: the room is at 5, then at 6.
    let cases = [
        (
            json!({"user-8": {"epoch": "nope", "offset": 1}}),
            "epoch_changed",
            5,
        ),
        (
            json!({"user-8": {"epoch": epoch, "offset": 1}}),
            "too_old",
            6,
        ),
    ];
    for (pos, reason, at) in cases {
        let mut c =
            Client::connect_positions(node.addr, &format!("{path}&since={}", since(&pos))).await;
        let hello = c.recv().await;
        assert_eq!(
            recovery_of(&hello)["user-8"],
            json!({"recovered": false, "reason": reason})
        );
        assert_eq!(rooms_of(&hello)["user-8"]["offset"], at);
        // Nothing replayed: the next message is live.
        publish_n(node.addr, "user-8", 100, 1).await;
        let v = c.recv().await;
        assert_eq!(
            (v["type"].as_str(), v["payload"]["n"].as_u64()),
            (Some("seq"), Some(100))
        );
    }
    // Within the window it works.
    let pos = json!({"user-8": {"epoch": epoch, "offset": 6}});
    let mut c =
        Client::connect_positions(node.addr, &format!("{path}&since={}", since(&pos))).await;
    let hello = c.recv().await;
    assert_eq!(
        recovery_of(&hello)["user-8"],
        json!({"recovered": true, "missed": 1})
    );
    let v = c.recv().await;
    assert_eq!(
        (v["payload"]["n"].as_u64(), v["offset"].as_u64()),
        (Some(100), Some(7))
    );

    // Malformed: one bad_since error, the socket goes on without recovery.
    for bad in [
        "%%%".to_string(),
        since(&json!([1, 2])),
        since(&json!({"a": {"epoch": 1}})),
    ] {
        let mut c = Client::connect_positions(node.addr, &format!("{path}&since={bad}")).await;
        let hello = c.recv().await;
        assert_eq!(hello["type"], "CONNECTED");
        assert_eq!(recovery_of(&hello), Value::Null);
        let e = c.recv().await;
        assert_eq!(
            (e["type"].as_str(), e["payload"]["code"].as_str()),
            (Some("ERROR"), Some("bad_since")),
            "{e}"
        );
        c.send_json(json!({"type": "ping"})).await;
        assert_eq!(c.recv().await["type"], "pong");
    }
    // More than 64 rooms is malformed too.
    let many: BTreeMap<String, Value> = (0..65)
        .map(|i| (format!("r{i}"), json!({"epoch": "e", "offset": 0})))
        .collect();
    let mut c =
        Client::connect_positions(node.addr, &format!("{path}&since={}", since(&json!(many))))
            .await;
    c.recv().await;
    assert_eq!(c.recv().await["payload"]["code"], "bad_since");
}

/// An event to two rooms a socket is in is replayed once (through the
/// first of its rooms), as it is delivered live once; volatile events are
/// live only.
#[tokio::test]
async fn replay_is_once_across_rooms_and_skips_volatile_events() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "rec")).await;
    // A manager of city 3 is in city-3-orders and user-9.
    let path = format!("/ws?token={}", manager(9, &[3]));
    let mut c = Client::connect_positions(node.addr, &path).await;
    let hello = c.recv().await;
    let rooms = rooms_of(&hello);
    let pos: Value = rooms
        .as_object()
        .unwrap()
        .iter()
        .map(|(r, p)| (r.clone(), p.clone()))
        .collect::<serde_json::Map<_, _>>()
        .into();
    assert!(
        pos.get("city-3-orders").is_some() && pos.get("user-9").is_some(),
        "{pos}"
    );
    drop(c);
    let both = json!({"rooms": ["city-3-orders", "user-9"], "type": "both", "data": {}});
    let (s, b) = publish_body(node.addr, both).await;
    assert_eq!(s, 204, "{b}");
    let vol = json!({"room": "user-9", "type": "vol", "data": {}, "volatile": true});
    let (s, b) = publish_body(node.addr, vol).await;
    assert_eq!(s, 204, "{b}");
    publish_n(node.addr, "user-9", 1, 1).await;

    let mut c =
        Client::connect_positions(node.addr, &format!("{path}&since={}", since(&pos))).await;
    let hello = c.recv().await;
    let rec = recovery_of(&hello);
    assert_eq!(
        rec["city-3-orders"],
        json!({"recovered": true, "missed": 1})
    );
    assert_eq!(rec["user-9"], json!({"recovered": true, "missed": 2}));
    let mut got = Vec::new();
    for _ in 0..2 {
        let v = c.recv().await;
        got.push((v["type"].as_str().unwrap().to_string(), v["room"].clone()));
    }
    assert_eq!(
        got,
        vec![
            ("both".to_string(), json!("city-3-orders")),
            ("seq".to_string(), json!("user-9"))
        ]
    );
    c.silent_for(Duration::from_millis(300)).await;

    // A volatile publish reaches a live socket without an offset.
    let vol = json!({"room": "user-9", "type": "vol", "data": {}, "volatile": true});
    publish_body(node.addr, vol).await;
    let v = c.recv().await;
    assert_eq!(v["type"], "vol");
    assert!(v.get("offset").is_none() && v.get("room").is_none(), "{v}");
}

/// `/`: join-room answers with the room's position, and a join carrying
/// `since` replays what the socket missed in that room before live events.
#[tokio::test]
async fn join_room_with_since_replays_on_the_rooms_dialect() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "rec")).await;
    let mut c = connect_ready_positions(node.addr, "/", &admin()).await;
    c.send_json(json!({"type": "join-room", "data": {"roomId": "board"}}))
        .await;
    let joined = c.recv().await;
    assert_eq!(joined["type"], "room-joined");
    let epoch = joined["data"]["epoch"].as_str().expect("epoch").to_string();
    assert_eq!(joined["data"]["offset"], 0);
    publish_n(node.addr, "board", 1, 2).await;
    assert_eq!(read_seq(&mut c, 2).await, vec![(1, 1), (2, 2)]);
    drop(c);
    publish_n(node.addr, "board", 3, 2).await;

    let mut c = connect_ready_positions(node.addr, "/", &admin()).await;
    c.send_json(json!({"type": "join-room", "data": {"roomId": "board", "since": {"epoch": epoch, "offset": 2}}}))
        .await;
    let joined = c.recv().await;
    assert_eq!(
        joined["data"]["recovery"],
        json!({"recovered": true, "missed": 2})
    );
    assert_eq!(joined["data"]["offset"], 4);
    assert_eq!(read_seq(&mut c, 2).await, vec![(3, 3), (4, 4)]);
    publish_n(node.addr, "board", 5, 1).await;
    assert_eq!(read_seq(&mut c, 1).await, vec![(5, 5)]);

    // A malformed since: bad_since, and the join still happens.
    c.send_json(json!({"type": "join-room", "data": {"roomId": "board2", "since": {"epoch": 5}}}))
        .await;
    let e = c.recv().await;
    assert_eq!(
        (e["type"].as_str(), e["data"]["code"].as_str()),
        (Some("error"), Some("bad_since"))
    );
    assert_eq!(c.recv().await["type"], "room-joined");
}

/// Two nodes over Redis: a socket that leaves node A resumes on node B
/// while a publisher keeps publishing; every event arrives once, in order,
/// with no gap between the replay and live delivery.
#[tokio::test]
async fn resume_on_another_node_under_load_has_no_gap_and_no_duplicate() {
    init_tracing();
    let db = TestDb::sqlite();
    let redis = RedisServer::start();
    let a = TestNode::start(config(&db, Some(&redis), "a")).await;
    let b = TestNode::start(config(&db, Some(&redis), "b")).await;
    let path = format!("/ws/driver/orders/?token={}", driver(21, 1));
    let mut c = Client::connect_positions(a.addr, &path).await;
    let hello = c.recv().await;
    assert_eq!(hello["type"], "connection_established");
    let mut pos = rooms_of(&hello);
    assert!(pos.get("driver-21").is_some(), "{pos}");
    c.recv_type("initial_orders").await;

    // A publisher on node B keeps going while the socket hops A → B → A.
    let publisher = {
        let addr = b.addr;
        tokio::spawn(async move {
            let mut conn = HttpConn::open(addr).await;
            for i in 1..=400u64 {
                let (s, body) = conn
                    .publish_body(json!({"room": "driver-21", "type": "seq", "data": {"n": i}}))
                    .await;
                assert_eq!(s, 204, "{body}");
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let mut seen: Vec<u64> = Vec::new();
    let nodes = [b.addr, a.addr, b.addr];
    for hop in nodes {
        // Read a while, then leave and come back elsewhere with `since`.
        for _ in 0..60 {
            match c.next_seen(Duration::from_secs(5)).await {
                Some(Seen::Json(v)) if v["type"] == "seq" => {
                    let n = v["n"]
                        .as_u64()
                        .unwrap_or_else(|| v["data"]["n"].as_u64().unwrap());
                    seen.push(n);
                    pos["driver-21"]["offset"] = v["offset"].clone();
                }
                Some(Seen::Json(_)) => {}
                _ => break,
            }
        }
        drop(c);
        c = Client::connect_positions(hop, &format!("{path}&since={}", since(&pos))).await;
        let hello = c.recv().await;
        assert_eq!(
            recovery_of(&hello)["driver-21"]["recovered"],
            true,
            "{hello}"
        );
    }
    publisher.await.unwrap();
    loop {
        match c.next_seen(Duration::from_secs(2)).await {
            Some(Seen::Json(v)) if v["type"] == "seq" => {
                seen.push(
                    v["n"]
                        .as_u64()
                        .unwrap_or_else(|| v["data"]["n"].as_u64().unwrap()),
                );
            }
            Some(Seen::Json(_)) => {}
            _ => break,
        }
    }
    let want: Vec<u64> = (1..=400).collect();
    assert_eq!(seen, want, "every event once, in order, across three hops");
}

/// A socket that resumed just before Redis restarted empty holds a floor at
/// its room's old offset (frames at or below it are what the replay gave
/// it). The new epoch's offsets start over below that floor: the node tells
/// the socket's outbox the epoch changed, so they are delivered, not
/// dropped as already seen until the next ping.
#[tokio::test]
async fn a_socket_resumed_before_redis_restarts_gets_the_new_epoch() {
    init_tracing();
    let mut redis = RedisServer::start();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, Some(&redis), "floor")).await;
    node.wait_ready(true).await;
    let path = format!("/?token={}", user(7));
    let mut c = Client::connect_positions(node.addr, &path).await;
    let hello = c.recv().await;
    let epoch = rooms_of(&hello)["user-7"]["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    publish_n(node.addr, "user-7", 1, 5).await;
    assert_eq!(read_seq(&mut c, 5).await.len(), 5);
    drop(c);
    publish_n(node.addr, "user-7", 6, 2).await;
    let pos = json!({"user-7": {"epoch": epoch, "offset": 5}});
    let mut c =
        Client::connect_positions(node.addr, &format!("{path}&since={}", since(&pos))).await;
    let hello = c.recv().await;
    assert_eq!(
        recovery_of(&hello)["user-7"],
        json!({"recovered": true, "missed": 2})
    );
    assert_eq!(read_seq(&mut c, 2).await, vec![(6, 6), (7, 7)]);

    redis.kill();
    node.wait_ready(false).await;
    redis.restart();
    node.wait_ready(true).await;
    // The first publish after the restart may meet a dead pooled
    // connection (503, retry later), as a client would retry.
    let mut tries = 0;
    loop {
        let body = json!({"room": "user-7", "type": "seq", "data": {"n": 100}});
        let (s, b) = publish_body(node.addr, body).await;
        if s == 204 {
            break;
        }
        tries += 1;
        assert!(tries < 20, "publish refused after the restart: {s} {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = read_seq(&mut c, 1).await;
    assert_eq!(got[0].0, 100, "{got:?}");
    assert!(
        got[0].1 <= 2,
        "a new epoch's offset, below the old floor of 7: {got:?}"
    );
}
