//! Operations (issue #5, SPEC §9): the Grafana dashboard and the Prometheus
//! alert rules name only metrics the server exports, the dashboard covers
//! every one of them, and a node under traffic exports every metric of
//! `switchboard::metrics::ALL` with Prometheus naming, bounded labels and
//! sub-millisecond-to-seconds buckets.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use switchboard::metrics::ALL;

const DASHBOARD: &str = include_str!("../grafana/dashboard.json");
const ALERTS: &str = include_str!("../grafana/alerts.yml");

/// Series Prometheus records itself for every scrape target.
const PROMETHEUS_OWN: &[&str] = &["up"];

// ---------------------------------------------------------------------------
// PromQL: which metrics does an expression read?

/// Words of PromQL that are not metric names when they stand alone, and the
/// aggregation operators (which may take `by (…)` before their parenthesis:
/// `sum by (le) (…)`).
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "Inf",
    "NaN",
];

/// The metric names `expr` reads: the identifiers left once strings, label
/// matchers `{…}`, ranges `[…]`, grouping label lists (`by (…)`, `on (…)`…)
/// and function or aggregation names (an identifier followed by `(`) are
/// taken out.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |i: &mut usize, close: char| {
        while *i < chars.len() && chars[*i] != close {
            *i += 1;
        }
        *i += 1;
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '{' => skip_to(&mut i, '}'),
            '[' => skip_to(&mut i, ']'),
            '$' => {
                // A Grafana variable outside a matcher, e.g. `$__interval`.
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // Numbers and durations: 0.99, 1e3, 5m.
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let called = chars.get(j) == Some(&'(');
                let grouping = matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                );
                if grouping && called {
                    i = j;
                    skip_to(&mut i, ')');
                } else if !called && !KEYWORDS.contains(&word.as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// `name` without the `_bucket`/`_sum`/`_count` suffix Prometheus adds to
/// histogram series, when what is left is an exported histogram (the
/// histograms, and only they, end in `_seconds`: checked on a live scrape).
fn base_name(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && base.ends_with("_seconds")
            && ALL.contains(&base)
        {
            return base;
        }
    }
    name
}

fn known(name: &str) -> bool {
    ALL.contains(&base_name(name)) || PROMETHEUS_OWN.contains(&name)
}

#[test]
fn the_promql_scanner_finds_metric_names() {
    let e = r#"histogram_quantile(0.99, sum by (le, op) (rate(switchboard_redis_command_duration_seconds_bucket{instance=~"$node", op!="x{y}"}[$__rate_interval]))) > 0.1"#;
    assert_eq!(
        metric_names(e),
        BTreeSet::from(["switchboard_redis_command_duration_seconds_bucket".to_string()])
    );
    let e = r#"sum(rate(a_total{s=~"5.."}[5m])) / on (route) group_left sum(rate(b_total[5m] offset 1h)) and up == 0"#;
    assert_eq!(
        metric_names(e),
        BTreeSet::from(["a_total".into(), "b_total".into(), "up".into()])
    );
    assert!(metric_names("sum(typo_metric)").contains("typo_metric"));
    assert!(!known("switchboard_no_such_metric_total"));
    assert!(known("switchboard_delivery_latency_seconds_bucket"));
    assert!(!known("switchboard_offers_total_bucket"));
}

// ---------------------------------------------------------------------------
// The dashboard and the alert rules

struct Query {
    place: String,
    expr: String,
}

/// Every PromQL expression of the dashboard: panel targets (rows included)
/// and `label_values(metric, label)` variable queries.
fn dashboard_queries(d: &Value) -> Vec<Query> {
    fn panels(list: &Value, out: &mut Vec<Query>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(Query {
                    place: format!("panel {title:?} target {}", t["refId"]),
                    expr: t["expr"].as_str().unwrap_or_default().to_string(),
                });
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&d["panels"], &mut out);
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            let def = v["definition"].as_str().unwrap();
            let inner = def
                .strip_prefix("label_values(")
                .and_then(|s| s.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable {}: not label_values(…): {def}", v["name"]));
            let (metric, _label) = inner.rsplit_once(',').expect("label_values(metric, label)");
            out.push(Query {
                place: format!("variable {}", v["name"]),
                expr: metric.trim().to_string(),
            });
        }
    }
    out
}

