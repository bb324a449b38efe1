//! The sending side of one socket ([`Outbox`]), how it closes ([`Closer`]),
//! and the close codes the server uses ([`close_code`]).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::lock::lock;
use crate::metrics as m;
use crate::ws::dialect::Dialect;

/// A socket's id, unique on this node.
pub type ConnId = u64;

/// Close codes the server uses; one catalogue (ARCHITECTURE.md repeats it).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    /// The client sent something that is not a valid WebSocket frame.
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Drain: the node is restarting, reconnect elsewhere.
    pub const SERVICE_RESTART: u16 = 1012;
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
    wire: Option<TcpStream>,
    out: Mutex<Out>,
    /// Tells the socket's task that a backlog appeared.
    backlog: Notify,
    cap: usize,
}

#[derive(Default)]
struct Out {
    queue: VecDeque<Bytes>,
    /// The queue's first frame is partly written: it must be finished
    /// before anything else goes out.
    partial: bool,
    /// The close frame is queued: nothing more is accepted.
    sealed: bool,
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
    pub fn new(
        id: ConnId,
        dialect: Dialect,
        queue_len: usize,
        wire: Option<TcpStream>,
    ) -> Arc<Outbox> {
        Arc::new(Outbox {
            id,
            dialect,
            closer: Closer::default(),
            wire,
            out: Mutex::new(Out::default()),
            backlog: Notify::new(),
            cap: queue_len.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Out> {
        // Nothing that can fail leaves `Out` half-updated, so a poisoned
        // lock's state is still sound.
        lock(&self.out)
    }

    pub fn stream(&self) -> Option<&TcpStream> {
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
        if out.sealed || self.closer.token().is_cancelled() {
            return Queued::Refused;
        }
        if out.queue.len() >= self.cap {
            drop(out);
            self.slow_consumer();
            return Queued::Refused;
        }
        let first = out.queue.is_empty();
        out.queue.push_back(frame);
        if first { Queued::First } else { Queued::Behind }
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
                    n -= first.len();
                    out.queue.pop_front();
                    out.partial = false;
                } else {
                    first.advance(n);
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
        }
        out.queue.push_back(close_frame);
    }

    /// Frames waiting in the backlog (unit tests read deliveries here).
    #[cfg(test)]
    pub(crate) fn take_queued(&self) -> Vec<Bytes> {
        self.lock().queue.drain(..).collect()
    }
}
