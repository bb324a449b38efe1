//! One socket's life: authenticate, join its rooms, then **one task** that
//! reads frames, flushes the send backlog, pings, and closes.
//!
//! - Sending: anyone with a frame for this socket calls [`Outbox::push`],
//!   which writes it directly when nothing is queued (see `hub`). The task
//!   only flushes what the kernel did not take at once, when the socket
//!   becomes writable.
//! - Reading: frames are decoded by [`frame::decode`] from a buffer that
//!   exists only while bytes are in hand; an idle socket holds no read
//!   buffer. Readiness + `try_read` are cancel-safe, so the read sits in
//!   the task's `select!` with the close, drain, backlog and ping branches.
//! - The upgraded connection is taken back as the plain `TcpStream` (hyper's
//!   `Upgraded::downcast`), so writes need no lock around a split stream and
//!   can happen from any thread. A TLS connection is taken back too, and
//!   handed to `tls::relay`: the socket works on the plain end of a local
//!   socket pair, the same way ([`Wire`]).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::assemble::{Assembler, Step};
use super::dialect::{Command, Dialect, Reply};
use super::frame::{self, DecodeError};
use super::outbox::{Outbox, Wire, close_code, goodbye};
use crate::auth::{AuthError, Identity, Role};
use crate::broker::{Broker, BrokerError, Replay};
use crate::domain::DomainError;
use crate::event::{Event, Recovery, StreamPos, epoch_id};
use crate::metrics as m;
use crate::node::app::App;

/// Frames above `MAX_FRAME_BYTES` but below this are read, refused with an
/// error, and the socket goes on; above it the stream cannot be resynced
/// without reading the payload, so the socket gets the error and close 1009.
fn hard_cap(max_frame: usize) -> usize {
    max_frame.saturating_mul(4).max(256 * 1024)
}

/// Bytes asked of the kernel per read (more when a known frame needs more).
const READ_CHUNK: usize = 4096;

pub async fn serve(
    app: Arc<App>,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    dialect: Dialect,
    auth: Result<Identity, AuthError>,
    since: Since,
) {
    let ws = match upgrade.await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    // Copied: `read_buf` may be a slice of hyper's whole read buffer,
    // which must not live as long as the socket.
    let (stream, early) = match ws
        .into_inner()
        .into_inner()
        .downcast::<TokioIo<TcpStream>>()
    {
        Ok(parts) => (
            Wire::Tcp(parts.io.into_inner()),
            BytesMut::from(&parts.read_buf[..]),
        ),
        // A TLS connection: the socket code works on the plain end of a
        // socket pair, the relay encrypts (see `tls::relay`).
        Err(upgraded) => match upgraded.downcast::<TokioIo<crate::tls::ServerStream>>() {
            Ok(parts) => {
                let early = BytesMut::from(&parts.read_buf[..]);
                match crate::tls::relay(parts.io.into_inner()) {
                    Ok((local, pump)) => {
                        app.tracker.spawn(pump);
                        (Wire::Local(local), early)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot relay a TLS socket");
                        return;
                    }
                }
            }
            Err(_) => {
                tracing::error!("an upgraded connection is neither TCP nor TLS over TCP");
                return;
            }
        },
    };
    let outbox = Outbox::new(
        app.next_conn_id(),
        dialect,
        app.config.send_queue_len,
        app.config.send_queue_bytes,
        Some(stream),
    );
    let identity = match auth {
        Ok(id) if dialect == Dialect::Driver && id.role != Role::Driver => {
            let msg = "the driver endpoint is for drivers only";
            Box::pin(refuse(&outbox, close_code::FORBIDDEN, "forbidden", msg)).await;
            return;
        }
        Ok(id) => id,
        Err(e) => {
            let msg = e.to_string();
            Box::pin(refuse(
                &outbox,
                close_code::UNAUTHORIZED,
                "unauthorized",
                &msg,
            ))
            .await;
            return;
        }
    };

    let driver = (identity.role == Role::Driver).then_some(identity.driver_id);
    if let Some(d) = driver {
        Box::pin(app.driver_socket_opened(d, identity.city_id)).await;
    }
    app.hub.socket_opened();
    metrics::gauge!(m::SOCKETS_OPEN, "dialect" => dialect.as_str()).increment(1.0);
    metrics::counter!(m::SOCKETS_OPENED, "dialect" => dialect.as_str()).increment(1);
    let mut session = Session {
        app: app.clone(),
        identity,
        outbox: outbox.clone(),
        dialect,
        rooms: Vec::new(),
    };
    // Boxed, like every rarely taken branch below: the task's own future
    // stays small, and it is what an idle socket costs.
    let keep_queue = if Box::pin(session.start(since)).await {
        session.run(early).await
    } else {
        // Not in every room, or without a position to resume from: the
        // client is told why, then reconnects (SPEC §10: nothing lost
        // silently).
        outbox
            .closer
            .close(close_code::TRY_AGAIN_LATER, "broker unavailable");
        true
    };

    // Teardown: no more deliveries, leave every room, then say goodbye.
    outbox.closer.close(close_code::NORMAL, "");
    for room in std::mem::take(&mut session.rooms) {
        app.leave(outbox.id, &room);
    }
    if let Some(d) = driver {
        app.driver_socket_closed(d);
    }
    // Boxed: its read buffer must not sit in every idle socket's future.
    Box::pin(goodbye(&outbox, keep_queue)).await;
    app.hub.socket_closed();
    metrics::gauge!(m::SOCKETS_OPEN, "dialect" => dialect.as_str()).decrement(1.0);
}

