//! `connections`: N idle sockets over K nodes, opened by one `hold` helper
//! process per node; server RSS per socket and idle CPU.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use switchboard_client::Socket;
use switchboard_testkit::{NodeProcess, RedisServer, mint};

use crate::shared::{SECRET, cluster, cpu_seconds, database, rss_kib};

pub async fn run(
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

/// Opens `count` idle sockets from 127.0.0.`first_ip`.. (cycling source
/// addresses past the ephemeral port range), holds them `secs`, then exits.
pub async fn hold(
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
