//! One socket's life: authenticate, join its rooms, then two loops.
//!
//! - The **reader** (this task) turns inbound frames into commands. It never
//!   writes: replies (pong, acks, errors) are encoded and queued to the
//!   socket's [`Outbox`]. fastwebsockets' `read_frame` is not cancel-safe, so
//!   it sits in a `select!` only beside the socket's close token, which fires
//!   when the socket is being torn down anyway.
//! - The **writer** (a second task) owns the write half. It drains the outbox
//!   into one vectored write per batch, sends server pings, and on close
//!   (slow consumer, ping timeout, drain, client close) writes the close frame.
//!
//! Outbound frames are written with our own encoder ([`super::frame`]) so one
//! encoded `Bytes` can go to many sockets; fastwebsockets reads.

use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes};
use fastwebsockets::{OpCode, Role as WsRole, WebSocketError};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::dialect::{Command, Dialect, Reply};
use super::frame;
use crate::auth::{AuthError, Identity, Role};
use crate::hub::{Outbox, close_code};
use crate::metrics as m;
use crate::node::App;

type Io = TokioIo<Upgraded>;

/// Frames above `MAX_FRAME_BYTES` but below this are read, refused with an
/// error, and the socket goes on; above it the stream cannot be resynced
/// without reading the payload, so the socket gets the error and close 1009.
fn hard_cap(max_frame: usize) -> usize {
    max_frame.saturating_mul(4).max(256 * 1024)
}

pub async fn serve(
    app: Arc<App>,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    dialect: Dialect,
    auth: Result<Identity, AuthError>,
) {
    let ws = match upgrade.await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let (read, mut write) = tokio::io::split(ws.into_inner());
    let identity = match auth {
        Ok(id) if dialect == Dialect::Driver && id.role != Role::Driver => {
            let msg = "the driver endpoint is for drivers only";
            refuse(&mut write, dialect, close_code::FORBIDDEN, "forbidden", msg).await;
            return;
        }
        Ok(id) => id,
        Err(e) => {
            let msg = e.to_string();
            refuse(
                &mut write,
                dialect,
                close_code::UNAUTHORIZED,
                "unauthorized",
                &msg,
            )
            .await;
            return;
        }
    };

    let (outbox, rx) = Outbox::new(app.next_conn_id(), dialect, app.config.send_queue_len);
    let alive = Arc::new(AtomicBool::new(true));
    app.hub.socket_opened();
    metrics::gauge!(m::SOCKETS_OPEN, "dialect" => dialect.as_str()).increment(1.0);
    metrics::counter!(m::SOCKETS_OPENED, "dialect" => dialect.as_str()).increment(1);
    let writer = tokio::spawn(write_loop(
        write,
        rx,
        outbox.clone(),
        app.drain.clone(),
        app.config.ping_interval,
        alive.clone(),
    ));

    let mut session = Session {
        app: app.clone(),
        identity,
        outbox: outbox.clone(),
        dialect,
        rooms: Vec::new(),
    };
    session.start().await;
    session.read_loop(read, &alive).await;

    // Teardown: make sure the writer stops, then leave every room.
    outbox.closer.close(close_code::NORMAL, "");
    for room in std::mem::take(&mut session.rooms) {
        app.leave(outbox.id, &room);
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    app.hub.socket_closed();
    metrics::gauge!(m::SOCKETS_OPEN, "dialect" => dialect.as_str()).decrement(1.0);
}

/// Tells an unauthenticated or unauthorized client why, then closes.
async fn refuse(w: &mut WriteHalf<Io>, dialect: Dialect, code: u16, err: &str, message: &str) {
    metrics::counter!(m::WS_ERRORS, "dialect" => dialect.as_str(), "code" => err.to_string())
        .increment(1);
    let msg = frame::text(dialect.reply(&Reply::Error { code: err, message }));
    let close = frame::close(code, err);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        w.write_all(&msg).await?;
        w.write_all(&close).await?;
        w.flush().await?;
        w.shutdown().await
    })
    .await;
}

struct Session {
    app: Arc<App>,
    identity: Identity,
    outbox: Arc<Outbox>,
    dialect: Dialect,
    rooms: Vec<String>,
}

impl Session {
    fn reply(&self, r: &Reply<'_>) {
        self.outbox.push(frame::text(self.dialect.reply(r)));
    }

    fn error(&self, code: &str, message: &str) {
        metrics::counter!(m::WS_ERRORS, "dialect" => self.dialect.as_str(), "code" => code.to_string())
            .increment(1);
        self.reply(&Reply::Error { code, message });
    }

