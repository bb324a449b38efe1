//! The WebSocket test client: a reader task turns frames into [`Seen`]
//! items, or the reader is parked (a consumer that never reads); raw and
//! unmasked frames, pong control. The upgrade is `switchboard_client`'s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, Payload, WebSocketWrite};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::WriteHalf;
use tokio::sync::{Mutex, mpsc};

use super::WAIT;

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
    /// Broken `ORDER_UPDATED` rules this client saw (see [`UpdateRule`]).
    broken: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            r.abort();
        }
        let broken = std::mem::take(&mut *self.broken.lock().unwrap());
        if !broken.is_empty() && !std::thread::panicking() {
            panic!("ORDER_UPDATED rule broken: {broken:#?}");
        }
    }
}

/// SPEC §5, checked on every socket of every test: an `ORDER_UPDATED` never
/// has an empty `changed`, and its `version` is larger than the one before
/// it for that order on that socket.
#[derive(Default)]
struct UpdateRule {
    versions: std::collections::HashMap<i64, i64>,
}

impl UpdateRule {
    fn check(&mut self, v: &Value) -> Option<String> {
        if v["type"] != "ORDER_UPDATED" {
            return None;
        }
        let p = &v["payload"];
        if p["changed"].as_array().is_none_or(Vec::is_empty) {
            return Some(format!("empty changed: {v}"));
        }
        let (Some(id), Some(version)) = (p["id"].as_i64(), p["version"].as_i64()) else {
            return Some(format!("no id or version: {v}"));
        };
        match self.versions.insert(id, version) {
            Some(before) if version <= before => {
                Some(format!("version {version} after {before}: {v}"))
            }
            _ => None,
        }
    }
}

/// A frame as a seed client reads it: without what SPEC §10 adds (`room`
/// and `offset` on historical frames, positions in connect messages and
/// `room-joined`).
pub fn seed_view(v: &mut Value) {
    let Some(m) = v.as_object_mut() else { return };
    if m.remove("room").is_some() {
        m.remove("offset");
    }
    let ty = m.get("type").and_then(Value::as_str).unwrap_or("");
    if ![
        "connected",
        "CONNECTED",
        "connection_established",
        "room-joined",
    ]
    .contains(&ty)
    {
        return;
    }
    for key in ["data", "payload"] {
        if let Some(b) = m.get_mut(key).and_then(Value::as_object_mut) {
            for f in ["rooms", "recovery", "epoch", "offset"] {
                b.remove(f);
            }
        }
    }
    for f in ["rooms", "recovery"] {
        m.remove(f);
    }
}

#[derive(Clone, Copy)]
pub struct ClientOpts {
    /// Answer server pings.
    pub auto_pong: bool,
    /// Read at all (false = a consumer that never reads).
    pub read: bool,
    /// Keep the top-level `room` and `offset` of historical frames (SPEC
    /// §10). Off by default: most tests compare frames with the seeds'
    /// exact shapes, which seed clients read without these fields;
    /// `tests/recovery.rs` and the golden tests check them.
    pub positions: bool,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts {
            auto_pong: true,
            read: true,
            positions: false,
        }
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr, path: &str) -> Client {
        Client::connect_with(addr, path, &[], ClientOpts::default()).await
    }

    /// A client that keeps frames' `room` and `offset` (SPEC §10).
    pub async fn connect_positions(addr: SocketAddr, path: &str) -> Client {
        let opts = ClientOpts {
            positions: true,
            ..ClientOpts::default()
        };
        Client::connect_with(addr, path, &[], opts).await
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
        let broken = Arc::new(std::sync::Mutex::new(Vec::new()));
        if !opts.read {
            return Client {
                rx,
                writer,
                reader: None,
                parked: Some(rd),
                broken,
            };
        }
        let w = writer.clone();
        let seen_broken = broken.clone();
        let reader = tokio::spawn(async move {
            let mut rule = UpdateRule::default();
            let mut fc = fastwebsockets::FragmentCollectorRead::new(rd);
            let mut no_send = |_| async { Ok::<(), std::io::Error>(()) };
            loop {
                let Ok(frame) = fc.read_frame(&mut no_send).await else {
                    let _ = tx.send(Seen::Close(1006));
                    return;
                };
                match frame.opcode {
                    OpCode::Text => {
                        let mut v: Value =
                            serde_json::from_slice(&frame.payload).expect("server sent JSON");
                        if !opts.positions {
                            seed_view(&mut v);
                        }
                        if let Some(b) = rule.check(&v) {
                            seen_broken.lock().unwrap().push(b);
                        }
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
            broken,
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

/// Connects to `path` with `token` in the query and reads the connect
/// message(s) of the dialect.
pub async fn connect_ready(addr: SocketAddr, path: &str, token: &str) -> Client {
    let sep = if path.contains('?') { '&' } else { '?' };
    ready(Client::connect(addr, &format!("{path}{sep}token={token}")).await).await
}

/// [`connect_ready`] for a client that keeps frames' `room` and `offset`.
pub async fn connect_ready_positions(addr: SocketAddr, path: &str, token: &str) -> Client {
    let sep = if path.contains('?') { '&' } else { '?' };
    ready(Client::connect_positions(addr, &format!("{path}{sep}token={token}")).await).await
}

async fn ready(mut c: Client) -> Client {
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

/// Every JSON message a client receives within `d` (stops early on close).
pub async fn collect_for(c: &mut Client, d: Duration) -> Vec<Value> {
    let deadline = Instant::now() + d;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_seen(left).await {
            Some(Seen::Json(v)) => out.push(v),
            Some(Seen::Close(code)) => panic!("socket closed ({code}) after {out:?}"),
            None => return out,
        }
    }
}

/// What is already queued on a client, without waiting.
pub async fn queued(c: &mut Client) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(s) = c.next_seen(Duration::from_millis(1)).await {
        match s {
            Seen::Json(v) => out.push(v),
            Seen::Close(code) => panic!("socket closed ({code}) after {out:?}"),
        }
    }
    out
}

pub fn of_type<'a>(msgs: &'a [Value], ty: &str) -> Vec<&'a Value> {
    msgs.iter().filter(|m| m["type"] == ty).collect()
}
