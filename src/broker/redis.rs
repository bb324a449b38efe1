//! Redis pub/sub broker: channel `{prefix}room:{room}` per room.
//!
//! On a Redis Cluster (`REDIS_URL=redis+cluster://…`, SPEC §12) the room's
//! name is a hash tag in every key and channel of the room
//! (`sb:room:{admin-orders}`, `sb:hist:{admin-orders}`,
//! `sb:hist:{admin-orders}:meta`, `sb:hist:{admin-orders}:id:<id>`), so
//! the append script stays in one slot, and rooms use sharded pub/sub
//! (SPUBLISH / SSUBSCRIBE): a message goes only to the shard that owns the
//! room's slot. The cluster subscriber is one RESP3 cluster connection
//! (one multiplexed connection per node it needs) whose pushes come to a
//! reader task; the crate re-subscribes tracked channels after a reconnect
//! or a slot move, and on a disconnection the subscriber also re-issues
//! SSUBSCRIBE for every room it holds until that succeeds (readiness false
//! meanwhile). Publishes go through `CLUSTER_LANES` publisher lanes (a
//! room always takes the same one, so its events keep their order; a slow
//! master holds up only its lanes' batches) and are grouped per room: one
//! pipeline per room and batch, the pipelines of a batch in flight together.
//!
//! History (SPEC §10): a room's events live in the stream
//! `{prefix}hist:{room}` (entry id `<offset>-0`, field `d` = the event JSON),
//! its epoch and last offset in the hash `{prefix}hist:{room}:meta` (`e`,
//! `o`). One Lua script per room appends to the stream and PUBLISHes
//! `"<offset>:<epoch> <json>"` atomically, so the offset a socket gets live
//! is the one a replay reads. It runs by EVALSHA; one Redis gets it loaded
//! on each new publisher connection, and a Redis (or cluster master) that
//! answers NOSCRIPT gets those commands again as EVAL. Both keys expire `HISTORY_TTL_SECS` after the last
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
//!   then reconnects with backoff and re-subscribes every wanted room, and
//!   the new reader first hands the hub what the rooms' history got while
//!   nobody listened ([`Tracker`]), so the hub misses nothing across a lost
//!   connection or a Redis restart.

use std::collections::{HashMap, HashSet};
use std::future::Future;
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
use crate::event::{Event, StreamPos, epoch_id};
use crate::lock::lock;
use crate::metrics as m;
use crate::redis_conn::{Conn, HotConn, Redis, RedisError, timed};

/// Appends one event to a room's history and publishes it live, atomically.
/// KEYS: meta, stream, id key (or the meta again when the event has no id).
/// ARGV: channel, payload, size, ttl, a fresh epoch, 1 when the event has
/// an id. Returns the offset, or -1 for an id already appended.
const APPEND_LUA: &str = r#"
if ARGV[6] == '1' then
  if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[4]) then return -1 end
end
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[5]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', e, 'o', 0)
end
local off = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], off .. '-0', 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[1], off .. ':' .. e .. ' ' .. ARGV[2])
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

/// One room's share of a publish: appended to the room's history and
/// published by [`APPEND_LUA`] when `historical`, else (volatile, or
/// history off) a plain PUBLISH / SPUBLISH.
struct PubOp {
    room: String,
    channel: String,
    historical: bool,
}

/// Channel and history key names of rooms (see the module doc).
#[derive(Clone)]
struct RoomKeys {
    channel_prefix: String,
    hist_prefix: String,
    cluster: bool,
}

impl RoomKeys {
    fn new(prefix: &str, cluster: bool) -> RoomKeys {
        RoomKeys {
            channel_prefix: format!("{prefix}room:"),
            hist_prefix: format!("{prefix}hist:"),
            cluster,
        }
    }
    /// The room as it appears in its names: a hash tag on a cluster.
    fn tagged(&self, room: &str) -> String {
        if self.cluster {
            format!("{{{room}}}")
        } else {
            room.to_string()
        }
    }
    fn channel(&self, room: &str) -> String {
        format!("{}{}", self.channel_prefix, self.tagged(room))
    }
    /// The room a channel name belongs to.
    fn room_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        let rest = channel.strip_prefix(self.channel_prefix.as_str())?;
        if self.cluster {
            rest.strip_prefix('{')?.strip_suffix('}')
        } else {
            Some(rest)
        }
    }
    fn stream(&self, room: &str) -> String {
        format!("{}{}", self.hist_prefix, self.tagged(room))
    }
    fn meta(&self, room: &str) -> String {
        format!("{}:meta", self.stream(room))
    }
    fn id(&self, room: &str, id: &str) -> String {
        format!("{}:id:{id}", self.stream(room))
    }
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
    names: RoomKeys,
    history: HistoryConfig,
    /// The publisher lanes: one on a single Redis (one connection, one
    /// order for every room), [`CLUSTER_LANES`] on a cluster (a room always
    /// takes the same lane, so its events keep their order).
    pub_tx: Vec<mpsc::Sender<PubItem>>,
    sub_tx: mpsc::UnboundedSender<SubCmd>,
    healthy: Arc<AtomicBool>,
    reader: Arc<History>,
}

/// What the publisher needs to build a history append.
struct HistoryKeys {
    names: RoomKeys,
    size: String,
    ttl: String,
    append: redis::Script,
    /// The append script's source, for EVAL when a master answered
    /// NOSCRIPT on a cluster.
    append_src: Arc<str>,
}

