//! Limits against abusive clients (SPEC §11), each over real sockets of a
//! real node: the inbound message rate (rate_limited, then 1008), position
//! coalescing (latest wins), rooms per socket, the send backlog in bytes,
//! sockets per node, and deadlines on a slow HTTP body and a half-sent
//! frame.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fastwebsockets::{Frame, Payload};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn code_of(v: &Value) -> Option<&str> {
    v["payload"]["code"]
        .as_str()
        .or(v["data"]["code"].as_str())
        .or(v["code"].as_str())
}

#[tokio::test]
async fn a_flood_is_dropped_with_rate_limited_then_closed_1008() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "limits");
    cfg.limits.messages_per_sec = 5;
    let node = TestNode::start(cfg).await;
    let mut flooder = connect_ready(node.addr, "/ws", &user(1)).await;
    let mut bystander = connect_ready(node.addr, "/ws", &user(2)).await;

    // A burst of 40 pings: 10 (two seconds' worth) pass, the rest are
    // dropped with one rate_limited error, not one per message.
    for _ in 0..40 {
        flooder.send_json(json!({"type": "ping"})).await;
    }
    let got = collect_for(&mut flooder, Duration::from_millis(500)).await;
    let pongs = got.iter().filter(|v| v["type"] == "pong").count();
    let limited = got
        .iter()
        .filter(|v| code_of(v) == Some("rate_limited"))
        .count();
    assert!((10..=11).contains(&pongs), "{got:?}");
    assert_eq!(limited, 1, "{got:?}");
    // Others are not slowed down.
    bystander.send_json(json!({"type": "ping"})).await;
    assert_eq!(bystander.recv().await["type"], "pong");

    // Kept over the limit for 10 s: closed 1008.
    let start = Instant::now();
    let closed = loop {
        assert!(start.elapsed() < Duration::from_secs(15), "never closed");
        if flooder
            .try_send_frame(Frame::text(Payload::Borrowed(br#"{"type":"ping"}"#)))
            .await
            .is_err()
        {
            break flooder.closed().await;
        }
        if let Some(Seen::Close(code)) = flooder.next_seen(Duration::from_millis(20)).await {
            break code;
        }
    };
    assert_eq!(closed, 1008);
    assert!(
        start.elapsed() >= Duration::from_secs(9),
        "{:?}",
        start.elapsed()
    );
    bystander.send_json(json!({"type": "ping"})).await;
    assert_eq!(bystander.recv().await["type"], "pong");
}

#[tokio::test]
async fn positions_inside_the_interval_coalesce_and_the_latest_arrives() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "limits");
    cfg.limits.location_interval = Duration::from_millis(300);
    let node = TestNode::start(cfg).await;
    let mut watcher = connect_ready(node.addr, "/ws", &admin()).await;
    let d = connect_ready(node.addr, "/ws/driver/orders/", &driver(31, 1)).await;
    for i in 0..20 {
        d.send_json(
            json!({"type": "location", "latitude": 41.0 + f64::from(i) / 100.0, "longitude": 69.2}),
        )
        .await;
    }
    let got = collect_for(&mut watcher, Duration::from_millis(1200)).await;
    let lats: Vec<f64> = got
        .iter()
        .filter(|v| v["type"] == "DRIVER_LOCATION")
        .map(|v| v["payload"]["latitude"].as_f64().unwrap())
        .collect();
    assert!(
        !lats.is_empty() && lats.len() <= 3,
        "20 reports in one interval fan out at most a few times: {lats:?}"
    );
    assert_eq!(lats[0], 41.0, "the first report goes out at once");
    assert_eq!(
        *lats.last().unwrap(),
        41.19,
        "the latest report always arrives: {lats:?}"
    );
}

#[tokio::test]
async fn a_socket_may_be_in_at_most_max_rooms() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "limits");
    cfg.limits.rooms_per_socket = 4;
    let node = TestNode::start(cfg).await;
    // An admin is in admin-orders and user-N at connect: two more fit.
    let mut c = connect_ready(node.addr, "/", &admin()).await;
    for r in ["a", "b"] {
        c.send_json(json!({"type": "join-room", "data": {"roomId": r}}))
            .await;
        assert_eq!(c.recv().await["type"], "room-joined");
    }
    c.send_json(json!({"type": "join-room", "data": {"roomId": "c"}}))
        .await;
    let e = c.recv().await;
    assert_eq!(code_of(&e), Some("too_many_rooms"), "{e}");
    // Leaving one makes room again.
    c.send_json(json!({"type": "leave-room", "data": {"roomId": "a"}}))
        .await;
    assert_eq!(c.recv().await["type"], "room-left");
    c.send_json(json!({"type": "join-room", "data": {"roomId": "c"}}))
        .await;
    assert_eq!(c.recv().await["type"], "room-joined");
}