    /// Joins the identity's rooms (live cluster-wide before the connect
    /// message goes out, so a client that saw `connected` misses nothing),
    /// then sends the dialect's connect messages.
    async fn start(&mut self) {
        // All rooms at once: with Redis down, a connect waits one join
        // timeout, not one per room.
        let rooms = self.identity.auto_rooms();
        let joins = rooms.iter().map(|room| self.app.join(&self.outbox, room));
        let results = futures_util::future::join_all(joins).await;
        for (room, result) in rooms.into_iter().zip(results) {
            if let Err(e) = result {
                // The membership stays: re-subscribed when Redis is back.
                self.error(
                    "broker_unavailable",
                    &format!("room {room} is not live yet: {e}"),
                );
            }
            self.rooms.push(room);
        }
        self.reply(&Reply::Connected {
            user_id: self.identity.user_id,
            role: self.identity.role.as_str(),
            driver_id: self.identity.driver_id,
        });
        if self.dialect == Dialect::Driver {
            match self.app.initial_orders(&self.identity).await {
                Ok(orders) => self.reply(&Reply::InitialOrders(&orders)),
                Err(e) => self.error(e.code(), &e.to_string()),
            }
        }
    }

    async fn join(&mut self, room: String, ack: bool) {
        if !self.rooms.contains(&room) {
            self.rooms.push(room.clone());
            if let Err(e) = self.app.join(&self.outbox, &room).await {
                // The membership stays: the room is re-subscribed when the
                // broker comes back.
                self.error(
                    "broker_unavailable",
                    &format!("room {room} is not live yet: {e}"),
                );
                return;
            }
        }
        if ack {
            self.reply(&Reply::RoomJoined(&room));
        }
    }

    async fn read_loop(&mut self, read: tokio::io::ReadHalf<Io>, alive: &AtomicBool) {
        let max = self.app.config.max_frame_bytes;
        let (mut rd, _) =
            fastwebsockets::after_handshake_split(read, tokio::io::sink(), WsRole::Server);
        rd.set_auto_close(false);
        rd.set_auto_pong(false);
        rd.set_max_message_size(hard_cap(max));
        // With auto close/pong off, fastwebsockets has nothing to send.
        let mut no_send = |_| async { Ok::<(), std::io::Error>(()) };
        let closed = self.outbox.closer.token().clone();
        // A fragmented message being reassembled: (is text, bytes so far).
        let mut partial: Option<(bool, Vec<u8>)> = None;
        loop {
            let frame = tokio::select! {
                f = rd.read_frame(&mut no_send) => f,
                _ = closed.cancelled() => return,
            };
            let frame = match frame {
                Ok(f) => f,
                Err(WebSocketError::FrameTooLarge) => {
                    let e = super::dialect::ProtoError::TooLarge {
                        size: hard_cap(max),
                        limit: max,
                    };
                    self.error(e.code(), &e.to_string());
                    self.outbox
                        .closer
                        .close(close_code::MESSAGE_TOO_BIG, "message too big");
                    return;
                }
                Err(WebSocketError::InvalidUTF8) => {
                    // The whole frame was consumed: the stream is in sync.
                    alive.store(true, Ordering::Relaxed);
                    self.error("bad_message", "text frames must be UTF-8");
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "socket read ended");
                    return;
                }
            };
            alive.store(true, Ordering::Relaxed);
            let (text, payload) = match frame.opcode {
                OpCode::Close => {
                    self.outbox.closer.close(close_code::NORMAL, "");
                    return;
                }
                OpCode::Ping => {
                    self.outbox.push(frame::pong(&frame.payload));
                    continue;
                }
                OpCode::Pong => continue,
                OpCode::Text | OpCode::Binary if frame.fin => {
                    (frame.opcode == OpCode::Text, frame.payload.to_vec())
                }
                OpCode::Text | OpCode::Binary => {
                    partial = Some((frame.opcode == OpCode::Text, frame.payload.to_vec()));
                    continue;
                }
                OpCode::Continuation => {
                    let Some((text, mut buf)) = partial.take() else {
                        self.error("bad_message", "continuation frame without a first frame");
                        continue;
                    };
                    buf.extend_from_slice(&frame.payload);
                    if buf.len() > hard_cap(max) {
                        let e = super::dialect::ProtoError::TooLarge {
                            size: buf.len(),
                            limit: max,
                        };
                        self.error(e.code(), &e.to_string());
                        self.outbox
                            .closer
                            .close(close_code::MESSAGE_TOO_BIG, "message too big");
                        return;
                    }
                    if !frame.fin {
                        partial = Some((text, buf));
                        continue;
                    }
                    (text, buf)
                }
            };
            self.handle_message(text, &payload, max).await;
        }
    }

    async fn handle_message(&mut self, text: bool, payload: &[u8], max: usize) {
        use super::dialect::ProtoError;
        let parsed = if payload.len() > max {
            Err(ProtoError::TooLarge {
                size: payload.len(),
                limit: max,
            })
        } else if !text {
            Err(ProtoError::Binary)
        } else {
            self.dialect.parse(payload)
        };
        let kind = match &parsed {
            Ok(Command::Ping) => "ping",
            Ok(Command::JoinRoom(_)) => "join-room",
            Ok(Command::LeaveRoom(_)) => "leave-room",
            Ok(Command::Location(_)) => "location",
            Err(_) => "invalid",
        };
        metrics::counter!(m::WS_MESSAGES_IN, "dialect" => self.dialect.as_str(), "type" => kind)
            .increment(1);
        match parsed {
            Err(e) => self.error(e.code(), &e.to_string()),
            Ok(Command::Ping) => self.reply(&Reply::Pong),
            Ok(Command::JoinRoom(room)) => {
                if self.identity.may_join(&room) {
                    self.join(room, true).await;
                } else {
                    self.error(
                        "join_refused",
                        &format!("not allowed to join room {room:?}"),
                    );
                }
            }
            Ok(Command::LeaveRoom(room)) => {
                if let Some(i) = self.rooms.iter().position(|r| *r == room) {
                    self.rooms.swap_remove(i);
                    self.app.leave(self.outbox.id, &room);
                }
                self.reply(&Reply::RoomLeft(&room));
            }
            Ok(Command::Location(loc)) => {
                if self.identity.role != Role::Driver {
                    self.error("forbidden", "only drivers report locations");
                } else if let Err(e) = self.app.driver_location(&self.identity, loc).await {
                    self.error(e.code(), &e.to_string());
                }
            }
        }
    }
}

