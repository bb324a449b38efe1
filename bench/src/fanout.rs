//! `fanout`: S subscribers over N nodes (via Redis), publishers at rate R
//! through `POST /api/publish`; deliveries/s, loss, duplicates, latency,
//! server CPU per delivery and peak RSS, and the loadgen's own CPU cost.
//! With `--rooms K` the publishes go round-robin over K rooms (`user-1` …
//! `user-K`, subscriber i in `user-(i mod K + 1)`); with `--redis-cluster M`
//! the nodes run on a Redis Cluster of M masters (sharded pub/sub) and
//! Redis CPU is reported per master.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_client::{Incoming, Socket};
use switchboard_testkit::{NodeProcess, RedisCluster, RedisServer, mint};

use crate::shared::{
    API_KEY, HttpConn, RedisCpu, SECRET, cpu_seconds, database, hist, node_binary, nodes_at, pct,
    rss_kib, self_cpu,
};

/// The Redis the nodes share: one server, or a cluster of masters.
enum Backend {
    Single(RedisServer),
    Cluster(RedisCluster, usize),
}

impl Backend {
    /// The Redis processes that carry the rooms (the masters).
    fn pids(&self) -> Vec<u32> {
        match self {
            Backend::Single(r) => r.pid().into_iter().collect(),
            Backend::Cluster(c, masters) => {
                c.pids()[..*masters].iter().flatten().copied().collect()
            }
        }
    }

    fn url(&self) -> String {
        match self {
            Backend::Single(r) => r.url(),
            Backend::Cluster(c, _) => c.url(),
        }
    }

    /// Each Redis process's accounting (the masters, for a cluster).
    async fn cpu(&self) -> anyhow::Result<Vec<RedisCpu>> {
        match self {
            Backend::Single(r) => Ok(vec![RedisCpu::read(r).await?]),
            Backend::Cluster(c, masters) => {
                let mut out = Vec::new();
                for p in &c.ports[..*masters] {
                    out.push(RedisCpu::read_url(&format!("redis://127.0.0.1:{p}/")).await?);
                }
                Ok(out)
            }
        }
    }
}

/// A process in a cgroup v1 CPU controller group of its own with a quota
/// (`--redis-cpu-cap`); moved back to the root group and the group removed
/// on drop.
struct CpuCap {
    dir: PathBuf,
    pid: u32,
}

const CPU_CGROUP: &str = "/sys/fs/cgroup/cpu";
/// A short CFS period: the capped process runs in small slices, not in
/// 100 ms bursts followed by long throttled gaps. The kernel's smallest
/// quota is 1 ms, so a cap under 0.1 core gets a longer period.
const CAP_PERIOD_US: u64 = 10_000;
const MIN_QUOTA_US: u64 = 1_000;

