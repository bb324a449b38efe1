//! The `Broker` contract: one test body, run against the in-process
//! `MemoryBroker` and the `RedisBroker` (on a real redis-server), plus what
//! only a cluster broker promises (unsubscribing, other nodes, reconnects).
//!
//! The contract is what a node relies on: after `reconcile(room)` resolves for
//! a room the sink wants, a publish reaches the sink for that room exactly
//! once, with the event intact; an event to several rooms arrives once per
//! room, in the order of its room list (except on a Redis Cluster, where
//! each room's shard delivers on its own); one publisher's events arrive in
//! publish order per room. (The memory broker hands every room of an event to the sink
//! and lets the sink drop what it does not want, so "an unwanted room is not
//! delivered" is a Redis-only promise, tested separately below.)

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use switchboard::broker::memory::MemoryBroker;
use switchboard::broker::redis::RedisBroker;
use switchboard::broker::{Broker, Replay, Sink};
use switchboard::config::HistoryConfig;
use switchboard::event::{Event, EventKind, StreamPos};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// History as a node runs it by default.
const HISTORY: HistoryConfig = HistoryConfig {
    size: 1000,
    ttl: Duration::from_secs(300),
};

/// Records every delivery; wants exactly the rooms a test put in `wanted`.
struct TestSink {
    wanted: Mutex<HashSet<String>>,
    tx: mpsc::UnboundedSender<(String, Event)>,
    /// The history offset of every delivery, in delivery order.
    offsets: Mutex<Vec<(String, Option<u64>)>>,
}

type Deliveries = mpsc::UnboundedReceiver<(String, Event)>;

impl TestSink {
    fn new() -> (Arc<TestSink>, Deliveries) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(TestSink {
                wanted: Mutex::new(HashSet::new()),
                tx,
                offsets: Mutex::new(Vec::new()),
            }),
            rx,
        )
    }
    fn want(&self, room: &str, yes: bool) {
        let mut w = self.wanted.lock().unwrap();
        if yes {
            w.insert(room.to_string());
        } else {
            w.remove(room);
        }
    }
}

impl Sink for TestSink {
    fn deliver(&self, room: &str, offset: Option<u64>, event: &Event) {
        self.offsets
            .lock()
            .unwrap()
            .push((room.to_string(), offset));
        let _ = self.tx.send((room.to_string(), event.clone()));
    }
    fn wants(&self, room: &str) -> bool {
        self.wanted.lock().unwrap().contains(room)
    }
    fn rooms(&self) -> Vec<String> {
        self.wanted.lock().unwrap().iter().cloned().collect()
    }
}

fn custom(rooms: &[&str], n: u64) -> Event {
    Event::new(
        rooms.iter().map(|r| r.to_string()).collect(),
        EventKind::Custom {
            ty: "contract".into(),
            data: json!({"n": n, "nested": {"s": "é ✓ \"quoted\"", "list": [1.5, null, true]}}),
        },
    )
}

async fn next(rx: &mut Deliveries, what: &str) -> (String, Event) {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no delivery within {WAIT:?}: {what}"))
        .expect("sink alive")
}

/// Publishes a marker to `room` (wanted and reconciled) and asserts it is the
/// very next delivery: nothing else (a duplicate, a stray room) came first.
async fn assert_nothing_else<B: Broker>(broker: &B, rx: &mut Deliveries, room: &str, what: &str) {
    let marker = custom(&[room], u64::MAX);
    broker.publish(Arc::new(marker.clone())).await.unwrap();
    let (r, e) = next(rx, what).await;
    assert_eq!(
        (r.as_str(), &e),
        (room, &marker),
        "{what}: unexpected delivery"
    );
}