/// `(alert name, expr)` of every rule in alerts.yml. The file keeps each
/// `expr:` on one line or in a `|`/`>` block; anything else fails here.
fn alert_rules(yaml: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut rules = Vec::new();
    let mut name = None;
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        if let Some(n) = t.strip_prefix("- alert:") {
            name = Some(n.trim().to_string());
        } else if let Some(e) = t.strip_prefix("expr:") {
            let e = e.trim();
            let expr = if e.starts_with('|') || e.starts_with('>') {
                let indent = lines[i].len() - t.len();
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                block.join(" ")
            } else if (e.starts_with('"') && e.ends_with('"'))
                || (e.starts_with('\'') && e.ends_with('\''))
            {
                e[1..e.len() - 1].to_string()
            } else {
                e.to_string()
            };
            let n = name.take().expect("every expr belongs to an `- alert:`");
            rules.push((n, expr));
        }
        i += 1;
    }
    rules
}

#[test]
fn dashboard_and_alerts_name_only_exported_metrics_and_cover_them_all() {
    // The list itself: unique, prefixed.
    let mut seen = BTreeSet::new();
    for m in ALL {
        assert!(m.starts_with("switchboard_"), "{m}: not prefixed");
        assert!(seen.insert(*m), "{m}: listed twice in metrics::ALL");
    }

    let d: Value = serde_json::from_str(DASHBOARD).expect("grafana/dashboard.json is JSON");
    let vars: BTreeMap<&str, &Value> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    assert_eq!(vars["datasource"]["type"], "datasource");
    assert_eq!(vars["datasource"]["query"], "prometheus");
    assert!(
        vars["node"]["definition"]
            .as_str()
            .unwrap()
            .contains("instance"),
        "the node variable ranges over `instance`"
    );

    let queries = dashboard_queries(&d);
    let mut used = BTreeSet::new();
    let mut unknown = Vec::new();
    for q in &queries {
        let names = metric_names(&q.expr);
        assert!(!names.is_empty(), "{}: no metric in {:?}", q.place, q.expr);
        for n in names {
            if known(&n) {
                used.insert(base_name(&n).to_string());
            } else {
                unknown.push(format!("{}: {n} (in {:?})", q.place, q.expr));
            }
        }
        if q.expr.contains("histogram_quantile") {
            assert!(
                q.expr.contains("_bucket") && q.expr.contains("le"),
                "{}: histogram_quantile needs _bucket series grouped by le: {}",
                q.place,
                q.expr
            );
        }
    }
    assert!(
        unknown.is_empty(),
        "dashboard queries name metrics the server does not export:\n{}",
        unknown.join("\n")
    );
    let unused: Vec<_> = ALL.iter().filter(|m| !used.contains(**m)).collect();
    assert!(
        unused.is_empty(),
        "metrics without a dashboard panel: {unused:?}"
    );

    // Every panel reads through the datasource variable, and the panels the
    // issue asks for are there.
    fn all_panels(list: &Value, out: &mut Vec<Value>) {
        for p in list.as_array().into_iter().flatten() {
            if p["type"] != "row" {
                out.push(p.clone());
            }
            all_panels(&p["panels"], out);
        }
    }
    let mut panels = Vec::new();
    all_panels(&d["panels"], &mut panels);
    let mut ids = BTreeSet::new();
    for p in &panels {
        assert!(ids.insert(p["id"].as_i64().unwrap()), "duplicate panel id");
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {}",
            p["title"]
        );
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {}",
                p["title"]
            );
        }
    }
    let exprs: Vec<String> = queries.iter().map(|q| q.expr.clone()).collect();
    let has = |needle: &str| exprs.iter().any(|e| e.contains(needle));
    assert!(has("sum by (instance, dialect) (switchboard_sockets_open"));
    assert!(has(
        "histogram_quantile(0.5, sum by (le) (rate(switchboard_delivery_latency_seconds_bucket"
    ));
    assert!(has(
        "histogram_quantile(0.99, sum by (le) (rate(switchboard_delivery_latency_seconds_bucket"
    ));
    // made, accepted, expired (and declined, no_driver): one series each.
    assert!(has("sum by (outcome) (rate(switchboard_offers_total"));
    assert!(has("switchboard_dispatch_duration_seconds_bucket"));
    assert!(has("switchboard_slow_consumers_total"));
    assert!(has("switchboard_http_request_duration_seconds_bucket"));
    assert!(has("switchboard_sync_jobs"));

    // Alert rules.
    let rules = alert_rules(ALERTS);
    let names: BTreeSet<&str> = rules.iter().map(|(n, _)| n.as_str()).collect();
    for required in [
        "SwitchboardNodeDown",
        "SwitchboardDeliveryLatencyHigh",
        "SwitchboardRedisErrors",
        "SwitchboardSlowConsumersRising",
        "SwitchboardSyncFailures",
    ] {
        assert!(names.contains(required), "alert {required} missing");
    }
    for (name, expr) in &rules {
        let metrics = metric_names(expr);
        assert!(!metrics.is_empty(), "alert {name}: no metric in {expr:?}");
        for m in metrics {
            assert!(
                known(&m),
                "alert {name} reads {m}, which the server does not export: {expr}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// A live node

/// A sync receiver on loopback: answers 500 to its first request, 200 after.
async fn external() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"{}")));
                        if n == 0 {
                            *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// One parsed scrape: `# TYPE` per family, `# HELP` presence, and samples.
struct Scrape {
    types: BTreeMap<String, String>,
    helped: BTreeSet<String>,
    /// (series name, labels) per sample line.
    samples: Vec<(String, Vec<(String, String)>)>,
}

fn parse_scrape(text: &str) -> Scrape {
    let mut s = Scrape {
        types: BTreeMap::new(),
        helped: BTreeSet::new(),
        samples: Vec::new(),
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap();
            s.types.insert(name.to_string(), ty.to_string());
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            s.helped
                .insert(rest.split_once(' ').map_or(rest, |(n, _)| n).to_string());
        } else if !line.is_empty() && !line.starts_with('#') {
            let (series, _value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), Vec::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').unwrap();
                    let mut labels = Vec::new();
                    // Values are quoted and never contain `",` in our labels.
                    for pair in body.split("\",").filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once("=\"").unwrap();
                        labels.push((k.to_string(), v.trim_end_matches('"').to_string()));
                    }
                    (name.to_string(), labels)
                }
            };
            s.samples.push((name, labels));
        }
    }
    s
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_raw(addr, "GET", "/metrics", &[], None).await;
    assert_eq!(status, 200);
    String::from_utf8(body.to_vec()).unwrap()
}

