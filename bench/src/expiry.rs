//! `expiry`: offers due in the same second across K node processes; each
//! must expire once; lateness = `order_timeout` at the driver − deadline.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};
use switchboard_client::{Incoming, Socket};
use switchboard_testkit::{RedisServer, http, mint};

use crate::shared::{SECRET, cluster, database, hist, pct};

pub async fn run(
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
