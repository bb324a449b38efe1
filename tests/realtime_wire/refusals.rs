//! Refusals: bad, expired, missing tokens → one error, close 4001; a
//! non-driver on the driver endpoint → close 4003.

use serde_json::{Value, json};
use switchboard::ws::dialect::Dialect;

use crate::common::*;
use crate::{ENDPOINTS, error_msg, member};

fn bad_tokens() -> Vec<(&'static str, Option<String>, &'static str)> {
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    let other_key = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "1", "role": "admin", "groups": ["Driver"], "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(b"some-other-secret-0123456789"),
    )
    .unwrap();
    let expired = token(json!({
        "sub": "1", "role": "driver", "exp": jsonwebtoken::get_current_timestamp() - 60
    }));
    vec![
        ("bad signature", Some(other_key), "invalid token"),
        ("expired", Some(expired), "token expired"),
        ("garbage", Some("not-a-jwt".into()), "invalid token"),
        ("missing", None, "missing token"),
    ]
}

/// Expects exactly one message, `want`, then a close frame with `code`.
async fn expect_refusal(c: &mut Client, want: &Value, code: u16, what: &str) {
    match c.next_seen(WAIT).await {
        Some(Seen::Json(v)) => assert_eq!(&v, want, "{what}"),
        other => panic!("{what}: expected an error message, got {other:?}"),
    }
    match c.next_seen(WAIT).await {
        Some(Seen::Close(got)) => assert_eq!(got, code, "{what}"),
        other => panic!("{what}: expected close {code}, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_expired_and_missing_tokens_get_an_error_then_4001_everywhere() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "auth")).await;
    let mut checked = 0;
    for (dialect, path) in ENDPOINTS {
        for (kind, tok, message) in bad_tokens() {
            let want = error_msg(dialect, "unauthorized", message);
            // In the query.
            let p = match &tok {
                Some(t) => format!("{path}?token={t}"),
                None => path.to_string(),
            };
            let mut c = Client::connect(node.addr, &p).await;
            expect_refusal(
                &mut c,
                &want,
                4001,
                &format!("{kind} token in the query of {p}"),
            )
            .await;
            // In `Authorization: Bearer`.
            let header = tok.as_ref().map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> = header
                .iter()
                .map(|h| ("authorization", h.as_str()))
                .collect();
            let mut c =
                Client::connect_with(node.addr, path, &headers, ClientOpts::default()).await;
            expect_refusal(
                &mut c,
                &want,
                4001,
                &format!("{kind} bearer token on {path}"),
            )
            .await;
            checked += 2;
            // In the driver path, with and without the trailing slash.
            if let (Dialect::Driver, Some(t)) = (dialect, &tok) {
                for p in [format!("{path}{t}"), format!("{path}{t}/")] {
                    let mut c = Client::connect(node.addr, &p).await;
                    expect_refusal(&mut c, &want, 4001, &format!("{kind} token in path {p}")).await;
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 3 * 4 * 2 + 3 * 2);

    // The same places with a good token connect: the refusals above were
    // about the token, not about where it was put.
    for (dialect, path) in ENDPOINTS {
        let (good, _) = member(dialect);
        let first_type = match dialect {
            Dialect::Rooms => "connected",
            Dialect::Events => "CONNECTED",
            Dialect::Driver => "connection_established",
        };
        let bearer = format!("Bearer {good}");
        let mut places = vec![
            Client::connect(node.addr, &format!("{path}?token={good}")).await,
            Client::connect_with(
                node.addr,
                path,
                &[("authorization", bearer.as_str())],
                ClientOpts::default(),
            )
            .await,
        ];
        if dialect == Dialect::Driver {
            places.push(Client::connect(node.addr, &format!("{path}{good}")).await);
            places.push(Client::connect(node.addr, &format!("{path}{good}/")).await);
            places
                .push(Client::connect(node.addr, &format!("/ws/driver/orders?token={good}")).await);
        }
        for c in &mut places {
            assert_eq!(c.recv().await["type"], first_type, "{path}");
        }
    }
}

#[tokio::test]
async fn non_drivers_on_the_driver_endpoint_are_closed_4003() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "forbid")).await;
    let want = error_msg(
        Dialect::Driver,
        "forbidden",
        "the driver endpoint is for drivers only",
    );
    for (who, tok) in [
        ("user", user(3)),
        ("admin", admin()),
        ("manager", manager(4, &[1])),
    ] {
        let bearer = format!("Bearer {tok}");
        let mut c = Client::connect(node.addr, &format!("/ws/driver/orders/?token={tok}")).await;
        expect_refusal(&mut c, &want, 4003, &format!("{who} in the query")).await;
        let mut c = Client::connect(node.addr, &format!("/ws/driver/orders/{tok}")).await;
        expect_refusal(&mut c, &want, 4003, &format!("{who} in the path")).await;
        let mut c = Client::connect_with(
            node.addr,
            "/ws/driver/orders/",
            &[("authorization", bearer.as_str())],
            ClientOpts::default(),
        )
        .await;
        expect_refusal(&mut c, &want, 4003, &format!("{who} as bearer")).await;
    }
    // A driver is let in (and a user on the other endpoints).
    connect_ready(node.addr, "/ws/driver/orders/", &driver(3, 1)).await;
    connect_ready(node.addr, "/", &user(3)).await;
}