/// Tells an unauthenticated or unauthorized client why, then closes.
async fn refuse(outbox: &Outbox, code: u16, err: &'static str, message: &str) {
    let dialect = outbox.dialect;
    metrics::counter!(m::WS_ERRORS, "dialect" => dialect.as_str(), "code" => err.to_string())
        .increment(1);
    outbox.push(frame::text(
        dialect.reply(&Reply::Error { code: err, message }),
    ));
    outbox.closer.close(code, err);
    Box::pin(goodbye(outbox, true)).await;
}

/// A failure of the rules or a backend as the client's error message. Rule
/// errors keep their message (written for the client); a backend failure
/// says only which backend failed, and its own text (a database's or Redis's
/// message) goes to the log (SPEC §11). The code is [`DomainError::code`].
fn client_message(e: &DomainError) -> String {
    let what = match e {
        DomainError::Invalid(_)
        | DomainError::NotFound(_)
        | DomainError::Conflict(_)
        | DomainError::Rule { .. } => return e.to_string(),
        DomainError::Store(_) => "database",
        DomainError::Broker(_) => "broker",
        DomainError::Index(_) => "driver index",
        DomainError::Clock(_) => "offer clock",
    };
    if e.is_unavailable() {
        // Debug: a socket's positions fail like this many times a second
        // while Redis is down, which readiness and the health log report.
        tracing::debug!(error = %e, "{what} unavailable");
        format!("{what} unavailable, retry later")
    } else {
        tracing::error!(error = %e, "{what} failed");
        format!("internal error ({what})")
    }
}

/// A broker failure as the client's words; Redis's own text to the log.
fn broker_message(room: &str, doing: &str, e: &BrokerError) -> String {
    tracing::debug!(error = %e, room, "broker unavailable while {doing}");
    let why = match e {
        BrokerError::Timeout => "broker timed out",
        _ => "broker unavailable",
    };
    format!("room {room} {doing}: {why}")
}

/// When a socket pinged now pings next: `every` from now, rounded up to a
/// grid of `PING_GRID` shared by every socket, so the node wakes a few times
/// a second for all its pings (and reads the pongs in bursts) instead of
/// once per socket.
fn next_ping(every: Duration) -> tokio::time::Instant {
    const PING_GRID: Duration = Duration::from_millis(250);
    static ORIGIN: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(tokio::time::Instant::now);
    let due = (tokio::time::Instant::now() + every).duration_since(origin);
    let grid = PING_GRID.as_nanos();
    let slots = due.as_nanos().div_ceil(grid);
    let rounded = u64::try_from(slots * grid).unwrap_or(u64::MAX);
    origin + Duration::from_nanos(rounded)
}

/// What the socket has read but not yet handled.
struct Inbound {
    buf: BytesMut,
    /// The whole size of the frame at the front of `buf`, once its header
    /// has arrived (0 when unknown).
    need: usize,
    /// Fragments of a message being reassembled.
    messages: Assembler,
    limit: RateLimit,
    /// Frames decoded so far (progress, for the frame deadline).
    frames: u64,
}

