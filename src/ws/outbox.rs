//! The sending side of one socket ([`Outbox`]), how it closes ([`Closer`]),
//! and the close codes the server uses ([`close_code`]).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::lock::lock;
use crate::metrics as m;
use crate::ws::dialect::Dialect;
use crate::ws::frame;

/// The byte stream under a socket: the client's TCP connection itself, or,
/// for a TLS connection, the local end of a socket pair whose other end
/// `tls::relay` copies to and from the encrypted stream. Both are plain
/// kernel sockets, so the outbox's non-blocking writes from any thread and
/// the socket task's readiness reads work the same on either.
#[derive(Debug)]
pub(crate) enum Wire {
    Tcp(TcpStream),
    Local(UnixStream),
}

impl Wire {
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Wire::Tcp(s) => s.readable().await,
            Wire::Local(s) => s.readable().await,
        }
    }

    pub async fn writable(&self) -> io::Result<()> {
        match self {
            Wire::Tcp(s) => s.writable().await,
            Wire::Local(s) => s.writable().await,
        }
    }

    pub fn poll_read_ready(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self {
            Wire::Tcp(s) => s.poll_read_ready(cx),
            Wire::Local(s) => s.poll_read_ready(cx),
        }
    }

    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Wire::Tcp(s) => s.try_read(buf),
            Wire::Local(s) => s.try_read(buf),
        }
    }

    pub fn try_read_buf<B: BufMut>(&self, buf: &mut B) -> io::Result<usize> {
        match self {
            Wire::Tcp(s) => s.try_read_buf(buf),
            Wire::Local(s) => s.try_read_buf(buf),
        }
    }

    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Wire::Tcp(s) => s.try_write_vectored(bufs),
            Wire::Local(s) => s.try_write_vectored(bufs),
        }
    }

    /// Shuts our sending side (FIN after the close frame; through TLS, the
    /// relay then sends close_notify and FIN).
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Wire::Tcp(s) => socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write),
            Wire::Local(s) => socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write),
        }
    }
}

/// A socket's id, unique on this node.
pub type ConnId = u64;

/// Close codes the server uses; one catalogue (ARCHITECTURE.md repeats it).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    /// The client sent something that is not a valid WebSocket frame.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message (or close reason) that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Over a limit for too long: a flood of messages, or a frame left
    /// half-sent (SPEC §11).
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Drain: the node is restarting, reconnect elsewhere.
    pub const SERVICE_RESTART: u16 = 1012;
    /// The broker could not put the socket in its rooms (or tell their
    /// positions) at connect: reconnect, with `since`, a little later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// No pong arrived between two server pings.
    pub const PING_TIMEOUT: u16 = 4000;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const FORBIDDEN: u16 = 4003;
    /// The socket's send queue overflowed: it reads slower than we send.
    pub const SLOW_CONSUMER: u16 = 4008;
}

