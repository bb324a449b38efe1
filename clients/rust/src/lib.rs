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
//! - [`Tls`]: `wss://` (and `https://` for the orders refetch) with rustls,
//!   trusting the roots the caller gives (a CA or a self-signed certificate
//!   in PEM, or a whole `rustls::ClientConfig`).

pub mod cache;
pub mod positions;
pub mod reconnect;

/// The rustls this crate speaks TLS with (to build a [`Tls`] from a
/// `ClientConfig` of one's own).
pub use tokio_rustls::rustls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketWrite};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("websocket: {0}")]
    Ws(#[from] fastwebsockets::WebSocketError),
    #[error("request: {0}")]
    Http(#[from] hyper::http::Error),
    #[error("tls: {0}")]
    Tls(String),
}

/// TLS settings for `wss://`: whom to trust and the name the server's
/// certificate must carry. Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl Tls {
    /// Trusts the certificates in `pem` (a CA, or the server's own
    /// self-signed certificate) and expects `server_name` (a DNS name or an
    /// IP address) in the server's certificate.
    pub fn trusting_pem(pem: &[u8], server_name: &str) -> Result<Tls, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| ClientError::Tls(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| ClientError::Tls(e.to_string()))?;
            n += 1;
        }
        if n == 0 {
            return Err(ClientError::Tls("no certificate in the PEM".into()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Tls::with_config(Arc::new(config), server_name)
    }

    /// A rustls client config of the caller's (its own roots, client
    /// certificates…); set `alpn_protocols` to `http/1.1` or leave it empty.
    pub fn with_config(
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<Tls, ClientError> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| ClientError::Tls(format!("{server_name:?}: {e}")))?;
        Ok(Tls {
            config,
            server_name,
        })
    }

    /// The TLS handshake on a connected `tcp`.
    pub async fn wrap(
        &self,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        Ok(connector.connect(self.server_name.clone(), tcp).await?)
    }
}

/// A byte stream a socket or a request can run on: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A connection to `addr` (from `local` when given), through TLS when `tls`
/// is given.
pub async fn connect_stream(
    addr: SocketAddr,
    local: Option<std::net::IpAddr>,
    tls: Option<&Tls>,
) -> Result<Box<dyn Io>, ClientError> {
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
    Ok(match tls {
        None => Box::new(tcp),
        Some(tls) => Box::new(tls.wrap(tcp).await?),
    })
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
/// `tcp` (a `TcpStream`, or any [`Io`], e.g. a TLS stream), connected to
/// `addr` (the `Host`), with extra request `headers`. The socket keeps
/// fastwebsockets' defaults (auto pong and close); [`Socket::connect`] turns
/// them off and reads it from a task, and a caller that needs raw frames
/// (the integration tests' client) can do its own reading.
pub async fn handshake(
    tcp: impl Io,
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
        Socket::connect_with(addr, path, local, queue, None).await
    }

    /// [`Socket::connect`], over `wss://` when `tls` is given.
    pub async fn connect_with(
        addr: SocketAddr,
        path: &str,
        local: Option<std::net::IpAddr>,
        queue: usize,
        tls: Option<&Tls>,
    ) -> Result<Socket, ClientError> {
        let io = connect_stream(addr, local, tls).await?;
        let ws = handshake(io, addr, path, &[]).await?;
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
