//! Redis pub/sub broker: channel `{prefix}room:{room}` per room.
//!
//! History (SPEC §10): a room's events live in the stream
//! `{prefix}hist:{room}` (entry id `<offset>-0`, field `d` = the event JSON),
//! its epoch and last offset in the hash `{prefix}hist:{room}:meta` (`e`,
//! `o`). One Lua script per room appends to the stream and PUBLISHes
//! `"<offset> <json>"` atomically, so the offset a socket gets live is the
//! one a replay reads. Both keys expire `HISTORY_TTL_SECS` after the last
//! publish; a room whose meta is gone gets a new epoch (its old stream is
//! dropped). An event with an id is appended once per room: the key
//! `{prefix}hist:{room}:id:{id}` (same TTL) remembers it.
//!
//! Two tasks per node:
//! - the **publisher** owns one connection from the pool and drains its queue
//!   into one pipelined round trip per batch (no pool checkout per message);
//! - the **subscriber** owns the node's single pub/sub connection. Subscribe
//!   and unsubscribe requests arrive on a queue and are applied in order, in
//!   batches, against what the hub wants at that moment. redis-rs' pub/sub
//!   does not reconnect by itself and its message stream is unbounded
//!   (CRATES.md), so a reader task drains the stream straight into the hub
//!   (which never blocks) and reports the end of the stream; the subscriber
//!   then reconnects with backoff and re-subscribes every wanted room.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::{Broker, BrokerError, Delivery, Replay, Sink, new_epoch};
use crate::config::HistoryConfig;
use crate::event::{Event, StreamPos};
use crate::metrics as m;
use crate::redis_conn::{HotConn, RedisError, timed};

/// Appends one event to a room's history and publishes it live, atomically.
/// KEYS: meta, stream, id key (or the meta again when the event has no id).
/// ARGV: channel, payload, size, ttl, a fresh epoch, 1 when the event has
/// an id. Returns the offset, or -1 for an id already appended.
const APPEND_LUA: &str = r#"
if ARGV[6] == '1' then
  if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[4]) then return -1 end
end
if not redis.call('HGET', KEYS[1], 'e') then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', ARGV[5], 'o', 0)
end
local off = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], off .. '-0', 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[1], off .. ' ' .. ARGV[2])
return off
"#;

/// A room's position, and the history after an offset in the same epoch.
/// KEYS: meta, stream. ARGV: since offset ('' = position only), since
/// epoch, a fresh epoch, ttl. Returns {epoch, offset[, entries]}.
const READ_LUA: &str = r#"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[3]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', e, 'o', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
local o = tonumber(redis.call('HGET', KEYS[1], 'o'))
if ARGV[1] == '' or ARGV[2] ~= e or tonumber(ARGV[1]) >= o then return {e, o} end
return {e, o, redis.call('XRANGE', KEYS[2], (tonumber(ARGV[1]) + 1) .. '-0', '+')}
"#;

/// Broker messages handed to the hub as one batch at most.
const READ_BATCH: usize = 256;

const OP_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BATCH: usize = 512;

/// One room's share of a publish.
enum PubOp {
    /// Volatile, or history off: a plain PUBLISH.
    Live { channel: String },
    /// Appended to the room's history and published by [`APPEND_LUA`].
    Historical { room: String, channel: String },
}

struct PubItem {
    ops: Vec<PubOp>,
    /// The event JSON, the same bytes for every room.
    payload: Bytes,
    id: Option<String>,
    done: oneshot::Sender<Result<(), RedisError>>,
}

enum SubCmd {
    Reconcile(String, oneshot::Sender<Result<(), BrokerError>>),
    /// The pub/sub stream of connection `generation` ended.
    Lost(u64),
}

pub struct RedisBroker {
    channel_prefix: String,
    hist_prefix: String,
    history: HistoryConfig,
    pub_tx: mpsc::Sender<PubItem>,
    sub_tx: mpsc::UnboundedSender<SubCmd>,
    healthy: Arc<AtomicBool>,
    hot: HotConn,
    read: redis::Script,
}