/// Closes a connection once; the first reason wins.
#[derive(Default)]
pub struct Closer {
    token: CancellationToken,
    reason: Mutex<Option<(u16, &'static str)>>,
}

impl Closer {
    pub fn close(&self, code: u16, reason: &'static str) {
        let mut r = lock(&self.reason);
        if r.is_none() {
            *r = Some((code, reason));
        }
        drop(r);
        self.token.cancel();
    }
    pub fn reason(&self) -> Option<(u16, &'static str)> {
        *lock(&self.reason)
    }
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

/// The sending side of one socket.
///
/// Whoever has a frame for the socket writes it **directly** from its own
/// thread (the fan-out loop, the socket's task) with a non-blocking write,
/// under this socket's lock, when nothing is queued ahead of it: a delivery
/// is one syscall, with no task wake-up and no channel hop. Only what the
/// kernel does not take at once (a full send buffer) stays queued; the
/// socket's task flushes that backlog when the socket is writable, in order,
/// with vectored writes. A backlog longer than `SEND_QUEUE_LEN` frames closes the
/// socket as a slow consumer. Every write happens under the lock, so frames
/// never interleave.
pub struct Outbox {
    pub id: ConnId,
    pub dialect: Dialect,
    pub closer: Closer,
    /// `None` only in unit tests: frames then just queue.
    wire: Option<Wire>,
    out: Mutex<Out>,
    /// Tells the socket's task that a backlog appeared.
    backlog: Notify,
    /// Most frames, and most bytes, the backlog may hold.
    cap: usize,
    cap_bytes: usize,
}

/// A room's floor after a resume: live frames of the room at or below
/// `offset` are what the socket already has, in history epoch `epoch`
/// ([`crate::event::epoch_id`]).
struct Floor {
    room: Box<str>,
    epoch: u64,
    offset: u64,
}

#[derive(Default)]
struct Out {
    queue: VecDeque<Bytes>,
    /// Bytes in `queue`.
    bytes: usize,
    /// The queue's first frame is partly written: it must be finished
    /// before anything else goes out.
    partial: bool,
    /// The close frame is queued: nothing more is accepted.
    sealed: bool,
    /// While the socket is being set up (its rooms joined, positions read,
    /// history replayed), live event frames wait here, see [`Outbox::hold`].
    held: Option<Vec<Held>>,
    /// Per room, the offset up to which the socket already has everything
    /// (replayed, or before the position it was told). A live frame at or
    /// below it is one the socket must not get again; the first one above
    /// it retires the floor (a room's frames arrive in offset order).
    floors: Vec<Floor>,
}

/// A live event frame held during set-up.
struct Held {
    room: Box<str>,
    offset: Option<u64>,
    frame: Bytes,
}

pub(crate) enum Queued {
    Refused,
    /// The socket had nothing queued: it needs a flush after the batch.
    First,
    /// Behind other frames, which someone is already flushing.
    Behind,
}

/// How many frames one vectored write takes at most.
const IOV: usize = 64;

impl Outbox {
    /// A backlog of more than `queue_len` frames or `queue_bytes` bytes
    /// closes the socket as a slow consumer (a single frame always fits).
    pub fn new(
        id: ConnId,
        dialect: Dialect,
        queue_len: usize,
        queue_bytes: usize,
        wire: Option<Wire>,
    ) -> Arc<Outbox> {
        Arc::new(Outbox {
            id,
            dialect,
            closer: Closer::default(),
            wire,
            out: Mutex::new(Out::default()),
            backlog: Notify::new(),
            cap: queue_len.max(1),
            cap_bytes: queue_bytes,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Out> {
        // Nothing that can fail leaves `Out` half-updated, so a poisoned
        // lock's state is still sound.
        lock(&self.out)
    }

    pub fn stream(&self) -> Option<&Wire> {
        self.wire.as_ref()
    }

    /// Sends one frame without waiting: written now when nothing is queued
    /// ahead, else left behind the frames that are (see [`Outbox::queue`]).
    pub fn push(&self, frame: Bytes) {
        if let Queued::First = self.queue(frame) {
            self.flush_batch();
        }
    }

    /// Queues a frame without writing it. `First` makes the caller the one
    /// who flushes (after the rest of its batch, if any, so a socket gets its
    /// share of a batch in one write); behind other frames it goes out with
    /// them. A backlog over the limit closes the socket as a slow consumer:
    /// it must not hold up anyone else.
    pub(crate) fn queue(&self, frame: Bytes) -> Queued {
        let mut out = self.lock();
        let q = self.enqueue(&mut out, frame);
        drop(out);
        self.settle(q)
    }

    /// Appends under the lock; `None` = over the limit (the caller closes
    /// the socket once the lock is released).
    fn enqueue(&self, out: &mut Out, frame: Bytes) -> Option<Queued> {
        if out.sealed || self.closer.token().is_cancelled() {
            return Some(Queued::Refused);
        }
        let first = out.queue.is_empty();
        if out.queue.len() >= self.cap || (!first && out.bytes + frame.len() > self.cap_bytes) {
            return None;
        }
        out.bytes += frame.len();
        out.queue.push_back(frame);
        Some(if first { Queued::First } else { Queued::Behind })
    }

    /// After the lock: an overflow closes the socket as a slow consumer.
    fn settle(&self, q: Option<Queued>) -> Queued {
        q.unwrap_or_else(|| {
            self.slow_consumer();
            Queued::Refused
        })
    }

    /// The live-frame rules of [`Outbox::queue_event`], under the lock.
    fn enqueue_event(
        &self,
        out: &mut Out,
        frame: Bytes,
        room: &str,
        offset: Option<u64>,
    ) -> Option<Queued> {
        if let Some(held) = &mut out.held {
            if held.len() >= self.cap {
                return None;
            }
            held.push(Held {
                room: room.into(),
                offset,
                frame,
            });
            // Nothing to flush: `release` does.
            return Some(Queued::Behind);
        }
        if let Some(off) = offset
            && let Some(i) = out.floors.iter().position(|f| *f.room == *room)
        {
            if off <= out.floors[i].offset {
                return Some(Queued::Refused);
            }
            out.floors.swap_remove(i);
        }
        self.enqueue(out, frame)
    }

    /// Queues a live event frame of `room` (at `offset` of its history):
    /// held while the socket is being set up, dropped when the socket
    /// already has it (see `floors`), else as [`Outbox::queue`].
    pub(crate) fn queue_event(&self, frame: Bytes, room: &str, offset: Option<u64>) -> Queued {
        let mut out = self.lock();
        let q = self.enqueue_event(&mut out, frame, room, offset);
        drop(out);
        self.settle(q)
    }

    /// Forgets the floors of the last resume (see `Out::floors`): by the
    /// next ping, no frame from before the resume is still in flight.
    pub(crate) fn retire_floors(&self) {
        let mut out = self.lock();
        if !out.floors.is_empty() && out.held.is_none() {
            out.floors = Vec::new();
        }
    }

    /// `room`'s history is in epoch `epoch` now: a floor of another epoch
    /// (an offset the new epoch's, starting over, would fall below) goes; a
    /// floor of this epoch stays (the socket resumed in it).
    pub(crate) fn forget_floor(&self, room: &str, epoch: u64) {
        let mut out = self.lock();
        out.floors.retain(|f| *f.room != *room || f.epoch == epoch);
    }

    /// From now on live event frames wait until [`Outbox::release`];
    /// replies (connect message, replayed frames) still go out at once.
    pub(crate) fn hold(&self) {
        let mut out = self.lock();
        if out.held.is_none() {
            out.held = Some(Vec::new());
        }
    }

    /// Ends a [`Outbox::hold`]: `floors` says, per room, the last offset the
    /// socket has; held frames above it (or without one) go out in arrival
    /// order, the rest are dropped, and later stragglers at or below it are
    /// dropped too.
    pub(crate) fn release(&self, floors: Vec<(String, u64, u64)>) {
        self.release_but(floors, None);
    }

    /// Ends a [`Outbox::hold`] for a join that failed: the held frames of
    /// `room` are dropped (the socket is not in it: a `join-room` again
    /// replays them), the rest go out.
    pub(crate) fn release_without(&self, room: &str) {
        self.release_but(Vec::new(), Some(room));
    }

    fn release_but(&self, floors: Vec<(String, u64, u64)>, without: Option<&str>) {
        let mut out = self.lock();
        for (room, epoch, offset) in floors {
            match out.floors.iter_mut().find(|f| *f.room == *room) {
                Some(f) if f.epoch == epoch => f.offset = f.offset.max(offset),
                Some(f) => (f.epoch, f.offset) = (epoch, offset),
                None => out.floors.push(Floor {
                    room: room.into(),
                    epoch,
                    offset,
                }),
            }
        }
        let Some(held) = out.held.take() else {
            return;
        };
        // Under the lock, so a live frame arriving meanwhile queues behind
        // the held ones, not before them.
        let mut first = false;
        let mut overflow = false;
        for h in held {
            if without.is_some_and(|r| *r == *h.room) {
                continue;
            }
            match self.enqueue_event(&mut out, h.frame, &h.room, h.offset) {
                Some(Queued::First) => first = true,
                Some(_) => {}
                None => {
                    overflow = true;
                    break;
                }
            }
        }
        drop(out);
        if overflow {
            self.slow_consumer();
        } else if first {
            self.flush_batch();
        }
    }

    /// Writes what is queued; a rest the kernel did not take is left to the
    /// socket's task.
    pub(crate) fn flush_batch(&self) {
        match self.flush() {
            Ok(true) => {}
            Ok(false) => self.backlog.notify_one(),
            Err(_) => self.closer.close(close_code::NORMAL, ""),
        }
    }

    fn slow_consumer(&self) {
        if !self.closer.token().is_cancelled() {
            metrics::counter!(m::SLOW_CONSUMERS, "dialect" => self.dialect.as_str()).increment(1);
        }
        self.closer
            .close(close_code::SLOW_CONSUMER, "slow consumer");
    }

    pub fn has_backlog(&self) -> bool {
        !self.lock().queue.is_empty()
    }

    /// Resolves when a backlog may have appeared (the socket's task then
    /// waits for the socket to be writable and calls [`Outbox::flush`]).
    pub async fn backlog_appeared(&self) {
        self.backlog.notified().await
    }

    /// Writes as much of the backlog as the socket takes now, in vectored
    /// writes. `Ok(true)` when nothing is left.
    pub fn flush(&self) -> io::Result<bool> {
        let mut out = self.lock();
        let Some(wire) = &self.wire else {
            return Ok(out.queue.is_empty());
        };
        while !out.queue.is_empty() {
            let mut iov = [IoSlice::new(&[]); IOV];
            let k = out.queue.len().min(IOV);
            for (slot, frame) in iov.iter_mut().zip(out.queue.iter()) {
                *slot = IoSlice::new(frame);
            }
            let mut n = match wire.try_write_vectored(&iov[..k]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            while n > 0 {
                let first = out.queue.front_mut().expect("wrote more than was queued");
                if n >= first.len() {
                    let len = first.len();
                    n -= len;
                    out.bytes -= len;
                    out.queue.pop_front();
                    out.partial = false;
                } else {
                    first.advance(n);
                    out.bytes -= n;
                    out.partial = true;
                    n = 0;
                }
            }
        }
        Ok(true)
    }

    /// Queues the close frame as the last thing this socket sends. With
    /// `keep_queue` the backlog goes out first (drain, or an error that
    /// explains the close); otherwise it is dropped, except a frame already
    /// partly written, which must be finished for the close frame to parse.
    pub fn seal(&self, close_frame: Bytes, keep_queue: bool) {
        let mut out = self.lock();
        if out.sealed {
            return;
        }
        out.sealed = true;
        if !keep_queue {
            let keep = usize::from(out.partial);
            out.queue.truncate(keep);
            out.bytes = out.queue.iter().map(Bytes::len).sum();
        }
        out.bytes += close_frame.len();
        out.queue.push_back(close_frame);
    }

    /// Frames waiting in the backlog (unit tests read deliveries here).
    #[cfg(test)]
    pub(crate) fn take_queued(&self) -> Vec<Bytes> {
        let mut out = self.lock();
        out.bytes = 0;
        out.queue.drain(..).collect()
    }
}

/// Sends the close frame (after the backlog when `keep_queue`), then ends
/// the TCP stream: our side is shut for writing, and what the peer still
/// sends (the rest of a message over the cap, its close frame) is read and
/// dropped until it closes too, so the connection ends with a closing
/// handshake rather than a reset (closing a socket with unread input makes
/// the kernel send RST, and the peer may lose our close frame): after a
/// protocol failure (1002, 1007, 1009) only. Gives up after 2 s on a peer
/// that does not read, and after 2 s more on one that does not close.
pub(crate) async fn goodbye(outbox: &Outbox, keep_queue: bool) {
    let (code, reason) = outbox.closer.reason().unwrap_or((close_code::NORMAL, ""));
    outbox.seal(frame::close(code, reason), keep_queue);
    let Some(stream) = outbox.stream() else {
        return;
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while !outbox.flush()? {
            stream.writable().await?;
        }
        io::Result::Ok(())
    })
    .await;
    let _ = stream.shutdown_write();
    // After a protocol failure the peer may still be sending: read until it
    // closes. Otherwise (drain, normal close, refusals) the peer is expected
    // to be done; a well-behaved one closes at once anyway.
    let failed = matches!(
        code,
        close_code::PROTOCOL_ERROR | close_code::INVALID_DATA | close_code::MESSAGE_TOO_BIG
    );
    if !failed {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        // On the heap, and only here: a socket's task future is sized by its
        // largest await point, and every idle socket would carry this.
        let mut sink = vec![0u8; 4096];
        loop {
            stream.readable().await?;
            match stream.try_read(&mut sink) {
                Ok(0) => return io::Result::Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
}