async fn wait_healthy<B: Broker>(broker: &B, healthy: bool) {
    let deadline = Instant::now() + WAIT;
    while broker.is_healthy() != healthy {
        assert!(
            Instant::now() < deadline,
            "is_healthy never became {healthy}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The one contract body, for any broker `make` builds over a sink.
/// Two brokers on `setup` under `prefix`, both healthy: `a` publishes,
/// `b` listens to `rooms` (its deliveries on `rx_b`).
struct Pair {
    a: RedisBroker,
    b: RedisBroker,
    sink_b: Arc<TestSink>,
    rx_b: Deliveries,
}

async fn pair<R: AsRef<str>>(setup: &RedisSetup, prefix: &str, rooms: &[R]) -> Pair {
    // What `a` hears is not looked at.
    let (sink_a, _) = TestSink::new();
    let (sink_b, rx_b) = TestSink::new();
    let a = setup.broker(prefix, sink_a);
    let b = setup.broker(prefix, sink_b.clone());
    wait_healthy(&a, true).await;
    wait_healthy(&b, true).await;
    for r in rooms {
        sink_b.want(r.as_ref(), true);
        b.reconcile(r.as_ref()).await.unwrap();
    }
    Pair { a, b, sink_b, rx_b }
}

async fn contract<B: Broker>(make: impl FnOnce(Arc<dyn Sink>) -> B) {
    contract_with(make, true).await
}

/// `list_order`: the rooms of one event arrive in the order of its list.
/// A Redis Cluster does not promise it (the rooms' shards are different
/// connections); per room, order holds everywhere.
async fn contract_with<B: Broker>(make: impl FnOnce(Arc<dyn Sink>) -> B, list_order: bool) {
    let (sink, mut rx) = TestSink::new();
    let broker = Arc::new(make(sink.clone() as Arc<dyn Sink>));
    wait_healthy(&*broker, true).await;

    // A room that was never wanted reconciles to nothing, without error.
    broker.reconcile("never-wanted").await.unwrap();

    // 1. After reconcile resolves for a wanted room, a publish reaches the
    //    sink for that room, once, intact (floats, unicode, nesting).
    sink.want("r1", true);
    broker.reconcile("r1").await.unwrap();
    let e = Event::new(
        vec!["r1".into()],
        EventKind::DriverLocation {
            driver_id: 5,
            latitude: 41.311081,
            longitude: 69.240562,
            heading: Some(0.1 + 0.2),
            speed: None,
            timestamp: "2024-01-15T10:30:00.000Z".into(),
        },
    );
    broker.publish(Arc::new(e.clone())).await.unwrap();
    assert_eq!(next(&mut rx, "single room").await, ("r1".into(), e));
    assert_nothing_else(&*broker, &mut rx, "r1", "after a single-room publish").await;

    // 2. An event to several wanted rooms: once per room, in list order,
    //    each delivery carrying the whole event (its full room list).
    for r in ["r2", "r3"] {
        sink.want(r, true);
        broker.reconcile(r).await.unwrap();
    }
    for rooms in [["r3", "r1", "r2"], ["r1", "r2", "r3"]] {
        let e = custom(&rooms, 2);
        broker.publish(Arc::new(e.clone())).await.unwrap();
        let mut got = Vec::new();
        for _ in rooms {
            let (r, ev) = next(&mut rx, "multi-room").await;
            assert_eq!(ev, e);
            got.push(r);
        }
        if !list_order {
            got.sort();
        }
        let mut want: Vec<String> = rooms.iter().map(|r| r.to_string()).collect();
        if !list_order {
            want.sort();
        }
        assert_eq!(got, want, "multi-room");
        assert_nothing_else(&*broker, &mut rx, "r2", "after a multi-room publish").await;
    }

    // 3. One publisher's events arrive in publish order, each once.
    for n in 0..100 {
        broker.publish(Arc::new(custom(&["r2"], n))).await.unwrap();
    }
    for n in 0..100 {
        let (r, e) = next(&mut rx, "ordered").await;
        assert_eq!((r.as_str(), e.kind), ("r2", custom(&["r2"], n).kind));
    }
    assert_nothing_else(&*broker, &mut rx, "r2", "after ordered publishes").await;

    // 4. Concurrent publishers: every event arrives exactly once.
    let tasks: Vec<_> = (0..8u64)
        .map(|t| {
            let b = broker.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    b.publish(Arc::new(custom(&["r3"], t * 100 + i)))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let (r, e) = next(&mut rx, "concurrent").await;
        assert_eq!(r, "r3");
        let EventKind::Custom { data, .. } = e.kind else {
            panic!("not ours: {e:?}")
        };
        assert!(seen.insert(data["n"].as_u64().unwrap()), "duplicate {data}");
    }
    assert_nothing_else(&*broker, &mut rx, "r3", "after concurrent publishes").await;

    // 5. Wanted, unwanted, wanted again: what counts is the sink's state
    //    when the last reconcile resolves.
    sink.want("r4", true);
    broker.reconcile("r4").await.unwrap();
    sink.want("r4", false);
    broker.reconcile("r4").await.unwrap();
    sink.want("r4", true);
    broker.reconcile("r4").await.unwrap();
    let e = custom(&["r4"], 5);
    broker.publish(Arc::new(e.clone())).await.unwrap();
    assert_eq!(next(&mut rx, "re-wanted room").await, ("r4".into(), e));
    assert_nothing_else(&*broker, &mut rx, "r4", "after re-wanting").await;
}

struct RedisSetup {
    url: String,
    stop: CancellationToken,
}

impl RedisSetup {
    fn new(redis: &RedisServer) -> RedisSetup {
        RedisSetup {
            url: redis.url(),
            stop: CancellationToken::new(),
        }
    }
    /// Brokers on a Redis Cluster (`redis+cluster://`).
    fn cluster(cluster: &RedisCluster) -> RedisSetup {
        RedisSetup {
            url: cluster.url(),
            stop: CancellationToken::new(),
        }
    }
    /// A RedisBroker as a node builds it, under its own key prefix.
    fn broker(&self, prefix: &str, sink: Arc<dyn Sink>) -> RedisBroker {
        self.broker_with(prefix, sink, HISTORY)
    }
    fn broker_with(&self, prefix: &str, sink: Arc<dyn Sink>, h: HistoryConfig) -> RedisBroker {
        let redis = switchboard::Redis::open(&self.url).unwrap();
        RedisBroker::start(redis, prefix, sink, self.stop.clone(), h)
    }
}

impl Drop for RedisSetup {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test]
async fn memory_broker_meets_the_contract() {
    init_tracing();
    contract(|sink| MemoryBroker::new(sink, HISTORY)).await;
}

#[tokio::test]
async fn redis_broker_meets_the_contract() {
    init_tracing();
    let redis = RedisServer::start();
    let setup = RedisSetup::new(&redis);
    contract(|sink| setup.broker("ct:", sink)).await;
}

// ---------------------------------------------------------------------------
// What only the cluster broker promises

#[tokio::test]
async fn redis_broker_stops_delivering_a_room_nobody_wants() {
    init_tracing();
    let redis = RedisServer::start();
    let setup = RedisSetup::new(&redis);
    let (sink, mut rx) = TestSink::new();
    let broker = setup.broker("ct:", sink.clone());
    wait_healthy(&broker, true).await;
    for r in ["kept", "dropped"] {
        sink.want(r, true);
        broker.reconcile(r).await.unwrap();
    }
    let e = custom(&["dropped"], 1);
    broker.publish(Arc::new(e.clone())).await.unwrap();
    assert_eq!(next(&mut rx, "wanted").await, ("dropped".into(), e));

    sink.want("dropped", false);
    broker.reconcile("dropped").await.unwrap();
    broker
        .publish(Arc::new(custom(&["dropped"], 2)))
        .await
        .unwrap();
    // Only the "kept" part of a multi-room event is delivered.
    let both = custom(&["dropped", "kept"], 3);
    broker.publish(Arc::new(both.clone())).await.unwrap();
    assert_eq!(next(&mut rx, "kept part").await, ("kept".into(), both));
    assert_nothing_else(&broker, &mut rx, "kept", "after unwanting").await;
    // Redis agrees: nobody is subscribed to the dropped room's channel.
    let mut conn = redis.conn().await;
    let subs: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("ct:room:dropped")
        .arg("ct:room:kept")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        subs,
        vec![("ct:room:dropped".into(), 0), ("ct:room:kept".into(), 1)]
    );
}

#[tokio::test]
async fn redis_brokers_deliver_to_other_nodes_that_want_the_room() {
    init_tracing();
    let redis = RedisServer::start();
    let setup = RedisSetup::new(&redis);
    let (sink_a, mut rx_a) = TestSink::new();
    let (sink_b, mut rx_b) = TestSink::new();
    let a = setup.broker("ct:", sink_a.clone());
    let b = setup.broker("ct:", sink_b.clone());
    // Another cluster (another prefix) on the same Redis hears nothing.
    let (sink_x, mut rx_x) = TestSink::new();
    let x = setup.broker("other:", sink_x.clone());
    for (s, brk) in [(&sink_a, &a), (&sink_b, &b), (&sink_x, &x)] {
        wait_healthy(brk, true).await;
        s.want("shared", true);
        brk.reconcile("shared").await.unwrap();
    }
    sink_b.want("only-b", true);
    b.reconcile("only-b").await.unwrap();
    sink_a.want("only-a", true);
    a.reconcile("only-a").await.unwrap();

    let e = custom(&["only-b", "shared"], 1);
    a.publish(Arc::new(e.clone())).await.unwrap();
    assert_eq!(
        next(&mut rx_b, "b, first room").await,
        ("only-b".into(), e.clone())
    );
    assert_eq!(
        next(&mut rx_b, "b, second room").await,
        ("shared".into(), e.clone())
    );
    assert_eq!(
        next(&mut rx_a, "a, shared room").await,
        ("shared".into(), e)
    );
    assert_nothing_else(&a, &mut rx_a, "only-a", "node a").await;
    assert_nothing_else(&b, &mut rx_b, "only-b", "node b").await;
    assert_nothing_else(&x, &mut rx_x, "shared", "other prefix").await;
}

#[tokio::test]
async fn redis_broker_reconnects_and_resubscribes_after_a_restart() {
    init_tracing();
    let mut redis = RedisServer::start();
    let setup = RedisSetup::new(&redis);
    let (sink, mut rx) = TestSink::new();
    let broker = setup.broker("ct:", sink.clone());
    wait_healthy(&broker, true).await;
    sink.want("r", true);
    broker.reconcile("r").await.unwrap();
    broker.publish(Arc::new(custom(&["r"], 1))).await.unwrap();
    assert_eq!(next(&mut rx, "before").await.0, "r");

    redis.kill();
    wait_healthy(&broker, false).await;
    assert!(
        broker.publish(Arc::new(custom(&["r"], 2))).await.is_err(),
        "a publish with Redis down must fail, not vanish"
    );
    // A room wanted during the outage is subscribed on reconnect too.
    sink.want("joined-while-down", true);
    let _ = tokio::time::timeout(
        Duration::from_millis(200),
        broker.reconcile("joined-while-down"),
    )
    .await;

    redis.restart();
    wait_healthy(&broker, true).await;
    // No reconcile needed: the broker re-subscribed what the sink wants.
    let e = custom(&["r", "joined-while-down"], 3);
    broker.publish(Arc::new(e.clone())).await.unwrap();
    assert_eq!(next(&mut rx, "after, r").await, ("r".into(), e.clone()));
    assert_eq!(
        next(&mut rx, "after, joined while down").await,
        ("joined-while-down".into(), e)
    );
    assert_nothing_else(&broker, &mut rx, "r", "after the restart").await;
}

// ---------------------------------------------------------------------------
// History (SPEC §10): the same body against both brokers.

fn offsets_of(sink: &TestSink, room: &str) -> Vec<Option<u64>> {
    sink.offsets
        .lock()
        .unwrap()
        .iter()
        .filter(|(r, _)| r == room)
        .map(|(_, o)| *o)
        .collect()
}

fn replayed(r: &Replay) -> Vec<u64> {
    match r {
        Replay::Recovered { events, .. } => events.iter().map(|(o, _)| *o).collect(),
        Replay::NotRecovered { reason, .. } => panic!("not recovered: {reason}"),
    }
}

/// Positions, live offsets, replay, all-or-nothing, once by id, volatile.
/// `size` must be 3.
async fn history_contract<B: Broker>(make: impl FnOnce(Arc<dyn Sink>) -> B) {
    let (sink, mut rx) = TestSink::new();
    let broker = make(sink.clone() as Arc<dyn Sink>);
    wait_healthy(&broker, true).await;
    sink.want("h", true);
    broker.reconcile("h").await.unwrap();

    // A room with no history yet is at offset 0, and every call agrees.
    let p0 = broker.position("h").await.unwrap().expect("history on");
    assert_eq!(p0.offset, 0);
    assert!(!p0.epoch.is_empty());
    assert_eq!(broker.position("h").await.unwrap(), Some(p0.clone()));

    // Live deliveries carry offsets 1, 2, 3, the same the history keeps.
    let sent: Vec<Event> = (1..=3).map(|n| custom(&["h"], n)).collect();
    for e in &sent {
        broker.publish(Arc::new(e.clone())).await.unwrap();
        assert_eq!(&next(&mut rx, "live").await.1, e);
    }
    assert_eq!(offsets_of(&sink, "h"), vec![Some(1), Some(2), Some(3)]);
    let p3 = broker.position("h").await.unwrap().unwrap();
    assert_eq!(
        p3,
        StreamPos {
            epoch: p0.epoch.clone(),
            offset: 3
        }
    );

    // Replay after offset 1: events 2 and 3, intact, and the position.
    let r = broker
        .replay(
            "h",
            &StreamPos {
                epoch: p0.epoch.clone(),
                offset: 1,
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(replayed(&r), vec![2, 3]);
    let Replay::Recovered { events, pos } = r else {
        unreachable!()
    };
    assert_eq!(events[0].1, sent[1]);
    assert_eq!(pos, p3);
    // Up to date: recovered, nothing missed.
    let r = broker.replay("h", &p3).await.unwrap().unwrap();
    assert_eq!(replayed(&r), Vec::<u64>::new());

    // Another epoch, or an offset ahead of the room: epoch_changed.
    for bad in [
        StreamPos {
            epoch: "not-this-one".into(),
            offset: 1,
        },
        StreamPos {
            epoch: p0.epoch.clone(),
            offset: 9,
        },
    ] {
        match broker.replay("h", &bad).await.unwrap().unwrap() {
            Replay::NotRecovered { reason, pos } => {
                assert_eq!(reason, "epoch_changed");
                assert_eq!(pos, p3);
            }
            other => panic!("{bad:?} recovered: {other:?}"),
        }
    }

    // Past the size (3), the oldest leave: a resume from 0 is too_old, from
    // 1 (events 2..4 kept) still works.
    let e4 = custom(&["h"], 4);
    broker.publish(Arc::new(e4.clone())).await.unwrap();
    assert_eq!(next(&mut rx, "fourth").await.1, e4);
    match broker.replay("h", &p0).await.unwrap().unwrap() {
        Replay::NotRecovered { reason, .. } => assert_eq!(reason, "too_old"),
        other => panic!("resumed past the history: {other:?}"),
    }
    let r = broker
        .replay(
            "h",
            &StreamPos {
                epoch: p0.epoch.clone(),
                offset: 1,
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(replayed(&r), vec![2, 3, 4]);

    // An event with an id enters the history once, however often it is
    // published, and is delivered live once.
    let mut once = custom(&["h"], 5);
    once.id = Some("outbox-1".into());
    broker.publish(Arc::new(once.clone())).await.unwrap();
    broker.publish(Arc::new(once.clone())).await.unwrap();
    assert_eq!(next(&mut rx, "id'd event").await.1, once);
    // Volatile: delivered without an offset, not kept.
    let mut v = custom(&["h"], 6);
    v.volatile = true;
    broker.publish(Arc::new(v.clone())).await.unwrap();
    assert_eq!(next(&mut rx, "volatile").await.1, v);
    assert_nothing_else(&broker, &mut rx, "h", "after the id'd and volatile events").await;
    assert_eq!(
        offsets_of(&sink, "h"),
        vec![Some(1), Some(2), Some(3), Some(4), Some(5), None, Some(6)]
    );
    let r = broker.replay("h", &p3).await.unwrap().unwrap();
    assert_eq!(
        replayed(&r),
        vec![4, 5, 6],
        "the volatile event is not in history"
    );
}

const SMALL: HistoryConfig = HistoryConfig {
    size: 3,
    ttl: Duration::from_secs(300),
};

#[tokio::test]
async fn memory_broker_keeps_history() {
    init_tracing();
    history_contract(|sink| MemoryBroker::new(sink, SMALL)).await;
}

#[tokio::test]
async fn redis_broker_keeps_history() {
    init_tracing();
    let redis = RedisServer::start();
    let setup = RedisSetup::new(&redis);
    history_contract(|sink| setup.broker_with("ht:", sink, SMALL)).await;
}

/// History off (`HISTORY_SIZE=0`): no positions, no offsets.
#[tokio::test]
async fn history_off_gives_no_positions() {
    init_tracing();
    let off = HistoryConfig {
        size: 0,
        ttl: Duration::from_secs(300),
    };
    let redis = RedisServer::start();
    let setup = RedisSetup::new(&redis);
    let (s1, mut r1) = TestSink::new();
    let (s2, mut r2) = TestSink::new();
    let mem = MemoryBroker::new(s1.clone(), off);
    let red = setup.broker_with("ho:", s2.clone(), off);
    wait_healthy(&red, true).await;
    s2.want("x", true);
    red.reconcile("x").await.unwrap();
    let e = custom(&["x"], 1);
    mem.publish(Arc::new(e.clone())).await.unwrap();
    red.publish(Arc::new(e.clone())).await.unwrap();
    assert_eq!(next(&mut r1, "memory").await.1, e);
    assert_eq!(next(&mut r2, "redis").await.1, e);
    assert_eq!(offsets_of(&s1, "x"), vec![None]);
    assert_eq!(offsets_of(&s2, "x"), vec![None]);
    assert_eq!(mem.position("x").await.unwrap(), None);
    assert_eq!(red.position("x").await.unwrap(), None);
}

/// A Redis restarted without persistence lost the history: a new epoch,
/// and a resume from the old one is refused as epoch_changed.
#[tokio::test]
async fn redis_restart_changes_the_epoch() {
    init_tracing();
    let mut redis = RedisServer::start();
    let setup = RedisSetup::new(&redis);
    let (sink, mut rx) = TestSink::new();
    let broker = setup.broker("hr:", sink.clone());
    wait_healthy(&broker, true).await;
    sink.want("r", true);
    broker.reconcile("r").await.unwrap();
    let e = custom(&["r"], 1);
    broker.publish(Arc::new(e.clone())).await.unwrap();
    assert_eq!(next(&mut rx, "before").await.1, e);
    let before = broker.position("r").await.unwrap().unwrap();
    assert_eq!(before.offset, 1);
    redis.kill();
    redis.restart();
    wait_healthy(&broker, true).await;
    let after = loop {
        // The pooled connection notices the restart on its first use.
        if let Ok(Some(p)) = broker.position("r").await {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(after.epoch, before.epoch);
    assert_eq!(after.offset, 0);
    match broker.replay("r", &before).await.unwrap().unwrap() {
        Replay::NotRecovered { reason, .. } => assert_eq!(reason, "epoch_changed"),
        other => panic!("recovered across a lost history: {other:?}"),
    }
}

/// A room nobody publishes to for HISTORY_TTL_SECS loses its history.
#[tokio::test]
async fn history_expires_after_its_ttl() {
    init_tracing();
    let short = HistoryConfig {
        size: 10,
        ttl: Duration::from_secs(1),
    };
    let redis = RedisServer::start();
    let setup = RedisSetup::new(&redis);
    let (s1, _r1) = TestSink::new();
    let (s2, _r2) = TestSink::new();
    let mem = MemoryBroker::new(s1, short);
    let red = setup.broker_with("hx:", s2, short);
    wait_healthy(&red, true).await;
    let e = custom(&["t"], 1);
    mem.publish(Arc::new(e.clone())).await.unwrap();
    red.publish(Arc::new(e.clone())).await.unwrap();
    let m1 = mem.position("t").await.unwrap().unwrap();
    let r1 = red.position("t").await.unwrap().unwrap();
    assert_eq!((m1.offset, r1.offset), (1, 1));
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let m2 = mem.position("t").await.unwrap().unwrap();
    let r2 = red.position("t").await.unwrap().unwrap();
    assert_ne!(m2.epoch, m1.epoch);
    assert_ne!(r2.epoch, r1.epoch);
    assert_eq!((m2.offset, r2.offset), (0, 0));
}

// ---------------------------------------------------------------------------
// On a real 3-master Redis Cluster (sharded pub/sub, history in the room's slot)

#[tokio::test]
async fn redis_cluster_broker_meets_the_contract() {
    init_tracing();
    let cluster = RedisCluster::start(3);
    let setup = RedisSetup::cluster(&cluster);
    contract_with(|sink| setup.broker("ct:", sink), false).await;
}

#[tokio::test]
async fn redis_cluster_broker_keeps_history() {
    init_tracing();
    let cluster = RedisCluster::start(3);
    let setup = RedisSetup::cluster(&cluster);
    history_contract(|sink| setup.broker_with("ht:", sink, SMALL)).await;
    // The room's stream, meta and channel share the room's slot.
    let slot = |k: &str| -> i64 {
        redis::from_redis_value(
            cluster
                .on(
                    cluster.ports[0],
                    redis::cmd("CLUSTER").arg("KEYSLOT").arg(k),
                )
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(slot("ht:hist:{h}"), slot("ht:room:{h}"));
    assert_eq!(slot("ht:hist:{h}:meta"), slot("ht:room:{h}"));
    let len: i64 = redis::from_redis_value(
        cluster
            .on(
                cluster.master_of("ht:hist:{h}"),
                redis::cmd("XLEN").arg("ht:hist:{h}"),
            )
            .unwrap(),
    )
    .unwrap();
    assert_eq!(len, 3, "the stream is readable on the room's master");
}

/// Rooms on different masters: another node's broker gets each of them,
/// through sharded subscriptions held on each room's master.
#[tokio::test]
async fn redis_cluster_brokers_deliver_across_masters() {
    init_tracing();
    let cluster = RedisCluster::start(3);
    // Enough rooms that every master owns some of them.
    let rooms: Vec<String> = (0..12).map(|i| format!("room-{i}")).collect();
    let masters: HashSet<u16> = rooms
        .iter()
        .map(|r| cluster.master_of(&format!("ct:room:{{{r}}}")))
        .collect();
    assert_eq!(masters.len(), 3, "the rooms land on all three masters");
    let setup = RedisSetup::cluster(&cluster);
    let (sink_a, mut rx_a) = TestSink::new();
    let (sink_b, mut rx_b) = TestSink::new();
    let a = setup.broker("ct:", sink_a.clone());
    let b = setup.broker("ct:", sink_b.clone());
    wait_healthy(&a, true).await;
    wait_healthy(&b, true).await;
    for r in &rooms {
        sink_b.want(r, true);
        b.reconcile(r).await.unwrap();
    }
    sink_a.want("room-0", true);
    a.reconcile("room-0").await.unwrap();
    // Each room's master counts its sharded subscribers (b; a too on room-0).
    for r in &rooms {
        let ch = format!("ct:room:{{{r}}}");
        let v = cluster
            .on(
                cluster.master_of(&ch),
                redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(&ch),
            )
            .unwrap();
        let counts: Vec<(String, i64)> = redis::from_redis_value(v).unwrap();
        let n = if r == "room-0" { 2 } else { 1 };
        assert_eq!(counts, vec![(ch.clone(), n)], "{ch}");
    }
    // One event to every room, then one per room: all arrive, per room in order.
    let all: Vec<&str> = rooms.iter().map(String::as_str).collect();
    let e = custom(&all, 1);
    a.publish(Arc::new(e.clone())).await.unwrap();
    let singles: Vec<Event> = rooms.iter().map(|r| custom(&[r.as_str()], 2)).collect();
    for single in &singles {
        a.publish(Arc::new(single.clone())).await.unwrap();
    }
    let mut got: Vec<(String, Event)> = Vec::new();
    for _ in 0..rooms.len() * 2 {
        got.push(next(&mut rx_b, "b").await);
    }
    for (r, single) in rooms.iter().zip(&singles) {
        let mine: Vec<&Event> = got.iter().filter(|(g, _)| g == r).map(|(_, e)| e).collect();
        assert_eq!(mine.len(), 2, "{r}: {mine:?}");
        assert_eq!(mine[0], &e, "{r}: the multi-room event first");
        assert_eq!(mine[1], single);
    }
    assert_eq!(next(&mut rx_a, "a").await, ("room-0".into(), e));
    assert_eq!(
        next(&mut rx_a, "a").await,
        ("room-0".into(), singles[0].clone())
    );
    assert_nothing_else(&b, &mut rx_b, "room-2", "node b").await;
    assert_nothing_else(&a, &mut rx_a, "room-0", "node a").await;
    // Unwanting drops the sharded subscription on that room's master.
    sink_b.want("room-1", false);
    b.reconcile("room-1").await.unwrap();
    let ch = "ct:room:{room-1}";
    let v = cluster
        .on(
            cluster.master_of(ch),
            redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(ch),
        )
        .unwrap();
    let counts: Vec<(String, i64)> = redis::from_redis_value(v).unwrap();
    assert_eq!(counts, vec![(ch.to_string(), 0)]);
}

/// A master failover under a stream of publishes (3 masters + 1 replica
/// each; the master of the busy room is SIGKILLed, its replica takes over):
/// the subscriber moves to the new master by itself, and what it missed
/// live is replayed from the room's history (recovery, SPEC §10). Counted:
/// events acknowledged to the publisher but neither delivered live nor
/// replayable (lost), and events delivered twice (dup).
#[tokio::test]
async fn redis_cluster_failover_is_survived_and_recovery_covers_the_gap() {
    init_tracing();
    let mut cluster = RedisCluster::start_with(3, 1);
    let setup = RedisSetup::cluster(&cluster);
    let rooms: Vec<String> = (0..6).map(|i| format!("busy-{i}")).collect();
    let Pair {
        a,
        b,
        sink_b,
        mut rx_b,
    } = pair(&setup, "fo:", &rooms).await;
    let a = Arc::new(a);
    let busy = "busy-0";
    let start = b.position(busy).await.unwrap().unwrap();
    let doomed = cluster.master_of(&format!("fo:room:{{{busy}}}"));

    // Publisher: numbered events to the busy room every 5 ms, each retried
    // until acknowledged (with an id, so a retry enters the history once,
    // as the relay does).
    const N: u64 = 400;
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let publisher = {
        let a = a.clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            let mut retries = 0u64;
            for n in 1..=N {
                let mut e = custom(&[busy], n);
                e.id = Some(format!("outbox-{n}"));
                let e = Arc::new(e);
                while a.publish(e.clone()).await.is_err() {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                acked.store(n, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            retries
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    replica_caught_up(doomed).await;
    cluster.kill(doomed);
    let killed_at = Instant::now();
    let before = acked.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        before > 0 && before < N,
        "killed mid-stream ({before} acked)"
    );
    // The replica is promoted: the busy room's slot has a new master.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.master_of(&format!("fo:room:{{{busy}}}")) == doomed {
        assert!(Instant::now() < deadline, "no failover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "failover after {:?}; {before} of {N} acknowledged at the kill",
        killed_at.elapsed()
    );
    let retries = publisher.await.unwrap();
    wait_healthy(&b, true).await;

    // Live deliveries of the busy room, by event number, with offsets.
    let mut live: Vec<(u64, u64)> = Vec::new(); // (n, offset)
    let got_all = Instant::now() + Duration::from_secs(10);
    while Instant::now() < got_all {
        match tokio::time::timeout(Duration::from_millis(500), rx_b.recv()).await {
            Ok(Some((room, e))) if room == busy => {
                let EventKind::Custom { data, .. } = e.kind else {
                    continue;
                };
                live.push((data["n"].as_u64().unwrap(), 0));
            }
            Ok(Some(_)) => {}
            _ if live.last().map(|l| l.0) == Some(N) => break,
            _ => {}
        }
    }
    let offsets: Vec<Option<u64>> = offsets_of(&sink_b, busy);
    for (l, o) in live.iter_mut().zip(offsets) {
        l.1 = o.expect("historical");
    }
    // A client resumes from the last offset it saw before each gap: replay
    // from its first gap covers everything after.
    let mut seen: HashSet<u64> = HashSet::new();
    let mut dup = 0;
    for (n, _) in &live {
        if !seen.insert(*n) {
            dup += 1;
        }
    }
    let resume_from = (start.offset + 1..)
        .zip(live.iter())
        .find(|(want, (_, off))| off != want)
        .map(|(want, _)| want - 1)
        .or(Some(start.offset + live.len() as u64));
    let mut replayed = 0;
    let mut verdict = "none needed".to_string();
    if let Some(from) = resume_from {
        let since = StreamPos {
            epoch: start.epoch.clone(),
            offset: from,
        };
        match b.replay(busy, &since).await.unwrap().unwrap() {
            Replay::Recovered { events, .. } => {
                verdict = format!("recovered from offset {from}");
                for (_, e) in events {
                    let EventKind::Custom { data, .. } = e.kind else {
                        continue;
                    };
                    if seen.insert(data["n"].as_u64().unwrap()) {
                        replayed += 1;
                    }
                }
            }
            Replay::NotRecovered { reason, .. } => verdict = format!("not recovered: {reason}"),
        }
    }
    let lost = (1..=N).filter(|n| !seen.contains(n)).count();
    eprintln!(
        "failover: {N} acknowledged, {} live, {replayed} replayed ({verdict}), {lost} lost, {dup} dup, {retries} publish retries",
        live.len()
    );
    assert_eq!(dup, 0, "no live duplicate");
    assert_eq!(lost, 0, "recovery covers every acknowledged event");
    // Every other room still reaches b through its (maybe new) master.
    for r in &rooms[1..] {
        let e = custom(&[r.as_str()], 9999);
        a.publish(Arc::new(e.clone())).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (room, got) = next(&mut rx_b, "after failover").await;
            if room == *r && got == e {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{r} not delivered after failover"
            );
        }
    }
}

/// Messages a node's sharded subscription never saw (its shard connection
/// was gone for a moment) are read back from the room's history and handed
/// over first, in order, when the next live message shows the gap. The gap
/// is made by appending to the history behind the broker's back, without
/// publishing, as a lost message would leave it.
#[tokio::test]
async fn redis_cluster_subscriber_fills_a_gap_from_history() {
    init_tracing();
    let cluster = RedisCluster::start(3);
    let setup = RedisSetup::cluster(&cluster);
    let Pair {
        a,
        b,
        sink_b,
        mut rx_b,
    } = pair(&setup, "gap:", &["g"]).await;
    let first = custom(&["g"], 1);
    a.publish(Arc::new(first.clone())).await.unwrap();
    assert_eq!(next(&mut rx_b, "first").await, ("g".into(), first));
    // Offsets 2 and 3 enter the history without a live message.
    let master = cluster.master_of("gap:hist:{g}");
    let lost: Vec<Event> = (2..=3).map(|n| custom(&["g"], n)).collect();
    for e in &lost {
        let off: i64 = redis::from_redis_value(
            cluster
                .on(
                    master,
                    redis::cmd("HINCRBY")
                        .arg("gap:hist:{g}:meta")
                        .arg("o")
                        .arg(1),
                )
                .unwrap(),
        )
        .unwrap();
        cluster
            .on(
                master,
                redis::cmd("XADD")
                    .arg("gap:hist:{g}")
                    .arg(format!("{off}-0"))
                    .arg("d")
                    .arg(serde_json::to_string(e).unwrap()),
            )
            .unwrap();
    }
    let fourth = custom(&["g"], 4);
    a.publish(Arc::new(fourth.clone())).await.unwrap();
    assert_eq!(
        next(&mut rx_b, "filled").await,
        ("g".into(), lost[0].clone())
    );
    assert_eq!(
        next(&mut rx_b, "filled").await,
        ("g".into(), lost[1].clone())
    );
    assert_eq!(next(&mut rx_b, "live").await, ("g".into(), fourth));
    assert_eq!(
        offsets_of(&sink_b, "g"),
        vec![Some(1), Some(2), Some(3), Some(4)]
    );
    assert_nothing_else(&b, &mut rx_b, "g", "after the gap").await;
}

/// A command on the Redis at `port` (the room's master, on a cluster).
fn on_port(port: u16, cmd: &redis::Cmd) -> redis::Value {
    switchboard_testkit::command_on(port, cmd).unwrap()
}

/// `cmdstat_<cmd>`'s calls on the Redis at `port` (0 when never called).
fn calls(port: u16, cmd: &str) -> u64 {
    let info: String =
        redis::from_redis_value(on_port(port, redis::cmd("INFO").arg("commandstats"))).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// The append script runs by EVALSHA; a Redis that lost its scripts
/// (`SCRIPT FLUSH` on every port in `ports`, as a restarted master or a
/// promoted replica has none) answers NOSCRIPT on a connection that is not
/// new, and those publishes go again as EVAL: each is delivered and in the
/// history once, the offsets have no gap. `master`: the room's Redis.
async fn script_lost(setup: &RedisSetup, ports: &[u16], master: u16, stream: &str) {
    let Pair {
        a,
        b,
        sink_b,
        mut rx_b,
    } = pair(setup, "ns:", &["s"]).await;
    let first = custom(&["s"], 1);
    a.publish(Arc::new(first.clone())).await.unwrap();
    assert_eq!(next(&mut rx_b, "first").await, ("s".into(), first));
    let (sha0, eval0) = (calls(master, "evalsha"), calls(master, "eval"));
    assert!(sha0 >= 1, "the first publish ran by EVALSHA");
    for port in ports {
        on_port(*port, redis::cmd("SCRIPT").arg("FLUSH"));
    }
    // Several in one batch: one pipeline for the room, NOSCRIPT for each.
    let events: Vec<Event> = (2..=4).map(|n| custom(&["s"], n)).collect();
    let sent =
        futures_util::future::join_all(events.iter().map(|e| a.publish(Arc::new(e.clone())))).await;
    for r in sent {
        r.expect("a publish after SCRIPT FLUSH");
    }
    for e in &events {
        assert_eq!(
            next(&mut rx_b, "after the flush").await,
            ("s".into(), e.clone())
        );
    }
    let fifth = custom(&["s"], 5);
    a.publish(Arc::new(fifth.clone())).await.unwrap();
    assert_eq!(next(&mut rx_b, "fifth").await, ("s".into(), fifth));
    assert_eq!(
        offsets_of(&sink_b, "s"),
        (1..=5).map(Some).collect::<Vec<_>>()
    );
    let len: i64 =
        redis::from_redis_value(on_port(master, redis::cmd("XLEN").arg(stream))).unwrap();
    assert_eq!(len, 5, "each in the history once");
    assert!(calls(master, "eval") > eval0, "NOSCRIPT answered by EVAL");
    assert!(
        calls(master, "evalsha") > sha0 + 1,
        "EVALSHA again once the script was back"
    );
    assert_nothing_else(&b, &mut rx_b, "s", "after the flush").await;
}

#[tokio::test]
async fn redis_publisher_runs_the_script_again_after_noscript() {
    init_tracing();
    let redis = RedisServer::start();
    let port = redis.port;
    script_lost(&RedisSetup::new(&redis), &[port], port, "ns:hist:s").await;
}

#[tokio::test]
async fn redis_cluster_publisher_runs_the_script_again_after_noscript() {
    init_tracing();
    let cluster = RedisCluster::start(3);
    let master = cluster.master_of("ns:hist:{s}");
    script_lost(
        &RedisSetup::cluster(&cluster),
        &cluster.ports,
        master,
        "ns:hist:{s}",
    )
    .await;
}

// ---------------------------------------------------------------------------
// A single Redis: the subscriber catches up after its connection is gone

/// How the subscriber loses its connection.
#[derive(Clone, Copy, Debug)]
enum SubscriberFault {
    /// `CLIENT KILL TYPE pubsub`: Redis keeps every history (same epochs).
    Killed,
    /// Redis SIGKILLed and started again empty (every epoch changes).
    RedisRestart,
}

/// Whether broker `b`'s subscription to `room` is live in Redis right now.
async fn subscribed(redis: &RedisServer, room: &str) -> bool {
    let mut c = redis.conn().await;
    let reply: Vec<redis::Value> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(format!("cu:room:{room}"))
        .query_async(&mut c)
        .await
        .unwrap();
    let n: i64 = redis::from_redis_value(reply[1].clone()).unwrap();
    n > 0
}

/// Node B's subscriber loses its connection while node A publishes. What A
/// published (and Redis acknowledged) while B was not subscribed reaches B
/// once it is back, in order, with no duplicate: in a busy room (more live
/// messages follow), a quiet one that had messages before (nothing follows:
/// only the catch-up can deliver them) and one that had none before.
async fn subscriber_catches_up(fault: SubscriberFault) {
    init_tracing();
    let mut redis = RedisServer::start();
    let setup = RedisSetup::new(&redis);
    let rooms = ["busy", "quiet", "fresh"];
    let Pair { a, b, mut rx_b, .. } = pair(&setup, "cu:", &rooms).await;
    let mut n = 0u64;
    let mut expect: Vec<(String, Event)> = Vec::new();
    // Before the fault: busy and quiet have history, fresh has none.
    for r in ["busy", "quiet"] {
        for _ in 0..3 {
            n += 1;
            let e = custom(&[r], n);
            a.publish(Arc::new(e.clone())).await.unwrap();
            expect.push((r.to_string(), e));
        }
    }
    for _ in 0..expect.len() {
        next(&mut rx_b, "before the fault").await;
    }
    // The subscriber's position of `fresh` is read right after its
    // SUBSCRIBE, in the background.
    tokio::time::sleep(Duration::from_millis(200)).await;
    expect.clear();

    match fault {
        SubscriberFault::Killed => {
            let mut c = redis.conn().await;
            let _: redis::Value = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("pubsub")
                .query_async(&mut c)
                .await
                .unwrap();
        }
        SubscriberFault::RedisRestart => {
            redis.kill();
            // Down long enough for the subscriber's backoff to grow.
            tokio::time::sleep(Duration::from_millis(1200)).await;
            redis.restart();
        }
    }
    // Published while B is not subscribed: counted only when Redis shows no
    // subscriber after the publish was acknowledged.
    let mut in_window = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    'window: loop {
        for r in rooms {
            n += 1;
            let e = custom(&[r], n);
            if a.publish(Arc::new(e.clone())).await.is_err() {
                // The publisher reconnects after the restart: not
                // acknowledged, not expected.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue 'window;
            }
            expect.push((r.to_string(), e));
            if subscribed(&redis, r).await {
                break 'window;
            }
            in_window += 1;
        }
        assert!(Instant::now() < deadline, "B never subscribed again");
    }
    assert!(
        in_window >= 3,
        "{fault:?}: only {in_window} publishes fell in the window; the test proves nothing"
    );
    wait_healthy(&b, true).await;
    // Busy goes on; quiet and fresh stay quiet.
    for _ in 0..3 {
        n += 1;
        let e = custom(&["busy"], n);
        a.publish(Arc::new(e.clone())).await.unwrap();
        expect.push(("busy".into(), e));
    }
    let mut got: Vec<(String, Event)> = Vec::new();
    for i in 0..expect.len() {
        got.push(
            next(
                &mut rx_b,
                &format!("{fault:?}: delivery {i} of {}", expect.len()),
            )
            .await,
        );
    }
    for r in rooms {
        let want: Vec<&Event> = expect
            .iter()
            .filter(|(x, _)| x == r)
            .map(|(_, e)| e)
            .collect();
        let have: Vec<&Event> = got.iter().filter(|(x, _)| x == r).map(|(_, e)| e).collect();
        assert_eq!(have, want, "{fault:?}: room {r} (in order, each once)");
    }
    for r in rooms {
        assert_nothing_else(&b, &mut rx_b, r, "after the catch-up").await;
    }
    eprintln!("{fault:?}: {in_window} publishes while B was not subscribed, all delivered");
}

#[tokio::test]
async fn redis_subscriber_catches_up_after_its_connection_is_killed() {
    subscriber_catches_up(SubscriberFault::Killed).await;
}

#[tokio::test]
async fn redis_subscriber_catches_up_after_redis_restarts_empty() {
    subscriber_catches_up(SubscriberFault::RedisRestart).await;
}

/// The cluster subscriber catches up too: node B's shard connection to the
/// master of a quiet room is killed, node A publishes to the room while B
/// has no sharded subscription there, and nothing more is published to it:
/// only the catch-up after B's resync can deliver those events.
#[tokio::test]
async fn redis_cluster_subscriber_catches_up_a_quiet_room() {
    init_tracing();
    let cluster = RedisCluster::start(3);
    let setup = RedisSetup::cluster(&cluster);
    let Pair { a, b, mut rx_b, .. } = pair(&setup, "cq:", &["q"]).await;
    let first = custom(&["q"], 1);
    a.publish(Arc::new(first.clone())).await.unwrap();
    assert_eq!(next(&mut rx_b, "first").await, ("q".into(), first));
    let master = cluster.master_of("cq:room:{q}");
    let listening = || -> bool {
        let v = cluster
            .on(
                master,
                redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg("cq:room:{q}"),
            )
            .unwrap();
        let v: Vec<redis::Value> = redis::from_redis_value(v).unwrap();
        redis::from_redis_value::<i64>(v[1].clone()).unwrap() > 0
    };
    assert!(listening());
    // Published only while B is seen not listening; then the room is quiet.
    // (A resubscribe can beat the first publish: tried again then.)
    let mut expect = Vec::new();
    let mut in_window = 0;
    let mut n = 1;
    for _attempt in 0..10 {
        cluster
            .on(
                master,
                redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"),
            )
            .unwrap();
        while !listening() {
            n += 1;
            let e = custom(&["q"], n);
            if a.publish(Arc::new(e.clone())).await.is_ok() {
                expect.push(e);
                in_window += 1;
            }
        }
        if in_window > 0 {
            break;
        }
    }
    assert!(
        in_window >= 1,
        "no publish fell between the kill and the resubscribe; the test proves nothing"
    );
    for (i, e) in expect.iter().enumerate() {
        let got = next(&mut rx_b, &format!("{i} of {}", expect.len())).await;
        assert_eq!(got, ("q".into(), e.clone()), "delivery {i}");
    }
    assert_nothing_else(&b, &mut rx_b, "q", "after the catch-up").await;
    eprintln!("{in_window} publishes while B had no sharded subscription, all delivered");
}

/// A room a node stopped wanting while Redis was down (its member left
/// during the outage) keeps no track: when a member joins it again later,
/// the node starts it from now. Before, the old epoch's track made the
/// first live message of the new epoch look like a gap, and the node
/// replayed the room's whole new epoch to the new member (the soak's
/// duplicates after a Redis restart).
#[tokio::test]
async fn a_room_left_during_an_outage_starts_afresh_when_joined_again() {
    init_tracing();
    let mut redis = RedisServer::start();
    let setup = RedisSetup::new(&redis);
    let Pair {
        a,
        b,
        sink_b,
        mut rx_b,
    } = pair(&setup, "af:", &["r"]).await;
    for n in 1..=3 {
        a.publish(Arc::new(custom(&["r"], n))).await.unwrap();
        next(&mut rx_b, "before the outage").await;
    }
    redis.kill();
    // The room's last member on B leaves while Redis is down.
    sink_b.want("r", false);
    let _ = b.reconcile("r").await;
    redis.restart();
    wait_healthy(&b, true).await;
    // The new epoch gets events B does not listen to.
    for n in 10..=14 {
        while a.publish(Arc::new(custom(&["r"], n))).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A member joins again: only what is published from now on.
    sink_b.want("r", true);
    b.reconcile("r").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let live = custom(&["r"], 20);
    a.publish(Arc::new(live.clone())).await.unwrap();
    assert_eq!(
        next(&mut rx_b, "the first event after the join").await,
        ("r".into(), live),
        "history from before the join was handed over"
    );
    assert_nothing_else(&b, &mut rx_b, "r", "after the join").await;
}
