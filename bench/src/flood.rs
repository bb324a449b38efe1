//! `flood`: does one abusive socket hurt everyone else on its node? One
//! node (on its own `redis-server`), S subscriber sockets on `/ws` (admin
//! tokens, room `admin-orders`) receiving a steady stream of publishes
//! (`POST /api/publish`, numbered and timestamped), and in alternating
//! phases one socket sending `--abuse-rate` messages a second (default
//! 10,000): driver locations, `join-room`s of rooms it may not join, and
//! garbage, over a driver token on the driver endpoint. When the server
//! closes it (1008 after 10 s over the rate), it reconnects at once, as an
//! abuser would.
//!
//! Phases: a warm-up (not measured), then `--rounds` × (quiet, flood),
//! `--secs` each. A delivery counts in the phase its publish was due in.
//! Reported: the subscribers' publish→socket latency per kind of phase
//! (p50…max), the p99 ratio flood/quiet (the issue's bar: at most 1.2),
//! loss, the node's CPU per phase, and what the abuser sent and got.
//!
//! The abuser runs on a thread of its own with its own runtime, writing
//! pre-built frames (masked with a zero key, which RFC 6455 allows) a few
//! at a time, so the loadgen's subscriber tasks do not queue behind it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_client::{Incoming, Socket};
use switchboard_testkit::{RedisServer, mint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fanout::int_field;
use crate::shared::{
    API_KEY, CENTER, HttpConn, SECRET, cluster, cpu_seconds, database, hist, pct, rss_kib,
};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 200)]
    subscribers: usize,
    /// Publishes per second to `admin-orders` (each reaches every subscriber).
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Seconds per phase.
    #[arg(long, default_value_t = 15.0)]
    secs: f64,
    /// Pairs of phases (quiet, flood).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Seconds of publishing before the first measured phase.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Messages per second the abusive socket sends.
    #[arg(long, default_value_t = 10_000.0)]
    abuse_rate: f64,
    /// What it sends: locations, joins, garbage, or a mix of the three.
    #[arg(long, value_enum, default_value = "mixed")]
    abuse: Abuse,
    /// Extra node settings, `KEY=VALUE` (e.g. `MAX_MESSAGES_PER_SEC=0` to
    /// see the node without its inbound rate limit).
    #[arg(long = "node-env")]
    node_env: Vec<String>,
    #[arg(long)]
    database_url: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Abuse {
    Locations,
    Joins,
    Garbage,
    Mixed,
}

impl Abuse {
    fn as_str(self) -> &'static str {
        match self {
            Abuse::Locations => "locations",
            Abuse::Joins => "joins",
            Abuse::Garbage => "garbage",
            Abuse::Mixed => "mixed",
        }
    }
}

