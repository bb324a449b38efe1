//! `assign`: nearest-driver lookup and full dispatch latency with many
//! drivers in the Redis GEO set, over HTTP to one node process, next to the
//! HTTP floor (`GET /healthz` on the same connection).

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};
use switchboard_testkit::{RedisServer, mint};

use crate::shared::{CENTER, HttpConn, Lcg, SECRET, cluster, database, hist, offset, pct};

pub async fn run(
    drivers: usize,
    orders: usize,
    area_km: f64,
    database_url: Option<String>,
) -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let (db_url, _dir) = database(database_url)?;
    let nodes = cluster(1, &redis, &db_url, &[]).await?;
    let node = &nodes[0];

    // Drivers straight into Redis, in pipelined batches.
    let client = redis::Client::open(redis.url())?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let mut rng = Lcg(42);
    let now_ms = chrono::Utc::now().timestamp_millis() + 3_600_000;
    let t0 = Instant::now();
    for chunk in (0..drivers).collect::<Vec<_>>().chunks(10_000) {
        let mut p = redis::pipe();
        for &i in chunk {
            let (lat, lon) = offset(
                CENTER,
                (rng.next_f64() - 0.5) * area_km,
                (rng.next_f64() - 0.5) * area_km,
            );
            p.cmd("GEOADD")
                .arg("sb:drivers:geo")
                .arg(lon)
                .arg(lat)
                .arg(i + 1)
                .ignore();
            // Seen "in the future" so nobody goes stale during the run.
            p.cmd("ZADD")
                .arg("sb:drivers:seen")
                .arg(now_ms)
                .arg(i + 1)
                .ignore();
            // Online (HTTP presence) until then too: the lookup checks it.
            p.cmd("ZADD")
                .arg("sb:drivers:http")
                .arg(now_ms)
                .arg(i + 1)
                .ignore();
        }
        p.exec_async(&mut con).await?;
    }
    let load_secs = t0.elapsed().as_secs_f64();

    // Every request goes over one kept-alive connection, so each sample is
    // one HTTP round trip; `/healthz` on it, timed in the same loop, is the
    // floor to subtract from the other two.
    let admin = mint(SECRET, json!({"sub": 1, "role": "admin"}));
    let auth = format!("Bearer {admin}");
    let auth = [("authorization", auth.as_str())];
    let mut conn = HttpConn::open(node.addr).await?;
    let mut floor = hist();
    let mut nearest = hist();
    let mut dispatch = hist();
    let deadline = Instant::now() + Duration::from_secs(300);
    for _ in 0..orders {
        if Instant::now() > deadline {
            break;
        }
        let (lat, lon) = offset(
            CENTER,
            (rng.next_f64() - 0.5) * area_km * 0.8,
            (rng.next_f64() - 0.5) * area_km * 0.8,
        );
        let t = Instant::now();
        let (st, _) = conn.request("GET", "/healthz", &[], None).await?;
        floor.record(t.elapsed().as_micros().max(1) as u64)?;
        if st != 200 {
            bail!("/healthz answered {st}");
        }
        // The dispatcher's own limit (32) and radius (the node's default).
        let path = format!("/api/drivers/nearby?lat={lat}&lon={lon}&limit=32");
        let t = Instant::now();
        let (st, body) = conn.request("GET", &path, &auth, None).await?;
        nearest.record(t.elapsed().as_micros().max(1) as u64)?;
        if st != 200 {
            bail!("nearby answered {st}: {}", String::from_utf8_lossy(&body));
        }
        let near: Value = serde_json::from_slice(&body)?;
        if near["items"].as_array().is_none_or(Vec::is_empty) {
            continue;
        }
        // A pickup point makes the create dispatch before it answers.
        let order = json!({"order_type": "delivery", "user_id": 1, "city_id": 1, "total": 100,
                           "latitude_from": lat, "longitude_from": lon});
        let t = Instant::now();
        let (st, body) = conn
            .request("POST", "/api/orders", &auth, Some(order.to_string()))
            .await?;
        dispatch.record(t.elapsed().as_micros().max(1) as u64)?;
        if st != 201 {
            bail!("create answered {st}: {}", String::from_utf8_lossy(&body));
        }
    }
    let (_, metrics) = conn.request("GET", "/metrics", &[], None).await?;
    let metrics = String::from_utf8_lossy(&metrics);
    let offered = metric_sum(&metrics, r#"switchboard_offers_total{outcome="made"}"#) as usize;
    // The lookup alone, as the node timed it: the Lua round trip (GEOSEARCH,
    // freshness, availability and presence checks), from its histogram.
    let lookup = bucket_quantiles(
        &metrics,
        "switchboard_redis_command_duration_seconds",
        "geo_nearest",
    );
    drop(nodes);
    let db_kind = if db_url.starts_with("sqlite") {
        "sqlite"
    } else {
        "postgres"
    };
    println!(
        "assign: {drivers} drivers over {area_km}x{area_km} km (loaded in {load_secs:.2} s), {} orders, {offered} offered, db {db_kind}, over HTTP to 1 node process",
        dispatch.len()
    );
    println!(
        "  HTTP floor (GET /healthz on the same kept-alive connection): {}",
        pct(&floor)
    );
    println!(
        "  nearest (GET /api/drivers/nearby: GEOSEARCH+filters in 1 Lua round trip, busy-driver DB check): {}",
        pct(&nearest)
    );
    println!(
        "  nearest-driver lookup alone (node's switchboard_redis_command_duration_seconds{{op=\"geo_nearest\"}}, bucket upper bounds): {lookup}"
    );
    println!(
        "  full dispatch (POST /api/orders: order insert + publish + nearest + DB checks + offer insert + deadline + publish): {}",
        pct(&dispatch)
    );
    println!(
        "{}",
        json!({"scenario": "assign", "drivers": drivers, "orders": dispatch.len(), "offered": offered,
               "db": db_kind, "http_floor": pct(&floor), "nearest": pct(&nearest), "lookup": lookup,
               "dispatch": pct(&dispatch)})
    );
    Ok(())
}

/// The sum of the samples of `series` (`name{labels}`, exactly) in a
/// Prometheus text exposition.
fn metric_sum(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .sum()
}

/// p50 and p99 of a Prometheus histogram's `op` series, each as the upper
/// bound (ms) of the bucket it falls in, and the share of samples within
/// 1 ms and within 2 ms (bucket bounds).
fn bucket_quantiles(text: &str, name: &str, op: &str) -> Value {
    let prefix = format!("{name}_bucket{{op=\"{op}\",le=\"");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, n) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, n.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let at = |q: f64| {
        buckets
            .iter()
            .find(|(_, n)| *n >= q * total)
            .map(|(le, _)| le * 1000.0)
    };
    let share = |ms: f64| {
        buckets
            .iter()
            .find(|(le, _)| (*le * 1000.0 - ms).abs() < 1e-9)
            .map(|(_, n)| n / total.max(1.0))
    };
    json!({"count": total, "p50_le_ms": at(0.5), "p99_le_ms": at(0.99),
           "share_le_1ms": share(1.0), "share_le_2ms": share(2.0)})
}
