//! Redis pub/sub broker: channel `{prefix}room:{room}` per room.
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

use super::{Broker, BrokerError, Sink};
use crate::event::Event;
use crate::metrics as m;
use crate::redis_conn::RedisError;

/// Broker messages handed to the hub as one batch at most.
const READ_BATCH: usize = 256;

const OP_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BATCH: usize = 512;

struct PubItem {
    channels: Vec<String>,
    payload: Bytes,
    done: oneshot::Sender<Result<(), RedisError>>,
}

enum SubCmd {
    Reconcile(String, oneshot::Sender<Result<(), BrokerError>>),
    /// The pub/sub stream of connection `generation` ended.
    Lost(u64),
}

pub struct RedisBroker {
    channel_prefix: String,
    pub_tx: mpsc::Sender<PubItem>,
    sub_tx: mpsc::UnboundedSender<SubCmd>,
    healthy: Arc<AtomicBool>,
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
    ) -> RedisBroker {
        let channel_prefix = format!("{prefix}room:");
        let (pub_tx, pub_rx) = mpsc::channel(64 * 1024);
        let (sub_tx, sub_rx) = mpsc::unbounded_channel();
        let healthy = Arc::new(AtomicBool::new(false));
        tokio::spawn(run_publisher(pool, pub_rx));
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
            pub_tx,
            sub_tx,
            healthy,
        }
    }
}

impl Broker for RedisBroker {
    async fn publish(&self, event: Arc<Event>) -> Result<(), BrokerError> {
        // Serialized once; the same bytes go to every room's channel.
        let payload = Bytes::from(serde_json::to_vec(&*event).expect("events serialize"));
        let channels = event
            .rooms
            .iter()
            .map(|r| format!("{}{r}", self.channel_prefix))
            .collect::<Vec<_>>();
        let n = channels.len() as u64;
        let (done, rx) = oneshot::channel();
        self.pub_tx
            .send(PubItem {
                channels,
                payload,
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
}

async fn run_publisher(pool: deadpool_redis::Pool, mut rx: mpsc::Receiver<PubItem>) {
    let mut conn: Option<deadpool_redis::Connection> = None;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut pipe = redis::pipe();
        for item in &batch {
            for ch in &item.channels {
                pipe.publish(ch, item.payload.as_ref()).ignore();
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
            let decode = |msg: redis::Msg, batch: &mut Vec<(String, Event)>| {
                metrics::counter!(m::BROKER_RECEIVED).increment(1);
                let Some(room) = msg.get_channel_name().strip_prefix(prefix.as_str()) else {
                    return;
                };
                match serde_json::from_slice::<Event>(msg.get_payload_bytes()) {
                    Ok(event) => batch.push((room.to_string(), event)),
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