/// How long a client may take to finish a frame it started (SPEC §11).
const FRAME_DEADLINE: Duration = Duration::from_secs(30);
/// How long a socket may stay over its message rate before it is closed.
const FLOOD_GRACE: Duration = Duration::from_secs(10);

/// The inbound message rate of one socket: a token bucket of `rate` a
/// second that holds two seconds' worth (bursts to twice the rate).
struct RateLimit {
    tokens: f64,
    at: std::time::Instant,
    /// Since when messages have been dropped without a pause of a second.
    over_since: Option<std::time::Instant>,
    last_drop: Option<std::time::Instant>,
    /// When the client was last told `rate_limited` (once a second).
    told: Option<std::time::Instant>,
}

enum Verdict {
    Pass,
    /// Drop the message; `tell` when the client should hear why.
    Drop {
        tell: bool,
    },
    /// Over the limit for `FLOOD_GRACE`: close 1008.
    Close,
}

impl RateLimit {
    fn new(rate: u32) -> RateLimit {
        RateLimit {
            tokens: f64::from(rate) * 2.0,
            at: std::time::Instant::now(),
            over_since: None,
            last_drop: None,
            told: None,
        }
    }

    fn check(&mut self, rate: u32, now: std::time::Instant) -> Verdict {
        let rate = f64::from(rate);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate * 2.0);
        self.at = now;
        let second = Duration::from_secs(1);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            if self
                .last_drop
                .is_some_and(|d| now.saturating_duration_since(d) >= second)
            {
                self.over_since = None;
            }
            return Verdict::Pass;
        }
        self.last_drop = Some(now);
        let since = *self.over_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= FLOOD_GRACE {
            return Verdict::Close;
        }
        let tell = self
            .told
            .is_none_or(|t| now.saturating_duration_since(t) >= second);
        if tell {
            self.told = Some(now);
        }
        Verdict::Drop { tell }
    }
}

/// What resuming a socket's rooms came to: positions for the connect
/// message, recovery outcomes, the events to replay (room, offset, event)
/// and, per room, the offset live frames must be above.
#[derive(Default)]
struct Resumed {
    positions: Vec<(String, StreamPos)>,
    recovery: Vec<(String, Recovery)>,
    replay: Vec<(String, u64, Event)>,
    /// (room, epoch id, offset) of each room's position.
    floors: Vec<(String, u64, u64)>,
}

/// The `since` query parameter of an upgrade (SPEC §10).
pub(crate) enum Since {
    None,
    Rooms(Vec<(String, StreamPos)>),
    /// Malformed or too many rooms: the reason, for the `bad_since` error.
    Bad(String),
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
    /// reads each room's position (or, for the rooms in `since`, what the
    /// client missed), then sends the dialect's connect messages and the
    /// replay. Live events wait meanwhile (`Outbox::hold`), so they follow
    /// the replay with no gap and no duplicate.
    ///
    /// Returns false when a room could not be joined or positioned (the
    /// broker is unavailable): the error messages are sent, and the caller
    /// closes 1013 so that the client resumes once the broker is back
    /// instead of sitting in rooms it may miss events of.
    async fn start(&mut self, since: Since) -> bool {
        let history = self.app.config.history.enabled();
        if history {
            self.outbox.hold();
        }
        // All rooms at once: with Redis down, a connect waits one join
        // timeout, not one per room.
        let rooms = self.identity.auto_rooms();
        let joins = rooms.iter().map(|room| self.app.join(&self.outbox, room));
        let results = futures_util::future::join_all(joins).await;
        let mut complete = true;
        for (room, result) in rooms.into_iter().zip(results) {
            if let Err(e) = result {
                complete = false;
                self.error(
                    "broker_unavailable",
                    &broker_message(&room, "is not live yet", &e),
                );
            }
            self.rooms.push(room);
        }
        let (asked, bad_since) = match since {
            Since::None => (Vec::new(), None),
            Since::Rooms(r) => (r, None),
            Since::Bad(why) => (Vec::new(), Some(why)),
        };
        let mut resumed = Resumed::default();
        if history && complete {
            for room in self.rooms.clone() {
                let since = asked.iter().find(|(r, _)| *r == room).map(|(_, p)| p);
                complete &= self.resume(&room, since, &mut resumed).await;
            }
        }
        if !complete {
            return false;
        }
        self.reply(&Reply::Connected {
            user_id: self.identity.user_id,
            role: self.identity.role.as_str(),
            driver_id: self.identity.driver_id,
            rooms: &resumed.positions,
            recovery: &resumed.recovery,
        });
        if let Some(why) = bad_since {
            metrics::counter!(m::RECOVERIES, "outcome" => "bad_since").increment(1);
            self.error("bad_since", &why);
        }
        if self.dialect == Dialect::Driver {
            match self.app.initial_orders(&self.identity).await {
                Ok(orders) => self.reply(&Reply::InitialOrders(&orders)),
                Err(e) => self.error(e.code(), &client_message(&e)),
            }
        }
        self.send_replay(&resumed.replay);
        if history {
            self.outbox.release(resumed.floors);
        }
        true
    }

