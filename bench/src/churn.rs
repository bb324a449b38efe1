//! `churn`: connect + authenticate + first message, per second, with a
//! distinct user per connection.

use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_client::{Incoming, Socket};
use switchboard_testkit::{RedisServer, mint};

use crate::shared::{SECRET, cluster, cpu_seconds, database, hist, pct};

pub async fn run(
    concurrency: usize,
    secs: f64,
    database_url: Option<String>,
) -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let (db_url, _dir) = database(database_url)?;
    let nodes = cluster(1, &redis, &db_url, &[]).await?;
    let addr = nodes[0].addr;
    let pid = nodes[0].pid().unwrap_or(0);
    let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
    let stop_at = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut n = 0u64;
            let mut failed = 0u64;
            let mut i = 0u64;
            while Instant::now() < stop_at {
                i += 1;
                // A distinct user per connection: each joins its own room.
                let tok = mint(
                    SECRET,
                    json!({"sub": 1_000_000 + w as u64 * 1_000_000 + i, "role": "user"}),
                );
                let t = Instant::now();
                match Socket::connect(addr, &format!("/?token={tok}"), None, 4).await {
                    Ok(mut s) => match s.recv().await {
                        Some(Incoming::Text(_)) => {
                            let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                            n += 1;
                        }
                        _ => failed += 1,
                    },
                    Err(_) => failed += 1,
                }
            }
            (h, n, failed)
        }));
    }
    let mut h = hist();
    let (mut n, mut failed) = (0, 0);
    for t in tasks {
        let (th, tn, tf) = t.await?;
        h.add(&th)?;
        n += tn;
        failed += tf;
    }
    let cpu = cpu_seconds(pid).unwrap_or(cpu0) - cpu0;
    println!(
        "churn: {concurrency} concurrent clients for {secs} s: {n} connects ({:.0}/s), {failed} failed, node CPU {cpu:.2} s ({:.0} µs/connect)",
        n as f64 / secs,
        cpu * 1e6 / n.max(1) as f64
    );
    println!("  connect+auth+first message: {}", pct(&h));
    println!(
        "{}",
        json!({"scenario": "churn", "concurrency": concurrency, "secs": secs, "connects": n,
               "per_s": n as f64 / secs, "failed": failed, "node_cpu_s": cpu, "latency": pct(&h)})
    );
    Ok(())
}