impl HistoryKeys {
    /// The command that publishes `op` of `item` (the append script for a
    /// historical one).
    fn command(&self, op: &PubOp, item: &PubItem) -> redis::Cmd {
        if !op.historical {
            let mut c = redis::cmd(if self.names.cluster {
                "SPUBLISH"
            } else {
                "PUBLISH"
            });
            c.arg(&op.channel).arg(item.payload.as_ref());
            return c;
        }
        let room = &op.room;
        let meta = self.names.meta(room);
        let id_key = match &item.id {
            Some(id) => self.names.id(room, id),
            None => meta.clone(),
        };
        // EVALSHA: Redis would hash the script's source on every EVAL (10 %
        // of a capped master's CPU in `loadgen fanout`). A Redis that does
        // not have the script answers NOSCRIPT without running anything,
        // and gets the command again as EVAL ([`unscripted`]); one Redis
        // also gets it loaded on every new publisher connection.
        let mut c = redis::cmd("EVALSHA");
        c.arg(self.append.get_hash())
            .arg(3)
            .arg(&meta)
            .arg(self.names.stream(room))
            .arg(id_key)
            .arg(&op.channel)
            .arg(item.payload.as_ref())
            .arg(&self.size)
            .arg(&self.ttl)
            .arg(new_epoch())
            .arg(u8::from(item.id.is_some()));
        c
    }
}

impl RedisBroker {
    /// Starts the publisher and subscriber tasks. Returns at once; the
    /// subscriber connects in the background (`is_healthy` tells when).
    pub fn start(
        redis: Redis,
        prefix: &str,
        sink: Arc<dyn Sink>,
        stop: CancellationToken,
        history: HistoryConfig,
    ) -> RedisBroker {
        let names = RoomKeys::new(prefix, redis.is_cluster());
        let (sub_tx, sub_rx) = mpsc::unbounded_channel();
        let healthy = Arc::new(AtomicBool::new(false));
        let append_src = if names.cluster {
            APPEND_LUA.replace("'PUBLISH'", "'SPUBLISH'")
        } else {
            APPEND_LUA.to_string()
        };
        let keys = Arc::new(HistoryKeys {
            names: names.clone(),
            size: history.size.to_string(),
            ttl: history.ttl.as_secs().max(1).to_string(),
            append: redis::Script::new(&append_src),
            append_src: append_src.into(),
        });
        let lanes = if names.cluster { CLUSTER_LANES } else { 1 };
        let pub_tx = (0..lanes)
            .map(|_| {
                let (tx, rx) = mpsc::channel(64 * 1024);
                tokio::spawn(run_publisher(redis.clone(), rx, keys.clone()));
                tx
            })
            .collect();
        let reader = Arc::new(History {
            hot: HotConn::new(redis.clone()),
            names: names.clone(),
            script: redis::Script::new(READ_LUA),
            ttl: history.ttl.as_secs().max(1),
        });
        let sub = Subscriber {
            redis: redis.clone(),
            names: names.clone(),
            tracker: Arc::new(Tracker {
                history: reader.clone(),
                enabled: history.enabled(),
                rooms: Default::default(),
            }),
            sink,
            healthy: healthy.clone(),
            cmd_tx: sub_tx.clone(),
            stop,
        };
        if redis.is_cluster() {
            tokio::spawn(sub.run_cluster(sub_rx));
        } else {
            tokio::spawn(sub.run(sub_rx));
        }
        RedisBroker {
            names,
            history,
            pub_tx,
            sub_tx,
            healthy,
            reader,
        }
    }
}

/// Reads rooms' history: for resumes, and for the subscriber's own
/// catch-up ([`Tracker`]).
struct History {
    hot: HotConn,
    names: RoomKeys,
    script: redis::Script,
    ttl: u64,
}

impl History {
    /// Runs [`READ_LUA`]: the room's position, and with `since` the
    /// entries after it when the epoch matches.
    async fn read(
        &self,
        room: &str,
        since: Option<&StreamPos>,
    ) -> Result<(StreamPos, Vec<(u64, Event)>), BrokerError> {
        let mut c = self.hot.get().await?;
        let mut inv = self.script.prepare_invoke();
        inv.key(self.names.meta(room))
            .key(self.names.stream(room))
            .arg(since.map(|s| s.offset.to_string()).unwrap_or_default())
            .arg(since.map(|s| s.epoch.as_str()).unwrap_or(""))
            .arg(new_epoch())
            .arg(self.ttl);
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
        Ok((StreamPos { epoch, offset }, events_of(room, entries)))
    }
}

/// A history stream entry as XRANGE returns it: id and fields.
type Entry = (String, Vec<(String, Vec<u8>)>);

/// The events of history entries with their offsets (entry id
/// `<offset>-0`, field `d`); an entry that is not one is skipped.
fn events_of(room: &str, entries: Vec<Entry>) -> Vec<(u64, Event)> {
    let mut events = Vec::with_capacity(entries.len());
    for (id, fields) in entries {
        let Some(off) = id.split('-').next().and_then(|o| o.parse::<u64>().ok()) else {
            tracing::warn!("bad history id {id:?} in {room}");
            continue;
        };
        let Some((_, data)) = fields.into_iter().find(|(k, _)| k == "d") else {
            continue;
        };
        match serde_json::from_slice::<Event>(&data) {
            Ok(e) => events.push((off, e)),
            Err(e) => tracing::warn!(error = %e, "undecodable history entry in {room}"),
        }
    }
    events
}

