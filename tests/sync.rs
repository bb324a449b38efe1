//! Sync with the external system: a real HTTP server on loopback that the
//! test makes succeed, fail with 500, refuse, or hang; real nodes; SQLite
//! and PostgreSQL.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

const OK: u8 = 0;
const FAIL: u8 = 1;
const HANG: u8 = 2;

/// One request the external system received.
#[derive(Debug, Clone)]
struct Received {
    key: String,
    body: Value,
}

/// The external system: answers per `mode`, records every request, and
/// tracks how many requests per Idempotency-Key are in flight at once.
struct External {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    /// Fail this many requests first, then obey `mode`.
    fail_first: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<Received>>>,
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
    max_in_flight_same_key: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for External {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl External {
    async fn start(delay: Duration) -> External {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(OK));
        let fail_first = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(Mutex::new(HashMap::new()));
        let max_same = Arc::new(AtomicUsize::new(0));
        let (m, f, r, inf, mx) = (
            mode.clone(),
            fail_first.clone(),
            received.clone(),
            in_flight.clone(),
            max_same.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (m, f, r, inf, mx) = (m.clone(), f.clone(), r.clone(), inf.clone(), mx.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (m, f, r, inf, mx) =
                            (m.clone(), f.clone(), r.clone(), inf.clone(), mx.clone());
                        async move {
                            let key = req
                                .headers()
                                .get("idempotency-key")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            r.lock().unwrap().push(Received {
                                key: key.clone(),
                                body,
                            });
                            {
                                let mut g = inf.lock().unwrap();
                                let n = g.entry(key.clone()).or_insert(0);
                                *n += 1;
                                mx.fetch_max(*n, Ordering::SeqCst);
                            }
                            tokio::time::sleep(delay).await;
                            let failing = f
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok();
                            let mode = m.load(Ordering::SeqCst);
                            if mode == HANG && !failing {
                                std::future::pending::<()>().await;
                            }
                            *inf.lock().unwrap().get_mut(&key).unwrap() -= 1;
                            let status = if failing || mode == FAIL { 500 } else { 200 };
                            let mut resp = hyper::Response::new(Full::new(Bytes::from_static(
                                b"{\"ok\":true}",
                            )));
                            *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        External {
            addr,
            mode,
            fail_first,
            received,
            in_flight,
            max_in_flight_same_key: max_same,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/sync/orders", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

fn sync_config(
    db: &TestDb,
    redis: Option<&RedisServer>,
    id: &str,
    url: &str,
) -> switchboard::Config {
    let mut c = config(db, redis, id);
    c.sync_url = Some(url.to_string());
    c.sync_backoff = Duration::from_millis(50);
    c.sync_timeout = Duration::from_millis(1000);
    c.sync_max_attempts = 8;
    c
}

async fn new_order(node: &TestNode) -> i64 {
    let (s, b) = http(
        node.addr,
        "POST",
        "/api/orders",
        &[("authorization", &format!("Bearer {}", admin()))],
        Some(json!({"city_id": 1, "user_id": 5, "total": 100})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    b["id"].as_i64().unwrap()
}

async fn jobs(node: &TestNode, status: &str) -> Vec<Value> {
    let (s, b) = http(
        node.addr,
        "GET",
        &format!("/api/sync/jobs?status={status}&limit=200"),
        &[("authorization", &format!("Bearer {}", admin()))],
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    b["items"].as_array().unwrap().clone()
}

async fn wait_for_jobs(node: &TestNode, status: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = jobs(node, status).await;
        if j.len() >= n {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "never {n} {status} jobs (have {})",
            j.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn delivery_and_success_event(db: TestDb) {
    let ext = External::start(Duration::ZERO).await;
    let node = TestNode::start(sync_config(&db, None, "n", &ext.url())).await;
    let mut rooms = connect_ready(node.addr, "/", &admin()).await;
    let mut events = connect_ready(node.addr, "/ws", &admin()).await;
    let id = new_order(&node).await;
    let ok = rooms.recv_type("sync-success").await;
    assert_eq!(ok["data"]["entity"], "order");
    assert_eq!(ok["data"]["entityId"], id);
    assert!(ok["data"]["timestamp"].is_string());
    assert!(ok["data"].get("error").is_none());
    let ok2 = events.recv_type("SYNC_SUCCESS").await;
    assert_eq!(ok2["payload"]["entityId"], id);
    let got = ext.received();
    assert_eq!(got.len(), 1);
    assert!(
        got[0].key.starts_with("switchboard-sync-"),
        "{:?}",
        got[0].key
    );
    assert_eq!(got[0].body["entity_id"], id);
    assert_eq!(got[0].body["action"], "created");
    assert_eq!(got[0].body["data"]["id"], id);
    let done = wait_for_jobs(&node, "delivered", 1).await;
    assert_eq!(done[0]["attempts"], 1);
    // A change is a new job with a new key.
    let (s, _) = http(
        node.addr,
        "PATCH",
        &format!("/api/orders/{id}"),
        &[("authorization", &format!("Bearer {}", admin()))],
        Some(json!({"status": "confirmed"})),
    )
    .await;
    assert_eq!(s, 200);
    rooms.recv_type("sync-success").await;
    let got = ext.received();
    assert_eq!(got.len(), 2);
    assert_ne!(got[0].key, got[1].key);
    assert_eq!(got[1].body["action"], "updated");
    assert_eq!(got[1].body["data"]["status"], "confirmed");
}

async fn failures_then_success(db: TestDb) {
    let ext = External::start(Duration::ZERO).await;
    ext.fail_first.store(2, Ordering::SeqCst);
    let node = TestNode::start(sync_config(&db, None, "n", &ext.url())).await;
    let mut rooms = connect_ready(node.addr, "/", &admin()).await;
    let id = new_order(&node).await;
    for _ in 0..2 {
        let e = rooms.recv_type("sync-error").await;
        assert_eq!(e["data"]["entityId"], id);
        assert!(e["data"]["error"].as_str().unwrap().contains("500"), "{e}");
    }
    let ok = rooms.recv_type("sync-success").await;
    assert_eq!(ok["data"]["entityId"], id);
    rooms.silent_for(Duration::from_millis(300)).await;
    let got = ext.received();
    assert_eq!(got.len(), 3);
    assert!(
        got.iter().all(|r| r.key == got[0].key),
        "one key across retries"
    );
    assert_eq!(wait_for_jobs(&node, "delivered", 1).await[0]["attempts"], 3);
}

async fn permanent_failure_then_manual_retry(db: TestDb) {
    let ext = External::start(Duration::ZERO).await;
    ext.mode.store(FAIL, Ordering::SeqCst);
    let mut c = sync_config(&db, None, "n", &ext.url());
    c.sync_max_attempts = 3;
    let node = TestNode::start(c).await;
    let mut rooms = connect_ready(node.addr, "/", &admin()).await;
    let id = new_order(&node).await;
    for _ in 0..3 {
        rooms.recv_type("sync-error").await;
    }
    let failed = wait_for_jobs(&node, "failed", 1).await;
    assert_eq!(failed[0]["entity_id"], id);
    assert_eq!(failed[0]["attempts"], 3);
    assert!(failed[0]["last_error"].as_str().unwrap().contains("500"));
    // No more attempts once failed.
    rooms.silent_for(Duration::from_millis(500)).await;
    assert_eq!(ext.received().len(), 3);
    // Only admins retry; a delivered or unknown job cannot be retried.
    let job = failed[0]["id"].as_i64().unwrap();
    let path = format!("/api/sync/jobs/{job}/retry");
    let (s, _) = http(
        node.addr,
        "POST",
        &path,
        &[("authorization", &format!("Bearer {}", user(5)))],
        None,
    )
    .await;
    assert_eq!(s, 403);
    ext.mode.store(OK, Ordering::SeqCst);
    let (s, b) = http(
        node.addr,
        "POST",
        &path,
        &[("authorization", &format!("Bearer {}", admin()))],
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["status"], "pending");
    let ok = rooms.recv_type("sync-success").await;
    assert_eq!(ok["data"]["entityId"], id);
    wait_for_jobs(&node, "delivered", 1).await;
    let (s, _) = http(
        node.addr,
        "POST",
        &path,
        &[("authorization", &format!("Bearer {}", admin()))],
        None,
    )
    .await;
    assert_eq!(s, 409);
    let (s, _) = http(
        node.addr,
        "POST",
        "/api/sync/jobs/999999/retry",
        &[("authorization", &format!("Bearer {}", admin()))],
        None,
    )
    .await;
    assert_eq!(s, 404);
}

async fn node_killed_mid_delivery(db: TestDb) {
    let redis = RedisServer::start();
    let ext = External::start(Duration::ZERO).await;
    ext.mode.store(HANG, Ordering::SeqCst);
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_switchboard"));
    let env = [
        ("REDIS_URL", redis.url()),
        ("DATABASE_URL", db.url.clone()),
        ("JWT_SECRET", SECRET.to_string()),
        ("API_KEYS", API_KEY.to_string()),
        ("NODE_ID", "doomed".to_string()),
        ("SYNC_URL", ext.url()),
        ("SYNC_TIMEOUT_MS", "1000".to_string()),
        ("SYNC_BACKOFF_MS", "50".to_string()),
    ];
    let mut doomed = switchboard_testkit::NodeProcess::start(&bin, &env).await;
    let (s, b) = switchboard_testkit::http(
        doomed.addr,
        "POST",
        "/api/orders",
        &[("authorization", &format!("Bearer {}", admin()))],
        Some(json!({"city_id": 1, "user_id": 5}).to_string()),
    )
    .await
    .unwrap();
    assert_eq!(s, 201, "{}", String::from_utf8_lossy(&b));
    // The external system holds the doomed node's request open.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ext.received().is_empty() {
        assert!(Instant::now() < deadline, "the doomed node never delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.kill();
    ext.mode.store(OK, Ordering::SeqCst);
    let survivor = TestNode::start(sync_config(&db, Some(&redis), "survivor", &ext.url())).await;
    let done = wait_for_jobs(&survivor, "delivered", 1).await;
    assert_eq!(done[0]["attempts"], 2, "{done:?}");
    let got = ext.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].key, got[1].key, "the retry carries the same key");
}

async fn two_workers_never_overlap(db: TestDb) {
    let redis = RedisServer::start();
    let ext = External::start(Duration::from_millis(30)).await;
    let a = TestNode::start(sync_config(&db, Some(&redis), "a", &ext.url())).await;
    let b = TestNode::start(sync_config(&db, Some(&redis), "b", &ext.url())).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(new_order(if i % 2 == 0 { &a } else { &b }).await);
    }
    wait_for_jobs(&a, "delivered", 40).await;
    assert_eq!(
        ext.max_in_flight_same_key.load(Ordering::SeqCst),
        1,
        "a job was delivered twice at once"
    );
    let got = ext.received();
    let keys: std::collections::HashSet<_> = got.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys.len(), 40);
    assert!(ext.in_flight.lock().unwrap().values().all(|n| *n == 0));
}

/// The jobs of one order go out in the order of its changes: a later change
/// waits while an earlier one is being retried (it used to overtake it).
async fn jobs_of_one_order_in_order(db: TestDb) {
    let ext = External::start(Duration::from_millis(5)).await;
    ext.fail_first.store(2, Ordering::SeqCst);
    let node = TestNode::start(sync_config(&db, None, "n", &ext.url())).await;
    let id = new_order(&node).await;
    for status in ["confirmed", "preparing", "ready"] {
        let (s, b) = call(
            node.addr,
            "PATCH",
            &format!("/api/orders/{id}"),
            &admin(),
            Some(json!({"status": status})),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    wait_for_jobs(&node, "delivered", 4).await;
    let job_ids: Vec<i64> = ext
        .received()
        .iter()
        .map(|r| {
            r.key
                .trim_start_matches("switchboard-sync-")
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        job_ids.is_sorted(),
        "a later change of the order went out before an earlier one: {job_ids:?}"
    );
    assert_eq!(
        job_ids.len(),
        6,
        "two failed attempts, then four deliveries: {job_ids:?}"
    );
}

async fn no_sync_url_no_jobs(db: TestDb) {
    let node = TestNode::start(config(&db, None, "n")).await;
    new_order(&node).await;
    assert!(jobs(&node, "pending").await.is_empty());
    use sea_orm::ConnectionTrait;
    let conn = sea_orm::Database::connect(&db.url).await.unwrap();
    let row = conn
        .query_one_raw(sea_orm::Statement::from_string(
            conn.get_database_backend(),
            "SELECT COUNT(*) AS n FROM sync_jobs",
        ))
        .await
        .unwrap()
        .unwrap();
    let n: i64 = row.try_get("", "n").unwrap();
    assert_eq!(n, 0);
}

db_variants!(
    sync_delivers_with_success_event,
    crate::delivery_and_success_event
);
db_variants!(sync_retries_then_succeeds, crate::failures_then_success);
db_variants!(
    sync_fails_then_manual_retry,
    crate::permanent_failure_then_manual_retry
);
db_variants!(
    sync_survives_node_killed_mid_delivery,
    crate::node_killed_mid_delivery
);
db_variants!(
    sync_two_workers_never_overlap,
    crate::two_workers_never_overlap
);
db_variants!(sync_off_writes_no_jobs, crate::no_sync_url_no_jobs);
db_variants!(
    sync_jobs_of_one_order_in_order,
    crate::jobs_of_one_order_in_order
);
