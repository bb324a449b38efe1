//! The machine's ceiling for BENCHMARKS.md: the least a fastwebsockets
//! server can do to fan a publish out. One process, no Redis, no rooms, no
//! auth: `POST /api/publish {type, data}` encodes one events-dialect frame
//! and `try_send`s the same bytes to every socket's queue; one writer task
//! per socket. Speaks just enough of switchboard's surface (`/healthz`,
//! `/readyz`, a `CONNECTED` message) for `loadgen fanout --server baseline`.

use std::convert::Infallible;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

type Subs = Arc<RwLock<Vec<mpsc::Sender<Bytes>>>>;

fn frame(v: &Value) -> Bytes {
    let payload = serde_json::to_vec(v).expect("serializes");
    let mut buf = Vec::new();
    let n = fastwebsockets::Frame::text(fastwebsockets::Payload::Owned(payload))
        .write(&mut buf)
        .len();
    buf.truncate(n);
    Bytes::from(buf)
}

async fn handle(
    subs: Subs,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if fastwebsockets::upgrade::is_upgrade_request(&req) {
        let Ok((resp, fut)) = fastwebsockets::upgrade::upgrade(&mut req) else {
            return Ok(Response::new(Full::new(Bytes::new())));
        };
        tokio::spawn(async move {
            let Ok(ws) = fut.await else { return };
            let (read, mut write) = tokio::io::split(ws.into_inner());
            let (tx, mut rx) = mpsc::channel::<Bytes>(4096);
            let _ = tx.try_send(frame(&json!({"type": "CONNECTED", "payload": {}})));
            subs.write().unwrap_or_else(|p| p.into_inner()).push(tx);
            // Keep the read half alive (and notice the close) without parsing.
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut read = read;
                let mut buf = [0u8; 512];
                while matches!(read.read(&mut buf).await, Ok(n) if n > 0) {}
            });
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, 256).await > 0 {
                let mut out = Vec::with_capacity(batch.iter().map(Bytes::len).sum());
                for b in batch.drain(..) {
                    out.extend_from_slice(&b);
                }
                if write.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
        return Ok(resp.map(|_| Full::new(Bytes::new())));
    }
    let path = req.uri().path().to_string();
    if path == "/api/publish" {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let f = frame(&json!({"type": v["type"], "payload": v["data"]}));
        let mut subs = subs.write().unwrap_or_else(|p| p.into_inner());
        subs.retain(|tx| {
            !matches!(
                tx.try_send(f.clone()),
                Err(mpsc::error::TrySendError::Closed(_))
            )
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = hyper::StatusCode::NO_CONTENT;
        return Ok(r);
    }
    Ok(Response::new(Full::new(Bytes::from_static(
        b"{\"ok\":true}",
    ))))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let addr = std::env::var("SWITCHBOARD_LISTEN").unwrap_or_else(|_| "127.0.0.1:3100".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let subs: Subs = Arc::default();
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let subs = subs.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(subs.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades()
                .await;
        });
    }
}