impl Broker for RedisBroker {
    async fn publish(&self, event: Arc<Event>) -> Result<(), BrokerError> {
        // Serialized once; the same bytes go to every room's channel.
        let payload = Bytes::from(serde_json::to_vec(&*event).expect("events serialize"));
        let historical = self.history.enabled() && !event.volatile;
        let ops = event
            .rooms
            .iter()
            .map(|r| PubOp {
                room: r.clone(),
                channel: self.names.channel(r),
                historical,
            })
            .collect::<Vec<_>>();
        let n = ops.len() as u64;
        // Each lane's share of the rooms: on a single Redis (one lane) the
        // ops as they are.
        let lanes = self.pub_tx.len();
        let shares: Vec<(usize, Vec<PubOp>)> = if lanes == 1 {
            vec![(0, ops)]
        } else {
            let mut shares: Vec<(usize, Vec<PubOp>)> = Vec::new();
            for op in ops {
                let lane = lane_of(&op.room, lanes);
                match shares.iter_mut().find(|(l, _)| *l == lane) {
                    Some((_, ops)) => ops.push(op),
                    None => shares.push((lane, vec![op])),
                }
            }
            shares
        };
        let mut answers = Vec::with_capacity(shares.len());
        for (lane, ops) in shares {
            let (done, rx) = oneshot::channel();
            self.pub_tx[lane]
                .send(PubItem {
                    ops,
                    payload: payload.clone(),
                    id: event.id.clone(),
                    done,
                })
                .await
                .map_err(|_| BrokerError::Unavailable("publisher stopped".into()))?;
            answers.push(rx);
        }
        let all = futures_util::future::join_all(answers);
        let Ok(results) = timeout(OP_TIMEOUT, all).await else {
            return Err(BrokerError::Timeout);
        };
        for r in results {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(BrokerError::Redis(e)),
                Err(_) => return Err(BrokerError::Unavailable("publisher stopped".into())),
            }
        }
        metrics::counter!(m::BROKER_PUBLISHED).increment(n);
        Ok(())
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
        Ok(Some(self.reader.read(room, None).await?.0))
    }

    async fn replay(&self, room: &str, since: &StreamPos) -> Result<Option<Replay>, BrokerError> {
        if !self.history.enabled() {
            return Ok(None);
        }
        let (now, events) = self.reader.read(room, Some(since)).await?;
        Ok(Some(super::judge(since, now, events)))
    }
}

/// Publisher lanes on a cluster: each lane has one batch in flight, so a
/// master that is slow to answer holds up only the batches of its lane,
/// not every publish of the node.
const CLUSTER_LANES: usize = 8;

/// A room's lane (FNV-1a of its name): always the same for a room.
fn lane_of(room: &str, lanes: usize) -> usize {
    let h = room.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (h % lanes as u64) as usize
}

async fn run_publisher(redis: Redis, mut rx: mpsc::Receiver<PubItem>, keys: Arc<HistoryKeys>) {
    let mut conn: Option<Conn> = None;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let start = Instant::now();
        let result = async {
            let fresh = conn.is_none();
            if fresh {
                conn = Some(
                    timeout(OP_TIMEOUT, redis.get())
                        .await
                        .map_err(|_| RedisError::Timeout)??,
                );
            }
            let c = conn.as_ref().expect("set just above");
            let sent = if keys.names.cluster {
                publish_cluster(c, &batch, &keys).boxed()
            } else {
                publish_single(c, &batch, &keys, fresh).boxed()
            };
            timeout(OP_TIMEOUT, sent)
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
            redis.broken();
        }
        for item in batch.drain(..) {
            let _ = item.done.send(result.clone());
        }
    }
}

/// One Redis: the whole batch in one pipelined round trip. A connection
/// that is new may be to a Redis that never saw the script (a restart), so
/// the script is loaded first in the same round trip.
fn publish_single(
    c: &Conn,
    batch: &[PubItem],
    keys: &HistoryKeys,
    fresh: bool,
) -> impl Future<Output = redis::RedisResult<()>> + use<> {
    let mut pipe = redis::pipe();
    if fresh {
        pipe.load_script(&keys.append).ignore();
    }
    for item in batch {
        for op in &item.ops {
            pipe.add_command(keys.command(op, item)).ignore();
        }
    }
    let mut c = c.clone();
    let src = keys.append_src.clone();
    async move { exec_scripted(pipe, &mut c, &src).await }
}

/// Runs `pipe`; the commands a Redis answered NOSCRIPT go again as EVAL
/// ([`unscripted`]).
async fn exec_scripted(pipe: redis::Pipeline, c: &mut Conn, src: &str) -> redis::RedisResult<()> {
    match pipe.exec_async(c).await {
        Err(e) => match unscripted(&pipe, e, src) {
            Ok(again) => again.exec_async(c).await,
            Err(e) => Err(e),
        },
        ok => ok,
    }
}

/// A cluster: a pipeline per room (its commands share the room's slot and
/// keep their order), all of them in flight together; the cluster
/// connection sends each to the master of its slot.
fn publish_cluster(
    c: &Conn,
    batch: &[PubItem],
    keys: &HistoryKeys,
) -> impl Future<Output = redis::RedisResult<()>> + use<> {
    let mut rooms: Vec<(&str, redis::Pipeline)> = Vec::new();
    let mut at: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for item in batch {
        for op in &item.ops {
            let i = *at.entry(op.room.as_str()).or_insert_with(|| {
                rooms.push((op.room.as_str(), redis::pipe()));
                rooms.len() - 1
            });
            rooms[i].1.add_command(keys.command(op, item)).ignore();
        }
    }
    let sends: Vec<_> = rooms
        .into_iter()
        .map(|(_, pipe)| {
            let mut c = c.clone();
            let src = keys.append_src.clone();
            async move { exec_scripted(pipe, &mut c, &src).await }
        })
        .collect();
    async move {
        for r in futures_util::future::join_all(sends).await {
            r?;
        }
        Ok(())
    }
}

