//! switchboard's load generator. Everything runs on loopback: it starts its
//! own `redis-server` and nodes, every loop is bounded in count and time,
//! and it prints a summary plus one JSON line.
//!
//! - `assign`: nearest-driver lookup and full dispatch latency with N drivers
//!   in the Redis GEO set, over HTTP to one node process (`GET
//!   /api/drivers/nearby`, `POST /api/orders` with a pickup point), next to
//!   the `GET /healthz` round trip on the same connection (the HTTP floor).
//! - `locations`: D driver sockets stream positions to one node process,
//!   an admin socket watches; ingest rate and staleness at the watcher.
//! - `expiry`: offers due in the same second across K node processes;
//!   each expires once; lateness = `order_timeout` received − deadline.
//! - `fanout`: S subscribers over N nodes (via Redis), a publisher at rate R
//!   through `POST /api/publish`; deliveries/s, loss, duplicates, latency,
//!   server CPU per delivery and peak RSS, and the loadgen's own CPU cost.
//! - `connections`: N idle sockets over K nodes; RSS per socket, idle CPU.
//! - `churn`: connect + authenticate + first message, per second.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use switchboard_client::{Incoming, Socket};
use switchboard_testkit::{NodeProcess, RedisServer, http, mint};

const SECRET: &[u8] = b"loadgen-secret-0123456789abcdef";
const API_KEY: &str = "loadgen-key";
/// Tashkent, as in seed 001.
const CENTER: (f64, f64) = (41.311081, 69.240562);