/// What the publisher needs to build a history append.
struct HistoryKeys {
    prefix: String,
    size: String,
    ttl: String,
    append: redis::Script,
}

impl HistoryKeys {
    fn meta(&self, room: &str) -> String {
        format!("{}{room}:meta", self.prefix)
    }
    fn stream(&self, room: &str) -> String {
        format!("{}{room}", self.prefix)
    }
}

impl RedisBroker {
    /// Starts the publisher and subscriber tasks. Returns at once; the
    /// subscriber connects in the background (`is_healthy` tells when).
    pub fn start(
        client: redis::Client,
        pool: deadpool_redis::Pool,
        prefix: &str,
        sink: Arc<dyn Sink>,
        stop: CancellationToken,
        history: HistoryConfig,
    ) -> RedisBroker {
        let channel_prefix = format!("{prefix}room:");
        let hist_prefix = format!("{prefix}hist:");
        let (pub_tx, pub_rx) = mpsc::channel(64 * 1024);
        let (sub_tx, sub_rx) = mpsc::unbounded_channel();
        let healthy = Arc::new(AtomicBool::new(false));
        let keys = HistoryKeys {
            prefix: hist_prefix.clone(),
            size: history.size.to_string(),
            ttl: history.ttl.as_secs().max(1).to_string(),
            append: redis::Script::new(APPEND_LUA),
        };
        tokio::spawn(run_publisher(pool.clone(), pub_rx, keys));
        tokio::spawn(
            Subscriber {
                client,
                channel_prefix: channel_prefix.clone(),
                sink,
                healthy: healthy.clone(),
                cmd_tx: sub_tx.clone(),
                stop,
            }
            .run(sub_rx),
        );
        RedisBroker {
            channel_prefix,
            hist_prefix,
            history,
            pub_tx,
            sub_tx,
            healthy,
            hot: HotConn::new(pool),
            read: redis::Script::new(READ_LUA),
        }
    }

    /// Runs [`READ_LUA`]: the room's position, and with `since` the
    /// entries after it when the epoch matches.
    async fn read(
        &self,
        room: &str,
        since: Option<&StreamPos>,
    ) -> Result<(StreamPos, Vec<(u64, Event)>), BrokerError> {
        let mut c = self.hot.get().await?;
        let mut inv = self.read.prepare_invoke();
        inv.key(format!("{}{room}:meta", self.hist_prefix))
            .key(format!("{}{room}", self.hist_prefix))
            .arg(since.map(|s| s.offset.to_string()).unwrap_or_default())
            .arg(since.map(|s| s.epoch.as_str()).unwrap_or(""))
            .arg(new_epoch())
            .arg(self.history.ttl.as_secs().max(1));
        type Entry = (String, Vec<(String, Vec<u8>)>);
        let reply: Vec<redis::Value> = match timed("history_read", inv.invoke_async(&mut c)).await {
            Ok(v) => v,
            Err(e) => {
                self.hot.broken();
                return Err(e.into());
            }
        };
        // {epoch, offset} or {epoch, offset, entries}.
        let bad = |e: redis::ParsingError| BrokerError::Unavailable(format!("history reply: {e}"));
        let mut reply = reply.into_iter();
        let (Some(epoch), Some(offset)) = (reply.next(), reply.next()) else {
            return Err(BrokerError::Unavailable("short history reply".into()));
        };
        let epoch: String = redis::from_redis_value(epoch).map_err(bad)?;
        let offset: u64 = redis::from_redis_value(offset).map_err(bad)?;
        let entries: Vec<Entry> = match reply.next() {
            Some(v) => redis::from_redis_value(v).map_err(bad)?,
            None => Vec::new(),
        };
        let mut events = Vec::new();
        for (id, fields) in entries {
            let off = id
                .split('-')
                .next()
                .and_then(|o| o.parse::<u64>().ok())
                .ok_or_else(|| BrokerError::Unavailable(format!("bad history id {id:?}")))?;
            let Some((_, data)) = fields.into_iter().find(|(k, _)| k == "d") else {
                continue;
            };
            match serde_json::from_slice::<Event>(&data) {
                Ok(e) => events.push((off, e)),
                Err(e) => tracing::warn!(error = %e, "undecodable history entry in {room}"),
            }
        }
        Ok((StreamPos { epoch, offset }, events))
    }
}

