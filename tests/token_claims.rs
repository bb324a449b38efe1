//! SPEC §2 tokens on real nodes: `nbf`, `token_type`, and the claims
//! mapping (`JWT_*_CLAIM`, `JWT_ROLE_MAP`, `JWT_DEFAULT_ROLE`), on sockets
//! (4001) and the HTTP API (401), on SQLite and PostgreSQL.

mod common;

use common::*;
use serde_json::json;
use switchboard::config::ClaimMapping;

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A stock Django simplejwt access token: no role at all.
fn simplejwt(user_id: i64, token_type: &str) -> String {
    token(json!({"user_id": user_id, "token_type": token_type, "jti": "8f2c", "exp": now() + 600}))
}

async fn refused_4001(addr: std::net::SocketAddr, path: &str, tok: &str, what: &str) {
    let mut c = Client::connect(addr, &format!("{path}?token={tok}")).await;
    let first = c.recv().await;
    let ty = first["type"].as_str().unwrap_or_default().to_lowercase();
    assert_eq!(ty, "error", "{what}: {first}");
    assert_eq!(c.closed().await, 4001, "{what}");
}

async fn stock_tokens_with_default_driver_role(db: TestDb) {
    let mut c = config(&db, None, "claims");
    c.claims = ClaimMapping {
        default_role: "driver".into(),
        ..ClaimMapping::default()
    };
    let node = TestNode::start(c).await;
    // The stock access token opens the driver socket as driver 41.
    let mut d = Client::connect(
        node.addr,
        &format!("/ws/driver/orders/{}", simplejwt(41, "access")),
    )
    .await;
    let hello = d.recv().await;
    assert_eq!(hello["type"], "connection_established", "{hello}");
    assert_eq!(hello["driver_id"], 41, "{hello}");
    // It works on the driver HTTP API too.
    let (s, b) = call(
        node.addr,
        "GET",
        "/api/driver/orders",
        &simplejwt(41, "access"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");

    // The refresh token of the same user is refused: 4001 and 401.
    let refresh = simplejwt(41, "refresh");
    refused_4001(
        node.addr,
        "/ws/driver/orders/",
        &refresh,
        "refresh on driver",
    )
    .await;
    refused_4001(node.addr, "/ws", &refresh, "refresh on /ws").await;
    let (s, b) = call(node.addr, "GET", "/api/driver/orders", &refresh, None).await;
    assert_eq!(error_code(s, &b, 401), "unauthorized");

    // Not valid before a minute from now: refused; valid since a second ago: fine.
    let early = token(json!({"user_id": 41, "exp": now() + 600, "nbf": now() + 60}));
    refused_4001(node.addr, "/ws/driver/orders/", &early, "nbf in the future").await;
    let (s, b) = call(node.addr, "GET", "/api/driver/orders", &early, None).await;
    assert_eq!(error_code(s, &b, 401), "unauthorized");
    let ok = token(json!({"user_id": 41, "exp": now() + 600, "nbf": now() - 1}));
    let (s, b) = call(node.addr, "GET", "/api/driver/orders", &ok, None).await;
    assert_eq!(s, 200, "{b}");
}
db_variants!(
    stock_simplejwt_tokens_refresh_and_nbf,
    crate::stock_tokens_with_default_driver_role
);

async fn nested_role_claim_through_the_role_map(db: TestDb) {
    let mut c = config(&db, None, "claims");
    c.claims = ClaimMapping {
        user: Some(vec!["uid".into()]),
        role: Some(vec!["realm".into(), "roles".into()]),
        city: Some(vec!["realm".into(), "cities".into()]),
        role_map: vec![
            ("Staff".into(), "manager".into()),
            ("Driver".into(), "driver".into()),
        ],
        default_role: "user".into(),
        ..ClaimMapping::default()
    };
    let node = TestNode::start(c).await;
    // A manager of city 7 through `realm.roles` (an array) and the map.
    let mgr = token(json!({"uid": "31", "realm": {"roles": ["Guest", "Staff"], "cities": [7]}}));
    let mut ws = Client::connect(node.addr, &format!("/?token={mgr}")).await;
    let hello = ws.recv().await;
    assert_eq!(hello["type"], "connected", "{hello}");
    assert_eq!(hello["data"]["role"], "manager", "{hello}");
    assert_eq!(hello["data"]["userId"], 31, "{hello}");
    // It manages city 7 (and only that): it sees nearby drivers there...
    let (s, b) = call(
        node.addr,
        "GET",
        &format!("/api/drivers/nearby?lat={}&lon={}", PICKUP.0, PICKUP.1),
        &mgr,
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // ...and may join city 7's room, not city 8's.
    ws.send_json(json!({"type": "join-room", "roomId": "city-7-orders"}))
        .await;
    assert_eq!(ws.recv().await["type"], "room-joined");
    // A string role claim maps too: the driver endpoint accepts it.
    let drv = token(json!({"uid": 32, "realm": {"roles": "Driver"}}));
    let mut d = Client::connect(node.addr, &format!("/ws/driver/orders/?token={drv}")).await;
    assert_eq!(d.recv().await["type"], "connection_established");
    // Without a mapped role it is a user: the driver endpoint says 4003.
    let guest = token(json!({"uid": 33, "realm": {"roles": ["Guest"]}}));
    let mut g = Client::connect(node.addr, &format!("/ws/driver/orders/?token={guest}")).await;
    let _ = g.recv().await;
    assert_eq!(g.closed().await, 4003);
}
db_variants!(
    nested_role_claim_maps,
    crate::nested_role_claim_through_the_role_map
);