#[derive(Parser)]
#[command(name = "loadgen", about = "switchboard load generator (loopback only)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Dispatch latency with many drivers in the GEO set.
    Assign {
        #[arg(long, default_value_t = 100_000)]
        drivers: usize,
        #[arg(long, default_value_t = 2000)]
        orders: usize,
        /// Side of the square the drivers are spread over, km.
        #[arg(long, default_value_t = 50.0)]
        area_km: f64,
        /// Database (default: a temp SQLite file).
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Driver positions into one node, an admin watching.
    Locations {
        #[arg(long, default_value_t = 500)]
        drivers: usize,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Positions per second per driver (0 = as fast as the socket takes them).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Fan-out through Redis: S subscribers over N nodes, publishes at R/s.
    Fanout(FanoutArgs),
    /// Idle sockets: RSS and CPU per socket.
    Connections {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 10_000)]
        sockets: usize,
        /// Seconds to hold them idle while measuring CPU.
        #[arg(long, default_value_t = 20.0)]
        idle_secs: f64,
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Connect + authenticate + first message, per second.
    Churn {
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Internal: hold `count` idle sockets to `addr` (used by `connections`).
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        first_ip: u8,
        #[arg(long)]
        secs: f64,
    },
    /// Offers due together across nodes.
    Expiry {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 300)]
        offers: usize,
        #[arg(long, default_value_t = 3.0)]
        timeout_secs: f64,
        #[arg(long)]
        database_url: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Assign {
                drivers,
                orders,
                area_km,
                database_url,
            } => assign(drivers, orders, area_km, database_url).await,
            Cmd::Locations {
                drivers,
                secs,
                rate,
                database_url,
            } => locations(drivers, secs, rate, database_url).await,
            Cmd::Expiry {
                nodes,
                offers,
                timeout_secs,
                database_url,
            } => expiry(nodes, offers, timeout_secs, database_url).await,
            Cmd::Fanout(args) => fanout(args).await,
            Cmd::Connections {
                nodes,
                sockets,
                idle_secs,
                database_url,
            } => connections(nodes, sockets, idle_secs, database_url).await,
            Cmd::Churn {
                concurrency,
                secs,
                database_url,
            } => churn(concurrency, secs, database_url).await,
            Cmd::Hold {
                addr,
                count,
                first_ip,
                secs,
            } => hold(addr, count, first_ip, secs).await,
        }
    })
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// p50/p90/p99/p99.9/max in milliseconds from a µs histogram.
fn pct(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| (v as f64 / 1000.0 * 1000.0).round() / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

fn node_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("switchboard");
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release`",
            bin.display()
        );
    }
    Ok(bin)
}

/// A temp SQLite database unless a URL is given (kept alive by the guard).
fn database(url: Option<String>) -> anyhow::Result<(String, Option<tempfile::TempDir>)> {
    Ok(match url {
        Some(u) => (u, None),
        None => {
            let dir = tempfile::tempdir()?;
            (
                format!("sqlite://{}?mode=rwc", dir.path().join("lg.db").display()),
                Some(dir),
            )
        }
    })
}

/// Deterministic pseudo-random numbers (no seeding dependency on the clock).
struct Lcg(u64);
impl Lcg {
    fn next_f64(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn offset(center: (f64, f64), dx_km: f64, dy_km: f64) -> (f64, f64) {
    let lat = center.0 + dy_km / 111.32;
    let lon = center.1 + dx_km / (111.32 * center.0.to_radians().cos());
    (lat, lon)
}

async fn assign(
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
    let offered = metric_sum(
        &String::from_utf8_lossy(&metrics),
        r#"switchboard_offers_total{outcome="made"}"#,
    ) as usize;
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
        "  full dispatch (POST /api/orders: order insert + publish + nearest + DB checks + offer insert + deadline + publish): {}",
        pct(&dispatch)
    );
    println!(
        "{}",
        json!({"scenario": "assign", "drivers": drivers, "orders": dispatch.len(), "offered": offered,
               "db": db_kind, "http_floor": pct(&floor), "nearest": pct(&nearest), "dispatch": pct(&dispatch)})
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

/// Starts K node processes sharing one Redis and one database.
async fn cluster(
    k: usize,
    redis: &RedisServer,
    db_url: &str,
    extra: &[(&str, String)],
) -> anyhow::Result<Vec<NodeProcess>> {
    cluster_of(&node_binary()?, k, redis, db_url, extra).await
}

async fn cluster_of(
    bin: &std::path::Path,
    k: usize,
    redis: &RedisServer,
    db_url: &str,
    extra: &[(&str, String)],
) -> anyhow::Result<Vec<NodeProcess>> {
    let mut nodes = Vec::new();
    for i in 0..k {
        let mut env = vec![
            ("REDIS_URL", redis.url()),
            ("DATABASE_URL", db_url.to_string()),
            ("JWT_SECRET", String::from_utf8_lossy(SECRET).into_owned()),
            ("API_KEYS", API_KEY.to_string()),
            ("NODE_ID", format!("lg{i}")),
        ];
        env.extend(extra.iter().cloned());
        // The first node migrates; the others start after it.
        nodes.push(NodeProcess::start(bin, &env).await);
    }
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(
            http(n.addr, "GET", "/readyz", &[], None).await,
            Ok((200, _))
        ) {
            if Instant::now() > deadline {
                bail!("node {} never became ready", n.addr);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(nodes)
}

/// Peak and current resident memory of a process, in KiB (VmHWM, VmRSS).
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

async fn locations(
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

async fn expiry(
    k: usize,
    offers: usize,
    timeout_secs: f64,
    database_url: Option<String>,
) -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let (db_url, _dir) = database(database_url)?;
    let nodes = cluster(
        k,
        &redis,
        &db_url,
        &[
            ("OFFER_TIMEOUT_SECS", timeout_secs.to_string()),
            ("OFFER_LEASE_SECS", "2".into()),
        ],
    )
    .await?;
    // One isolated driver per order: 0.5° apart, far beyond the radius.
    let side = (offers as f64).sqrt().ceil() as usize;
    let spot = |i: usize| {
        (
            10.0 + (i / side) as f64 * 0.5,
            10.0 + (i % side) as f64 * 0.5,
        )
    };
    let mut sockets = Vec::new();
    for i in 0..offers {
        let n = &nodes[i % k];
        let t = mint(
            SECRET,
            json!({"sub": 50_000 + i, "role": "driver", "city_id": 1}),
        );
        let mut s =
            Socket::connect(n.addr, &format!("/ws/driver/orders/?token={t}"), None, 16).await?;
        let _ = s.recv().await;
        let _ = s.recv().await;
        let (lat, lon) = spot(i);
        let body = json!({"latitude": lat, "longitude": lon}).to_string();
        let (st, _) = http(
            n.addr,
            "POST",
            "/api/driver/location",
            &[("authorization", &format!("Bearer {t}"))],
            Some(body),
        )
        .await
        .map_err(anyhow::Error::msg)?;
        if st != 204 {
            bail!("location refused: {st}");
        }
        sockets.push(s);
    }
    let admin = mint(SECRET, json!({"sub": 1, "role": "admin"}));
    let t_create = Instant::now();
    let mut creates = Vec::new();
    for i in 0..offers {
        let addr = nodes[i % k].addr;
        let (lat, lon) = spot(i);
        let auth = format!("Bearer {admin}");
        creates.push(tokio::spawn(async move {
            let body = json!({"city_id": 1, "user_id": 2, "total": 10, "latitude_from": lat, "longitude_from": lon}).to_string();
            http(addr, "POST", "/api/orders", &[("authorization", &auth)], Some(body)).await
        }));
    }
    for c in creates {
        let (st, b) = c.await?.map_err(anyhow::Error::msg)?;
        if st != 201 {
            bail!("create failed {st}: {}", String::from_utf8_lossy(&b));
        }
    }
    let create_secs = t_create.elapsed().as_secs_f64();
    // Each driver: its offer's deadline, then the order_timeout's arrival.
    let mut waits = Vec::new();
    for mut s in sockets {
        waits.push(tokio::spawn(async move {
            let mut deadline = None;
            let mut timeouts = 0u32;
            let mut lateness = None;
            let until = Instant::now() + Duration::from_secs_f64(timeout_secs + 20.0);
            while let Ok(Some(Incoming::Text(b))) =
                tokio::time::timeout_at(until.into(), s.recv()).await
            {
                let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                match v["type"].as_str() {
                    Some("new_order") => {
                        deadline = v["order"]["offer_expires_at"]
                            .as_str()
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
                    }
                    Some("order_timeout") => {
                        timeouts += 1;
                        if let Some(d) = deadline {
                            lateness = Some(
                                (chrono::Utc::now() - d.with_timezone(&chrono::Utc))
                                    .num_microseconds()
                                    .unwrap_or(0),
                            );
                        }
                        // Keep listening briefly for a duplicate.
                        let _ = tokio::time::timeout(Duration::from_millis(1500), async {
                            while let Some(Incoming::Text(b)) = s.recv().await {
                                if b.windows(13).any(|w| w == b"order_timeout") {
                                    timeouts += 1;
                                }
                            }
                        })
                        .await;
                        break;
                    }
                    _ => {}
                }
            }
            (timeouts, lateness)
        }));
    }
    let mut late = hist();
    let (mut once, mut dup, mut missing) = (0, 0, 0);
    for w in waits {
        let (n, l) = w.await?;
        match n {
            0 => missing += 1,
            1 => once += 1,
            _ => dup += 1,
        }
        if let Some(l) = l {
            late.record(l.max(1) as u64)?;
        }
    }
    println!(
        "expiry: {offers} offers over {k} nodes (created in {create_secs:.2} s), timeout {timeout_secs} s: expired once {once}, duplicated {dup}, missing {missing}"
    );
    println!(
        "  lateness (deadline → order_timeout at the driver): {}",
        pct(&late)
    );
    println!(
        "{}",
        json!({"scenario": "expiry", "nodes": k, "offers": offers, "once": once, "duplicated": dup,
               "missing": missing, "create_secs": create_secs, "lateness": pct(&late)})
    );
    Ok(())
}

#[derive(clap::Args)]
struct FanoutArgs {
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Publishes per second (deliveries/s = rate × subscribers).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Bytes of filler in each payload.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Endpoint the subscribers use: /ws (events), / (rooms), driver.
    #[arg(long, default_value = "/ws")]
    path: String,
    /// Publisher tasks, each with its own connection to every node and
    /// one request in flight; together they keep to `rate`.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Node binary (default: `switchboard` beside this one); e.g. `baseline`.
    #[arg(long)]
    server: Option<PathBuf>,
    #[arg(long)]
    database_url: Option<String>,
}

/// A kept-alive HTTP/1 connection for the publisher.
struct HttpConn {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    addr: std::net::SocketAddr,
}

impl HttpConn {
    async fn open(addr: std::net::SocketAddr) -> anyhow::Result<HttpConn> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(HttpConn { sender, addr })
    }

    /// Any request; the status and body.
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> anyhow::Result<(u16, bytes::Bytes)> {
        if self.sender.ready().await.is_err() {
            *self = HttpConn::open(self.addr).await?;
        }
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(http_body_util::Full::new(bytes::Bytes::from(
            body.unwrap_or_default(),
        )))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        use http_body_util::BodyExt;
        Ok((status, resp.into_body().collect().await?.to_bytes()))
    }

    async fn post(&mut self, path: &str, key: &str, body: String) -> anyhow::Result<u16> {
        // A kept-alive connection the server closed is replaced, once.
        if self.sender.ready().await.is_err() {
            *self = HttpConn::open(self.addr).await?;
        }
        let req = hyper::Request::post(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .header("x-api-key", key)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        use http_body_util::BodyExt;
        let _ = resp.into_body().collect().await;
        Ok(status)
    }
}

/// The integer after `"key":` in a JSON frame, without parsing the JSON.
fn int_field(b: &[u8], key: &[u8]) -> Option<u64> {
    let i = b.windows(key.len()).position(|w| w == key)? + key.len();
    let mut n = 0u64;
    let mut any = false;
    for &c in &b[i..] {
        if c.is_ascii_digit() {
            n = n * 10 + (c - b'0') as u64;
            any = true;
        } else {
            break;
        }
    }
    any.then_some(n)
}

fn self_cpu() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

async fn fanout(a: FanoutArgs) -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let (db_url, _dir) = database(a.database_url)?;
    let bin = match a.server {
        Some(p) => p,
        None => node_binary()?,
    };
    let nodes = cluster_of(
        &bin,
        a.nodes,
        &redis,
        &db_url,
        &[("SEND_QUEUE_LEN", "4096".into())],
    )
    .await?;
    let admin = mint(SECRET, json!({"sub": 1, "role": "admin"}));
    let driver = mint(SECRET, json!({"sub": 7, "role": "driver", "city_id": 1}));
    // Drivers listen on driver-7; everyone else on admin-orders.
    let (room, token) = if a.path.starts_with("/ws/driver") {
        ("driver-7", driver)
    } else {
        ("admin-orders", admin)
    };
    let mut subs = Vec::new();
    for i in 0..a.subscribers {
        let n = &nodes[i % nodes.len()];
        let sep = if a.path.contains('?') { '&' } else { '?' };
        let mut s =
            Socket::connect(n.addr, &format!("{}{sep}token={token}", a.path), None, 4096).await?;
        // Connect messages (1, or 2 on the driver endpoint).
        let _ = s.recv().await;
        if a.path.starts_with("/ws/driver") {
            let _ = s.recv().await;
        }
        subs.push(s);
    }
    // Fired 5 s after the last publish was answered (however late the
    // publisher ran): what has not arrived by then is lost.
    let done = tokio_util::sync::CancellationToken::new();
    let total_publishes = (a.rate * a.secs).round() as u64;
    // Subscribers: parse only `"s":` (sequence) and `"t":` (send time, µs).
    let mut tasks = Vec::new();
    for mut s in subs {
        // One stop signal for the whole run (a timeout per message would
        // cost a timer insertion per message).
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut seen = vec![false; total_publishes as usize + 1];
            let (mut got, mut dups) = (0u64, 0u64);
            let mut closed = None;
            loop {
                let b = tokio::select! {
                    biased;
                    m = s.recv() => match m {
                        Some(Incoming::Text(b)) => b,
                        Some(Incoming::Close(code)) => {
                            closed = Some(code);
                            break;
                        }
                        None => break,
                    },
                    _ = done.cancelled() => break,
                };
                let (Some(seq), Some(t)) = (int_field(&b, b"\"s\":"), int_field(&b, b"\"t\":"))
                else {
                    continue;
                };
                let now = chrono::Utc::now().timestamp_micros() as u64;
                let _ = h.record(now.saturating_sub(t).max(1));
                match seen.get_mut(seq as usize) {
                    Some(x) if *x => dups += 1,
                    Some(x) => {
                        *x = true;
                        got += 1;
                    }
                    None => {}
                }
            }
            (h, got, dups, seen, closed)
        }));
    }
    let pids: Vec<u32> = nodes.iter().filter_map(NodeProcess::pid).collect();
    let cpu0: Vec<f64> = pids
        .iter()
        .map(|p| cpu_seconds(*p).unwrap_or(0.0))
        .collect();
    let my0 = self_cpu();
    // Publishers: paced (publish `seq` is due at (seq-1)/rate), each with
    // one kept-alive connection per node, round-robin over the nodes;
    // publisher j sends the publishes with seq ≡ j (mod publishers).
    let started = Instant::now();
    let publishers = a.publishers.max(1) as u64;
    let mut pubs = Vec::new();
    for j in 0..publishers {
        let mut conns = Vec::new();
        for n in &nodes {
            conns.push(HttpConn::open(n.addr).await?);
        }
        let filler = "x".repeat(a.payload);
        let room = room.to_string();
        let rate = a.rate;
        pubs.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut refused = 0u64;
            for seq in (1 + j..=total_publishes).step_by(publishers as usize) {
                let due = started + Duration::from_secs_f64((seq - 1) as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let t = chrono::Utc::now().timestamp_micros();
                let body = format!(
                    r#"{{"room":"{room}","type":"bench","data":{{"s":{seq},"t":{t},"p":"{filler}"}}}}"#
                );
                let n = conns.len();
                let c = &mut conns[(seq / publishers) as usize % n];
                match c.post("/api/publish", API_KEY, body).await {
                    Ok(204) => accepted.push(seq),
                    other => {
                        if refused < 3 {
                            eprintln!("publish {seq} not accepted: {other:?}");
                        }
                        refused += 1;
                    }
                }
            }
            (accepted, refused)
        }));
    }
    let mut accepted = vec![false; total_publishes as usize + 1];
    let mut refused = 0u64;
    for p in pubs {
        let (acc, r) = p.await?;
        for seq in acc {
            accepted[seq as usize] = true;
        }
        refused += r;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(5)).await;
    done.cancel();
    let mut lat = hist();
    let (mut got, mut dups, mut lost) = (0u64, 0u64, 0u64);
    // Sockets the server closed during the run, by close code (4008: the
    // loadgen read too slowly and was dropped as a slow consumer).
    let mut closes: std::collections::BTreeMap<u16, u64> = Default::default();
    for t in tasks {
        let (h, g, d, seen, closed) = t.await?;
        if let Some(code) = closed {
            *closes.entry(code).or_default() += 1;
        }
        lat.add(&h)?;
        got += g;
        dups += d;
        lost += accepted
            .iter()
            .zip(&seen)
            .filter(|(acc, s)| **acc && !**s)
            .count() as u64;
    }
    let my_cpu = self_cpu() - my0;
    let node_cpu: f64 = pids
        .iter()
        .zip(&cpu0)
        .map(|(p, c)| cpu_seconds(*p).unwrap_or(*c) - c)
        .sum();
    let peak_rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p).0).collect();
    let expected = accepted.iter().filter(|x| **x).count() as u64 * a.subscribers as u64;
    let per_s = got as f64 / publish_secs;
    let server_us = node_cpu * 1e6 / got.max(1) as f64;
    let loadgen_us = my_cpu * 1e6 / got.max(1) as f64;
    println!(
        "fanout: {} subscribers on {} nodes ({}), {} publishes at {}/s by {} publisher(s) for {:.1} s, payload {} B, server {}",
        a.subscribers,
        a.nodes,
        a.path,
        total_publishes,
        a.rate,
        publishers,
        publish_secs,
        a.payload,
        bin.file_name().and_then(|n| n.to_str()).unwrap_or("?")
    );
    println!(
        "  deliveries {got}/{expected} ({per_s:.0}/s), lost {lost}, duplicates {dups}, publishes refused {refused}, sockets closed by the server {closes:?}"
    );
    println!("  latency publish→socket: {}", pct(&lat));
    println!(
        "  server CPU {node_cpu:.2} s = {server_us:.2} µs/delivery; peak RSS per node {peak_rss:?} KiB; loadgen CPU {loadgen_us:.2} µs/delivery"
    );
    println!(
        "{}",
        json!({"scenario": "fanout", "server": bin.file_name().and_then(|n| n.to_str()), "nodes": a.nodes,
               "subscribers": a.subscribers, "publishers": publishers, "path": a.path, "rate": a.rate, "secs": a.secs, "payload": a.payload,
               "deliveries": got, "expected": expected, "per_s": per_s, "lost": lost, "duplicates": dups,
               "refused": refused, "closed_by_server": closes, "latency": pct(&lat), "server_cpu_s": node_cpu,
               "server_us_per_delivery": server_us, "peak_rss_kib": peak_rss, "loadgen_us_per_delivery": loadgen_us})
    );
    Ok(())
}

/// Opens `count` idle sockets from 127.0.0.`first_ip`.. (cycling source
/// addresses past the ephemeral port range), holds them `secs`, then exits.
async fn hold(
    addr: std::net::SocketAddr,
    count: usize,
    first_ip: u8,
    secs: f64,
) -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let admin = mint(SECRET, json!({"sub": 1, "role": "user"}));
    let mut socks = Vec::with_capacity(count);
    let per_ip = 20_000;
    for i in 0..count {
        let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::new(
            127,
            0,
            0,
            first_ip + (i / per_ip) as u8,
        ));
        let mut s = Socket::connect(addr, &format!("/?token={admin}"), Some(ip), 4).await?;
        let _ = s.recv().await;
        socks.push(s);
    }
    println!("held {count}");
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    drop(socks);
    Ok(())
}

async fn connections(
    k: usize,
    sockets: usize,
    idle_secs: f64,
    database_url: Option<String>,
) -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let (db_url, _dir) = database(database_url)?;
    let nodes = cluster(k, &redis, &db_url, &[]).await?;
    let pids: Vec<u32> = nodes.iter().filter_map(NodeProcess::pid).collect();
    let rss0: Vec<u64> = pids.iter().map(|p| rss_kib(*p).1).collect();
    // One holder process per node (each below the per-process file cap).
    let me = std::env::current_exe()?;
    let per_node = sockets / k;
    let hold_secs = idle_secs + 120.0;
    let t0 = Instant::now();
    let mut holders = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let child = tokio::process::Command::new(&me)
            .args([
                "hold",
                "--addr",
                &n.addr.to_string(),
                "--count",
                &per_node.to_string(),
            ])
            .args([
                "--first-ip",
                &(2 + i * 10).to_string(),
                "--secs",
                &hold_secs.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        holders.push(child);
    }
    // Wait until every holder reports its sockets open.
    for h in holders.iter_mut() {
        use tokio::io::AsyncBufReadExt;
        let out = h.stdout.take().expect("piped");
        let mut lines = tokio::io::BufReader::new(out).lines();
        match tokio::time::timeout(Duration::from_secs(300), lines.next_line()).await {
            Ok(Ok(Some(l))) if l.starts_with("held") => {}
            other => bail!("holder failed: {other:?}"),
        }
    }
    let open_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1: Vec<u64> = pids.iter().map(|p| rss_kib(*p).1).collect();
    let cpu0: Vec<f64> = pids
        .iter()
        .map(|p| cpu_seconds(*p).unwrap_or(0.0))
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(idle_secs)).await;
    let cpu1: Vec<f64> = pids
        .iter()
        .map(|p| cpu_seconds(*p).unwrap_or(0.0))
        .collect();
    let total = per_node * k;
    let rss_delta: u64 = rss1
        .iter()
        .zip(&rss0)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    let kib_per_socket = rss_delta as f64 / total as f64;
    let idle_cpu: f64 = cpu1.iter().zip(&cpu0).map(|(a, b)| a - b).sum();
    let us_per_socket_s = idle_cpu * 1e6 / total as f64 / idle_secs;
    println!("connections: {total} idle sockets over {k} nodes (opened in {open_secs:.1} s)");
    println!(
        "  server RSS +{rss_delta} KiB = {kib_per_socket:.2} KiB/socket; idle CPU {idle_cpu:.3} s over {idle_secs} s = {us_per_socket_s:.3} µs/s per socket"
    );
    println!(
        "{}",
        json!({"scenario": "connections", "sockets": total, "nodes": k, "open_secs": open_secs,
               "rss_delta_kib": rss_delta, "kib_per_socket": kib_per_socket,
               "idle_cpu_s": idle_cpu, "idle_secs": idle_secs, "us_per_socket_per_s": us_per_socket_s})
    );
    drop(holders);
    Ok(())
}

async fn churn(concurrency: usize, secs: f64, database_url: Option<String>) -> anyhow::Result<()> {
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
