//! Findings of the security read (issue 14), each reproduced: the dev-token
//! endpoint and DNS rebinding, a publish naming a room twice.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use switchboard::config::JwtKey;

/// Dev mode hands its admin token only to a loopback peer that asked for a
/// loopback host: a rebinding page (`Host: evil.example` resolving to
/// 127.0.0.1) gets a 404.
#[tokio::test]
async fn the_dev_token_checks_the_host_header() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "dev");
    cfg.jwt_key = JwtKey::Secret {
        secret: b"made-up-at-start-0123456789abcdef".to_vec(),
        generated: true,
    };
    let node = TestNode::start(cfg).await;
    let port = node.addr.port();
    for (host, want) in [
        (format!("evil.example:{port}"), 404),
        ("evil.example".to_string(), 404),
        (format!("127.0.0.1.nip.example:{port}"), 404),
        (format!("localhost:{port}"), 200),
        (format!("127.0.0.1:{port}"), 200),
        (format!("[::1]:{port}"), 200),
    ] {
        let (s, body) = http_raw(
            node.addr,
            "GET",
            "/dashboard/dev-token",
            &[("host", &host)],
            None,
        )
        .await;
        assert_eq!(s, want, "Host: {host}: {}", String::from_utf8_lossy(&body));
    }
}

/// `/api/publish` with rooms `[admin-orders, user-1, admin-orders]`: a socket
/// in both rooms gets the event once (it used to get it twice).
#[tokio::test]
async fn a_publish_naming_a_room_twice_delivers_once() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "pub")).await;
    // An admin with sub 1 is in admin-orders and user-1.
    let mut c = connect_ready(node.addr, "/ws", &admin()).await;
    let (s, b) = publish_body(
        node.addr,
        json!({"rooms": ["admin-orders", "user-1", "admin-orders"], "type": "twice", "data": {}}),
    )
    .await;
    assert_eq!(s, 204, "{b}");
    assert_eq!(c.recv().await["type"], "twice");
    c.silent_for(Duration::from_millis(300)).await;
}