/// The commands of a pipeline that Redis answered NOSCRIPT (it never had
/// the append script: a cluster's promoted replica, a restart, a `SCRIPT
/// FLUSH`), as EVAL with the script's source, in their order. NOSCRIPT runs
/// nothing, and the pipeline's other commands ran, so only these go again
/// (if another connection loaded the script in the middle of the pipeline,
/// the commands after that point ran first and hold the earlier offsets).
/// Any other error is returned as it is.
fn unscripted(
    pipe: &redis::Pipeline,
    e: redis::RedisError,
    src: &str,
) -> Result<redis::Pipeline, redis::RedisError> {
    let Some(errors) = e.clone().into_server_errors() else {
        return Err(e);
    };
    if errors.is_empty()
        || errors
            .iter()
            .any(|(_, err)| err.kind() != Some(redis::ServerErrorKind::NoScript))
    {
        return Err(e);
    }
    let mut again = redis::pipe();
    for (i, cmd) in pipe.cmd_iter().enumerate() {
        if !errors.iter().any(|(at, _)| *at == i) {
            continue;
        }
        let mut eval = redis::cmd("EVAL");
        eval.arg(src);
        // EVALSHA's name and hash, then the keys and arguments as they were.
        for arg in cmd.args_iter().skip(2) {
            if let redis::Arg::Simple(bytes) = arg {
                eval.arg(bytes);
            }
        }
        again.add_command(eval).ignore();
    }
    Ok(again)
}

/// A live message is the event JSON, preceded by `"<offset>:<epoch> "`
/// when the event is in the room's history.
fn split_position(payload: &[u8]) -> (Option<(u64, u64)>, &[u8]) {
    if payload.first().is_some_and(u8::is_ascii_digit)
        && let Some(sp) = payload.iter().position(|b| *b == b' ')
        && let Ok(head) = std::str::from_utf8(&payload[..sp])
        && let Some((off, epoch)) = head.split_once(':')
        && let (Ok(off), Ok(epoch)) = (off.parse(), u64::from_str_radix(epoch, 16))
    {
        return (Some((off, epoch)), &payload[sp + 1..]);
    }
    (None, payload)
}

/// A live message for the [`Tracker`]: the delivery, and the epoch its
/// offset belongs to.
struct Live {
    delivery: Delivery,
    epoch: Option<u64>,
}

/// One pub/sub message into the batch for the tracker.
fn decode(names: &RoomKeys, msg: redis::Msg, batch: &mut Vec<Live>) {
    metrics::counter!(m::BROKER_RECEIVED).increment(1);
    let Some(room) = names.room_of(msg.get_channel_name()) else {
        return;
    };
    let (pos, json) = split_position(msg.get_payload_bytes());
    match serde_json::from_slice::<Event>(json) {
        Ok(event) => batch.push(Live {
            delivery: Delivery {
                room: room.to_string(),
                offset: pos.map(|p| p.0),
                event,
            },
            epoch: pos.map(|p| p.1),
        }),
        Err(e) => tracing::warn!(error = %e, "undecodable broker message on {room}"),
    }
}

struct Subscriber {
    redis: Redis,
    names: RoomKeys,
    /// Where each subscribed room's messages stand on this node.
    tracker: Arc<Tracker>,
    sink: Arc<dyn Sink>,
    healthy: Arc<AtomicBool>,
    cmd_tx: mpsc::UnboundedSender<SubCmd>,
    stop: CancellationToken,
}

impl Subscriber {
    fn channel(&self, room: &str) -> String {
        self.names.channel(room)
    }

