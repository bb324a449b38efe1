//! `soak`: two nodes on a `redis-server` of its own (loopback), for
//! `--minutes` (30 by default; bounded by `--max-secs`), under everything at
//! once, with two faults:
//!
//! - fan-out with counting: the `recovery` scenario's sockets over the three
//!   dialects (group rooms, personal rooms, `admin-orders`) and publishers;
//!   every socket also hangs up by itself every `--churn-secs` on average
//!   and resumes with `since` on the other node;
//! - driver locations: `--drivers` driver sockets report a position every
//!   second;
//! - connection churn: connect + authenticate + first message + close,
//!   `--churn-rate` a second, each a new user;
//! - dispatch: an order near the drivers every `--order-secs` (`POST
//!   /api/orders`); the driver offered it accepts over HTTP, then an admin
//!   completes it (the driver is free again);
//! - at a third of the run node 1 is SIGKILLed and started again; at two
//!   thirds Redis is restarted (it keeps nothing: every room's history and
//!   epoch start over).
//!
//! Every `--sample-secs` the RSS and open file descriptors of each node
//! process are read from `/proc`. At the end: those at start and end, and
//! every publish the server acknowledged (204) counted per socket as in
//! `recovery`: lost, duplicated, out of order. A loss is put in one of
//! three bins: the server told the socket on its reconnect that the room
//! could not be recovered and the event falls in that gap (SPEC §10:
//! "told plainly"); the event was published inside a fault's window (from
//! 1 s before the fault until 5 s after the service is back); or neither,
//! which is a real loss.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use switchboard_client::{Incoming, Socket};
use switchboard_testkit::{NodeProcess, RedisServer, mint};
use tokio_util::sync::CancellationToken;

use crate::recovery::{self, ClientReport, Published, Shared, Spec, Totals};
use crate::shared::{
    CENTER, HttpConn, Lcg, SECRET, database, node_binary, node_env, offset, rss_kib, wait_ready,
};

#[derive(clap::Args)]
pub struct Args {
    /// Length of the run (the load; setup and the final count come on top).
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Counting sockets, spread over `/`, `/ws` and the driver endpoint.
    #[arg(long, default_value_t = 300)]
    sockets: usize,
    #[arg(long, default_value_t = 20)]
    group_size: usize,
    #[arg(long, default_value_t = 2)]
    publishers: usize,
    /// Publishes per second, all publishers together.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Mean seconds a counting socket stays connected before it hangs up
    /// and resumes.
    #[arg(long, default_value_t = 300.0)]
    churn_secs: f64,
    /// Driver sockets reporting a position every second (and taking offers).
    #[arg(long, default_value_t = 20)]
    drivers: usize,
    /// Short-lived connections (connect, first message, close) per second.
    #[arg(long, default_value_t = 2.0)]
    churn_rate: f64,
    /// Seconds between orders.
    #[arg(long, default_value_t = 5.0)]
    order_secs: f64,
    /// Seconds between samples of RSS and fds.
    #[arg(long, default_value_t = 30.0)]
    sample_secs: f64,
    /// Gives up (and fails) after this many seconds in all (default: the
    /// run plus 10 minutes).
    #[arg(long)]
    max_secs: Option<f64>,
    #[arg(long)]
    database_url: Option<String>,
}

