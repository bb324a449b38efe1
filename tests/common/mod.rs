//! Test harness: real `redis-server` processes and real nodes on free ports,
//! a WebSocket client and a small HTTP client. Everything a test starts is
//! stopped by a `Drop` guard, pass or fail.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketWrite};
use http_body_util::{BodyExt, Full};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use switchboard::Node;
use switchboard::config::{Config, JwtKey};
use tokio::io::WriteHalf;
use tokio::sync::{Mutex, mpsc};

pub const SECRET: &str = "integration-test-secret-0123456789";
pub const API_KEY: &str = "test-api-key";
pub const WAIT: Duration = Duration::from_secs(10);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

// Not every test binary uses both.
#[allow(unused_imports)]
pub use switchboard_testkit::{RedisServer, free_port};

/// A database shared by the nodes of one test cluster: a SQLite file in a
/// temp dir, or a fresh PostgreSQL database (dropped on drop).
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("sb.db").display());
        TestDb {
            url,
            _dir: Some(dir),
            pg: None,
        }
    }

    /// A new database on the server of `TEST_DATABASE_URL`; `None` when the
    /// variable is unset (PostgreSQL variants are then skipped, loudly).
    pub async fn postgres() -> Option<TestDb> {
        let Ok(admin_url) = std::env::var("TEST_DATABASE_URL") else {
            eprintln!("TEST_DATABASE_URL unset: skipping the PostgreSQL variant");
            return None;
        };
        use sea_orm::ConnectionTrait;
        let name = format!("sb_test_{:016x}", rand::random::<u64>());
        let admin = sea_orm::Database::connect(&admin_url)
            .await
            .expect("TEST_DATABASE_URL reachable");
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        admin.close().await.ok();
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .unwrap_or(&admin_url);
        Some(TestDb {
            url: format!("{base}/{name}"),
            _dir: None,
            pg: Some((admin_url, name)),
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin_url, name)) = self.pg.take() {
            // Drop runs outside async: a short-lived runtime on its own thread.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    use sea_orm::ConnectionTrait;
                    if let Ok(db) = sea_orm::Database::connect(&admin_url).await {
                        let _ = db
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

/// Runs a test body once on SQLite and once on PostgreSQL (when
/// `TEST_DATABASE_URL` is set): `db_variants!(name, body_fn);` where
/// `body_fn(TestDb)` is an async fn.
#[macro_export]
macro_rules! db_variants {
    ($name:ident, $body:path) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $crate::common::init_tracing();
                $body($crate::common::TestDb::sqlite()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $crate::common::init_tracing();
                if let Some(db) = $crate::common::TestDb::postgres().await {
                    $body(db).await;
                }
            }
        }
    };
}

/// A node config for tests: loopback, free port, fixed secret and API key.
pub fn config(db: &TestDb, redis: Option<&RedisServer>, node_id: &str) -> Config {
    let mut c = Config::defaults();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.database_url = db.url.clone();
    c.redis_url = redis.map(RedisServer::url);
    c.jwt_key = JwtKey::Secret {
        secret: SECRET.as_bytes().to_vec(),
        generated: false,
    };
    c.api_keys = vec![API_KEY.to_string()];
    c.node_id = node_id.to_string();
    c.shutdown_grace = Duration::from_secs(5);
    c
}

/// A running node, drained and stopped on drop.
pub struct TestNode {
    pub node: Option<Node>,
    pub addr: SocketAddr,
}

impl TestNode {
    pub async fn start(config: Config) -> TestNode {
        let node = Node::start(config).await.expect("node starts");
        let addr = node.addr();
        TestNode {
            node: Some(node),
            addr,
        }
    }

    pub fn node(&self) -> &Node {
        self.node.as_ref().unwrap()
    }

    pub async fn stop(&mut self) {
        if let Some(n) = self.node.take() {
            n.stop().await;
        }
    }

    /// Waits until `/readyz` answers `ready` (or panics after `WAIT`).
    pub async fn wait_ready(&self, ready: bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, _) = http(self.addr, "GET", "/readyz", &[], None).await;
            if (status == 200) == ready {
                return;
            }
            assert!(Instant::now() < deadline, "readyz never became {ready}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn publish(&self, room: &str, ty: &str, data: Value) {
        let (s, b) = http(
            self.addr,
            "POST",
            "/api/publish",
            &[("x-api-key", API_KEY)],
            Some(json!({"room": room, "type": ty, "data": data})),
        )
        .await;
        assert_eq!(s, 204, "publish failed: {b}");
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(n) = self.node.take() {
            // Dropping without awaiting: start the drain so tasks end.
            n.shutdown();
        }
    }
}

/// A JWT signed with the test secret.
pub fn token(claims: Value) -> String {
    let mut c = claims;
    if c.get("exp").is_none() {
        c["exp"] = json!(jsonwebtoken::get_current_timestamp() + 3600);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &c,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub fn admin() -> String {
    token(json!({"sub": "1", "role": "admin"}))
}
pub fn manager(id: i64, cities: &[i64]) -> String {
    token(json!({"sub": id, "role": "manager", "city_ids": cities}))
}
pub fn driver(id: i64, city: i64) -> String {
    token(json!({"user_id": id, "groups": ["Driver"], "city_id": city}))
}
pub fn user(id: i64) -> String {
    token(json!({"userId": id, "role": "user", "city_id": 1}))
}

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

/// What a test client saw.
#[derive(Debug)]
pub enum Seen {
    Json(Value),
    Close(u16),
}

type Writer = Arc<Mutex<WebSocketWrite<WriteHalf<TokioIo<Upgraded>>>>>;

/// A WebSocket client: a reader task turns frames into [`Seen`] items.
pub struct Client {
    rx: mpsc::UnboundedReceiver<Seen>,
    writer: Writer,
    reader: Option<tokio::task::JoinHandle<()>>,
    /// Held (unread) when the client was opened with `read = false`.
    parked: Option<fastwebsockets::WebSocketRead<tokio::io::ReadHalf<TokioIo<Upgraded>>>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            r.abort();
        }
    }
}

#[derive(Clone, Copy)]
pub struct ClientOpts {
    /// Answer server pings.
    pub auto_pong: bool,
    /// Read at all (false = a consumer that never reads).
    pub read: bool,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts {
            auto_pong: true,
            read: true,
        }
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr, path: &str) -> Client {
        Client::connect_with(addr, path, &[], ClientOpts::default()).await
    }

    pub async fn connect_with(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        opts: ClientOpts,
    ) -> Client {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let ws = switchboard_client::handshake(tcp, addr, path, headers)
            .await
            .expect("websocket handshake");
        let (mut rd, wr) = ws.split(tokio::io::split);
        rd.set_auto_pong(false);
        rd.set_auto_close(false);
        let writer: Writer = Arc::new(Mutex::new(wr));
        let (tx, rx) = mpsc::unbounded_channel();
        if !opts.read {
            return Client {
                rx,
                writer,
                reader: None,
                parked: Some(rd),
            };
        }
        let w = writer.clone();
        let reader = tokio::spawn(async move {
            let mut fc = fastwebsockets::FragmentCollectorRead::new(rd);
            let mut no_send = |_| async { Ok::<(), std::io::Error>(()) };
            loop {
                let Ok(frame) = fc.read_frame(&mut no_send).await else {
                    let _ = tx.send(Seen::Close(1006));
                    return;
                };
                match frame.opcode {
                    OpCode::Text => {
                        let v: Value =
                            serde_json::from_slice(&frame.payload).expect("server sent JSON");
                        let _ = tx.send(Seen::Json(v));
                    }
                    OpCode::Close => {
                        let code = if frame.payload.len() >= 2 {
                            u16::from_be_bytes([frame.payload[0], frame.payload[1]])
                        } else {
                            1005
                        };
                        let _ = tx.send(Seen::Close(code));
                        return;
                    }
                    OpCode::Ping if opts.auto_pong => {
                        let p = frame.payload.to_vec();
                        let _ = w
                            .lock()
                            .await
                            .write_frame(Frame::pong(Payload::Owned(p)))
                            .await;
                    }
                    _ => {}
                }
            }
        });
        Client {
            rx,
            writer,
            reader: Some(reader),
            parked: None,
        }
    }

    pub async fn send_frame(&self, frame: Frame<'_>) {
        self.writer
            .lock()
            .await
            .write_frame(frame)
            .await
            .expect("client write");
    }

    pub async fn send_text(&self, s: &str) {
        self.send_frame(Frame::text(Payload::Owned(s.as_bytes().to_vec())))
            .await;
    }

    pub async fn send_json(&self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    /// The next message; panics on close or after `WAIT`.
    pub async fn recv(&mut self) -> Value {
        match self.next_seen(WAIT).await {
            Some(Seen::Json(v)) => v,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    pub async fn next_seen(&mut self, within: Duration) -> Option<Seen> {
        tokio::time::timeout(within, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Skips messages until one of type `ty` arrives.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_seen(left).await {
                Some(Seen::Json(v)) if v["type"] == ty => return v,
                Some(Seen::Json(_)) => continue,
                other => panic!("waiting for {ty}, got {other:?}"),
            }
        }
    }

    /// Waits for the close frame and returns its code.
    pub async fn closed(&mut self) -> u16 {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_seen(left).await {
                Some(Seen::Close(c)) => return c,
                Some(Seen::Json(_)) => continue,
                None => panic!("socket was not closed within {WAIT:?}"),
            }
        }
    }

    /// Asserts nothing arrives for `d`.
    pub async fn silent_for(&mut self, d: Duration) {
        if let Some(s) = self.next_seen(d).await {
            panic!("expected silence, got {s:?}");
        }
    }
}

/// Connects to `path` with `token` in the query and reads the connect
/// message(s) of the dialect.
pub async fn connect_ready(addr: SocketAddr, path: &str, token: &str) -> Client {
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut c = Client::connect(addr, &format!("{path}{sep}token={token}")).await;
    let first = c.recv().await;
    match first["type"].as_str() {
        Some("connected") | Some("CONNECTED") => {}
        Some("connection_established") => {
            let init = c.recv().await;
            assert_eq!(init["type"], "initial_orders", "{init}");
        }
        _ => panic!("unexpected first message {first}"),
    }
    c
}

// ---- Helpers added for the wire, cluster and broker tests. ----

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

impl Client {
    /// Like [`Client::send_frame`], but a write error (the server closed the
    /// connection under us) is returned instead of panicking.
    pub async fn try_send_frame(
        &self,
        frame: Frame<'_>,
    ) -> Result<(), fastwebsockets::WebSocketError> {
        self.writer.lock().await.write_frame(frame).await
    }

    /// Sends one frame from a task of its own, so a test can read the
    /// server's answer while a large frame is still being written. The task
    /// yields whether the write succeeded.
    pub fn spawn_send(&self, opcode: OpCode, payload: Vec<u8>) -> tokio::task::JoinHandle<bool> {
        let w = self.writer.clone();
        tokio::spawn(async move {
            let frame = Frame::new(true, opcode, None, Payload::Owned(payload));
            w.lock().await.write_frame(frame).await.is_ok()
        })
    }

    /// Sends a frame without the client mask RFC 6455 requires.
    pub async fn send_unmasked(&self, frame: Frame<'_>) {
        let mut w = self.writer.lock().await;
        w.set_auto_apply_mask(false);
        w.write_frame(frame).await.expect("client write");
        w.set_auto_apply_mask(true);
    }

    /// For a parked client: reads the next `n` text frames as JSON (other
    /// frames are skipped); panics if they do not all come within `within`.
    pub async fn read_parked(&mut self, n: usize, within: Duration) -> Vec<Value> {
        let rd = self.parked.as_mut().expect("a parked client");
        let mut no_send = |_| async { Ok::<(), std::io::Error>(()) };
        let deadline = Instant::now() + within;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let f = tokio::time::timeout(left, rd.read_frame(&mut no_send))
                .await
                .unwrap_or_else(|_| panic!("only {} of {n} frames in time", out.len()))
                .expect("the connection ended");
            match f.opcode {
                OpCode::Text => {
                    out.push(serde_json::from_slice(&f.payload).expect("server sent JSON"))
                }
                OpCode::Close => panic!("closed after {} of {n} frames", out.len()),
                _ => {}
            }
        }
        out
    }

    /// Opens a socket that reads its first `skip` frames (the connect
    /// messages, so the socket is known to be in its rooms) and then never
    /// reads again: a consumer whose buffers fill up.
    pub async fn connect_parked(addr: SocketAddr, path: &str, skip: usize) -> Client {
        let mut c = Client::connect_with(
            addr,
            path,
            &[],
            ClientOpts {
                read: false,
                ..ClientOpts::default()
            },
        )
        .await;
        let rd = c.parked.as_mut().expect("opened parked");
        let mut no_send = |_| async { Ok::<(), std::io::Error>(()) };
        for _ in 0..skip {
            let f = tokio::time::timeout(WAIT, rd.read_frame(&mut no_send))
                .await
                .expect("connect message in time")
                .expect("connect message");
            assert_eq!(f.opcode, OpCode::Text, "expected a connect message");
        }
        c
    }

    /// For a parked client: reads whatever the server buffered until the
    /// connection ends. Returns the number of text frames read and whether
    /// the connection ended (closed or reset) within `within`.
    pub async fn drain_parked(&mut self, within: Duration) -> (usize, bool) {
        let rd = self.parked.as_mut().expect("a parked client");
        let mut no_send = |_| async { Ok::<(), std::io::Error>(()) };
        let mut texts = 0;
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rd.read_frame(&mut no_send)).await {
                Err(_) => return (texts, false),
                Ok(Err(_)) => return (texts, true),
                Ok(Ok(f)) => match f.opcode {
                    OpCode::Close => return (texts, true),
                    OpCode::Text => texts += 1,
                    _ => {}
                },
            }
        }
    }
}
