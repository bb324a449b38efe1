//! HTTP: one request on a fresh connection ([`http`], [`http_raw`]), a
//! kept-alive connection ([`HttpConn`]), calls with a bearer token, the
//! orders and driver calls the scenarios repeat, SPEC §6 error bodies,
//! readiness and Prometheus samples.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::{API_KEY, WAIT};

/// Plain HTTP/1 request; returns the status and the JSON body (Null if none).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let (status, bytes) = http_raw(addr, method, path, headers, body.map(|b| b.to_string())).await;
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (status, v)
}

pub async fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> (u16, Bytes) {
    switchboard_testkit::http(addr, method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// A keep-alive HTTP/1 connection, for many requests in a row (thousands of
/// publishes would otherwise open thousands of TCP connections).
pub struct HttpConn {
    addr: SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl HttpConn {
    pub async fn open(addr: SocketAddr) -> HttpConn {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        HttpConn { addr, sender }
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .unwrap();
        tokio::time::timeout(WAIT, self.sender.ready())
            .await
            .expect("http connection ready")
            .expect("http connection alive");
        let resp = tokio::time::timeout(WAIT, self.sender.send_request(req))
            .await
            .expect("http timed out")
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, v)
    }

    /// `POST /api/publish` with any body; returns the status and JSON body.
    pub async fn publish_body(&mut self, body: Value) -> (u16, Value) {
        self.request(
            "POST",
            "/api/publish",
            &[("x-api-key", API_KEY)],
            Some(body),
        )
        .await
    }
}

/// `POST /api/publish` with any body (e.g. `{"rooms": [..], ..}`), on a fresh
/// connection; returns the status and JSON body.
pub async fn publish_body(addr: SocketAddr, body: Value) -> (u16, Value) {
    http(
        addr,
        "POST",
        "/api/publish",
        &[("x-api-key", API_KEY)],
        Some(body),
    )
    .await
}

/// `GET /readyz` that tolerates a refused connection (a node that stopped
/// accepting): `None` then.
pub async fn readyz_status(addr: SocketAddr) -> Option<u16> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri("/readyz")
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .ok()?
        .ok()?;
    Some(resp.status().as_u16())
}

/// The value of one Prometheus sample line (`name{labels} value`) in a
/// `/metrics` text, summed over every line whose series starts with `series`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if name.starts_with(series)
            && let Ok(v) = value.parse::<f64>()
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Any request with `Authorization: Bearer token`.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    http(
        addr,
        method,
        path,
        &[("authorization", &bearer(token))],
        body,
    )
    .await
}

/// A request whose body is sent as given (malformed JSON and the like).
pub async fn call_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, Value) {
    let (s, bytes) = http_raw(
        addr,
        method,
        path,
        &[("authorization", &bearer(token))],
        Some(body.to_string()),
    )
    .await;
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (s, v)
}

/// Reports a driver's position over HTTP.
pub async fn locate(addr: SocketAddr, token: &str, lat: f64, lon: f64) {
    let (s, b) = call(
        addr,
        "POST",
        "/api/driver/location",
        token,
        Some(json!({"latitude": lat, "longitude": lon})),
    )
    .await;
    assert_eq!(s, 204, "{b}");
}

/// Creates an order; asserts 201 and returns it.
pub async fn create_order(addr: SocketAddr, token: &str, body: Value) -> Value {
    let (s, b) = call(addr, "POST", "/api/orders", token, Some(body)).await;
    assert_eq!(s, 201, "{b}");
    b
}

pub fn id_of(order: &Value) -> i64 {
    order["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("no id in {order}"))
}

/// Asserts the JSON error body of SPEC §6 and returns its code.
pub fn error_code(status: u16, body: &Value, want_status: u16) -> String {
    assert_eq!(status, want_status, "{body}");
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code in {body}"));
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "no error.message in {body}"
    );
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "only `error` at the top: {body}"
    );
    code.to_string()
}