async fn write_loop(
    mut w: WriteHalf<Io>,
    mut rx: mpsc::Receiver<Bytes>,
    outbox: Arc<Outbox>,
    drain: CancellationToken,
    ping_every: Duration,
    alive: Arc<AtomicBool>,
) {
    let closed = outbox.closer.token().clone();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: Vec<Bytes> = Vec::new();
    let mut flush_queue = false;
    loop {
        tokio::select! {
            biased;
            _ = closed.cancelled() => {
                // Over the hard cap: the error saying why is queued just
                // before the close and must go out before the 1009.
                flush_queue = matches!(
                    outbox.closer.reason(),
                    Some((close_code::MESSAGE_TOO_BIG, _))
                );
                break;
            }
            _ = drain.cancelled() => {
                // Drain: what was queued before the node stopped still goes
                // out, then 1012 tells the client to reconnect elsewhere.
                outbox.closer.close(close_code::SERVICE_RESTART, "server restart");
                flush_queue = true;
                break;
            }
            n = rx.recv_many(&mut batch, 256) => {
                if n == 0 {
                    break;
                }
                tokio::select! {
                    r = write_all(&mut w, &mut batch) => if r.is_err() {
                        outbox.closer.close(close_code::NORMAL, "");
                        return;
                    },
                    // Torn down mid-write (e.g. slow consumer): abandon it.
                    _ = closed.cancelled() => return,
                }
            }
            _ = ping.tick() => {
                if !alive.swap(false, Ordering::Relaxed) {
                    outbox.closer.close(close_code::PING_TIMEOUT, "ping timeout");
                    break;
                }
                batch.push(frame::ping());
                if write_all(&mut w, &mut batch).await.is_err() {
                    return;
                }
            }
        }
    }
    let (code, reason) = outbox.closer.reason().unwrap_or((close_code::NORMAL, ""));
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if flush_queue {
            rx.close();
            while rx.recv_many(&mut batch, 256).await > 0 {
                write_all(&mut w, &mut batch).await?;
            }
        }
        w.write_all(&frame::close(code, reason)).await?;
        w.flush().await?;
        w.shutdown().await
    })
    .await;
}

/// Writes every frame of `batch` (emptying it) with vectored writes: one
/// syscall for a whole queue in the common case.
async fn write_all<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    let mut start = 0;
    while start < batch.len() {
        let slices: Vec<IoSlice<'_>> = batch[start..]
            .iter()
            .take(64)
            .map(|b| IoSlice::new(b))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let first = &mut batch[start];
            if n >= first.len() {
                n -= first.len();
                start += 1;
            } else {
                first.advance(n);
                n = 0;
            }
        }
    }
    batch.clear();
    w.flush().await
}