impl CpuCap {
    fn new(pid: u32, cores: f64) -> anyhow::Result<CpuCap> {
        use anyhow::Context;
        let dir = PathBuf::from(format!("{CPU_CGROUP}/switchboard-bench-{pid}"));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating {} (root and cgroup v1 needed)", dir.display()))?;
        let period = CAP_PERIOD_US.max((MIN_QUOTA_US as f64 / cores).ceil() as u64);
        let quota = (cores * period as f64) as u64;
        std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string())?;
        std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        Ok(CpuCap { dir, pid })
    }

    /// (times throttled, seconds throttled) so far.
    fn throttled(&self) -> (u64, f64) {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        let field = |k: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(k)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        (
            field("nr_throttled "),
            field("throttled_time ") as f64 / 1e9,
        )
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("{CPU_CGROUP}/cgroup.procs"), self.pid.to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Sums per-process accounting into one.
fn total(v: &[RedisCpu]) -> RedisCpu {
    let mut t = RedisCpu::default();
    for r in v {
        t.cpu_s += r.cpu_s;
        t.cmd_us += r.cmd_us;
        for (k, (c, u)) in &r.by_cmd {
            let e = t.by_cmd.entry(k.clone()).or_default();
            e.0 += c;
            e.1 += u;
        }
    }
    t
}

#[derive(clap::Args)]
pub struct Args {
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
    /// `HISTORY_SIZE` of the nodes (default: the server's, 1000; 0 = history
    /// off, a plain PUBLISH per room instead of the append script).
    #[arg(long)]
    history_size: Option<usize>,
    /// Rooms the publishes go round-robin over (1 = `admin-orders`, or
    /// `driver-7` on the driver endpoint; K > 1 = `user-1` … `user-K`, on
    /// `/ws`).
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Run the nodes on a Redis Cluster of this many masters (0 = one Redis).
    #[arg(long, default_value_t = 0)]
    redis_cluster: usize,
    /// Caps each Redis process (each master) at this many cores with a
    /// cgroup v1 CPU quota (needs root and `/sys/fs/cgroup/cpu`): emulates
    /// a deployment where Redis, not the nodes, is the bottleneck, on a
    /// machine whose cores the nodes and the loadgen share with Redis.
    #[arg(long)]
    redis_cpu_cap: Option<f64>,
    /// Node binary (default: `switchboard` beside this one); e.g. `baseline`.
    #[arg(long)]
    server: Option<PathBuf>,
    #[arg(long)]
    database_url: Option<String>,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let redis = if a.redis_cluster > 0 {
        Backend::Cluster(RedisCluster::start(a.redis_cluster), a.redis_cluster)
    } else {
        Backend::Single(RedisServer::start())
    };
    let caps = match a.redis_cpu_cap {
        Some(cores) => redis
            .pids()
            .into_iter()
            .map(|pid| CpuCap::new(pid, cores))
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    let rooms = a.rooms.max(1);
    let (db_url, _dir) = database(a.database_url)?;
    let bin = match a.server {
        Some(p) => p,
        None => node_binary()?,
    };
    let mut extra = vec![("SEND_QUEUE_LEN", "4096".to_string())];
    if let Some(h) = a.history_size {
        extra.push(("HISTORY_SIZE", h.to_string()));
    }
    let nodes = nodes_at(&bin, a.nodes, &redis.url(), &db_url, &extra).await?;
    let admin = mint(SECRET, json!({"sub": 1, "role": "admin"}));
    let driver = mint(SECRET, json!({"sub": 7, "role": "driver", "city_id": 1}));
    // Drivers listen on driver-7; everyone else on admin-orders.
    let (room, token) = if a.path.starts_with("/ws/driver") {
        ("driver-7", driver)
    } else {
        ("admin-orders", admin)
    };
    // Room k (0-based) of K: `user-(k+1)`, heard by its user's sockets.
    let room_of = move |k: u64| -> String {
        if rooms == 1 {
            room.to_string()
        } else {
            format!("user-{}", k + 1)
        }
    };
    let mut subs = Vec::new();
    for i in 0..a.subscribers {
        let n = &nodes[i % nodes.len()];
        let sep = if a.path.contains('?') { '&' } else { '?' };
        let token = if rooms == 1 {
            token.clone()
        } else {
            mint(SECRET, json!({"sub": i % rooms + 1, "role": "user"}))
        };
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
    // Redis's background (the nodes' health checks, heartbeats and offer
    // clocks) over an idle second, to tell it from the publishes' share.
    let idle0 = (Instant::now(), total(&redis.cpu().await?));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle1 = total(&redis.cpu().await?);
    let idle_secs = idle0.0.elapsed().as_secs_f64();
    let (idle_cpu, idle_cmd_us, _) = idle1.since(&idle0.1);
    let per_master0 = redis.cpu().await?;
    let redis0 = total(&per_master0);
    let redis_t0 = Instant::now();
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
        let rate = a.rate;
        pubs.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut refused = 0u64;
            for seq in (1 + j..=total_publishes).step_by(publishers as usize) {
                let due = started + Duration::from_secs_f64((seq - 1) as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let t = chrono::Utc::now().timestamp_micros();
                let room = room_of(seq % rooms as u64);
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
    let mut expected = 0u64;
    for (i, t) in tasks.into_iter().enumerate() {
        let (h, g, d, seen, closed) = t.await?;
        if let Some(code) = closed {
            *closes.entry(code).or_default() += 1;
        }
        lat.add(&h)?;
        got += g;
        dups += d;
        // Subscriber i hears the publishes of its room only.
        let mine = |seq: usize| seq as u64 % rooms as u64 == (i % rooms) as u64;
        let owed = || {
            accepted
                .iter()
                .enumerate()
                .filter(|(seq, acc)| **acc && mine(*seq))
        };
        expected += owed().count() as u64;
        lost += owed().filter(|(seq, _)| !seen[*seq]).count() as u64;
    }
    let my_cpu = self_cpu() - my0;
    let per_master1 = redis.cpu().await?;
    let (redis_cpu, redis_cmd_us, redis_cmds) = total(&per_master1).since(&redis0);
    let redis_secs_now = redis_t0.elapsed().as_secs_f64();
    // Each master's share of a core over the run: is one of them the bottleneck?
    let master_cores: Vec<f64> = per_master1
        .iter()
        .zip(&per_master0)
        .map(|(b, a)| ((b.cpu_s - a.cpu_s) / redis_secs_now * 100.0).round() / 100.0)
        .collect();
    let redis_secs = redis_t0.elapsed().as_secs_f64();
    let node_cpu: f64 = pids
        .iter()
        .zip(&cpu0)
        .map(|(p, c)| cpu_seconds(*p).unwrap_or(*c) - c)
        .sum();
    let peak_rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p).0).collect();
    let history = a
        .history_size
        .map_or_else(|| "server default".to_string(), |h| h.to_string());
    let per_s = got as f64 / publish_secs;
    let server_us = node_cpu * 1e6 / got.max(1) as f64;
    let loadgen_us = my_cpu * 1e6 / got.max(1) as f64;
    let accepted_n = accepted.iter().filter(|x| **x).count() as u64;
    let redis_us = redis_cpu * 1e6 / accepted_n.max(1) as f64;
    // Minus the idle background over the same time.
    let redis_net_us =
        (redis_cpu - idle_cpu / idle_secs * redis_secs).max(0.0) * 1e6 / accepted_n.max(1) as f64;
    let redis_cmd_net = redis_cmd_us as f64 - idle_cmd_us as f64 / idle_secs * redis_secs;
    let redis_cmd_per_publish = redis_cmd_net.max(0.0) / accepted_n.max(1) as f64;
    println!(
        "fanout: {} subscribers on {} nodes ({}), {} publishes at {}/s by {} publisher(s) for {:.1} s, payload {} B, server {}, history {history}",
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
        "  redis CPU {redis_cpu:.2} s = {redis_us:.1} µs/publish ({redis_net_us:.1} without its idle background of {:.1} ms/s); inside commands {redis_cmd_per_publish:.1} µs/publish",
        idle_cpu / idle_secs * 1e3
    );
    println!("  redis commands: {redis_cmds}");
    println!(
        "  redis: {} ({} rooms); CPU per master, in cores: {master_cores:?}; publishes accepted {accepted_n} = {:.0}/s",
        if a.redis_cluster > 0 {
            format!("cluster of {} masters", a.redis_cluster)
        } else {
            "one server".to_string()
        },
        rooms,
        accepted_n as f64 / publish_secs
    );
    // Throttled: the capped Redis wanted more CPU than its quota (it is
    // CPU-bound at the cap).
    let throttled: Vec<(u64, f64)> = caps.iter().map(CpuCap::throttled).collect();
    if let Some(cores) = a.redis_cpu_cap {
        println!(
            "  redis capped at {cores} core each: (times throttled, seconds throttled) per master {throttled:?}"
        );
    }
    println!(
        "{}",
        json!({"scenario": "fanout", "server": bin.file_name().and_then(|n| n.to_str()), "nodes": a.nodes,
               "subscribers": a.subscribers, "publishers": publishers, "path": a.path, "rate": a.rate, "secs": a.secs, "payload": a.payload,
               "deliveries": got, "expected": expected, "per_s": per_s, "lost": lost, "duplicates": dups,
               "refused": refused, "closed_by_server": closes, "latency": pct(&lat), "server_cpu_s": node_cpu,
               "server_us_per_delivery": server_us, "peak_rss_kib": peak_rss, "loadgen_us_per_delivery": loadgen_us,
               "history_size": a.history_size, "redis_cpu_s": redis_cpu, "redis_us_per_publish": redis_us,
               "redis_net_us_per_publish": redis_net_us, "redis_idle_cpu_ms_per_s": idle_cpu / idle_secs * 1e3,
               "redis_cmd_us_per_publish": redis_cmd_per_publish, "redis_commands": redis_cmds,
               "rooms": rooms, "redis_masters": a.redis_cluster.max(1), "redis_cluster": a.redis_cluster > 0,
               "publishes_per_s": accepted_n as f64 / publish_secs, "redis_master_cores": master_cores,
               "redis_cpu_cap": a.redis_cpu_cap, "redis_throttled": throttled})
    );
    Ok(())
}

/// The integer after `"key":` in a JSON frame, without parsing the JSON.
pub(crate) fn int_field(b: &[u8], key: &[u8]) -> Option<u64> {
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