    /// Where `room` stands for this socket: its position, or with `since`
    /// the events after it (all or nothing). False when the broker could
    /// not tell (an error message was sent).
    async fn resume(&self, room: &str, since: Option<&StreamPos>, into: &mut Resumed) -> bool {
        let broker = &self.app.ctx.broker;
        let (pos, recovery, events) = match since {
            None => match broker.position(room).await {
                Ok(Some(pos)) => (pos, None, Vec::new()),
                Ok(None) => return true,
                Err(e) => {
                    self.error(
                        "broker_unavailable",
                        &broker_message(room, "has no position now", &e),
                    );
                    return false;
                }
            },
            Some(since) => match broker.replay(room, since).await {
                Ok(Some(Replay::Recovered { events, pos })) => {
                    let missed = events.len() as u64;
                    (pos, Some(Recovery::Recovered { missed }), events)
                }
                Ok(Some(Replay::NotRecovered { reason, pos })) => {
                    (pos, Some(Recovery::NotRecovered { reason }), Vec::new())
                }
                Ok(None) => return true,
                Err(e) => {
                    self.error(
                        "broker_unavailable",
                        &broker_message(room, "cannot be recovered now", &e),
                    );
                    return false;
                }
            },
        };
        if let Some(rec) = recovery {
            let outcome = match &rec {
                Recovery::Recovered { .. } => "recovered",
                Recovery::NotRecovered { reason } => reason,
            };
            metrics::counter!(m::RECOVERIES, "outcome" => outcome).increment(1);
            into.recovery.push((room.to_string(), rec));
        }
        into.floors
            .push((room.to_string(), epoch_id(&pos.epoch), pos.offset));
        into.positions.push((room.to_string(), pos));
        into.replay
            .extend(events.into_iter().map(|(o, e)| (room.to_string(), o, e)));
        true
    }

    /// Sends replayed events, each once across the socket's rooms: an event
    /// also addressed to an earlier room of its list that the socket is in
    /// comes through that room (the live rule, SPEC §3).
    fn send_replay(&self, replay: &[(String, u64, Event)]) {
        let mut sent = 0u64;
        for (room, offset, event) in replay {
            let idx = event.room_index(room).unwrap_or(0);
            if event.rooms[..idx].iter().any(|r| self.rooms.contains(r)) {
                continue;
            }
            let personal = crate::event::room::is_personal(room);
            if let Some(bytes) = self
                .dialect
                .render_at(event, personal, Some((room, *offset)))
            {
                self.outbox.push(frame::text(bytes));
                sent += 1;
            }
        }
        if sent > 0 {
            metrics::counter!(m::REPLAYED).increment(sent);
        }
    }