/// A reader that does not read is closed by the byte cap: with a frame cap
/// (SEND_QUEUE_LEN) too large to matter, 32 KiB frames beyond what the
/// kernel's socket buffers take (about 24 MB on loopback here) and
/// SEND_QUEUE_BYTES close it 4008.
#[tokio::test]
async fn the_send_backlog_is_capped_in_bytes() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "limits");
    cfg.send_queue_bytes = 256 * 1024;
    cfg.send_queue_len = 1_000_000;
    let node = TestNode::start(cfg).await;
    let mut parked = Client::connect_parked(node.addr, &format!("/?token={}", user(5)), 1).await;
    let pad = "p".repeat(32 * 1024);
    let mut conn = HttpConn::open(node.addr).await;
    let mut sent = 0;
    while node.node().socket_count() > 0 {
        assert!(
            sent < 4000,
            "the parked socket was never dropped after {sent} frames"
        );
        let (s, b) = conn
            .publish_body(
                json!({"room": "user-5", "type": "fill", "data": {"pad": pad}, "volatile": true}),
            )
            .await;
        assert_eq!(s, 204, "{b}");
        sent += 1;
    }
    eprintln!("dropped after {sent} frames of 32 KiB");
    let (_, closed) = parked.drain_parked(WAIT).await;
    assert!(closed, "the socket ended");
}

#[tokio::test]
async fn upgrades_over_max_connections_get_503() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "limits");
    cfg.limits.max_connections = 2;
    let node = TestNode::start(cfg).await;
    let _a = connect_ready(node.addr, "/ws", &user(1)).await;
    let _b = connect_ready(node.addr, "/ws", &user(2)).await;
    let tcp = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let refused =
        switchboard_client::handshake(tcp, node.addr, &format!("/ws?token={}", user(3)), &[]).await;
    assert!(refused.is_err(), "a third socket was accepted");
    let m = node.node().render_metrics();
    assert!(
        m.contains("switchboard_upgrades_rejected_total{reason=\"max_connections\"} 1"),
        "{m}"
    );
    drop(_a);
    eventually(WAIT, "room for one more", || async {
        let tcp = tokio::net::TcpStream::connect(node.addr).await.ok()?;
        switchboard_client::handshake(tcp, node.addr, &format!("/ws?token={}", user(3)), &[])
            .await
            .ok()
    })
    .await;
}

/// A body that does not arrive within 10 s: 408 with the error body.
#[tokio::test]
async fn a_slow_http_body_gets_408() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "limits")).await;
    let mut tcp = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let head = format!(
        "POST /api/orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"city_id\"",
        user(1)
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), tcp.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    let took = start.elapsed();
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(15)).contains(&took),
        "{took:?}"
    );
}

/// A frame started and never finished: closed 1008 after 30 s.
#[tokio::test]
async fn a_half_sent_frame_is_closed_1008() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "limits")).await;
    let tcp = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let ws = switchboard_client::handshake(tcp, node.addr, &format!("/ws?token={}", user(1)), &[])
        .await
        .unwrap();
    let mut io = ws.into_inner();
    // The header of a 100-byte masked text frame, and 10 bytes of it.
    let mut raw = vec![0x81u8, 0x80 | 100, 1, 2, 3, 4];
    raw.extend_from_slice(&[b'x'; 10]);
    io.write_all(&raw).await.unwrap();
    let start = Instant::now();
    // Server frames are unmasked: find the close frame and its code.
    let mut buf = Vec::new();
    let code = tokio::time::timeout(Duration::from_secs(45), async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = io.read(&mut chunk).await.unwrap();
            assert!(n > 0, "ended without a close frame");
            buf.extend_from_slice(&chunk[..n]);
            let mut at = 0;
            while at + 2 <= buf.len() {
                let (b0, len) = (buf[at], usize::from(buf[at + 1] & 0x7f));
                let (head, len) = match len {
                    126 if at + 4 <= buf.len() => (
                        4,
                        usize::from(u16::from_be_bytes([buf[at + 2], buf[at + 3]])),
                    ),
                    126 => break,
                    n => (2, n),
                };
                if at + head + len > buf.len() {
                    break;
                }
                if b0 & 0x0f == 0x8 {
                    return u16::from_be_bytes([buf[at + head], buf[at + head + 1]]);
                }
                at += head + len;
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(code, 1008);
    assert!(
        start.elapsed() >= Duration::from_secs(29),
        "{:?}",
        start.elapsed()
    );
}
