//! Bonus balances under concurrency: completions credit once per order,
//! debits never take a balance below zero, and the user hears about every
//! change exactly once. Two nodes, one Redis, SQLite and PostgreSQL.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use futures_util::future::join_all;
use serde_json::{Value, json};

const USER: i64 = 77;
/// 1000 at BONUS_RATE 0.05.
const TOTAL: f64 = 1000.0;
const EARNED: f64 = 50.0;
const DEBIT: f64 = 20.0;
/// Orders completed before the race, and during it.
const FUNDED_BEFORE: usize = 2;
const RACED: usize = 4;
const PATCHES_PER_ORDER: usize = 5;
const DEBITS: usize = 30;

enum Outcome {
    Completed(i64, u16, Value),
    Debited(u16, Value),
}

async fn concurrent_debits_and_credits(db: TestDb) {
    let redis = RedisServer::start();
    let mut nodes = Vec::new();
    for id in ["b1", "b2"] {
        let mut c = config(&db, Some(&redis), id);
        c.bonus_rate = 0.05;
        let n = TestNode::start(c).await;
        n.wait_ready(true).await;
        nodes.push(n);
    }
    let addrs = [nodes[0].addr, nodes[1].addr];
    let mut ws = connect_ready(addrs[0], "/", &user(USER)).await;

    let mut orders = Vec::new();
    for i in 0..FUNDED_BEFORE + RACED {
        let o = create_order(
            addrs[i % 2],
            &admin(),
            json!({"city_id": 1, "user_id": USER, "total": TOTAL}),
        )
        .await;
        assert_eq!(o["bonuses_earned"], json!(EARNED as i64), "{o}");
        orders.push(id_of(&o));
    }
    for &id in &orders[..FUNDED_BEFORE] {
        let (s, b) = call(
            addrs[0],
            "PATCH",
            &format!("/api/orders/{id}"),
            &admin(),
            Some(json!({"status": "completed"})),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    let (s, me) = call(addrs[1], "GET", "/api/bonuses/me", &user(USER), None).await;
    assert_eq!(s, 200, "{me}");
    assert_eq!(me["balance"], json!((EARNED * FUNDED_BEFORE as f64) as i64));

    // The race: 20 completions of 4 orders (5 each) and 30 debits of 20
    // against a balance that ends at most at 300, all at once on two nodes.
    let raced: Vec<i64> = orders[FUNDED_BEFORE..].to_vec();
    let mut completions = Vec::new();
    for _ in 0..PATCHES_PER_ORDER {
        completions.extend(&raced);
    }
    // Interleaved (two completions, three debits, …) so both are in flight
    // together.
    let mut jobs: Vec<Option<i64>> = Vec::new();
    let mut pending = completions.iter();
    while jobs.len() < completions.len() + DEBITS {
        jobs.extend(pending.next().map(|id| Some(*id)));
        jobs.extend(pending.next().map(|id| Some(*id)));
        for _ in 0..3 {
            if jobs.iter().filter(|j| j.is_none()).count() < DEBITS {
                jobs.push(None);
            }
        }
    }
    assert_eq!(jobs.len(), 50);
    let mut handles = Vec::new();
    for (k, job) in jobs.into_iter().enumerate() {
        let addr = addrs[k % 2];
        handles.push(tokio::spawn(async move {
            match job {
                Some(id) => {
                    let (s, b) = call(
                        addr,
                        "PATCH",
                        &format!("/api/orders/{id}"),
                        &admin(),
                        Some(json!({"status": "completed"})),
                    )
                    .await;
                    Outcome::Completed(id, s, b)
                }
                None => {
                    let (s, b) = call(
                        addr,
                        "POST",
                        "/api/orders",
                        &user(USER),
                        Some(json!({"city_id": 1, "total": 100, "bonuses_used": DEBIT})),
                    )
                    .await;
                    Outcome::Debited(s, b)
                }
            }
        }));
    }
    let outcomes: Vec<Outcome> = join_all(handles)
        .await
        .into_iter()
        .map(|r| r.expect("request task"))
        .collect();

    let mut completed: HashMap<i64, usize> = HashMap::new();
    let mut debit_orders = Vec::new();
    for o in &outcomes {
        match o {
            Outcome::Completed(id, 200, b) => {
                assert_eq!(b["status"], "completed", "{b}");
                *completed.entry(*id).or_default() += 1;
            }
            Outcome::Completed(_, s, b) => {
                assert_eq!(error_code(*s, b, 409), "conflict");
            }
            Outcome::Debited(201, b) => {
                assert_eq!(b["bonuses_used"], json!(DEBIT as i64), "{b}");
                debit_orders.push(id_of(b));
            }
            Outcome::Debited(s, b) => {
                assert_eq!(error_code(*s, b, 422), "insufficient_bonuses");
            }
        }
    }
    for id in &raced {
        assert_eq!(
            completed.get(id),
            Some(&1),
            "order {id}: one completion wins"
        );
    }
    let credits = EARNED * (FUNDED_BEFORE + RACED) as f64;
    let debited = DEBIT * debit_orders.len() as f64;
    eprintln!("{} of {DEBITS} debits went through", debit_orders.len());
    assert!(
        !debit_orders.is_empty() && debit_orders.len() < DEBITS,
        "the race must both grant and refuse debits"
    );
    assert!(debited <= credits);

    // The balance is exactly credits − debits; the operations agree.
    let (s, me) = call(
        addrs[1],
        "GET",
        "/api/bonuses/me?limit=200",
        &user(USER),
        None,
    )
    .await;
    assert_eq!(s, 200, "{me}");
    let balance = me["balance"].as_f64().unwrap();
    assert_eq!(balance, credits - debited, "{me}");
    assert!(balance >= 0.0);
    let ops = me["items"].as_array().unwrap();
    assert!(me["next_cursor"].is_null(), "{me}");
    let mut earned: Vec<i64> = ops
        .iter()
        .filter(|o| o["type"] == "earned")
        .map(|o| o["order_id"].as_i64().unwrap())
        .collect();
    earned.sort();
    assert_eq!(earned, orders, "exactly one `earned` per completed order");
    let mut used: Vec<i64> = ops
        .iter()
        .filter(|o| o["type"] == "used")
        .map(|o| o["order_id"].as_i64().unwrap())
        .collect();
    used.sort();
    debit_orders.sort();
    assert_eq!(used, debit_orders, "one `used` per successful debit");
    assert_eq!(ops.len(), earned.len() + used.len(), "{me}");
    for o in ops {
        assert!(o["balance_after"].as_f64().unwrap() >= 0.0, "{o}");
        let want = if o["type"] == "earned" { EARNED } else { DEBIT };
        assert_eq!(o["amount"], json!(want as i64), "{o}");
    }
    // Nothing else moved the balance.
    let conn = db_conn(&db).await;
    assert_eq!(
        scalar(
            &conn,
            &format!("SELECT count(*) FROM bonus_operations WHERE user_id = {USER}")
        )
        .await,
        ops.len() as i64
    );

    // The user's socket heard of each change once, in seed 002's shape, with
    // the balance each operation left.
    let msgs = collect_for(&mut ws, Duration::from_millis(500)).await;
    let bonus: Vec<&Value> = of_type(&msgs, "bonus-updated");
    assert_eq!(bonus.len(), ops.len(), "{bonus:?}");
    let mut from_events: Vec<(String, i64, i64)> = Vec::new();
    for m in &bonus {
        let d = &m["data"];
        let keys: Vec<&str> = d.as_object().unwrap().keys().map(String::as_str).collect();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, ["balance", "operation", "timestamp"], "{m}");
        assert!(d["balance"].is_number(), "{m}");
        assert!(d["balance"].as_f64().unwrap() >= 0.0, "{m}");
        let op = &d["operation"];
        let mut op_keys: Vec<&str> = op.as_object().unwrap().keys().map(String::as_str).collect();
        op_keys.sort();
        assert_eq!(op_keys, ["amount", "orderId", "type"], "{m}");
        chrono::DateTime::parse_from_rfc3339(d["timestamp"].as_str().unwrap()).unwrap();
        from_events.push((
            op["type"].as_str().unwrap().to_string(),
            op["orderId"].as_i64().unwrap(),
            (d["balance"].as_f64().unwrap() * 100.0).round() as i64,
        ));
    }
    let mut from_ops: Vec<(String, i64, i64)> = ops
        .iter()
        .map(|o| {
            (
                o["type"].as_str().unwrap().to_string(),
                o["order_id"].as_i64().unwrap(),
                (o["balance_after"].as_f64().unwrap() * 100.0).round() as i64,
            )
        })
        .collect();
    from_events.sort();
    from_ops.sort();
    assert_eq!(from_events, from_ops, "events match the operations");
    let last_balance = (balance * 100.0).round() as i64;
    assert!(
        from_ops.iter().any(|(_, _, b)| *b == last_balance),
        "some operation left the final balance"
    );

    // Retrying a completion later still does not credit again.
    let (s, b) = call(
        addrs[0],
        "PATCH",
        &format!("/api/orders/{}", orders[0]),
        &admin(),
        Some(json!({"status": "completed"})),
    )
    .await;
    assert_eq!(error_code(s, &b, 409), "conflict");
    let (_, me) = call(addrs[0], "GET", "/api/bonuses/me", &user(USER), None).await;
    assert_eq!(me["balance"].as_f64(), Some(balance));
    ws.silent_for(Duration::from_millis(200)).await;
}

db_variants!(
    fifty_concurrent_debits_and_credits,
    crate::concurrent_debits_and_credits
);