impl Broker for RedisBroker {
    async fn publish(&self, event: Arc<Event>) -> Result<(), BrokerError> {
        // Serialized once; the same bytes go to every room's channel.
        let payload = Bytes::from(serde_json::to_vec(&*event).expect("events serialize"));
        let historical = self.history.enabled() && !event.volatile;
        let ops = event
            .rooms
            .iter()
            .map(|r| {
                let channel = format!("{}{r}", self.channel_prefix);
                if historical {
                    PubOp::Historical {
                        room: r.clone(),
                        channel,
                    }
                } else {
                    PubOp::Live { channel }
                }
            })
            .collect::<Vec<_>>();
        let n = ops.len() as u64;
        let (done, rx) = oneshot::channel();
        self.pub_tx
            .send(PubItem {
                ops,
                payload,
                id: event.id.clone(),
                done,
            })
            .await
            .map_err(|_| BrokerError::Unavailable("publisher stopped".into()))?;
        match timeout(OP_TIMEOUT, rx).await {
            Ok(Ok(Ok(()))) => {
                metrics::counter!(m::BROKER_PUBLISHED).increment(n);
                Ok(())
            }
            Ok(Ok(Err(e))) => Err(BrokerError::Redis(e)),
            Ok(Err(_)) => Err(BrokerError::Unavailable("publisher stopped".into())),
            Err(_) => Err(BrokerError::Timeout),
        }
    }

    async fn reconcile(&self, room: &str) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        self.sub_tx
            .send(SubCmd::Reconcile(room.to_string(), tx))
            .map_err(|_| BrokerError::Unavailable("subscriber stopped".into()))?;
        match timeout(OP_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(BrokerError::Unavailable("subscriber stopped".into())),
            Err(_) => Err(BrokerError::Timeout),
        }
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    async fn position(&self, room: &str) -> Result<Option<StreamPos>, BrokerError> {
        if !self.history.enabled() {
            return Ok(None);
        }
        Ok(Some(self.read(room, None).await?.0))
    }

    async fn replay(&self, room: &str, since: &StreamPos) -> Result<Option<Replay>, BrokerError> {
        if !self.history.enabled() {
            return Ok(None);
        }
        let (now, events) = self.read(room, Some(since)).await?;
        Ok(Some(super::judge(since, now, events)))
    }
}

async fn run_publisher(
    pool: deadpool_redis::Pool,
    mut rx: mpsc::Receiver<PubItem>,
    keys: HistoryKeys,
) {
    let mut conn: Option<deadpool_redis::Connection> = None;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut pipe = redis::pipe();
        // A new connection may be to a Redis that never saw the script
        // (a restart): load it first, in the same round trip.
        if conn.is_none() {
            pipe.load_script(&keys.append).ignore();
        }
        for item in &batch {
            for op in &item.ops {
                match op {
                    PubOp::Live { channel } => {
                        pipe.publish(channel, item.payload.as_ref()).ignore();
                    }
                    PubOp::Historical { room, channel } => {
                        let meta = keys.meta(room);
                        let id_key = match &item.id {
                            Some(id) => format!("{}{room}:id:{id}", keys.prefix),
                            None => meta.clone(),
                        };
                        let mut inv = keys.append.prepare_invoke();
                        inv.key(&meta)
                            .key(keys.stream(room))
                            .key(id_key)
                            .arg(channel)
                            .arg(item.payload.as_ref())
                            .arg(&keys.size)
                            .arg(&keys.ttl)
                            .arg(new_epoch())
                            .arg(u8::from(item.id.is_some()));
                        pipe.invoke_script(&inv).ignore();
                    }
                }
            }
        }
        let start = Instant::now();
        let result = async {
            if conn.is_none() {
                conn = Some(
                    timeout(OP_TIMEOUT, pool.get())
                        .await
                        .map_err(|_| RedisError::Timeout)?
                        .map_err(|e| RedisError::Command(e.to_string()))?,
                );
            }
            let c = conn.as_mut().expect("set just above");
            timeout(OP_TIMEOUT, pipe.exec_async(c))
                .await
                .map_err(|_| RedisError::Timeout)?
                .map_err(|e| RedisError::Command(e.to_string()))
        }
        .await;
        metrics::histogram!(m::REDIS_DURATION, "op" => "publish")
            .record(start.elapsed().as_secs_f64());
        if result.is_err() {
            metrics::counter!(m::REDIS_ERRORS, "op" => "publish").increment(1);
            conn = None;
        }
        for item in batch.drain(..) {
            let _ = item.done.send(result.clone());
        }
    }
}

