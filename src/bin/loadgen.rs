//! switchboard's load generator. Everything runs on loopback: it starts its
//! own `redis-server` and nodes, every loop is bounded in count and time,
//! and it prints a summary plus one JSON line.
//!
//! - `assign`: nearest-driver lookup and full dispatch latency with N drivers
//!   in the Redis GEO set (dispatcher called in-process, timed around it).
//! - `locations`: D driver sockets stream positions to one node process,
//!   an admin socket watches; ingest rate and staleness at the watcher.
//! - `expiry`: offers due in the same second across K node processes;
//!   each expires once; lateness = `order_timeout` received − deadline.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use switchboard::testkit::{NodeProcess, RedisServer, http, mint};
use switchboard_client::{Incoming, Socket};

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
    use switchboard::dispatch::index::DriverIndex;
    let redis = RedisServer::start();
    let (db_url, _dir) = database(database_url)?;
    let mut config = switchboard::Config::defaults();
    config.listen = "127.0.0.1:0".parse()?;
    config.redis_url = Some(redis.url());
    config.database_url = db_url.clone();
    config.node_id = "loadgen".into();
    let node = switchboard::Node::start(config).await?;
    let app = node.app().clone();

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

    let mut nearest = hist();
    let mut dispatch = hist();
    let mut offered = 0;
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
        let near = app
            .drivers
            .nearest(
                lat,
                lon,
                app.config.dispatch_radius_km,
                app.config.driver_stale,
                32,
            )
            .await?;
        nearest.record(t.elapsed().as_micros().max(1) as u64)?;
        if near.is_empty() {
            continue;
        }
        let (order, _) = switchboard::store::create_order(
            &app.db,
            switchboard::store::NewOrder {
                order_type: "delivery".into(),
                user_id: 1,
                city_id: 1,
                address_from: String::new(),
                address_to: String::new(),
                latitude_from: Some(format!("{lat:.6}")),
                longitude_from: Some(format!("{lon:.6}")),
                latitude_to: None,
                longitude_to: None,
                total: 100.0,
                bonuses_used: 0.0,
                bonuses_earned: 5.0,
                scheduled_at: None,
            },
            false,
        )
        .await?;
        let t = Instant::now();
        let offer = switchboard::dispatch::dispatch(&app, order.id).await?;
        dispatch.record(t.elapsed().as_micros().max(1) as u64)?;
        offered += offer.is_some() as usize;
    }
    node.stop().await;
    let db_kind = if db_url.starts_with("sqlite") {
        "sqlite"
    } else {
        "postgres"
    };
    println!(
        "assign: {drivers} drivers over {area_km}x{area_km} km (loaded in {load_secs:.2} s), {} orders, {offered} offered, db {db_kind}",
        dispatch.len()
    );
    println!(
        "  nearest (GEOSEARCH+filters, 1 Lua round trip): {}",
        pct(&nearest)
    );
    println!(
        "  full dispatch (nearest + DB checks + offer insert + deadline + publish): {}",
        pct(&dispatch)
    );
    println!(
        "{}",
        json!({"scenario": "assign", "drivers": drivers, "orders": dispatch.len(), "offered": offered,
               "db": db_kind, "nearest": pct(&nearest), "dispatch": pct(&dispatch)})
    );
    Ok(())
}

/// Starts K node processes sharing one Redis and one database.
async fn cluster(
    k: usize,
    redis: &RedisServer,
    db_url: &str,
    extra: &[(&str, String)],
) -> anyhow::Result<Vec<NodeProcess>> {
    let bin = node_binary()?;
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
        nodes.push(NodeProcess::start(&bin, &env).await);
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
    let sent = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (i, s) in sockets.into_iter().enumerate() {
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Lcg(i as u64 + 1);
            let gap = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
            while Instant::now() < stop_at {
                let (lat, lon) = offset(CENTER, (rng.next_f64() - 0.5) * 20.0, (rng.next_f64() - 0.5) * 20.0);
                let msg = format!(r#"{{"type":"location","latitude":{lat:.6},"longitude":{lon:.6},"heading":90,"speed":10}}"#);
                if s.send_text(&msg).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                if let Some(g) = gap {
                    tokio::time::sleep(g).await;
                }
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
    let sent = sent.load(Ordering::Relaxed);
    let per_s = sent as f64 / secs;
    println!(
        "locations: {drivers} driver sockets → 1 node for {secs} s: {sent} positions sent ({per_s:.0}/s), watcher saw {seen}, node CPU {cpu:.2} s ({:.1} µs/position)",
        cpu * 1e6 / sent.max(1) as f64
    );
    println!("  staleness at the watcher: {}", pct(&stale));
    println!(
        "{}",
        json!({"scenario": "locations", "drivers": drivers, "secs": secs, "sent": sent, "per_s": per_s,
               "watcher_seen": seen, "node_cpu_s": cpu, "staleness": pct(&stale)})
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
