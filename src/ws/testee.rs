//! The Autobahn TestSuite's echo testee, built from the product's own socket
//! code: the frame decoder (`ws::frame`), the RFC rules of message assembly
//! and close frames (`ws::assemble`), the writer (`ws::outbox`) and the
//! close handshake (`ws::outbox::goodbye`). Only with the `autobahn` feature
//! (`cargo run --example autobahn_testee --features autobahn`), for
//! `scripts/autobahn`: never a product endpoint.
//!
//! The suite echoes messages up to 16 MiB, so the caps are given here, not
//! taken from the product's configuration.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::Empty;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::ws::assemble::{Assembler, Step};
use crate::ws::dialect::Dialect;
use crate::ws::frame::{self, DecodeError};
use crate::ws::outbox::{Outbox, Wire, close_code, goodbye};

/// Serves echo sockets on `listener` until the process ends; messages up
/// to `cap` bytes.
pub async fn serve(listener: TcpListener, cap: usize) -> std::io::Result<()> {
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(move |mut req: Request<hyper::body::Incoming>| async move {
                match fastwebsockets::upgrade::upgrade(&mut req) {
                    Ok((resp, fut)) => {
                        tokio::spawn(echo(fut, cap));
                        Ok::<_, Infallible>(resp)
                    }
                    Err(_) => {
                        let mut r = Response::new(Empty::<Bytes>::new());
                        *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
                        Ok(r)
                    }
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades()
                .await;
        });
    }
}

/// Binds `addr` and serves (the example's `main`).
pub async fn run(addr: SocketAddr, cap: usize) -> std::io::Result<()> {
    serve(TcpListener::bind(addr).await?, cap).await
}

async fn echo(upgrade: fastwebsockets::upgrade::UpgradeFut, cap: usize) {
    let Ok(ws) = upgrade.await else { return };
    let Ok(parts) = ws
        .into_inner()
        .into_inner()
        .downcast::<TokioIo<TcpStream>>()
    else {
        return;
    };
    let mut buf = BytesMut::from(&parts.read_buf[..]);
    let outbox = Outbox::new(
        0,
        Dialect::Events,
        usize::MAX / 2,
        usize::MAX / 2,
        Some(Wire::Tcp(parts.io.into_inner())),
    );
    let Some(stream) = outbox.stream() else {
        return;
    };
    let mut messages = Assembler::default();
    let mut need = 0;
    // Echoes already queued go out before the close frame.
    let keep = 'read: loop {
        loop {
            match frame::decode(&mut buf, cap, &mut need) {
                Ok(Some(f)) => match messages.push(f, cap) {
                    Step::More | Step::Pong => {}
                    Step::Ping(p) => outbox.push(frame::pong(&p)),
                    Step::Message { text, payload } => outbox.push(if text {
                        frame::text(payload)
                    } else {
                        frame::binary(payload)
                    }),
                    Step::Close(code) => {
                        outbox.closer.close(code, "");
                        break 'read true;
                    }
                    Step::Fail(code, _) => {
                        outbox.closer.close(code, "");
                        break 'read true;
                    }
                },
                Ok(None) => break,
                Err(DecodeError::TooLarge(_)) => {
                    outbox.closer.close(close_code::MESSAGE_TOO_BIG, "");
                    break 'read true;
                }
                Err(DecodeError::Protocol(_)) => {
                    outbox.closer.close(close_code::PROTOCOL_ERROR, "");
                    break 'read true;
                }
            }
        }
        let backlog = outbox.has_backlog();
        tokio::select! {
            r = stream.writable(), if backlog => {
                if r.is_err() || outbox.flush().is_err() {
                    return;
                }
            }
            r = stream.readable() => {
                if r.is_err() {
                    return;
                }
                buf.reserve(need.saturating_sub(buf.len()).max(64 * 1024));
                match stream.try_read_buf(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(60)) => return,
        }
    };
    goodbye(&outbox, keep).await;
}
