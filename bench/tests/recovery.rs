//! SPEC §10 proved by counting: `loadgen recovery` with 1200 sockets over
//! the three dialects and 3 nodes, 3 publishers, once with a node SIGKILLed
//! and once with a rolling restart (SIGTERM, drain, 1012, restart). Every
//! event a publisher got 204 for must reach every socket in its rooms
//! exactly once and in order per room, every resumed room must say
//! `recovered: true`, and the fault must really have happened.
//!
//! The loadgen starts `switchboard` found beside it in the same target dir;
//! `cargo test --workspace --all-targets` builds both first. Rates are
//! chosen for a debug build on 2 cores: each run takes about 15 s.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

/// One scenario at a time: each runs 3 nodes and a thousand sockets.
static SERIAL: Mutex<()> = Mutex::new(());

const SOCKETS: u64 = 1200;

fn run(fault: &str) -> Value {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let loadgen = env!("CARGO_BIN_EXE_loadgen");
    let server = Path::new(loadgen).with_file_name("switchboard");
    assert!(
        server.exists(),
        "{} is missing: build the workspace (cargo test --workspace --all-targets builds it)",
        server.display()
    );
    let out = Command::new(loadgen)
        .args(["recovery", "--nodes", "3", "--publishers", "3"])
        .args(["--sockets", &SOCKETS.to_string(), "--group-size", "20"])
        .args(["--rate", "150", "--secs", "8", "--fault", fault])
        .args(["--max-secs", "100"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("loadgen runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
    assert!(
        out.status.success(),
        "loadgen recovery --fault {fault} failed ({}):\n{stdout}\nstderr (last lines, newest first):\n{}",
        out.status,
        tail.join("\n")
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in:\n{stdout}"));
    let v: Value = serde_json::from_str(line).expect("the JSON line parses");
    println!("{stdout}");
    v
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// What both faults must show.
fn check_counts(v: &Value) {
    assert_eq!(n(v, "sockets"), SOCKETS);
    for d in ["/", "/ws", "/ws/driver/orders/"] {
        assert_eq!(v["dialects"][d].as_u64(), Some(SOCKETS / 3), "{d}: {v}");
    }
    assert!(n(v, "events_acknowledged") > 500, "too few events: {v}");
    assert!(
        n(v, "deliveries_expected") > 10 * n(v, "events_acknowledged"),
        "{v}"
    );
    assert_eq!(n(v, "delivered"), n(v, "deliveries_expected"), "{v}");
    assert_eq!(n(v, "lost"), 0, "{v}");
    assert_eq!(n(v, "duplicated"), 0, "{v}");
    assert_eq!(n(v, "out_of_order"), 0, "{v}");
    assert_eq!(n(v, "misrouted"), 0, "{v}");
    assert_eq!(n(v, "bad_frames"), 0, "{v}");
    assert_eq!(n(v, "not_recovered"), 0, "{v}");
    assert_eq!(v["quiet"], true, "{v}");
    // The fault happened: every socket of the faulted node(s) reconnected,
    // resumed its rooms, and some of them had missed events replayed.
    let faulted = n(v, "sockets_on_faulted_nodes");
    assert!(faulted >= SOCKETS / 3 - 10, "too few sockets hit: {v}");
    assert!(n(v, "reconnects") >= faulted, "{v}");
    assert!(n(v, "recovered") >= 2 * faulted, "{v}");
    assert!(n(v, "replayed") > 0, "nothing was replayed: {v}");
}

#[test]
fn a_killed_node_loses_nothing() {
    let v = run("kill");
    check_counts(&v);
    assert_eq!(n(&v, "nodes_faulted"), 1, "{v}");
    // SIGKILL: no close frame, the connections just end.
    assert!(
        v["closes"]["1006"].as_u64() >= Some(n(&v, "sockets_on_faulted_nodes")),
        "{v}"
    );
}

#[test]
fn a_rolling_restart_loses_nothing() {
    let v = run("rolling");
    check_counts(&v);
    assert_eq!(n(&v, "nodes_faulted"), 3, "{v}");
    assert_eq!(n(&v, "stuck"), 0, "a node did not exit after SIGTERM: {v}");
    // Every socket was drained at least once (its node restarted), with 1012.
    assert!(n(&v, "sockets_on_faulted_nodes") >= SOCKETS, "{v}");
    assert!(v["closes"]["1012"].as_u64() >= Some(SOCKETS), "{v}");
}

/// A known server duplicate, found by `loadgen recovery --joined-cross-rooms`
/// and pinned here step by step (ignored until the server handles it; run
/// with `cargo test -p switchboard-bench --test recovery -- --ignored`).
///
/// On `/` a socket is put in its auto rooms at connect and in any other
/// room only by its `join-room` after the connect message. An event
/// published to `[joined room, personal room]` then reaches a resuming
/// socket twice:
/// 1. the old connection got it through the joined room (the first of its
///    rooms), so the client's position in its personal room did not move;
/// 2. the new connection's `since` names the personal room at that older
///    position: the connect replays the event through the personal room,
///    since the socket is not in the joined room yet (`send_replay` looks
///    at the rooms the socket is in at that moment);
/// 3. likewise an event published between the connect message and the
///    `join-room` arrives live through the personal room, and then the
///    `join-room` with `since` replays it through the joined room.
#[tokio::test]
#[ignore = "known server duplicate: see the comment"]
async fn rejoined_room_and_personal_room_deliver_an_event_once() {
    use std::time::Duration;
    use switchboard_client::{Incoming, Socket};
    use switchboard_testkit::{NodeProcess, RedisServer, http, mint};

    const SECRET: &str = "recovery-test-secret-0123456789abcdef";
    let server = Path::new(env!("CARGO_BIN_EXE_loadgen")).with_file_name("switchboard");
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    let node = NodeProcess::launch(&server)
        .envs(&[
            ("REDIS_URL", redis.url()),
            ("DATABASE_URL", db),
            ("JWT_SECRET", SECRET.to_string()),
            ("API_KEYS", "k".to_string()),
        ])
        .wait_ready()
        .start()
        .await;
    let token = mint(
        SECRET.as_bytes(),
        serde_json::json!({"sub": 1, "role": "admin"}),
    );
    async fn next(s: &mut Socket) -> Value {
        match tokio::time::timeout(Duration::from_secs(5), s.recv()).await {
            Ok(Some(Incoming::Text(b))) => serde_json::from_slice(&b).expect("json"),
            other => panic!("expected a message, got {other:?}"),
        }
    }
    /// Every message that arrives within `ms`.
    async fn rest(s: &mut Socket, ms: u64) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(Some(Incoming::Text(b))) =
            tokio::time::timeout(Duration::from_millis(ms), s.recv()).await
        {
            out.push(serde_json::from_slice(&b).expect("json"));
        }
        out
    }
    let publish = |n: u64| {
        let body =
            serde_json::json!({"rooms": ["driver-9", "user-1"], "type": "x", "data": {"n": n}});
        async move {
            let (status, _) = http(
                node.addr,
                "POST",
                "/api/publish",
                &[("x-api-key", "k")],
                Some(body.to_string()),
            )
            .await
            .expect("publish");
            assert_eq!(status, 204);
        }
    };
    let join = |since: Option<Value>| {
        let mut data = serde_json::json!({"roomId": "driver-9"});
        if let Some(s) = since {
            data["since"] = s;
        }
        serde_json::json!({"type": "join-room", "data": data}).to_string()
    };

    // First connection: positions, join, event 1 through driver-9.
    let mut s = Socket::connect(node.addr, &format!("/?token={token}"), None, 64)
        .await
        .expect("connect");
    let connected = next(&mut s).await;
    let rooms = connected["data"]["rooms"].clone();
    s.send_text(&join(None)).await.expect("send");
    let joined = next(&mut s).await;
    assert_eq!(joined["type"], "room-joined");
    publish(1).await;
    let got = next(&mut s).await;
    assert_eq!(
        (got["room"].as_str(), got["data"]["n"].as_u64()),
        (Some("driver-9"), Some(1))
    );
    let driver9 = serde_json::json!({"epoch": joined["data"]["epoch"], "offset": got["offset"]});
    drop(s);

    // Resume: since for the auto rooms at the positions seen (user-1 did not
    // move: event 1 came through driver-9), then event 2 before the join.
    use base64::Engine;
    let since = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rooms.to_string());
    let mut s = Socket::connect(
        node.addr,
        &format!("/?token={token}&since={since}"),
        None,
        64,
    )
    .await
    .expect("reconnect");
    let connected = next(&mut s).await;
    assert_eq!(connected["data"]["recovery"]["user-1"]["recovered"], true);
    let mut events = rest(&mut s, 300).await;
    publish(2).await;
    events.extend(rest(&mut s, 300).await);
    s.send_text(&join(Some(driver9))).await.expect("send");
    events.extend(rest(&mut s, 500).await);
    let seen: Vec<(u64, String)> = events
        .iter()
        .filter(|v| v["type"] == "x")
        .map(|v| {
            (
                v["data"]["n"].as_u64().unwrap_or(0),
                v["room"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    // Wanted: event 2 once. Today: [(1, "user-1"), (2, "user-1"), (2, "driver-9")].
    assert_eq!(
        seen.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        vec![2],
        "events after the resume (event, room): {seen:?}"
    );
}
