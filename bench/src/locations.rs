//! `locations`: driver sockets stream positions to one node process while an
//! admin socket watches; ingest rate, CPU per position, staleness at the
//! watcher.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_client::{Incoming, Socket};
use switchboard_testkit::{RedisServer, mint};

use crate::shared::{
    CENTER, Lcg, SECRET, cluster, cpu_seconds, database, hist, offset, pct, self_cpu,
};

pub async fn run(
    drivers: usize,
    secs: f64,
    rate: f64,
    database_url: Option<String>,
) -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let (db_url, _dir) = database(database_url)?;
    let nodes = cluster(1, &redis, &db_url, &[]).await?;
    let node = &nodes[0];
    let admin = mint(SECRET, json!({"sub": 1, "role": "admin"}));
    let mut watcher =
        Socket::connect(node.addr, &format!("/ws?token={admin}"), None, 65536).await?;
    // Skip the CONNECTED message.
    let _ = watcher.recv().await;
    let mut sockets = Vec::new();
    for i in 0..drivers {
        let t = mint(
            SECRET,
            json!({"sub": 10_000 + i, "role": "driver", "city_id": 1}),
        );
        let mut s = Socket::connect(
            node.addr,
            &format!("/ws/driver/orders/?token={t}"),
            None,
            16,
        )
        .await?;
        let _ = s.recv().await; // connection_established
        let _ = s.recv().await; // initial_orders
        sockets.push(s);
    }
    let cpu0 = cpu_seconds(node.pid().unwrap_or(0)).unwrap_or(0.0);
    let redis_cpu0 = cpu_seconds(redis.pid().unwrap_or(0)).unwrap_or(0.0);
    let my0 = self_cpu();
    let sent = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (i, s) in sockets.into_iter().enumerate() {
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Lcg(i as u64 + 1);
            let gap = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
            // Absolute deadlines (a sleep after each send would add the send
            // time and the timer's 1 ms rounding to every gap), phases
            // spread over one gap.
            let mut next = tokio::time::Instant::now()
                + gap.unwrap_or_default().mul_f64(i as f64 / drivers as f64);
            while Instant::now() < stop_at {
                if let Some(g) = gap {
                    tokio::time::sleep_until(next).await;
                    next += g;
                }
                let (lat, lon) = offset(CENTER, (rng.next_f64() - 0.5) * 20.0, (rng.next_f64() - 0.5) * 20.0);
                let msg = format!(r#"{{"type":"location","latitude":{lat:.6},"longitude":{lon:.6},"heading":90,"speed":10}}"#);
                if s.send_text(&msg).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            s
        }));
    }
    // The watcher: count DRIVER_LOCATION and how old each is on arrival.
    let mut stale = hist();
    let mut seen = 0u64;
    let watch_until = stop_at + Duration::from_secs(2);
    while let Ok(Some(Incoming::Text(b))) =
        tokio::time::timeout_at(watch_until.into(), watcher.recv()).await
    {
        // Parse only the timestamp (the one field measured).
        if let Some(i) = memchr_ts(&b) {
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(i) {
                let age = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
                    .num_microseconds()
                    .unwrap_or(0);
                stale.record(age.max(1) as u64)?;
            }
            seen += 1;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let cpu = cpu_seconds(node.pid().unwrap_or(0)).unwrap_or(0.0) - cpu0;
    let redis_cpu = cpu_seconds(redis.pid().unwrap_or(0)).unwrap_or(0.0) - redis_cpu0;
    let my_cpu = self_cpu() - my0;
    let sent = sent.load(Ordering::Relaxed);
    let per_s = sent as f64 / secs;
    let us = |c: f64| c * 1e6 / sent.max(1) as f64;
    println!(
        "locations: {drivers} driver sockets → 1 node for {secs} s: {sent} positions sent ({per_s:.0}/s), watcher saw {seen}, node CPU {cpu:.2} s ({:.1} µs/position), redis {:.1} µs/position, loadgen {:.1} µs/position",
        us(cpu),
        us(redis_cpu),
        us(my_cpu)
    );
    println!("  staleness at the watcher: {}", pct(&stale));
    println!(
        "{}",
        json!({"scenario": "locations", "drivers": drivers, "secs": secs, "sent": sent, "per_s": per_s,
               "watcher_seen": seen, "node_cpu_s": cpu, "node_us_per_position": us(cpu),
               "redis_us_per_position": us(redis_cpu), "loadgen_us_per_position": us(my_cpu),
               "staleness": pct(&stale)})
    );
    Ok(())
}

/// The `"timestamp":"…"` value in a DRIVER_LOCATION frame, without parsing JSON.
fn memchr_ts(b: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(b).ok()?;
    let i = s.find("\"timestamp\":\"")? + 13;
    let j = s[i..].find('"')? + i;
    Some(&s[i..j])
}
