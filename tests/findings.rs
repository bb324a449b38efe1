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

/// Words of jsonwebtoken's error kinds and of database drivers that must
/// never reach a client (SPEC §11: details go to the log).
const INTERNAL_WORDS: &[&str] = &[
    "InvalidToken",
    "InvalidSignature",
    "InvalidAlgorithm",
    "Base64",
    "Json",
    "Utf8",
    "MissingRequiredClaim",
    "Error(",
    "no such table",
    "Query Error",
    "sqlx",
    "SQL",
];

fn assert_no_internal_words(text: &str, what: &str) {
    for w in INTERNAL_WORDS {
        assert!(
            !text.contains(w),
            "{what}: {w:?} reached the client: {text}"
        );
    }
}

/// Malformed tokens, each refused by a different check of jsonwebtoken.
fn malformed_tokens() -> Vec<(&'static str, String)> {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    let hs384 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS384),
        &json!({"sub": 1, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let no_exp = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": 1}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    vec![
        ("not a JWT", "not-a-jwt".into()),
        ("bad base64", "a$.b$.c$".into()),
        (
            "header not JSON",
            format!("{}.{}.c2ln", b64("not json"), b64("{}")),
        ),
        (
            "claims not JSON",
            format!("{}.{}.c2ln", b64(r#"{"alg":"HS256"}"#), b64("[1,")),
        ),
        (
            "alg none",
            format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(r#"{"sub":1}"#)),
        ),
        ("wrong algorithm", hs384),
        ("no exp", no_exp),
        ("bad signature", format!("{}x", admin())),
    ]
}

/// A malformed token over a real socket and over HTTP: the client is told
/// "invalid token" in our words, never jsonwebtoken's (`InvalidToken`,
/// `Base64(…)`, `Json(…)`, …), which used to be the 4001 error message and
/// the 401 body verbatim.
#[tokio::test]
async fn jwt_parser_text_never_reaches_clients() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "jwt")).await;
    for (kind, t) in malformed_tokens() {
        let q: String = form_urlencoded_token(&t);
        for path in ["/", "/ws", "/ws/driver/orders/"] {
            let mut c = Client::connect(node.addr, &format!("{path}?token={q}")).await;
            let msg = match c.next_seen(WAIT).await {
                Some(Seen::Json(v)) => v,
                other => panic!("{kind} on {path}: expected an error, got {other:?}"),
            };
            let text = msg.to_string();
            assert_no_internal_words(&text, &format!("{kind} on {path}"));
            assert!(
                text.contains("\"invalid token\""),
                "{kind} on {path}: {text}"
            );
            assert_eq!(c.closed().await, 4001, "{kind} on {path}");
        }
        let (s, body) = http(
            node.addr,
            "GET",
            "/api/orders",
            &[("authorization", &bearer(&t))],
            None,
        )
        .await;
        assert_eq!(error_code(s, &body, 401), "unauthorized", "{kind}");
        assert_eq!(body["error"]["message"], "invalid token", "{kind}: {body}");
    }
}

/// The token as a query value (`+`, `/`, `$` and the like escaped).
fn form_urlencoded_token(t: &str) -> String {
    t.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A database failure (the offers table gone under a running node): the
/// driver socket's `initial_orders` error and the HTTP 500 say "database",
/// not the driver's message (`no such table: offers`), which is logged.
#[tokio::test]
async fn database_error_text_never_reaches_clients() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "dberr")).await;
    let conn = db_conn(&db).await;
    use sea_orm::ConnectionTrait;
    conn.execute_unprepared("DROP TABLE offers").await.unwrap();
    let mut c = Client::connect(node.addr, &format!("/ws/driver/orders/{}", driver(7, 1))).await;
    let mut saw_error = false;
    while let Some(Seen::Json(v)) = c.next_seen(Duration::from_secs(2)).await {
        let text = v.to_string();
        assert_no_internal_words(&text, "driver socket");
        if v["type"] == "error" {
            assert_eq!(v["code"], "internal", "{v}");
            assert_eq!(v["message"], "internal error (database)", "{v}");
            saw_error = true;
            break;
        }
    }
    assert!(
        saw_error,
        "the driver socket got no error for its initial orders"
    );
    let (s, body) = call(node.addr, "GET", "/api/driver/orders", &driver(7, 1), None).await;
    assert_eq!(error_code(s, &body, 500), "internal", "{body}");
    assert_no_internal_words(&body.to_string(), "GET /api/driver/orders");
}