    async fn join(&mut self, room: String, since: Option<StreamPos>, bad_since: bool) {
        let history = self.app.config.history.enabled();
        let member = self.rooms.contains(&room);
        let max = self.app.config.limits.rooms_per_socket;
        if !member && self.rooms.len() >= max {
            self.error(
                "too_many_rooms",
                &format!("a socket may be in at most {max} rooms"),
            );
            return;
        }
        if !member {
            if history {
                self.outbox.hold();
            }
            self.rooms.push(room.clone());
            if let Err(e) = self.app.join(&self.outbox, &room).await {
                self.error(
                    "broker_unavailable",
                    &broker_message(&room, "was not joined (send join-room again)", &e),
                );
                self.undo_join(&room);
                return;
            }
        }
        let mut resumed = Resumed::default();
        if history {
            // A room the socket is already in goes on live: nothing to replay.
            let since = since.as_ref().filter(|_| !member);
            if !self.resume(&room, since, &mut resumed).await && !member {
                // Without a position the client could not resume the room
                // later: not joined, so it asks again.
                self.undo_join(&room);
                return;
            }
        }
        if bad_since {
            metrics::counter!(m::RECOVERIES, "outcome" => "bad_since").increment(1);
            self.error(
                "bad_since",
                "since must be {\"epoch\": string, \"offset\": integer}",
            );
        }
        self.reply(&Reply::RoomJoined {
            room: &room,
            pos: resumed.positions.first().map(|(_, p)| p),
            recovery: resumed.recovery.first().map(|(_, r)| r),
        });
        self.send_replay(&resumed.replay);
        if history && !member {
            self.outbox.release(resumed.floors);
        }
    }

    /// A `join-room` that failed: the socket leaves the room again, so
    /// the client's view (not joined, no `room-joined`) is the server's.
    fn undo_join(&mut self, room: &str) {
        self.rooms.retain(|r| r != room);
        self.app.leave(self.outbox.id, room);
        self.outbox.release_without(room);
    }

    /// The socket's loop, until it closes. Returns whether the backlog
    /// should still go out before the close frame.
    async fn run(&mut self, early: BytesMut) -> bool {
        let outbox = self.outbox.clone();
        let Some(stream) = outbox.stream() else {
            return false;
        };
        let closed = outbox.closer.token().clone();
        let drain = self.app.drain.clone();
        let every = self.app.config.ping_interval;
        let ping = tokio::time::sleep_until(next_ping(every));
        tokio::pin!(ping);
        let mut alive = true;
        // Set while a frame has started but not finished arriving.
        let mut frame_deadline: Option<tokio::time::Instant> = None;
        let mut inbound = Inbound {
            buf: early,
            need: 0,
            messages: Assembler::default(),
            limit: RateLimit::new(self.app.config.limits.messages_per_sec),
            frames: 0,
        };
        // Frames the client sent right behind its handshake.
        if !inbound.buf.is_empty()
            && let Some(keep) = Box::pin(self.process(&mut inbound)).await
        {
            return keep;
        }
        loop {
            let backlog = outbox.has_backlog();
            tokio::select! {
                biased;
                _ = closed.cancelled() => return false,
                _ = drain.cancelled() => {
                    // Drain: what was queued before the node stopped still
                    // goes out, then 1012 tells the client to reconnect
                    // elsewhere.
                    outbox.closer.close(close_code::SERVICE_RESTART, "server restart");
                    return true;
                }
                r = stream.writable(), if backlog => {
                    if r.is_err() || outbox.flush().is_err() {
                        outbox.closer.close(close_code::NORMAL, "");
                        return false;
                    }
                }
                _ = outbox.backlog_appeared(), if !backlog => {}
                // The stream's own reader slot (this task is its only
                // reader): `readable()` would queue a waiter under a lock on
                // every wait (locations: 16.0–18.6 → 15.2–15.4 µs/position).
                r = std::future::poll_fn(|cx| stream.poll_read_ready(cx)) => {
                    if r.is_err() {
                        return false;
                    }
                    let want = inbound.need.saturating_sub(inbound.buf.len()).max(READ_CHUNK);
                    inbound.buf.reserve(want);
                    let frames_before = inbound.frames;
                    match stream.try_read_buf(&mut inbound.buf) {
                        Ok(0) => return false,
                        Ok(_) => {
                            alive = true;
                            if let Some(keep) = Box::pin(self.process(&mut inbound)).await {
                                return keep;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "socket read ended");
                            return false;
                        }
                    }
                    if inbound.buf.is_empty() {
                        // Idle again: hold no read buffer.
                        inbound.buf = BytesMut::new();
                        frame_deadline = None;
                    } else if frame_deadline.is_none() || inbound.frames != frames_before {
                        // A frame has started since the last one finished.
                        frame_deadline = Some(tokio::time::Instant::now() + FRAME_DEADLINE);
                    }
                }
                _ = tokio::time::sleep_until(frame_deadline.unwrap_or_else(tokio::time::Instant::now)), if frame_deadline.is_some() => {
                    self.error("frame_timeout", "a frame was started and not finished within 30 s");
                    outbox.closer.close(close_code::POLICY_VIOLATION, "frame timeout");
                    return true;
                }
                _ = &mut ping => {
                    if !alive {
                        outbox.closer.close(close_code::PING_TIMEOUT, "ping timeout");
                        return false;
                    }
                    alive = false;
                    // Stragglers of a resume arrive within milliseconds; an
                    // idle socket need not keep its floors.
                    outbox.retire_floors();
                    outbox.push(frame::ping());
                    ping.as_mut().reset(next_ping(every));
                }
            }
        }
    }