    /// Of the `touched` rooms, those to subscribe (wanted, not held) and
    /// to unsubscribe (held, no longer wanted). A room about to be
    /// subscribed afresh loses its track: it starts from now (an old track,
    /// from before the node left it, would make its first message look like
    /// a gap and replay history the members already have).
    fn changes(
        &self,
        touched: HashSet<String>,
        subscribed: &HashSet<String>,
    ) -> (Vec<String>, Vec<String>) {
        let mut to_sub = Vec::new();
        let mut to_unsub = Vec::new();
        for room in touched {
            match (self.sink.wants(&room), subscribed.contains(&room)) {
                (true, false) => to_sub.push(room),
                (false, true) => to_unsub.push(room),
                _ => {}
            }
        }
        self.tracker.forget(&to_sub);
        (to_sub, to_unsub)
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
        let client = self
            .redis
            .single_client()
            .expect("the single-Redis subscriber runs on one Redis")?;
        let pubsub = timeout(OP_TIMEOUT, client.get_async_pubsub())
            .await
            .map_err(|_| RedisError::Timeout)?
            .map_err(|e| RedisError::Command(e.to_string()))?;
        let (mut psink, mut stream) = pubsub.split();
        let mut subscribed: HashSet<String> = HashSet::new();
        let wanted = self.sink.rooms();
        // Rooms left while nobody listened lose their tracks: a later
        // subscribe starts them afresh.
        self.tracker.keep_only(&wanted);
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
        //
        // Before the first live message the reader catches up: what the
        // rooms' history got while this node was not subscribed (a lost
        // connection, a Redis restart) goes to the hub first, in order
        // ([`Tracker::catch_up`]); live messages it already handed over are
        // then dropped.
        let sink = self.sink.clone();
        let names = self.names.clone();
        let lost = self.cmd_tx.clone();
        let tracker = self.tracker.clone();
        let resumed: Vec<String> = subscribed.iter().cloned().collect();
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            tracker.catch_up(&*sink, &resumed, &mut out).await;
            if !out.is_empty() {
                sink.deliver_batch(&out);
                out.clear();
            }
            let mut batch = Vec::new();
            let mut ended = false;
            while let Some(msg) = stream.next().await {
                decode(&names, msg, &mut batch);
                while batch.len() < READ_BATCH {
                    match stream.next().now_or_never() {
                        Some(Some(msg)) => decode(&names, msg, &mut batch),
                        Some(None) => {
                            ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                tracker.admit(&*sink, &mut batch, &mut out).await;
                sink.deliver_batch(&out);
                out.clear();
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
            let (to_sub, to_unsub) = self.changes(touched, &subscribed);
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
                    self.tracker.forget(&to_unsub);
                    self.tracker.start_from_now(to_sub.clone());
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

impl Subscriber {
    /// The cluster subscriber: one RESP3 cluster connection with sharded
    /// subscriptions. The crate reconnects and re-subscribes by itself; on
    /// a disconnection push this task marks the broker unhealthy and
    /// re-issues SSUBSCRIBE for every room it holds (idempotent) until that
    /// succeeds, so readiness returns only once every room is live again.
    async fn run_cluster(self, mut cmds: mpsc::UnboundedReceiver<SubCmd>) {
        let (push_tx, mut push_rx) = mpsc::unbounded_channel::<redis::PushInfo>();
        // After each resync the reader catches up (in its own order with
        // the live messages): see [`Tracker::catch_up`].
        let marker = push_tx.clone();
        let catch_up = move || {
            let _ = marker.send(redis::PushInfo {
                kind: redis::PushKind::Other(CATCH_UP.into()),
                data: Vec::new(),
            });
        };
        let client = match self.redis.cluster_subscriber(push_tx) {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                tracing::error!(error = %e, "redis cluster subscriber cannot start");
                return;
            }
            None => unreachable!("the cluster subscriber runs on a cluster"),
        };
        // Reader: pushes straight into the hub, batched like the single
        // subscriber's; a disconnection asks for a resync.
        let sink = self.sink.clone();
        let names = self.names.clone();
        let lost = self.cmd_tx.clone();
        let healthy = self.healthy.clone();
        let tracker = self.tracker.clone();
        let reader = tokio::spawn(async move {
            let mut batch = Vec::new();
            let mut out = Vec::new();
            // True for the catch-up marker.
            let take = |p: redis::PushInfo, batch: &mut Vec<Live>| match p.kind {
                redis::PushKind::SMessage | redis::PushKind::Message => {
                    if let Some(msg) = redis::Msg::from_push_info(p) {
                        decode(&names, msg, batch);
                    }
                    false
                }
                redis::PushKind::Disconnection => {
                    healthy.store(false, Ordering::Relaxed);
                    let _ = lost.send(SubCmd::Lost(0));
                    false
                }
                redis::PushKind::Other(k) => k == CATCH_UP,
                _ => false,
            };
            while let Some(p) = push_rx.recv().await {
                let mut catch_up = take(p, &mut batch);
                while !catch_up && batch.len() < READ_BATCH {
                    match push_rx.try_recv() {
                        Ok(p) => catch_up = take(p, &mut batch),
                        Err(_) => break,
                    }
                }
                if !batch.is_empty() {
                    tracker.admit(&*sink, &mut batch, &mut out).await;
                    sink.deliver_batch(&out);
                    out.clear();
                }
                if catch_up {
                    tracker.catch_up(&*sink, &sink.rooms(), &mut out).await;
                    if !out.is_empty() {
                        sink.deliver_batch(&out);
                        out.clear();
                    }
                }
            }
        });
        let _abort = AbortOnDrop(reader);

        let mut conn: Option<redis::cluster_async::ClusterConnection> = None;
        let mut subscribed: HashSet<String> = HashSet::new();
        // Every wanted room is (re)subscribed before the broker is healthy.
        let mut resync = true;
        let mut backoff = Duration::from_millis(50);
        let mut batch = Vec::new();
        loop {
            if resync {
                match self
                    .cluster_resync(&client, &mut conn, &mut subscribed)
                    .await
                {
                    Ok(()) => {
                        resync = false;
                        backoff = Duration::from_millis(50);
                        catch_up();
                        if !self.healthy.swap(true, Ordering::Relaxed) {
                            tracing::info!(
                                rooms = subscribed.len(),
                                "redis cluster subscriber ready"
                            );
                        }
                    }
                    Err(e) => {
                        self.healthy.store(false, Ordering::Relaxed);
                        metrics::counter!(m::REDIS_ERRORS, "op" => "subscribe").increment(1);
                        tracing::warn!(error = %e, "redis cluster subscriber: retrying in {backoff:?}");
                    }
                }
            }
            let wait = if resync {
                backoff
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                n = cmds.recv_many(&mut batch, 1024) => if n == 0 { return },
                _ = tokio::time::sleep(wait) => {
                    if resync {
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        metrics::counter!(m::BROKER_RECONNECTS).increment(1);
                    }
                    continue;
                }
                _ = self.stop.cancelled() => return,
            }
            let mut waiters = Vec::new();
            let mut touched = HashSet::new();
            for cmd in batch.drain(..) {
                match cmd {
                    SubCmd::Reconcile(room, w) => {
                        touched.insert(room);
                        waiters.push(w);
                    }
                    SubCmd::Lost(_) => resync = true,
                }
            }
            if resync {
                // Answered after the resync: the rooms are then live.
                match self
                    .cluster_resync(&client, &mut conn, &mut subscribed)
                    .await
                {
                    Ok(()) => {
                        resync = false;
                        catch_up();
                        self.healthy.store(true, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.healthy.store(false, Ordering::Relaxed);
                        tracing::warn!(error = %e, "redis cluster subscriber: resync failed");
                    }
                }
            }
            let result = if resync {
                Err(BrokerError::Unavailable("redis cluster unreachable".into()))
            } else {
                self.cluster_apply(&client, &mut conn, &mut subscribed, touched)
                    .await
                    .map_err(BrokerError::Redis)
            };
            if result.is_err() {
                resync = true;
            }
            for w in waiters {
                let _ = w.send(
                    result
                        .as_ref()
                        .map(|_| ())
                        .map_err(|e| BrokerError::Unavailable(e.to_string())),
                );
            }
        }
    }

    async fn cluster_conn(
        client: &redis::cluster::ClusterClient,
        conn: &mut Option<redis::cluster_async::ClusterConnection>,
    ) -> Result<redis::cluster_async::ClusterConnection, RedisError> {
        if let Some(c) = conn {
            return Ok(c.clone());
        }
        let c = timeout(OP_TIMEOUT, client.get_async_connection())
            .await
            .map_err(|_| RedisError::Timeout)?
            .map_err(|e| RedisError::Command(e.to_string()))?;
        *conn = Some(c.clone());
        Ok(c)
    }

    /// SSUBSCRIBE (or SUNSUBSCRIBE) each channel on its own: channels of
    /// different slots cannot share one command. All in flight together.
    async fn cluster_cmd(
        c: &redis::cluster_async::ClusterConnection,
        subscribe: bool,
        channels: Vec<String>,
    ) -> Result<(), RedisError> {
        let calls = channels.into_iter().map(|ch| {
            let mut c = c.clone();
            async move {
                if subscribe {
                    c.ssubscribe(ch).await
                } else {
                    c.sunsubscribe(ch).await
                }
            }
        });
        let start = Instant::now();
        let results = timeout(OP_TIMEOUT, futures_util::future::join_all(calls))
            .await
            .map_err(|_| RedisError::Timeout)?;
        metrics::histogram!(m::REDIS_DURATION, "op" => "subscribe")
            .record(start.elapsed().as_secs_f64());
        for r in results {
            r.map_err(|e| RedisError::Command(e.to_string()))?;
        }
        Ok(())
    }

    /// Subscribes every wanted room again (and forgets unwanted ones).
    async fn cluster_resync(
        &self,
        client: &redis::cluster::ClusterClient,
        conn: &mut Option<redis::cluster_async::ClusterConnection>,
        subscribed: &mut HashSet<String>,
    ) -> Result<(), RedisError> {
        let mut touched: HashSet<String> = self.sink.rooms().into_iter().collect();
        touched.extend(subscribed.iter().cloned());
        // Wanted rooms are re-issued even when held: after a failover the
        // crate's own re-subscription may still be under way.
        let want: Vec<String> = touched
            .iter()
            .filter(|r| self.sink.wants(r))
            .cloned()
            .collect();
        let fresh: Vec<String> = want
            .iter()
            .filter(|r| !subscribed.contains(*r))
            .cloned()
            .collect();
        self.tracker.forget(&fresh);
        let r = async {
            let c = Self::cluster_conn(client, conn).await?;
            Self::cluster_cmd(&c, true, want.iter().map(|r| self.channel(r)).collect()).await
        }
        .await;
        if r.is_err() {
            *conn = None;
            return r;
        }
        subscribed.extend(want);
        let drop: Vec<String> = subscribed
            .iter()
            .filter(|r| !self.sink.wants(r))
            .cloned()
            .collect();
        self.cluster_apply(client, conn, subscribed, drop.into_iter().collect())
            .await
    }

    /// Makes the subscription of each touched room match the sink.
    async fn cluster_apply(
        &self,
        client: &redis::cluster::ClusterClient,
        conn: &mut Option<redis::cluster_async::ClusterConnection>,
        subscribed: &mut HashSet<String>,
        touched: HashSet<String>,
    ) -> Result<(), RedisError> {
        let (to_sub, to_unsub) = self.changes(touched, subscribed);
        if to_sub.is_empty() && to_unsub.is_empty() {
            return Ok(());
        }
        let r = async {
            let c = Self::cluster_conn(client, conn).await?;
            if !to_sub.is_empty() {
                Self::cluster_cmd(&c, true, to_sub.iter().map(|r| self.channel(r)).collect())
                    .await?;
            }
            if !to_unsub.is_empty() {
                Self::cluster_cmd(
                    &c,
                    false,
                    to_unsub.iter().map(|r| self.channel(r)).collect(),
                )
                .await?;
            }
            Ok(())
        }
        .await;
        match r {
            Ok(()) => {
                self.tracker.forget(&to_unsub);
                self.tracker.start_from_now(to_sub.clone());
                subscribed.extend(to_sub);
                for room in &to_unsub {
                    subscribed.remove(room);
                }
                Ok(())
            }
            Err(e) => {
                *conn = None;
                Err(e)
            }
        }
    }
}

/// Where one subscribed room stands on this node: the epoch and offset of
/// the last historical message handed to the hub, or (`delivered` false)
/// the room's position read right after the node subscribed.
struct Track {
    epoch: u64,
    last: u64,
    delivered: bool,
}

/// Nothing acknowledged is lost between Redis and the hub (SPEC §10):
///
/// - **Catch-up** (after every reconnect of the single subscriber, after
///   every resync of the cluster one): each room the node
///   subscribed again is read from its history after the last offset
///   handed over, or, when the epoch changed (Redis restarted empty, the
///   history expired), from the start of the new epoch: all of it was
///   published while the node was not listening. Read after the SUBSCRIBE,
///   so anything later comes live; live messages at or below what the
///   catch-up handed over are dropped as duplicates.
/// - **Gap fill** (both modes): a live message whose offset skips ahead of
///   the last one (a sharded subscription gone for a moment: a failover, a
///   slot move), or that opens a new epoch above offset 1, makes the tracker
///   read the missing entries and hand them over first, in order.
/// - **Start from now**: a room subscribed afresh gets its position read
///   right after the SUBSCRIBE, so a room that is quiet until the
///   connection drops still knows where to catch up from.
///
/// Sockets that stay connected then miss nothing the history still holds;
/// a socket that reconnects resumes with `since` as usual.
struct Tracker {
    history: Arc<History>,
    /// History on (`HISTORY_SIZE` > 0): offsets exist.
    enabled: bool,
    rooms: std::sync::Mutex<HashMap<String, Track>>,
}

/// The cluster subscriber's marker in its push channel: catch up now.
const CATCH_UP: &str = "switchboard-catch-up";

/// At most this many events are read back for one gap.
const GAP_MAX: usize = 1000;

/// Reads of one room a catch-up tries before leaving it to the gap fill.
const CATCH_UP_TRIES: usize = 4;

/// Rooms read at once by a catch-up (one round trip each, pipelined on the
/// multiplexed connection).
const CATCH_UP_WIDTH: usize = 256;

impl Tracker {
    /// Live messages in arrival order into `out`: duplicates of what a
    /// catch-up handed over are dropped, gaps are filled from history.
    async fn admit(&self, sink: &dyn Sink, batch: &mut Vec<Live>, out: &mut Vec<Delivery>) {
        // (where in `out`, room, first and last missing offset)
        let mut gaps: Vec<(usize, String, u64, u64)> = Vec::new();
        {
            let mut rooms = lock(&self.rooms);
            for live in batch.drain(..) {
                let d = live.delivery;
                let (Some(o), Some(e)) = (d.offset, live.epoch) else {
                    out.push(d);
                    continue;
                };
                // Tracks go when the node unsubscribes: a tracked room is
                // wanted, and only a room's first message asks the hub.
                match rooms.get_mut(&d.room) {
                    None if !sink.wants(&d.room) => {}
                    None => {
                        rooms.insert(
                            d.room.clone(),
                            Track {
                                epoch: e,
                                last: o,
                                delivered: true,
                            },
                        );
                    }
                    Some(t) if !t.delivered => {
                        *t = Track {
                            epoch: e,
                            last: o,
                            delivered: true,
                        };
                    }
                    Some(t) if t.epoch == e => {
                        if o <= t.last {
                            metrics::counter!(m::BROKER_DUPLICATES).increment(1);
                            continue;
                        }
                        if o > t.last + 1 {
                            gaps.push((out.len(), d.room.clone(), t.last + 1, o - 1));
                        }
                        t.last = o;
                    }
                    Some(t) => {
                        // A new epoch: its entries before this one were
                        // published while this node did not hear them.
                        sink.epoch_changed(&d.room, e);
                        if o > 1 {
                            gaps.push((out.len(), d.room.clone(), 1, o - 1));
                        }
                        *t = Track {
                            epoch: e,
                            last: o,
                            delivered: true,
                        };
                    }
                }
                out.push(d);
            }
        }
        // Last gap first: the earlier indices stay valid.
        for (at, room, from, to) in gaps.into_iter().rev() {
            match self.history.range(&room, from, to).await {
                Ok(events) => {
                    tracing::info!(
                        %room,
                        from,
                        to,
                        found = events.len(),
                        "filled a subscription gap from history"
                    );
                    metrics::counter!(m::BROKER_FILLED).increment(events.len() as u64);
                    out.splice(
                        at..at,
                        events.into_iter().map(|(off, event)| Delivery {
                            room: room.clone(),
                            offset: Some(off),
                            event,
                        }),
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, %room, "subscription gap not filled")
                }
            }
        }
    }

    /// Reads what each of `rooms` got while this node was not subscribed
    /// (see the type's doc) into `out`. A room never tracked starts from
    /// now. A read that fails leaves the room as it was: its next live
    /// message shows the gap.
    async fn catch_up(&self, sink: &dyn Sink, rooms: &[String], out: &mut Vec<Delivery>) {
        if !self.enabled {
            return;
        }
        let known: Vec<(String, Option<StreamPos>)> = {
            let t = lock(&self.rooms);
            rooms
                .iter()
                .filter(|r| sink.wants(r))
                .map(|r| {
                    let since = t.get(r).map(|k| StreamPos {
                        epoch: format!("{:016x}", k.epoch),
                        offset: k.last,
                    });
                    (r.clone(), since)
                })
                .collect()
        };
        let mut filled = 0usize;
        // A read can fail on a connection from before the outage (it is then
        // replaced): those rooms are read again, a few times.
        let rooms_n = known.len();
        let mut todo = known;
        for attempt in 1..=CATCH_UP_TRIES {
            let mut failed = Vec::new();
            filled += self.catch_up_pass(sink, &todo, out, &mut failed).await;
            if failed.is_empty() {
                break;
            }
            if attempt == CATCH_UP_TRIES {
                for (room, _) in &failed {
                    tracing::warn!(%room, "subscription catch-up failed; the next live message shows the gap");
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
            todo = failed;
        }
        if filled > 0 {
            metrics::counter!(m::BROKER_FILLED).increment(filled as u64);
            tracing::info!(
                rooms = rooms_n,
                events = filled,
                "caught up from history after re-subscribing"
            );
        }
    }

    /// One read of each room for [`Tracker::catch_up`]; the rooms whose
    /// read failed go to `failed`. Returns how many events it handed over.
    async fn catch_up_pass(
        &self,
        sink: &dyn Sink,
        rooms: &[(String, Option<StreamPos>)],
        out: &mut Vec<Delivery>,
        failed: &mut Vec<(String, Option<StreamPos>)>,
    ) -> usize {
        let mut filled = 0;
        for chunk in rooms.chunks(CATCH_UP_WIDTH) {
            let reads = chunk
                .iter()
                .map(|(room, since)| self.since(room, since.as_ref()));
            let results = futures_util::future::join_all(reads).await;
            let mut t = lock(&self.rooms);
            for ((room, since), r) in chunk.iter().zip(results) {
                match r {
                    Ok((pos, events)) => {
                        if since.as_ref().is_some_and(|s| s.epoch != pos.epoch) {
                            sink.epoch_changed(room, epoch_id(&pos.epoch));
                        }
                        let last = events.last().map_or(pos.offset, |(o, _)| *o);
                        filled += events.len();
                        out.extend(events.into_iter().map(|(offset, event)| Delivery {
                            room: room.clone(),
                            offset: Some(offset),
                            event,
                        }));
                        t.insert(
                            room.clone(),
                            Track {
                                epoch: epoch_id(&pos.epoch),
                                last,
                                delivered: since.is_some(),
                            },
                        );
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, %room, "subscription catch-up read failed");
                        failed.push((room.clone(), since.clone()));
                    }
                }
            }
        }
        filled
    }

    /// The room's position and its entries after `since`; after an epoch
    /// change, every entry of the new epoch.
    async fn since(
        &self,
        room: &str,
        since: Option<&StreamPos>,
    ) -> Result<(StreamPos, Vec<(u64, Event)>), BrokerError> {
        let Some(since) = since else {
            return Ok((self.history.read(room, None).await?.0, Vec::new()));
        };
        let (now, events) = self.history.read(room, Some(since)).await?;
        if now.epoch == since.epoch {
            return Ok((now, events));
        }
        let start = StreamPos {
            epoch: now.epoch,
            offset: 0,
        };
        self.history.read(room, Some(&start)).await
    }

    /// Rooms just subscribed: their positions now, in the background (a
    /// live message that comes first wins).
    fn start_from_now(self: &Arc<Self>, rooms: Vec<String>) {
        if !self.enabled || rooms.is_empty() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            for chunk in rooms.chunks(CATCH_UP_WIDTH) {
                let reads = chunk.iter().map(|r| me.history.read(r, None));
                let results = futures_util::future::join_all(reads).await;
                let mut t = lock(&me.rooms);
                for (room, r) in chunk.iter().zip(results) {
                    match r {
                        Ok((pos, _)) => {
                            t.entry(room.clone()).or_insert(Track {
                                epoch: epoch_id(&pos.epoch),
                                last: pos.offset,
                                delivered: false,
                            });
                        }
                        Err(e) => tracing::debug!(error = %e, %room, "no position to track"),
                    }
                }
            }
        });
    }

    /// Forgets every room but `rooms` (the ones subscribed again).
    fn keep_only(&self, rooms: &[String]) {
        let keep: HashSet<&str> = rooms.iter().map(String::as_str).collect();
        lock(&self.rooms).retain(|r, _| keep.contains(r.as_str()));
    }

    /// Rooms this node left, or subscribes afresh.
    fn forget(&self, rooms: &[String]) {
        if rooms.is_empty() {
            return;
        }
        let mut t = lock(&self.rooms);
        for r in rooms {
            t.remove(r);
        }
    }
}

impl History {
    /// The room's history entries from `from` to `to` (offsets, inclusive).
    async fn range(&self, room: &str, from: u64, to: u64) -> Result<Vec<(u64, Event)>, RedisError> {
        let mut c = self.hot.get().await?;
        let entries: Vec<Entry> = match timed(
            "history_read",
            redis::cmd("XRANGE")
                .arg(self.names.stream(room))
                .arg(format!("{from}-0"))
                .arg(format!("{to}-0"))
                .arg("COUNT")
                .arg(GAP_MAX)
                .query_async(&mut c),
        )
        .await
        {
            Ok(v) => v,
            Err(e) => {
                self.hot.broken();
                return Err(e);
            }
        };
        Ok(events_of(room, entries))
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