/// Label names a metric may carry; all of them take few values.
const BOUNDED_LABELS: &[&str] = &[
    "dialect", "type", "kind", "code", "route", "status", "op", "outcome", "result", "reason",
    "le", "node", "version",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_under_traffic_exports_every_metric_with_bounded_labels() {
    init_tracing();
    let mut redis = RedisServer::start();
    let db = TestDb::sqlite();
    let (ext, _ext_task) = external().await;
    let mut cfg = config(&db, Some(&redis), "ops");
    cfg.sync_url = Some(format!("http://{ext}/sync"));
    cfg.sync_max_attempts = 1; // the external's one 500 fails a job for good
    cfg.sync_backoff = Duration::from_millis(50);
    cfg.sync_timeout = Duration::from_secs(1);
    cfg.send_queue_len = 16;
    let node = TestNode::start(cfg).await;
    node.wait_ready(true).await;
    let addr = node.addr;
    let bearer = |t: &str| format!("Bearer {t}");
    let admin_auth = bearer(&admin());

    // Sockets in every dialect; a driver reports its position, pings, and
    // sends one malformed frame.
    let mut rooms = connect_ready(addr, "/", &admin()).await;
    let mut events = connect_ready(addr, "/ws", &admin()).await;
    let mut drv = connect_ready(addr, "/ws/driver/orders/", &driver(7, 1)).await;
    drv.send_json(json!({"type": "location", "latitude": 41.3111, "longitude": 69.2406}))
        .await;
    drv.send_json(json!({"type": "ping"})).await;
    assert_eq!(drv.recv_type("pong").await["type"], "pong");
    drv.send_text("not json").await;
    assert_eq!(drv.recv_type("error").await["type"], "error");

    // An order is dispatched to the driver, who accepts it; a second order
    // has no driver left. Each change is a sync job for the external system.
    let (s, order) = http(
        addr,
        "POST",
        "/api/orders",
        &[("authorization", &admin_auth)],
        Some(json!({"city_id": 1, "user_id": 4, "total": 1500,
                    "latitude_from": 41.311081, "longitude_from": 69.240562})),
    )
    .await;
    assert_eq!(s, 201, "{order}");
    let id = order["id"].as_i64().unwrap();
    assert_eq!(drv.recv_type("new_order").await["order"]["id"], id);
    let (s, b) = http(
        addr,
        "POST",
        &format!("/api/driver/orders/{id}/accept"),
        &[("authorization", &bearer(&driver(7, 1)))],
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = http(
        addr,
        "POST",
        "/api/orders",
        &[("authorization", &admin_auth)],
        Some(json!({"city_id": 1, "user_id": 4, "total": 700,
                    "latitude_from": 41.3, "longitude_from": 69.2})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    node.publish("admin-orders", "hello", json!({"n": 1})).await;
    assert_eq!(rooms.recv_type("hello").await["data"]["n"], 1);
    assert_eq!(events.recv_type("hello").await["payload"]["n"], 1);
    let (s, _) = http(
        addr,
        "GET",
        "/api/orders/999999",
        &[("authorization", &admin_auth)],
        None,
    )
    .await;
    assert_eq!(s, 404);

    // A consumer that never reads, alone in its room, is dropped.
    let mut slow = Client::connect_parked(addr, &format!("/?token={}", user(9)), 1).await;
    let pad = "p".repeat(32 * 1024);
    let mut conn = HttpConn::open(addr).await;
    let mut sent = 0;
    while !node
        .node()
        .render_metrics()
        .contains("switchboard_slow_consumers_total")
    {
        assert!(sent < 5000, "the parked socket was never dropped");
        let (s, b) = conn
            .publish_body(json!({"room": "user-9", "type": "fill", "data": {"pad": pad}}))
            .await;
        assert_eq!(s, 204, "{b}");
        sent += 1;
    }
    let _ = slow.drain_parked(WAIT).await;

    // Redis goes away (heartbeat errors, a refused publish) and comes back
    // (the broker reconnects).
    redis.kill();
    node.wait_ready(false).await;
    let (s, _) = publish_body(
        addr,
        json!({"room": "admin-orders", "type": "x", "data": {}}),
    )
    .await;
    assert_eq!(s, 503);
    redis.restart();
    node.wait_ready(true).await;

    // Every metric shows up (the sync gauges are refreshed every 2 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (text, parsed) = loop {
        let text = scrape(addr).await;
        let parsed = parse_scrape(&text);
        let missing: Vec<_> = ALL
            .iter()
            .filter(|m| !parsed.types.contains_key(**m))
            .collect();
        if missing.is_empty() {
            break (text, parsed);
        }
        assert!(
            Instant::now() < deadline,
            "never exported after traffic: {missing:?}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Naming: the exported families are exactly the documented ones;
    // counters end in _total and nothing else does; histograms are in
    // seconds with buckets from 100 µs to 10 s; every family has HELP.
    for (name, ty) in &parsed.types {
        assert!(
            ALL.contains(&name.as_str()),
            "{name} is exported but not listed in metrics::ALL"
        );
        assert!(parsed.helped.contains(name), "{name} has no HELP line");
        assert_eq!(
            ty == "counter",
            name.ends_with("_total"),
            "{name} is a {ty}: counters, and only counters, end in _total"
        );
        assert_eq!(
            ty == "histogram",
            name.ends_with("_seconds"),
            "{name} is a {ty}: histograms, and only they, are in seconds"
        );
        if ty == "histogram" {
            let les: BTreeSet<&str> = parsed
                .samples
                .iter()
                .filter(|(n, _)| n == &format!("{name}_bucket"))
                .flat_map(|(_, l)| l.iter().filter(|(k, _)| k == "le").map(|(_, v)| v.as_str()))
                .collect();
            for le in ["0.0001", "0.001", "0.01", "0.1", "1", "10", "+Inf"] {
                assert!(les.contains(le), "{name}: no le={le} bucket (has {les:?})");
            }
        }
    }

    // Bounded labels: known label names only, no ids or room names in any
    // value, routes are templates, and few series per family.
    let mut per_family: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (series, labels) in &parsed.samples {
        let family = base_name(series);
        for (k, v) in labels {
            assert!(
                BOUNDED_LABELS.contains(&k.as_str()),
                "{series}: unexpected label {k}={v}"
            );
            for id_like in ["user-", "driver-", "city-", "admin-orders", "999999"] {
                assert!(
                    !v.contains(id_like),
                    "{series}: label {k}={v} names a room or an id"
                );
            }
            if k == "route" {
                assert!(
                    !v.chars().any(|c| c.is_ascii_digit()),
                    "{series}: route {v} is not a template"
                );
            }
        }
        let key = labels
            .iter()
            .filter(|(k, _)| k != "le")
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        per_family.entry(family).or_default().insert(key);
    }
    for (family, series) in &per_family {
        assert!(
            series.len() <= 100,
            "{family}: {} series, labels are not bounded",
            series.len()
        );
    }

    // The dashboard and the alerts read only what this scrape has.
    let d: Value = serde_json::from_str(DASHBOARD).unwrap();
    let mut exprs: Vec<String> = dashboard_queries(&d).into_iter().map(|q| q.expr).collect();
    exprs.extend(alert_rules(ALERTS).into_iter().map(|(_, e)| e));
    for e in &exprs {
        for n in metric_names(e) {
            assert!(
                parsed.types.contains_key(base_name(&n)) || PROMETHEUS_OWN.contains(&n.as_str()),
                "{n} (in {e}) is not in a live scrape"
            );
        }
    }

    // promtool's own lint, when it is installed (scripts/check-ops installs it).
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Err(_) => eprintln!("promtool not installed: skipping `promtool check metrics`"),
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
