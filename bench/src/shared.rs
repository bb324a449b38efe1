//! What every scenario shares: the secret and API key the nodes are started
//! with, latency histograms and their summary, starting a cluster of node
//! processes, the CPU and memory of a process from `/proc`, deterministic
//! positions, and a kept-alive HTTP/1 connection.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use switchboard_testkit::{NodeProcess, RedisServer, http};

pub const SECRET: &[u8] = b"loadgen-secret-0123456789abcdef";
pub const API_KEY: &str = "loadgen-key";
/// Tashkent, as in seed 001.
pub const CENTER: (f64, f64) = (41.311081, 69.240562);

pub fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// p50/p90/p99/p99.9/max in milliseconds from a µs histogram.
pub fn pct(h: &Histogram<u64>) -> Value {
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

pub fn node_binary() -> anyhow::Result<PathBuf> {
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
pub fn database(url: Option<String>) -> anyhow::Result<(String, Option<tempfile::TempDir>)> {
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
pub struct Lcg(pub u64);
impl Lcg {
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub fn offset(center: (f64, f64), dx_km: f64, dy_km: f64) -> (f64, f64) {
    let lat = center.0 + dy_km / 111.32;
    let lon = center.1 + dx_km / (111.32 * center.0.to_radians().cos());
    (lat, lon)
}

/// Starts K node processes sharing one Redis and one database.
pub async fn cluster(
    k: usize,
    redis: &RedisServer,
    db_url: &str,
    extra: &[(&str, String)],
) -> anyhow::Result<Vec<NodeProcess>> {
    cluster_of(&node_binary()?, k, redis, db_url, extra).await
}

pub async fn cluster_of(
    bin: &std::path::Path,
    k: usize,
    redis: &RedisServer,
    db_url: &str,
    extra: &[(&str, String)],
) -> anyhow::Result<Vec<NodeProcess>> {
    nodes_at(bin, k, &redis.url(), db_url, extra).await
}

/// [`cluster_of`] against any `REDIS_URL` (one Redis, or a Redis Cluster's
/// `redis+cluster://`).
pub async fn nodes_at(
    bin: &std::path::Path,
    k: usize,
    redis_url: &str,
    db_url: &str,
    extra: &[(&str, String)],
) -> anyhow::Result<Vec<NodeProcess>> {
    let mut nodes = Vec::new();
    for i in 0..k {
        // The first node migrates; the others start after it.
        let env = node_env(&format!("lg{i}"), redis_url, db_url, extra);
        nodes.push(NodeProcess::start(bin, &env).await);
    }
    for n in &nodes {
        wait_ready(n.addr, Duration::from_secs(30)).await?;
    }
    Ok(nodes)
}

/// The environment of a loadgen node: Redis, database, the shared secret and
/// API key, its `NODE_ID`, then `extra`.
pub fn node_env<'a>(
    node_id: &str,
    redis_url: &str,
    db_url: &str,
    extra: &[(&'a str, String)],
) -> Vec<(&'a str, String)> {
    let mut env = vec![
        ("REDIS_URL", redis_url.to_string()),
        ("DATABASE_URL", db_url.to_string()),
        ("JWT_SECRET", String::from_utf8_lossy(SECRET).into_owned()),
        ("API_KEYS", API_KEY.to_string()),
        ("NODE_ID", node_id.to_string()),
    ];
    env.extend(extra.iter().cloned());
    env
}

/// Waits until `GET /readyz` answers 200 (Redis and the database reachable).
pub async fn wait_ready(addr: std::net::SocketAddr, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !matches!(http(addr, "GET", "/readyz", &[], None).await, Ok((200, _))) {
        if Instant::now() > deadline {
            bail!("node {addr} never became ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Peak and current resident memory of a process, in KiB (VmHWM, VmRSS).
pub fn rss_kib(pid: u32) -> (u64, u64) {
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

pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

pub fn self_cpu() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

/// A kept-alive HTTP/1 connection (the fan-out publishers, the assign timings).
pub struct HttpConn {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    addr: std::net::SocketAddr,
}

impl HttpConn {
    pub async fn open(addr: std::net::SocketAddr) -> anyhow::Result<HttpConn> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(HttpConn { sender, addr })
    }

    /// Any request; the status and body.
    pub async fn request(
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

    pub async fn post(&mut self, path: &str, key: &str, body: String) -> anyhow::Result<u16> {
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

/// Redis's own accounting, from `INFO`: process CPU (user + sys, µs
/// precision, unlike `/proc`'s 10 ms ticks) and the time spent inside
/// commands (`commandstats`), total and per command.
#[derive(Clone, Default)]
pub struct RedisCpu {
    pub cpu_s: f64,
    pub cmd_us: u64,
    pub by_cmd: std::collections::BTreeMap<String, (u64, u64)>,
}

impl RedisCpu {
    pub async fn read(redis: &RedisServer) -> anyhow::Result<RedisCpu> {
        Self::read_url(&redis.url()).await
    }

    /// [`RedisCpu::read`] of the Redis at `url` (one node of a cluster).
    pub async fn read_url(url: &str) -> anyhow::Result<RedisCpu> {
        let mut c = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .arg("commandstats")
            .query_async(&mut c)
            .await?;
        let mut r = RedisCpu::default();
        for line in info.lines() {
            let Some((k, v)) = line.trim().split_once(':') else {
                continue;
            };
            match k {
                "used_cpu_user" | "used_cpu_sys" => r.cpu_s += v.parse::<f64>().unwrap_or(0.0),
                _ => {
                    let Some(name) = k.strip_prefix("cmdstat_") else {
                        continue;
                    };
                    let field = |f: &str| {
                        v.split(',')
                            .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))
                            .and_then(|n| n.parse::<u64>().ok())
                            .unwrap_or(0)
                    };
                    let (calls, usec) = (field("calls"), field("usec"));
                    r.cmd_us += usec;
                    r.by_cmd.insert(name.to_string(), (calls, usec));
                }
            }
        }
        Ok(r)
    }

    /// What happened between `before` and `self`: CPU seconds, command µs,
    /// and (calls, µs) of each command that ran.
    pub fn since(&self, before: &RedisCpu) -> (f64, u64, Value) {
        let mut cmds = serde_json::Map::new();
        for (name, (calls, usec)) in &self.by_cmd {
            let (c0, u0) = before.by_cmd.get(name).copied().unwrap_or((0, 0));
            if calls > &c0 {
                cmds.insert(
                    name.clone(),
                    json!({"calls": calls - c0, "usec": usec - u0}),
                );
            }
        }
        (
            self.cpu_s - before.cpu_s,
            self.cmd_us.saturating_sub(before.cmd_us),
            Value::Object(cmds),
        )
    }
}