/// A live message is the event JSON, preceded by `"<offset> "` when the
/// event is in the room's history.
fn split_offset(payload: &[u8]) -> (Option<u64>, &[u8]) {
    if payload.first().is_some_and(u8::is_ascii_digit)
        && let Some(sp) = payload.iter().position(|b| *b == b' ')
        && let Some(off) = std::str::from_utf8(&payload[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
    {
        return (Some(off), &payload[sp + 1..]);
    }
    (None, payload)
}

struct Subscriber {
    client: redis::Client,
    channel_prefix: String,
    sink: Arc<dyn Sink>,
    healthy: Arc<AtomicBool>,
    cmd_tx: mpsc::UnboundedSender<SubCmd>,
    stop: CancellationToken,
}

impl Subscriber {
    fn channel(&self, room: &str) -> String {
        format!("{}{room}", self.channel_prefix)
    }

    async fn run(self, mut cmds: mpsc::UnboundedReceiver<SubCmd>) {
        let mut generation = 0u64;
        let mut backoff = Duration::from_millis(50);
        loop {
            generation += 1;
            match self.session(generation, &mut cmds).await {
                Ok(()) => return, // stopped
                Err(e) => {
                    // A session that got connected starts the backoff over.
                    if self.healthy.swap(false, Ordering::Relaxed) {
                        backoff = Duration::from_millis(50);
                    }
                    metrics::counter!(m::REDIS_ERRORS, "op" => "subscribe").increment(1);
                    tracing::warn!(error = %e, "redis subscriber lost; reconnecting in {backoff:?}");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
            metrics::counter!(m::BROKER_RECONNECTS).increment(1);
        }
    }

    /// One connection's life: connect, subscribe every wanted room, then
    /// apply requests until the connection is lost (`Err`) or stop (`Ok`).
    async fn session(
        &self,
        generation: u64,
        cmds: &mut mpsc::UnboundedReceiver<SubCmd>,
    ) -> Result<(), RedisError> {
        let pubsub = timeout(OP_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| RedisError::Timeout)?
            .map_err(|e| RedisError::Command(e.to_string()))?;
        let (mut psink, mut stream) = pubsub.split();
        let mut subscribed: HashSet<String> = HashSet::new();
        let wanted = self.sink.rooms();
        if !wanted.is_empty() {
            let chans: Vec<String> = wanted.iter().map(|r| self.channel(r)).collect();
            timeout(OP_TIMEOUT, psink.subscribe(chans))
                .await
                .map_err(|_| RedisError::Timeout)?
                .map_err(|e| RedisError::Command(e.to_string()))?;
            subscribed.extend(wanted);
        }
        // Reader: straight into the hub, which never waits on a socket.
        // Messages that arrived while the previous batch was being fanned
        // out are taken together (up to `READ_BATCH`): the hub then sends a
        // socket all of them in one write. No timer: under light load a
        // batch is one message and nothing waits.
        let sink = self.sink.clone();
        let prefix = self.channel_prefix.clone();
        let lost = self.cmd_tx.clone();
        let reader = tokio::spawn(async move {
            let decode = |msg: redis::Msg, batch: &mut Vec<Delivery>| {
                metrics::counter!(m::BROKER_RECEIVED).increment(1);
                let Some(room) = msg.get_channel_name().strip_prefix(prefix.as_str()) else {
                    return;
                };
                let (offset, json) = split_offset(msg.get_payload_bytes());
                match serde_json::from_slice::<Event>(json) {
                    Ok(event) => batch.push(Delivery {
                        room: room.to_string(),
                        offset,
                        event,
                    }),
                    Err(e) => tracing::warn!(error = %e, "undecodable broker message on {room}"),
                }
            };
            let mut batch = Vec::new();
            let mut ended = false;
            while let Some(msg) = stream.next().await {
                decode(msg, &mut batch);
                while batch.len() < READ_BATCH {
                    match stream.next().now_or_never() {
                        Some(Some(msg)) => decode(msg, &mut batch),
                        Some(None) => {
                            ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                sink.deliver_batch(&batch);
                batch.clear();
                if ended {
                    break;
                }
            }
            let _ = lost.send(SubCmd::Lost(generation));
        });
        let _abort = AbortOnDrop(reader);
        self.healthy.store(true, Ordering::Relaxed);
        tracing::info!(rooms = subscribed.len(), "redis subscriber connected");

        let mut batch = Vec::new();
        loop {
            tokio::select! {
                n = cmds.recv_many(&mut batch, 1024) => if n == 0 { return Ok(()) },
                _ = self.stop.cancelled() => return Ok(()),
            }
            let mut waiters = Vec::new();
            let mut touched = HashSet::new();
            for cmd in batch.drain(..) {
                match cmd {
                    SubCmd::Reconcile(room, w) => {
                        touched.insert(room);
                        waiters.push(w);
                    }
                    SubCmd::Lost(g) if g == generation => {
                        // Requests taken from the queue are re-queued so the
                        // next session answers them.
                        for room in touched {
                            let (tx, _) = oneshot::channel();
                            let _ = self.cmd_tx.send(SubCmd::Reconcile(room, tx));
                        }
                        for w in waiters {
                            let _ = w.send(Err(BrokerError::Unavailable(
                                "redis connection lost".into(),
                            )));
                        }
                        return Err(RedisError::Command("pub/sub connection closed".into()));
                    }
                    SubCmd::Lost(_) => {}
                }
            }
            let mut to_sub = Vec::new();
            let mut to_unsub = Vec::new();
            for room in touched {
                let want = self.sink.wants(&room);
                let have = subscribed.contains(&room);
                if want && !have {
                    to_sub.push(room);
                } else if !want && have {
                    to_unsub.push(room);
                }
            }
            let start = Instant::now();
            let result = async {
                if !to_sub.is_empty() {
                    let chans: Vec<String> = to_sub.iter().map(|r| self.channel(r)).collect();
                    timeout(OP_TIMEOUT, psink.subscribe(chans))
                        .await
                        .map_err(|_| RedisError::Timeout)?
                        .map_err(|e| RedisError::Command(e.to_string()))?;
                }
                if !to_unsub.is_empty() {
                    let chans: Vec<String> = to_unsub.iter().map(|r| self.channel(r)).collect();
                    timeout(OP_TIMEOUT, psink.unsubscribe(chans))
                        .await
                        .map_err(|_| RedisError::Timeout)?
                        .map_err(|e| RedisError::Command(e.to_string()))?;
                }
                Ok::<(), RedisError>(())
            }
            .await;
            if !to_sub.is_empty() || !to_unsub.is_empty() {
                metrics::histogram!(m::REDIS_DURATION, "op" => "subscribe")
                    .record(start.elapsed().as_secs_f64());
            }
            match result {
                Ok(()) => {
                    subscribed.extend(to_sub);
                    for r in &to_unsub {
                        subscribed.remove(r);
                    }
                    for w in waiters {
                        let _ = w.send(Ok(()));
                    }
                }
                Err(e) => {
                    for w in waiters {
                        let _ = w.send(Err(BrokerError::Redis(e.clone())));
                    }
                    return Err(e);
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
