//! `redispatch`: how fast a waiting order reaches a driver that becomes
//! eligible (SPEC §5 "No stranded order"). `orders` orders are created with
//! no driver anywhere, so each ends `no_drivers` and waits; then one driver
//! per order connects next to it and reports its position by socket, at
//! `rate` drivers per second. Latency = the position sent → `new_order` at
//! that driver. The retry pass is slowed to 10 minutes so that only the
//! eligibility path can make the offer.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};
use switchboard_client::{Incoming, Socket};
use switchboard_testkit::{RedisServer, http, mint};

use crate::shared::{SECRET, cluster, database, hist, pct};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Waiting orders (one driver comes for each).
    #[arg(long, default_value_t = 1000)]
    orders: usize,
    /// Drivers becoming eligible per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    #[arg(long)]
    database_url: Option<String>,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let (db_url, _dir) = database(a.database_url)?;
    let nodes = cluster(
        a.nodes,
        &redis,
        &db_url,
        &[
            ("DISPATCH_RETRY_SECS", "600".into()),
            ("OFFER_TIMEOUT_SECS", "600".into()),
        ],
    )
    .await?;
    // Each order alone in its own 0.5° cell, far beyond the radius of any other.
    let side = (a.orders as f64).sqrt().ceil() as usize;
    let spot = |i: usize| {
        (
            10.0 + (i / side) as f64 * 0.5,
            10.0 + (i % side) as f64 * 0.5,
        )
    };
    let admin = mint(SECRET, json!({"sub": 1, "role": "admin"}));
    let auth = format!("Bearer {admin}");
    let mut watch =
        Socket::connect(nodes[0].addr, &format!("/ws?token={admin}"), None, 4096).await?;
    let t_create = Instant::now();
    let mut creates = Vec::new();
    for i in 0..a.orders {
        let addr = nodes[i % a.nodes].addr;
        let (lat, lon) = spot(i);
        let auth = auth.clone();
        creates.push(tokio::spawn(async move {
            let body = json!({"city_id": 1, "user_id": 2, "total": 10,
                              "latitude_from": lat, "longitude_from": lon})
            .to_string();
            http(
                addr,
                "POST",
                "/api/orders",
                &[("authorization", &auth)],
                Some(body),
            )
            .await
        }));
    }
    let mut ids = Vec::new();
    for c in creates {
        let (st, b) = c.await?.map_err(anyhow::Error::msg)?;
        if st != 201 {
            bail!("create failed {st}: {}", String::from_utf8_lossy(&b));
        }
        let v: Value = serde_json::from_slice(&b)?;
        ids.push(v["id"].as_i64().unwrap_or(0));
    }
    // Every order announced `no_drivers` before any driver shows up.
    let mut waiting = 0;
    let until = Instant::now() + Duration::from_secs(120);
    while waiting < a.orders {
        match tokio::time::timeout_at(until.into(), watch.recv()).await {
            Ok(Some(Incoming::Text(b))) => {
                let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                if v["type"] == "ORDER_UPDATED" && v["payload"]["dispatch_status"] == "no_drivers" {
                    waiting += 1;
                }
            }
            Ok(Some(_)) => {}
            _ => bail!(
                "only {waiting} of {} orders were announced no_drivers",
                a.orders
            ),
        }
    }
    let create_secs = t_create.elapsed().as_secs_f64();
    drop(watch);

    // Drivers arrive at `rate`, each next to its order (about 1 km away).
    let gap = Duration::from_secs_f64(1.0 / a.rate.max(0.001));
    let mut runs = Vec::new();
    let t0 = Instant::now();
    for i in 0..a.orders {
        let addr = nodes[(i + 1) % a.nodes].addr;
        let (lat, lon) = spot(i);
        let want = ids[i];
        tokio::time::sleep_until((t0 + gap * i as u32).into()).await;
        runs.push(tokio::spawn(async move {
            let t = mint(
                SECRET,
                json!({"sub": 70_000 + i, "role": "driver", "city_id": 1}),
            );
            let mut s = Socket::connect(addr, &format!("/ws/driver/orders/?token={t}"), None, 16)
                .await
                .map_err(|e| e.to_string())?;
            let _ = s.recv().await; // connected
            let _ = s.recv().await; // initial_orders
            let msg = json!({"type": "location", "latitude": lat + 0.009, "longitude": lon});
            let sent = Instant::now();
            s.send_text(&msg.to_string())
                .await
                .map_err(|e| e.to_string())?;
            let until = sent + Duration::from_secs(10);
            loop {
                match tokio::time::timeout_at(until.into(), s.recv()).await {
                    Ok(Some(Incoming::Text(b))) => {
                        let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                        if v["type"] == "new_order" {
                            let got = v["order"]["id"].as_i64();
                            return Ok::<_, String>((got == Some(want), Some(sent.elapsed())));
                        }
                    }
                    Ok(Some(_)) => {}
                    _ => return Ok((false, None)),
                }
            }
        }));
    }
    let mut lat = hist();
    let (mut offered, mut wrong, mut missing) = (0, 0, 0);
    for r in runs {
        match r.await?.map_err(anyhow::Error::msg)? {
            (true, Some(d)) => {
                offered += 1;
                lat.record((d.as_micros() as u64).max(1))?;
            }
            (false, Some(_)) => wrong += 1,
            _ => missing += 1,
        }
    }
    println!(
        "redispatch: {} waiting orders over {} nodes (created and announced no_drivers in {create_secs:.1} s); \
         drivers at {}/s: offered {offered}, wrong order {wrong}, missing {missing}",
        a.orders, a.nodes, a.rate
    );
    println!("  driver becomes eligible → new_order: {}", pct(&lat));
    println!(
        "{}",
        json!({"scenario": "redispatch", "nodes": a.nodes, "orders": a.orders, "rate": a.rate,
               "offered": offered, "wrong": wrong, "missing": missing, "latency": pct(&lat)})
    );
    if missing > 0 || wrong > 0 {
        bail!("{missing} drivers got no offer, {wrong} the wrong one");
    }
    Ok(())
}