    /// A message over the hard cap: the error saying why, then close 1009
    /// (the error goes out first: `Some(true)` keeps the queue).
    fn too_large(&self, size: usize) -> Option<bool> {
        let e = super::dialect::ProtoError::TooLarge {
            size,
            limit: self.app.config.max_frame_bytes,
        };
        self.error(e.code(), &e.to_string());
        self.outbox
            .closer
            .close(close_code::MESSAGE_TOO_BIG, "message too big");
        Some(true)
    }

    /// Handles every whole frame in the read buffer. `Some(keep_queue)` when
    /// the socket is to close.
    async fn process(&mut self, inbound: &mut Inbound) -> Option<bool> {
        let max = self.app.config.max_frame_bytes;
        loop {
            let frame = match frame::decode(&mut inbound.buf, hard_cap(max), &mut inbound.need) {
                Ok(Some(f)) => {
                    inbound.frames += 1;
                    f
                }
                Ok(None) => return None,
                Err(DecodeError::TooLarge(size)) => {
                    return self.too_large(usize::try_from(size).unwrap_or(usize::MAX));
                }
                Err(DecodeError::Protocol(why)) => {
                    self.error("bad_frame", why);
                    self.outbox
                        .closer
                        .close(close_code::PROTOCOL_ERROR, "protocol error");
                    return Some(true);
                }
            };
            let (text, payload) = match inbound.messages.push(frame, hard_cap(max)) {
                Step::More | Step::Pong => continue,
                Step::Ping(payload) => {
                    self.outbox.push(frame::pong(&payload));
                    continue;
                }
                Step::Close(code) => {
                    // Echo the peer's code; what is still queued is dropped.
                    self.outbox.closer.close(code, "");
                    return Some(false);
                }
                Step::Fail(close_code::MESSAGE_TOO_BIG, _) => {
                    let size = inbound.messages.pending().max(hard_cap(max) + 1);
                    return self.too_large(size);
                }
                Step::Fail(code, why) => {
                    self.error("bad_frame", why);
                    self.outbox.closer.close(code, "protocol error");
                    return Some(true);
                }
                Step::Message { text, payload } => (text, payload),
            };
            let rate = self.app.config.limits.messages_per_sec;
            match inbound.limit.check(rate, std::time::Instant::now()) {
                Verdict::Pass => self.handle_message(text, &payload, max).await,
                Verdict::Drop { tell } => {
                    metrics::counter!(m::RATE_LIMITED, "dialect" => self.dialect.as_str())
                        .increment(1);
                    if tell {
                        self.error(
                            "rate_limited",
                            &format!("more than {rate} messages a second: dropped"),
                        );
                    }
                }
                Verdict::Close => {
                    self.error("rate_limited", "over the message rate for 10 s");
                    self.outbox
                        .closer
                        .close(close_code::POLICY_VIOLATION, "message rate");
                    return Some(true);
                }
            }
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
            Ok(Command::JoinRoom { .. }) => "join-room",
            Ok(Command::LeaveRoom(_)) => "leave-room",
            Ok(Command::Location(_)) => "location",
            Err(_) => "invalid",
        };
        metrics::counter!(m::WS_MESSAGES_IN, "dialect" => self.dialect.as_str(), "type" => kind)
            .increment(1);
        match parsed {
            Err(e) => self.error(e.code(), &e.to_string()),
            Ok(Command::Ping) => self.reply(&Reply::Pong),
            Ok(Command::JoinRoom {
                room,
                since,
                bad_since,
            }) => {
                if self.identity.may_join(&room) {
                    self.join(room, since, bad_since).await;
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
                    self.error(e.code(), &client_message(&e));
                }
            }
        }
    }
}