/// A client text frame, masked with the zero key (the payload is sent as is).
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    let n = payload.len();
    if n < 126 {
        f.push(0x80 | n as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// The abuser's messages, built once: `n` frames cycling over its kinds.
fn abuse_frames(kind: Abuse, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let k = match kind {
                Abuse::Mixed => i % 3,
                Abuse::Locations => 0,
                Abuse::Joins => 1,
                Abuse::Garbage => 2,
            };
            let msg = match k {
                0 => {
                    let (lat, lon) = crate::shared::offset(CENTER, i as f64 * 0.01, 0.0);
                    format!(r#"{{"type":"location","latitude":{lat:.6},"longitude":{lon:.6}}}"#)
                }
                1 => format!(r#"{{"type":"join-room","roomId":"city-{i}-orders"}}"#),
                _ => format!("{{\"type\":garbage {i} \u{1F4A5}"),
            };
            masked_text(msg.as_bytes())
        })
        .collect()
}

/// What the abuser did.
#[derive(Default)]
struct AbuseStats {
    sent: AtomicU64,
    connects: AtomicU64,
    /// Bytes the server sent it (error messages, mostly).
    bytes_in: AtomicU64,
    closes_1008: AtomicU64,
    other_ends: AtomicU64,
}

/// The abusive socket: while `on`, sends `rate` messages a second in
/// batches every millisecond; reconnects whenever the server ends it.
fn abuser(
    addr: SocketAddr,
    token: String,
    kind: Abuse,
    rate: f64,
    on: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    stats: Arc<AbuseStats>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("abuser runtime");
        rt.block_on(async move {
            let frames = abuse_frames(kind, 300);
            let mut next = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if !on.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let path = format!("/ws/driver/orders/?token={token}");
                let Ok(ws) = switchboard_client::handshake(tcp, addr, &path, &[]).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                stats.connects.fetch_add(1, Ordering::Relaxed);
                let io = ws.into_inner();
                let (mut rd, mut wr) = tokio::io::split(io);
                // Reads and drops what the server says; notes a close frame.
                let st = stats.clone();
                let reader = tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut saw_1008 = false;
                    loop {
                        match rd.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                st.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                                // A close frame (unmasked, short) with 1008.
                                if buf[..n]
                                    .windows(4)
                                    .any(|w| w[0] == 0x88 && w[1] < 126 && w[2..] == [0x03, 0xf0])
                                {
                                    saw_1008 = true;
                                }
                            }
                        }
                    }
                    if saw_1008 {
                        st.closes_1008.fetch_add(1, Ordering::Relaxed);
                    } else {
                        st.other_ends.fetch_add(1, Ordering::Relaxed);
                    }
                });
                // Paced: message k of this connection is due at k / rate.
                let t0 = Instant::now();
                let mut k = 0u64;
                let mut batch = Vec::with_capacity(64 * 1024);
                'conn: while on.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    if reader.is_finished() {
                        break;
                    }
                    let due = (t0.elapsed().as_secs_f64() * rate) as u64;
                    batch.clear();
                    let mut in_batch = 0u64;
                    while k < due && batch.len() < 60 * 1024 {
                        batch.extend_from_slice(&frames[next]);
                        next = (next + 1) % frames.len();
                        k += 1;
                        in_batch += 1;
                    }
                    if !batch.is_empty() {
                        if wr.write_all(&batch).await.is_err() {
                            break 'conn;
                        }
                        stats.sent.fetch_add(in_batch, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                drop(wr);
                reader.abort();
            }
        });
    })
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let redis = RedisServer::start();
    let (db_url, _dir) = database(a.database_url.clone())?;
    let mut extra: Vec<(&str, String)> = vec![("SEND_QUEUE_LEN", "4096".to_string())];
    let kv: Vec<(String, String)> = a
        .node_env
        .iter()
        .filter_map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    for (k, v) in &kv {
        extra.push((k.as_str(), v.clone()));
    }
    let nodes = cluster(1, &redis, &db_url, &extra).await?;
    let addr = nodes[0].addr;
    let pid = nodes[0].pid().unwrap_or(0);
    let admin = mint(SECRET, json!({"sub": 1, "role": "admin"}));
    let driver = mint(
        SECRET,
        json!({"sub": 900, "role": "driver", "driver_id": 900, "city_id": 1}),
    );

    // Timeline: warm-up, then rounds of (quiet, flood).
    let phases = 2 * a.rounds;
    let total_secs = a.warmup + a.secs * phases as f64;
    let total_publishes = (a.rate * total_secs).round() as u64;
    // The phase a publish due at `t` s belongs to: None in the warm-up.
    let warmup = a.warmup;
    let secs = a.secs;
    let phase_of = move |t: f64| -> Option<usize> {
        (t >= warmup).then(|| (((t - warmup) / secs) as usize).min(phases - 1))
    };

    let mut subs = Vec::new();
    for _ in 0..a.subscribers {
        let mut s = Socket::connect(addr, &format!("/ws?token={admin}"), None, 4096).await?;
        let _ = s.recv().await; // CONNECTED
        subs.push(s);
    }
    let done = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    let rate = a.rate;
    for mut s in subs {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            // One histogram per phase kind: 0 quiet, 1 flood.
            let mut h = [hist(), hist()];
            let mut seen = vec![false; total_publishes as usize + 1];
            let mut dups = 0u64;
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
                match seen.get_mut(seq as usize) {
                    Some(x) if *x => dups += 1,
                    Some(x) => *x = true,
                    None => {}
                }
                if let Some(p) = phase_of((seq - 1) as f64 / rate) {
                    let _ = h[p % 2].record(now.saturating_sub(t).max(1));
                }
            }
            (h, seen, dups, closed)
        }));
    }

    // The abuser, switched on in the flood phases.
    let on = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(AbuseStats::default());
    let abuse_thread = abuser(
        addr,
        driver,
        a.abuse,
        a.abuse_rate,
        on.clone(),
        stop.clone(),
        stats.clone(),
    );

    // Publisher: paced, one kept-alive connection.
    let started = Instant::now();
    let publisher = {
        let mut conn = HttpConn::open(addr).await?;
        tokio::spawn(async move {
            let mut accepted = vec![false; total_publishes as usize + 1];
            let mut refused = 0u64;
            for seq in 1..=total_publishes {
                let due = started + Duration::from_secs_f64((seq - 1) as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let t = chrono::Utc::now().timestamp_micros();
                let body = format!(
                    r#"{{"room":"admin-orders","type":"bench","data":{{"s":{seq},"t":{t},"p":"{}"}}}}"#,
                    "x".repeat(100)
                );
                match conn.post("/api/publish", API_KEY, body).await {
                    Ok(204) => accepted[seq as usize] = true,
                    _ => refused += 1,
                }
            }
            (accepted, refused)
        })
    };

    // Phase switching and the node's CPU per phase.
    let mut cpu_by_kind = [0.0f64; 2];
    let mut abuse_sent_by_phase = Vec::new();
    tokio::time::sleep_until((started + Duration::from_secs_f64(a.warmup)).into()).await;
    for p in 0..phases {
        let flood = p % 2 == 1;
        on.store(flood, Ordering::Relaxed);
        let sent0 = stats.sent.load(Ordering::Relaxed);
        let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
        let end = started + Duration::from_secs_f64(a.warmup + a.secs * (p + 1) as f64);
        tokio::time::sleep_until(end.into()).await;
        cpu_by_kind[p % 2] += cpu_seconds(pid).unwrap_or(cpu0) - cpu0;
        abuse_sent_by_phase.push(stats.sent.load(Ordering::Relaxed) - sent0);
    }
    on.store(false, Ordering::Relaxed);
    let (accepted, refused) = publisher.await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    done.cancel();
    stop.store(true, Ordering::Relaxed);
    let _ = abuse_thread.join();

    let mut h = [hist(), hist()];
    let (mut lost, mut dups) = (0u64, 0u64);
    let mut closes: std::collections::BTreeMap<u16, u64> = Default::default();
    for t in tasks {
        let (th, seen, d, closed) = t.await?;
        for k in 0..2 {
            h[k].add(&th[k])?;
        }
        dups += d;
        lost += accepted
            .iter()
            .zip(&seen)
            .filter(|(acc, s)| **acc && !**s)
            .count() as u64;
        if let Some(c) = closed {
            *closes.entry(c).or_default() += 1;
        }
    }
    let p99 = |h: &hdrhistogram::Histogram<u64>| h.value_at_quantile(0.99) as f64 / 1000.0;
    let (q99, f99) = (p99(&h[0]), p99(&h[1]));
    let ratio = f99 / q99.max(0.001);
    let phase_secs = a.secs * a.rounds as f64;
    let flood_sent: u64 = abuse_sent_by_phase.iter().skip(1).step_by(2).sum();
    let (_, rss) = rss_kib(pid);
    println!(
        "flood: {} subscribers on /ws, {} publishes/s to admin-orders, {} × ({} s quiet, {} s flood) after {} s warm-up; abuser {} at {}/s on the driver endpoint",
        a.subscribers,
        a.rate,
        a.rounds,
        a.secs,
        a.secs,
        a.warmup,
        a.abuse.as_str(),
        a.abuse_rate
    );
    println!("  quiet: {}", pct(&h[0]));
    println!("  flood: {}", pct(&h[1]));
    println!(
        "  p99 quiet {q99:.3} ms, flood {f99:.3} ms: ratio {ratio:.3} ({:+.1} %; bar ≤ +20 %: {})",
        (ratio - 1.0) * 100.0,
        if ratio <= 1.2 { "met" } else { "NOT met" }
    );
    println!(
        "  abuser sent {} messages in the flood phases ({:.0}/s), connects {}, closed 1008 {} times, other ends {}, {} bytes back",
        flood_sent,
        flood_sent as f64 / phase_secs,
        stats.connects.load(Ordering::Relaxed),
        stats.closes_1008.load(Ordering::Relaxed),
        stats.other_ends.load(Ordering::Relaxed),
        stats.bytes_in.load(Ordering::Relaxed)
    );
    println!(
        "  node CPU quiet {:.2} s, flood {:.2} s ({:.1} % vs {:.1} % of a core); lost {lost}, duplicates {dups}, publishes refused {refused}, subscriber closes {closes:?}, node RSS {rss} KiB",
        cpu_by_kind[0],
        cpu_by_kind[1],
        cpu_by_kind[0] / phase_secs * 100.0,
        cpu_by_kind[1] / phase_secs * 100.0
    );
    println!(
        "{}",
        json!({"scenario": "flood", "subscribers": a.subscribers, "rate": a.rate, "secs": a.secs,
               "rounds": a.rounds, "abuse": a.abuse.as_str(), "abuse_rate": a.abuse_rate,
               "node_env": a.node_env, "quiet": pct(&h[0]), "flood": pct(&h[1]),
               "p99_quiet_ms": q99, "p99_flood_ms": f99, "p99_ratio": ratio, "bar_met": ratio <= 1.2,
               "abuse_sent": flood_sent, "abuse_per_s": flood_sent as f64 / phase_secs,
               "abuse_connects": stats.connects.load(Ordering::Relaxed),
               "abuse_closed_1008": stats.closes_1008.load(Ordering::Relaxed),
               "node_cpu_quiet_s": cpu_by_kind[0], "node_cpu_flood_s": cpu_by_kind[1],
               "lost": lost, "duplicates": dups, "refused": refused})
    );
    drop(nodes);
    Ok(())
}