/// One reading of a node process.
#[derive(Clone, Debug)]
struct Sample {
    t: f64,
    node: usize,
    pid: u32,
    rss_kib: u64,
    fds: usize,
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The node processes and what restarting one needs. Fields drop in
/// order: the nodes before their Redis.
struct Cluster {
    nodes: Vec<NodeProcess>,
    redis: RedisServer,
    bin: std::path::PathBuf,
    db_url: String,
    restarts: usize,
}

impl Cluster {
    async fn start_node(&mut self, i: usize) -> anyhow::Result<NodeProcess> {
        let id = format!("soak{i}r{}", self.restarts);
        self.restarts += 1;
        let extra = [("SEND_QUEUE_LEN", "4096".to_string())];
        let env = node_env(&id, &self.redis.url(), &self.db_url, &extra);
        let node = NodeProcess::start(&self.bin, &env).await;
        wait_ready(node.addr, Duration::from_secs(30)).await?;
        Ok(node)
    }
}

/// What the side loads counted.
#[derive(Default)]
struct Side {
    positions_sent: AtomicU64,
    driver_reconnects: AtomicU64,
    offers: AtomicU64,
    accepted: AtomicU64,
    accept_failed: AtomicU64,
    completed: AtomicU64,
    orders_created: AtomicU64,
    orders_failed: AtomicU64,
    churn_ok: AtomicU64,
    churn_failed: AtomicU64,
}

/// A driver: reports a position every second on the driver endpoint of a
/// live node; accepts every offer over HTTP, and an admin completes it.
async fn driver(i: usize, shared: Arc<Shared>, side: Arc<Side>, stop: CancellationToken) {
    let id = 500_000 + i as u64;
    let token = mint(
        SECRET,
        json!({"sub": id, "role": "driver", "driver_id": id, "city_id": 1}),
    );
    let admin = mint(SECRET, json!({"sub": 999_999, "role": "admin"}));
    let mut rng = Lcg(id);
    let (lat, lon) = offset(
        CENTER,
        (rng.next_f64() - 0.5) * 4.0,
        (rng.next_f64() - 0.5) * 4.0,
    );
    let mut first = true;
    'life: while !stop.is_cancelled() {
        let Some(addr) = shared.pick(i, None) else {
            break;
        };
        let path = format!("/ws/driver/orders/?token={token}");
        let Ok(Ok(mut sock)) = tokio::time::timeout(
            Duration::from_secs(10),
            Socket::connect(addr, &path, None, 256),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if !first {
            side.driver_reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break 'life,
                _ = tick.tick() => {
                    let jitter = (rng.next_f64() - 0.5) * 0.0005;
                    let msg = json!({"type": "location", "latitude": lat + jitter, "longitude": lon + jitter});
                    if sock.send_text(&msg.to_string()).await.is_err() {
                        break;
                    }
                    side.positions_sent.fetch_add(1, Ordering::Relaxed);
                }
                m = sock.recv() => match m {
                    Some(Incoming::Text(b)) => {
                        let Ok(v) = serde_json::from_slice::<Value>(&b) else { continue };
                        if v["type"] != "new_order" {
                            continue;
                        }
                        let Some(order) = v["order"]["id"].as_i64() else { continue };
                        side.offers.fetch_add(1, Ordering::Relaxed);
                        let side = side.clone();
                        let (token, admin) = (token.clone(), admin.clone());
                        let shared = shared.clone();
                        // Accept, then complete, off the socket's loop.
                        tokio::spawn(async move {
                            let Some(node) = shared.pick(order as usize, None) else { return };
                            let Ok(mut c) = HttpConn::open(node).await else {
                                side.accept_failed.fetch_add(1, Ordering::Relaxed);
                                return;
                            };
                            let auth = format!("Bearer {token}");
                            let path = format!("/api/driver/orders/{order}/accept");
                            match c.request("POST", &path, &[("authorization", &auth)], None).await {
                                Ok((200, _)) => side.accepted.fetch_add(1, Ordering::Relaxed),
                                _ => side.accept_failed.fetch_add(1, Ordering::Relaxed),
                            };
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            let auth = format!("Bearer {admin}");
                            let body = json!({"status": "completed"}).to_string();
                            let path = format!("/api/orders/{order}");
                            if let Ok((200, _)) =
                                c.request("PATCH", &path, &[("authorization", &auth)], Some(body)).await
                            {
                                side.completed.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                    Some(Incoming::Close(_)) | None => break,
                },
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Orders near the drivers, one every `every`, by an admin.
async fn orders(every: Duration, shared: Arc<Shared>, side: Arc<Side>, stop: CancellationToken) {
    let admin = mint(SECRET, json!({"sub": 999_999, "role": "admin"}));
    let auth = format!("Bearer {admin}");
    let mut rng = Lcg(7);
    let mut tick = tokio::time::interval(every);
    let mut n = 0usize;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        let Some(addr) = shared.pick(n, None) else {
            continue;
        };
        let (lat, lon) = offset(
            CENTER,
            (rng.next_f64() - 0.5) * 4.0,
            (rng.next_f64() - 0.5) * 4.0,
        );
        let body = json!({"order_type": "delivery", "user_id": 999_999, "city_id": 1, "total": 100,
                          "latitude_from": lat, "longitude_from": lon})
        .to_string();
        let ok = async {
            let mut c = HttpConn::open(addr).await?;
            c.request(
                "POST",
                "/api/orders",
                &[("authorization", &auth)],
                Some(body),
            )
            .await
        };
        match tokio::time::timeout(Duration::from_secs(10), ok).await {
            Ok(Ok((201, _))) => side.orders_created.fetch_add(1, Ordering::Relaxed),
            _ => side.orders_failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Short-lived connections: connect, first message, close; a new user each.
async fn churn(rate: f64, shared: Arc<Shared>, side: Arc<Side>, stop: CancellationToken) {
    if rate <= 0.0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        let Some(addr) = shared.pick(n as usize, None) else {
            continue;
        };
        let tok = mint(SECRET, json!({"sub": 3_000_000 + n, "role": "user"}));
        let path = ["/?token=", "/ws?token="][n as usize % 2];
        let side = side.clone();
        tokio::spawn(async move {
            let ok = async {
                let mut s = Socket::connect(addr, &format!("{path}{tok}"), None, 4)
                    .await
                    .ok()?;
                matches!(s.recv().await, Some(Incoming::Text(_))).then_some(())
            };
            match tokio::time::timeout(Duration::from_secs(10), ok).await {
                Ok(Some(())) => side.churn_ok.fetch_add(1, Ordering::Relaxed),
                _ => side.churn_failed.fetch_add(1, Ordering::Relaxed),
            };
        });
    }
}

/// A fault's window: publishes inside it may be lost without a bug.
struct Window {
    what: &'static str,
    from: Instant,
    to: Instant,
}

/// Lost deliveries of one socket, by bin.
#[derive(Default, Debug)]
struct Lost {
    /// In a gap the server reported (not recovered on reconnect).
    told: u64,
    /// Published inside a fault's window, by fault.
    in_fault: BTreeMap<&'static str, u64>,
    /// Neither.
    unexplained: u64,
    /// Unexplained losses by the minute of the run their publish was in.
    unexplained_by_minute: BTreeMap<u64, u64>,
    samples: Vec<String>,
}

#[allow(clippy::too_many_arguments)]
fn classify_losses(
    spec: &Spec,
    rep: &ClientReport,
    acked_by_room: &HashMap<&str, Vec<u64>>,
    by_id: &HashMap<u64, &Published>,
    windows: &[Window],
    started: Instant,
    out: &mut Lost,
) {
    let got: HashSet<u64> = rep.log.iter().map(|(_, id)| *id).collect();
    let mut expected: HashSet<u64> = HashSet::new();
    for r in &spec.rooms {
        if let Some(ids) = acked_by_room.get(r.as_str()) {
            expected.extend(ids);
        }
    }
    for id in expected.iter().filter(|id| !got.contains(id)) {
        let Some(e) = by_id.get(id) else { continue };
        let slack = Duration::from_secs(1);
        let told = rep.gaps.iter().any(|(room, from, to)| {
            e.rooms.contains(&spec.rooms[*room as usize]) && e.at + slack >= *from && e.at <= *to
        });
        if told {
            out.told += 1;
        } else if let Some(w) = windows
            .iter()
            .find(|w| e.at + Duration::from_secs(1) >= w.from && e.at <= w.to)
        {
            *out.in_fault.entry(w.what).or_default() += 1;
        } else {
            out.unexplained += 1;
            let at = e.at.saturating_duration_since(started).as_secs_f64();
            *out.unexplained_by_minute.entry(at as u64 / 60).or_default() += 1;
            if out.samples.len() < 20 {
                let gaps: Vec<String> = rep
                    .gaps
                    .iter()
                    .map(|(r, from, to)| {
                        format!(
                            "{} {:.1}–{:.1} s",
                            spec.rooms[*r as usize],
                            from.saturating_duration_since(started).as_secs_f64(),
                            to.saturating_duration_since(started).as_secs_f64()
                        )
                    })
                    .collect();
                out.samples.push(format!(
                    "socket {} ({}) never got event {id} (to {:?}, published at {at:.1} s); its not-recovered gaps: {gaps:?}",
                    spec.idx,
                    spec.dialect.name(),
                    e.rooms
                ));
            }
        }
    }
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let max = Duration::from_secs_f64(a.max_secs.unwrap_or(a.minutes * 60.0 + 600.0));
    match tokio::time::timeout(max, scenario(a)).await {
        Ok(r) => r,
        Err(_) => bail!("soak: gave up after {max:?} (--max-secs)"),
    }
}

async fn scenario(a: Args) -> anyhow::Result<()> {
    if a.sockets == 0 || a.group_size == 0 || a.publishers == 0 || a.rate <= 0.0 {
        bail!("sockets, group size, publishers and rate must be positive");
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let run_secs = a.minutes * 60.0;
    let (db_url, _dir) = database(a.database_url.clone())?;
    let mut cluster = Cluster {
        nodes: Vec::new(),
        redis: RedisServer::start(),
        bin: node_binary()?,
        db_url,
        restarts: 0,
    };
    for i in 0..2 {
        let n = cluster.start_node(i).await?;
        cluster.nodes.push(n);
    }
    let shared = Arc::new(Shared {
        live: RwLock::new(cluster.nodes.iter().map(|n| n.addr).collect()),
        per_node: Mutex::new(HashMap::new()),
        ready: AtomicUsize::new(0),
        frames: AtomicU64::new(0),
    });
    let t0 = Instant::now();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let pids: Arc<RwLock<Vec<u32>>> = Arc::new(RwLock::new(
        cluster.nodes.iter().map(|n| n.pid().unwrap_or(0)).collect(),
    ));
    let sample_now = {
        let samples = samples.clone();
        let pids = pids.clone();
        move |label: &str| {
            let t = t0.elapsed().as_secs_f64();
            let pids = pids.read().unwrap_or_else(|e| e.into_inner()).clone();
            let mut line = format!("  [{t:7.1} s] {label}");
            let mut s = samples.lock().unwrap_or_else(|e| e.into_inner());
            for (node, pid) in pids.into_iter().enumerate() {
                let (_, rss) = rss_kib(pid);
                let fd = fds(pid);
                line.push_str(&format!(
                    "  node{node} pid {pid}: RSS {:.1} MiB, {fd} fds",
                    rss as f64 / 1024.0
                ));
                s.push(Sample {
                    t,
                    node,
                    pid,
                    rss_kib: rss,
                    fds: fd,
                });
            }
            println!("{line}");
        }
    };
    sample_now("nodes started");

    // Counting sockets.
    let groups = a.sockets.div_ceil(a.group_size);
    let mut members = vec![Vec::new(); groups];
    for i in 0..a.sockets {
        members[i % groups].push(i);
    }
    let members = Arc::new(members);
    let stop_clients = CancellationToken::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let clients: Vec<_> = recovery::specs(a.sockets, groups)
        .into_iter()
        .map(|s| {
            tokio::spawn(recovery::client(
                s,
                shared.clone(),
                stop_clients.clone(),
                gate.clone(),
                500,
                a.churn_secs,
            ))
        })
        .collect();
    if !recovery::wait_all_ready(&shared, a.sockets, Duration::from_secs(60)).await {
        stop_clients.cancel();
        bail!(
            "only {} of {} sockets got into their rooms within 60 s",
            shared.ready.load(Ordering::SeqCst),
            a.sockets
        );
    }

    // The load.
    let side = Arc::new(Side::default());
    let stop_load = CancellationToken::new();
    let started = Instant::now();
    let pubs: Vec<_> = (0..a.publishers)
        .map(|j| {
            tokio::spawn(recovery::publisher(
                j,
                a.publishers,
                a.rate / a.publishers as f64,
                members.clone(),
                shared.clone(),
                stop_load.clone(),
                started,
                false,
            ))
        })
        .collect();
    let mut side_tasks = Vec::new();
    for i in 0..a.drivers {
        side_tasks.push(tokio::spawn(driver(
            i,
            shared.clone(),
            side.clone(),
            stop_load.clone(),
        )));
    }
    side_tasks.push(tokio::spawn(orders(
        Duration::from_secs_f64(a.order_secs),
        shared.clone(),
        side.clone(),
        stop_load.clone(),
    )));
    side_tasks.push(tokio::spawn(churn(
        a.churn_rate,
        shared.clone(),
        side.clone(),
        stop_load.clone(),
    )));
    sample_now("load started");
    let load_t = t0.elapsed().as_secs_f64();

    // The timeline: samples, the node kill at 1/3, the Redis restart at 2/3.
    let mut windows = Vec::new();
    let mut events_log = Vec::new();
    let kill_at = started + Duration::from_secs_f64(run_secs / 3.0);
    let redis_at = started + Duration::from_secs_f64(run_secs * 2.0 / 3.0);
    let end_at = started + Duration::from_secs_f64(run_secs);
    let (mut killed, mut restarted) = (false, false);
    let mut next_sample = Instant::now() + Duration::from_secs_f64(a.sample_secs);
    while Instant::now() < end_at {
        let next = [next_sample, end_at]
            .into_iter()
            .chain((!killed).then_some(kill_at))
            .chain((!restarted).then_some(redis_at))
            .min()
            .expect("a time");
        tokio::time::sleep_until(next.into()).await;
        let now = Instant::now();
        if !killed && now >= kill_at {
            killed = true;
            let from = Instant::now();
            let victim = &mut cluster.nodes[1];
            shared.set_live(victim.addr, false);
            let on = shared.on_node(victim.addr);
            victim.kill();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let new = cluster.start_node(1).await.context("restart node 1")?;
            shared.set_live(new.addr, true);
            pids.write().unwrap_or_else(|e| e.into_inner())[1] = new.pid().unwrap_or(0);
            cluster.nodes[1] = new;
            let back = from.elapsed().as_secs_f64();
            events_log.push(format!(
                "node 1 SIGKILLed at {:.0} s with {on} sockets on it, a new node 1 ready {back:.1} s later",
                from.duration_since(started).as_secs_f64()
            ));
            windows.push(Window {
                what: "node kill",
                from,
                to: Instant::now() + Duration::from_secs(5),
            });
            sample_now("node 1 restarted");
        }
        if !restarted && Instant::now() >= redis_at {
            restarted = true;
            let from = Instant::now();
            cluster.redis.kill();
            tokio::time::sleep(Duration::from_secs(3)).await;
            cluster.redis.restart();
            // Back when both nodes say ready again.
            for n in &cluster.nodes {
                wait_ready(n.addr, Duration::from_secs(60)).await?;
            }
            let back = from.elapsed().as_secs_f64();
            events_log.push(format!(
                "Redis killed at {:.0} s, restarted 3 s later (empty), both nodes ready {back:.1} s after the kill",
                from.duration_since(started).as_secs_f64()
            ));
            windows.push(Window {
                what: "redis restart",
                from,
                to: Instant::now() + Duration::from_secs(5),
            });
            sample_now("redis restarted");
        }
        if Instant::now() >= next_sample {
            sample_now("sample");
            next_sample += Duration::from_secs_f64(a.sample_secs);
        }
    }
    stop_load.cancel();
    let mut events = Vec::new();
    let mut publish_failures: BTreeMap<String, u64> = BTreeMap::new();
    for p in pubs {
        let (e, f) = p.await?;
        events.extend(e);
        for (k, v) in f {
            *publish_failures.entry(k).or_default() += v;
        }
    }
    for t in side_tasks {
        let _ = t.await;
    }
    let publish_secs = started.elapsed().as_secs_f64();

    // Quiet: every socket in its rooms and no frame for 1.5 s (bounded).
    let quiet = recovery::wait_quiet(&shared, a.sockets, Duration::from_secs(60)).await;
    sample_now("end");
    stop_clients.cancel();
    let mut reports = Vec::new();
    for c in clients {
        reports.push(c.await?);
    }
    drop(cluster);

    // Counting.
    let mut by_id: HashMap<u64, &Published> = HashMap::new();
    let mut acked_by_room: HashMap<&str, Vec<u64>> = HashMap::new();
    for e in &events {
        by_id.insert(e.id, e);
        if e.acked {
            for r in &e.rooms {
                acked_by_room.entry(r.as_str()).or_default().push(e.id);
            }
        }
    }
    let acked = events.iter().filter(|e| e.acked).count() as u64;
    let mut t = Totals::default();
    let mut lost = Lost::default();
    let mut other_events = 0u64;
    let mut offset_regressions = 0u64;
    for (spec, rep) in &reports {
        t.add(spec, rep, &acked_by_room, &by_id);
        classify_losses(
            spec,
            rep,
            &acked_by_room,
            &by_id,
            &windows,
            started,
            &mut lost,
        );
        other_events += rep.other_events;
        offset_regressions += rep.out_of_order_offsets;
    }
    // Order by the publishers' ids (each room has one publisher, whose ids
    // grow), apart from the offsets: after the Redis restart the new epoch's
    // offsets start over under a socket that stays connected, and nothing
    // tells it (it learns on its next resume: epoch_changed).
    let out_of_order = t.out_of_order - offset_regressions;

    // RSS and fds per node process: the first sample after the load
    // started, and the last one of the same process.
    let samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut per_process: BTreeMap<(usize, u32), (Sample, Sample, u64, usize)> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.t >= load_t) {
        per_process
            .entry((s.node, s.pid))
            .and_modify(|(_, last, max_rss, max_fds)| {
                *last = s.clone();
                *max_rss = (*max_rss).max(s.rss_kib);
                *max_fds = (*max_fds).max(s.fds);
            })
            .or_insert((s.clone(), s.clone(), s.rss_kib, s.fds));
    }
    let side_json = json!({
        "positions_sent": side.positions_sent.load(Ordering::Relaxed),
        "driver_reconnects": side.driver_reconnects.load(Ordering::Relaxed),
        "orders_created": side.orders_created.load(Ordering::Relaxed),
        "orders_failed": side.orders_failed.load(Ordering::Relaxed),
        "offers": side.offers.load(Ordering::Relaxed),
        "accepted": side.accepted.load(Ordering::Relaxed),
        "accept_failed": side.accept_failed.load(Ordering::Relaxed),
        "completed": side.completed.load(Ordering::Relaxed),
        "churn_connects": side.churn_ok.load(Ordering::Relaxed),
        "churn_failed": side.churn_failed.load(Ordering::Relaxed),
    });
    println!(
        "soak: {:.1} min, 2 nodes, {} counting sockets (groups of {}, hang up every ~{} s), {} publishes/s by {}, {} drivers, {} short connections/s, an order every {} s",
        a.minutes,
        a.sockets,
        a.group_size,
        a.churn_secs,
        a.rate,
        a.publishers,
        a.drivers,
        a.churn_rate,
        a.order_secs
    );
    for e in &events_log {
        println!("  {e}");
    }
    let mut procs = Vec::new();
    for ((node, pid), (first, last, max_rss, max_fds)) in &per_process {
        println!(
            "  node{node} pid {pid}: RSS {:.1} → {:.1} MiB (max {:.1}), fds {} → {} (max {max_fds}), from {:.0} s to {:.0} s",
            first.rss_kib as f64 / 1024.0,
            last.rss_kib as f64 / 1024.0,
            *max_rss as f64 / 1024.0,
            first.fds,
            last.fds,
            first.t,
            last.t
        );
        procs.push(json!({"node": node, "pid": pid, "from_s": first.t, "to_s": last.t,
                          "rss_kib_start": first.rss_kib, "rss_kib_end": last.rss_kib, "rss_kib_max": max_rss,
                          "fds_start": first.fds, "fds_end": last.fds, "fds_max": max_fds}));
    }
    // Both nodes together (sockets move between them: a killed node's go
    // to the other one), at the first sample after the load started and
    // at the last.
    let at = |t: f64| -> (u64, usize) {
        samples
            .iter()
            .filter(|s| s.t == t)
            .fold((0, 0), |(r, f), s| (r + s.rss_kib, f + s.fds))
    };
    let first_t = samples
        .iter()
        .map(|s| s.t)
        .find(|t| *t >= load_t)
        .unwrap_or(0.0);
    let last_t = samples.last().map_or(0.0, |s| s.t);
    let (rss0, fds0) = at(first_t);
    let (rss1, fds1) = at(last_t);
    println!(
        "  both nodes: RSS {:.1} → {:.1} MiB, fds {fds0} → {fds1} (at {first_t:.0} s and {last_t:.0} s)",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0
    );
    println!(
        "  events published {}, acknowledged {acked}, failed {publish_failures:?} over {publish_secs:.0} s",
        events.len()
    );
    println!(
        "  deliveries expected {}, delivered {}: lost {} (told not recovered {}, in a fault's window {:?}, unexplained {}), duplicated {}, out of order {out_of_order} (offsets that went back: {offset_regressions}), misrouted {}, bad frames {}",
        t.expected,
        t.delivered,
        t.lost,
        lost.told,
        lost.in_fault,
        lost.unexplained,
        t.duplicated,
        t.misrouted,
        t.bad_frames
    );
    println!(
        "  reconnects {} (failed attempts {}), closes {:?}; rooms recovered {}, not recovered {} {:?}; replayed {}; other events seen {other_events}",
        t.reconnects,
        t.connect_failures,
        t.closes,
        t.recovered,
        t.not_recovered,
        t.reasons,
        t.replayed
    );
    if !t.errors.is_empty() {
        println!("  error messages: {:?}", t.errors);
    }
    println!("  side load: {side_json}");
    if lost.unexplained > 0 {
        println!(
            "  unexplained losses by minute of publish: {:?}",
            lost.unexplained_by_minute
        );
    }
    // Duplicates first, then the losses.
    for line in t
        .dup_samples
        .iter()
        .chain(&lost.samples)
        .chain(&t.samples)
        .take(30)
    {
        println!("  ! {line}");
    }
    if !quiet {
        println!("  NOT QUIET at the end");
    }
    let pass = lost.unexplained == 0 && t.duplicated == 0 && out_of_order == 0 && t.misrouted == 0;
    println!(
        "{}",
        json!({"scenario": "soak", "minutes": a.minutes, "sockets": a.sockets, "rate": a.rate,
               "publishers": a.publishers, "drivers": a.drivers, "churn_rate": a.churn_rate,
               "churn_secs": a.churn_secs, "order_secs": a.order_secs, "faults": events_log,
               "processes": procs, "rss_kib_both_start": rss0, "rss_kib_both_end": rss1,
               "fds_both_start": fds0, "fds_both_end": fds1, "events_published": events.len(), "events_acknowledged": acked,
               "publish_failures": publish_failures, "deliveries_expected": t.expected,
               "delivered": t.delivered, "lost": t.lost, "lost_told": lost.told,
               "lost_in_fault_window": lost.in_fault, "lost_unexplained": lost.unexplained,
               "lost_unexplained_by_minute": lost.unexplained_by_minute,
               "duplicated": t.duplicated, "out_of_order": out_of_order,
               "offset_regressions": offset_regressions, "misrouted": t.misrouted,
               "bad_frames": t.bad_frames, "reconnects": t.reconnects, "closes": t.closes,
               "recovered": t.recovered, "not_recovered": t.not_recovered,
               "not_recovered_reasons": t.reasons, "errors": t.errors, "side": side_json,
               "quiet": quiet, "pass": pass})
    );
    if !pass {
        bail!(
            "soak failed: lost (unexplained) {}, duplicated {}, out of order {}, misrouted {}",
            lost.unexplained,
            t.duplicated,
            out_of_order,
            t.misrouted
        );
    }
    Ok(())
}
