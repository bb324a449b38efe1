//! Slow consumers and keepalive

use std::time::Duration;

use serde_json::json;

use crate::common::*;
use crate::{ENDPOINTS, member};

#[tokio::test]
async fn a_reader_that_falls_behind_gets_its_backlog_in_order() {
    init_tracing();
    let db = TestDb::sqlite();
    // The backlog may hold all of it (SEND_QUEUE_BYTES defaults to 4 MiB).
    let mut cfg = config(&db, None, "backlog");
    cfg.send_queue_bytes = 64 * 1024 * 1024;
    let node = TestNode::start(cfg).await;
    let mut lagging = Client::connect_parked(node.addr, &format!("/?token={}", admin()), 1).await;
    // 400 × 40 KB = 16 MB: more than loopback's socket buffers take, so
    // most of it waits in the server's backlog (under SEND_QUEUE_LEN frames
    // and SEND_QUEUE_BYTES) until the client reads again.
    let n = 400;
    let pad = "b".repeat(40_000);
    let mut http = HttpConn::open(node.addr).await;
    for seq in 0..n {
        let (s, b) = http
            .publish_body(
                json!({"room": "admin-orders", "type": "bulk", "data": {"seq": seq, "pad": pad}}),
            )
            .await;
        assert_eq!(s, 204, "publish {seq} failed: {b}");
    }
    let got = lagging.read_parked(n, Duration::from_secs(20)).await;
    for (i, v) in got.iter().enumerate() {
        assert_eq!(v["data"]["seq"], i, "lost or reordered");
        assert_eq!(v["data"]["pad"].as_str().map(str::len), Some(40_000));
    }
    assert_eq!(node.node().socket_count(), 1, "closed as a slow consumer");
}

#[tokio::test]
async fn a_slow_consumer_is_dropped_while_a_fast_one_gets_everything() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "slow");
    cfg.send_queue_len = 16;
    let node = TestNode::start(cfg).await;
    // Never reads after its `connected` message.
    let mut slow = Client::connect_parked(node.addr, &format!("/?token={}", admin()), 1).await;
    let mut fast = connect_ready(node.addr, "/", &admin()).await;
    assert_eq!(node.node().socket_count(), 2);

    let pad = "p".repeat(4096);
    let mut http = HttpConn::open(node.addr).await;
    let mut sent = 0u64;
    let mut received = 0u64;
    // At least 2000 publishes of ~4 KiB; more if the kernel buffers of the
    // slow socket have not filled yet (they are sized by the kernel).
    while sent < 2000 || (node.node().socket_count() > 1 && sent < 20_000) {
        let (s, b) = http
            .publish_body(
                json!({"room": "admin-orders", "type": "tick", "data": {"seq": sent, "pad": pad}}),
            )
            .await;
        assert_eq!(s, 204, "publish {sent} failed: {b}");
        sent += 1;
        // Read as we go, so the fast reader is never the slow one.
        while let Some(Seen::Json(v)) = fast.next_seen(Duration::ZERO).await {
            assert_eq!(
                v["data"]["seq"], received,
                "fast client lost or reordered a message"
            );
            received += 1;
        }
    }
    while received < sent {
        let v = fast.recv().await;
        assert_eq!(
            v["data"]["seq"], received,
            "fast client lost or reordered a message"
        );
        received += 1;
    }
    assert_eq!(received, sent);
    // The slow socket is gone on the server, counted in the metric, and its
    // TCP connection ends once the client reads what was buffered.
    let deadline = std::time::Instant::now() + WAIT;
    while node.node().socket_count() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "slow socket not closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, metrics) = http.request("GET", "/metrics", &[], None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    let slow_total = metric_value(
        &metrics,
        "switchboard_slow_consumers_total{dialect=\"rooms\"}",
    );
    assert!(
        slow_total.is_some_and(|n| n >= 1.0),
        "switchboard_slow_consumers_total not counted:\n{metrics}"
    );
    let (frames, ended) = slow.drain_parked(WAIT).await;
    assert!(ended, "the slow socket's connection did not end");
    assert!(
        (frames as u64) < sent,
        "the slow socket got everything: not slow"
    );
    // The fast one is still fine.
    fast.send_json(json!({"type": "ping"})).await;
    assert_eq!(fast.recv().await, json!({"type": "pong"}));
}

#[tokio::test]
async fn server_keepalive_closes_silent_sockets_4000_and_keeps_ponging_ones() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "keepalive");
    cfg.ping_interval = Duration::from_millis(300);
    let node = TestNode::start(cfg).await;
    let silent_opts = ClientOpts {
        auto_pong: false,
        ..ClientOpts::default()
    };
    let mut silent = Vec::new();
    let mut ponging = Vec::new();
    for (dialect, path) in ENDPOINTS {
        let (tok, _) = member(dialect);
        let p = format!("{path}?token={tok}");
        silent.push((
            path,
            Client::connect_with(node.addr, &p, &[], silent_opts).await,
        ));
        ponging.push((path, connect_ready(node.addr, path, &tok).await));
    }
    for (path, c) in &mut silent {
        assert_eq!(c.closed().await, 4000, "{path}");
    }
    // Several ping intervals later the ponging sockets are still open.
    for (path, c) in &mut ponging {
        c.silent_for(Duration::from_millis(300)).await;
        c.send_json(json!({"type": "ping"})).await;
        assert_eq!(c.recv().await, json!({"type": "pong"}), "{path}");
    }
    assert_eq!(node.node().socket_count(), 3);
}
