//! Rust client for switchboard's three WebSocket dialects.
//!
//! - [`Socket`]: one connection, raw frames in and out (the load generator
//!   uses it: it parses only what it measures). A reader task owns the read
//!   half (fastwebsockets' `read_frame` is not cancel-safe, so it never sits
//!   in a `select!`); sends go through a shared writer.
//! - [`reconnect::Client`]: stays connected with seed 000's rules (backoff
//!   with jitter, at most 10 attempts, no retry after 4001/4003) and keeps
//!   [`cache::OrdersCache`] and [`cache::DriverPositions`] up to date; it
//!   resumes by itself on every reconnect ([`positions`]: `since`, SPEC §10)
//!   and signals `Resync` for a room that was not recovered, whose orders
//!   the cache then refetches.

pub mod cache;
pub mod positions;
pub mod reconnect;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketWrite};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::WriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("websocket: {0}")]
    Ws(#[from] fastwebsockets::WebSocketError),
    #[error("request: {0}")]
    Http(#[from] hyper::http::Error),
}

/// What the server sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Text(Bytes),
    /// The close code (1005 when none, 1006 when the connection just ended).
    Close(u16),
}

struct SpawnExecutor;
impl<Fut> hyper::rt::Executor<Fut> for SpawnExecutor
where
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::spawn(fut);
    }
}

/// An upgraded connection, as [`handshake`] returns it.
pub type WebSocketStream = WebSocket<TokioIo<Upgraded>>;

/// The WebSocket upgrade of `path` (with its query, e.g. `/ws?token=…`) on
/// `tcp`, connected to `addr` (the `Host`), with extra request `headers`. The socket keeps
/// fastwebsockets' defaults (auto pong and close); [`Socket::connect`] turns
/// them off and reads it from a task, and a caller that needs raw frames
/// (the integration tests' client) can do its own reading.
pub async fn handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<WebSocketStream, ClientError> {
    let mut req = hyper::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", addr.to_string())
        .header(hyper::header::UPGRADE, "websocket")
        .header(hyper::header::CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let (ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, req, tcp).await?;
    Ok(ws)
}

type Writer = Arc<Mutex<WebSocketWrite<WriteHalf<TokioIo<Upgraded>>>>>;

/// One open socket.
pub struct Socket {
    rx: mpsc::Receiver<Incoming>,
    writer: Writer,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Socket {
    /// Opens `ws://{addr}{path}` (path includes the query, e.g. `/ws?token=…`),
    /// optionally from a given local address (to spread many sockets over
    /// 127.0.0.x source addresses). Server pings are answered.
    pub async fn connect(
        addr: SocketAddr,
        path: &str,
        local: Option<std::net::IpAddr>,
        queue: usize,
    ) -> Result<Socket, ClientError> {
        let tcp = match local {
            None => tokio::net::TcpStream::connect(addr).await?,
            Some(ip) => {
                let s = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                s.bind(SocketAddr::new(ip, 0))?;
                s.connect(addr).await?
            }
        };
        tcp.set_nodelay(true)?;
        let ws = handshake(tcp, addr, path, &[]).await?;
        let (mut rd, wr) = ws.split(tokio::io::split);
        rd.set_auto_pong(false);
        rd.set_auto_close(false);
        let writer: Writer = Arc::new(Mutex::new(wr));
        let (tx, rx) = mpsc::channel(queue.max(1));
        let w = writer.clone();
        let reader = tokio::spawn(async move {
            let mut fc = fastwebsockets::FragmentCollectorRead::new(rd);
            let mut no_send = |_| async { Ok::<(), std::io::Error>(()) };
            loop {
                let Ok(frame) = fc.read_frame(&mut no_send).await else {
                    let _ = tx.send(Incoming::Close(1006)).await;
                    return;
                };
                match frame.opcode {
                    OpCode::Text => {
                        let b = Bytes::copy_from_slice(&frame.payload);
                        if tx.send(Incoming::Text(b)).await.is_err() {
                            return;
                        }
                    }
                    OpCode::Close => {
                        let p = &frame.payload;
                        let code = if p.len() >= 2 {
                            u16::from_be_bytes([p[0], p[1]])
                        } else {
                            1005
                        };
                        let _ = tx.send(Incoming::Close(code)).await;
                        return;
                    }
                    OpCode::Ping => {
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
        Ok(Socket { rx, writer, reader })
    }

    pub async fn send_text(&self, text: &str) -> Result<(), ClientError> {
        let f = Frame::text(Payload::Owned(text.as_bytes().to_vec()));
        self.writer.lock().await.write_frame(f).await?;
        Ok(())
    }

    /// The next frame; `None` after the reader ended and everything was read.
    pub async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }
}
