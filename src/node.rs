//! Wires the seams together and owns the node's life: start, readiness,
//! drain on shutdown.
//!
//! [`App`] is the state every request and socket shares. [`Node::start`]
//! builds it from a [`Config`], binds the listener and returns; tests start
//! several nodes in one process this way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use sea_orm::DatabaseConnection;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Identity, Verifier};
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::{AnyBroker, Broker, BrokerError, Sink};
use crate::config::Config;
use crate::dispatch::clock::{AnyClock, MemoryClock, RedisClock};
use crate::dispatch::index::{AnyIndex, MemoryIndex, RedisIndex};
use crate::event::{Event, iso_now};
use crate::http::ApiError;
use crate::hub::{ConnId, Hub, Outbox};
use crate::metrics as m;
use crate::ws::dialect::Location;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Db(#[from] crate::store::StoreError),
    #[error("redis: {0}")]
    Redis(String),
    #[error("jwt: {0}")]
    Jwt(String),
}

impl Sink for Hub {
    fn deliver(&self, room: &str, event: &Event) {
        Hub::deliver(self, room, event)
    }
    fn deliver_batch(&self, batch: &[(String, Event)]) {
        Hub::deliver_batch(self, batch.iter().map(|(r, e)| (r.as_str(), e)))
    }
    fn wants(&self, room: &str) -> bool {
        self.has_room(room)
    }
    fn rooms(&self) -> Vec<String> {
        Hub::rooms(self)
    }
}

/// What readiness is made of; refreshed by the health task every second and
/// at once when the broker loses Redis.
#[derive(Default)]
pub struct Health {
    pub redis_ok: AtomicBool,
    pub db_ok: AtomicBool,
    pub draining: AtomicBool,
}

/// The state shared by every request and socket of one node.
pub struct App {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub broker: AnyBroker,
    pub drivers: AnyIndex,
    pub offers: AnyClock,
    pub verifier: Verifier,
    pub redis: Option<deadpool_redis::Pool>,
    pub db: DatabaseConnection,
    /// Cancelled when the drain starts: stop accepting, close sockets 1012.
    pub drain: CancellationToken,
    /// Cancelled when the drain is over: background tasks stop.
    pub stop: CancellationToken,
    /// Every connection task, so the drain can wait for them.
    pub tracker: TaskTracker,
    pub health: Health,
    pub metrics: PrometheusHandle,
    pub started_at: String,
    /// A key for `/api/publish` made up in dev mode (no `API_KEYS`).
    pub dev_api_key: Option<String>,
    next_conn: AtomicU64,
}

impl App {
    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether order changes are written to the sync outbox (`SYNC_URL` set).
    pub fn sync_on(&self) -> bool {
        self.config.sync_url.is_some()
    }

    pub fn is_ready(&self) -> bool {
        !self.health.draining.load(Ordering::Relaxed)
            && self.health.db_ok.load(Ordering::Relaxed)
            && (self.redis.is_none()
                || (self.health.redis_ok.load(Ordering::Relaxed) && self.broker.is_healthy()))
    }

    /// Adds a socket to a room; resolves once the room is live cluster-wide.
    pub async fn join(&self, outbox: &Arc<Outbox>, room: &str) -> Result<(), BrokerError> {
        self.hub.add(room, outbox);
        self.broker.reconcile(room).await
    }

    /// Removes a socket from a room; the last local member out unsubscribes
    /// the node (in the background: nobody waits for it).
    pub fn leave(self: &Arc<Self>, id: ConnId, room: &str) {
        if self.hub.remove(room, id) {
            let app = self.clone();
            let room = room.to_string();
            tokio::spawn(async move {
                let _ = app.broker.reconcile(&room).await;
            });
        }
    }

    /// Publishes an event to its rooms on every node.
    pub async fn publish(&self, event: Event) -> Result<(), ApiError> {
        self.broker
            .publish(Arc::new(event))
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))
    }

    /// A driver's open offers for `initial_orders`.
    pub async fn initial_orders(&self, identity: &Identity) -> Result<Vec<Value>, ApiError> {
        crate::dispatch::open_offers(self, identity).await
    }

    /// A driver reported its position over its socket.
    pub async fn driver_location(&self, id: &Identity, loc: Location) -> Result<(), ApiError> {
        crate::dispatch::driver_location(self, id, loc).await
    }

    /// This node's line of `/api/stats`.
    pub fn node_stats(&self) -> Value {
        json!({
            "node_id": self.config.node_id,
            "sockets": self.hub.socket_count(),
            "rooms": self.hub.room_count(),
            "messages_out": self.hub.frames_out(),
            "started_at": self.started_at,
            "last_seen": iso_now(),
        })
    }
}

/// A running node.
pub struct Node {
    addr: SocketAddr,
    app: Arc<App>,
    done: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Connects the database (running migrations unless disabled) and Redis,
    /// binds the listener and starts serving. Returns once the port is bound.
    pub async fn start(config: Config) -> Result<Node, StartError> {
        let metrics = m::install();
        let verifier = Verifier::new(&config).map_err(|e| StartError::Jwt(e.to_string()))?;
        let db = crate::store::connect(&config.database_url, config.migrate).await?;
        let hub = Arc::new(Hub::default());
        let stop = CancellationToken::new();
        let (broker, drivers, offers, redis) = match &config.redis_url {
            None => (
                AnyBroker::Memory(MemoryBroker::new(hub.clone())),
                AnyIndex::Memory(MemoryIndex::default()),
                AnyClock::Memory(MemoryClock::default()),
                None,
            ),
            Some(url) => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| StartError::Redis(e.to_string()))?;
                let pool = crate::store::redis_pool(url).map_err(StartError::Redis)?;
                let broker = RedisBroker::start(
                    client,
                    pool.clone(),
                    &config.redis_prefix,
                    hub.clone(),
                    stop.clone(),
                );
                (
                    AnyBroker::Redis(broker),
                    AnyIndex::Redis(RedisIndex::new(pool.clone(), &config.redis_prefix)),
                    AnyClock::Redis(RedisClock::new(
                        pool.clone(),
                        &config.redis_prefix,
                        config.offer_lease,
                    )),
                    Some(pool),
                )
            }
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let dev_api_key = (config.api_keys.is_empty()
            && matches!(
                config.jwt_key,
                crate::config::JwtKey::Secret {
                    generated: true,
                    ..
                }
            ))
        .then(|| {
            use rand::Rng;
            let n: u128 = rand::rng().random();
            format!("dev-{n:032x}")
        });
        let app = Arc::new(App {
            config,
            hub,
            broker,
            drivers,
            offers,
            verifier,
            redis,
            db,
            drain: CancellationToken::new(),
            stop,
            tracker: TaskTracker::new(),
            health: Health::default(),
            metrics,
            started_at: iso_now(),
            dev_api_key,
            next_conn: AtomicU64::new(1),
        });
        crate::health::check_once(&app).await;
        tokio::spawn(crate::health::run(app.clone()));
        match crate::dispatch::reseed(&app).await {
            Ok(n) if n > 0 => tracing::info!(offers = n, "re-seeded open offer deadlines"),
            Ok(_) => {}
            // The clock's database sweep catches these up once Redis is back.
            Err(e) => tracing::warn!(error = %e, "could not re-seed offer deadlines"),
        }
        tokio::spawn(crate::dispatch::run_clock(app.clone()));
        if app.sync_on() {
            tokio::spawn(crate::domain::sync::run(app.clone()));
        }
        let done = tokio::spawn(serve(listener, app.clone()));
        tracing::info!(%addr, node_id = %app.config.node_id, mode = if app.redis.is_some() { "cluster" } else { "embedded" }, "switchboard listening");
        Ok(Node { addr, app, done })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Starts the drain: readiness goes false at once, no new connections,
    /// sockets get their queued frames and then close 1012.
    pub fn shutdown(&self) {
        self.app.health.draining.store(true, Ordering::Relaxed);
        metrics::gauge!(m::READY).set(0.0);
        self.app.drain.cancel();
    }

    /// Waits for the drain to finish (at most `SHUTDOWN_GRACE_SECS`).
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    pub async fn stop(self) {
        self.shutdown();
        self.wait().await;
    }
}

/// How long a draining node keeps answering new HTTP connections (readiness
/// 503, upgrades refused, API requests served) so probes and load balancers
/// see it go unready instead of refused connections: a fifth of the grace
/// period, at most 5 s.
fn drain_linger(grace: Duration) -> Duration {
    (grace / 5).min(Duration::from_secs(5))
}

/// Accepts connections until the drain has lingered, then waits for every
/// connection task (bounded by the grace period) and stops background tasks.
async fn serve(listener: TcpListener, app: Arc<App>) {
    let mut linger_until: Option<tokio::time::Instant> = None;
    loop {
        let until = linger_until;
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = app.drain.cancelled(), if until.is_none() => {
                linger_until = Some(tokio::time::Instant::now() + drain_linger(app.config.shutdown_grace));
                continue;
            }
            _ = tokio::time::sleep_until(until.unwrap_or_else(tokio::time::Instant::now)), if until.is_some() => break,
        };
        let _ = tcp.set_nodelay(true);
        let draining = linger_until.is_some();
        let app2 = app.clone();
        app.tracker.spawn(async move {
            let app3 = app2.clone();
            let svc = service_fn(move |req| crate::http::handle(app3.clone(), peer, req));
            // A connection accepted while draining answers one request and
            // closes; older ones finish their request and close.
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .keep_alive(!draining)
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            if draining {
                let _ = tokio::time::timeout(app2.config.shutdown_grace, conn).await;
                return;
            }
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = app2.drain.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(app2.config.shutdown_grace, conn).await;
                }
            }
        });
    }
    drop(listener);
    app.tracker.close();
    if tokio::time::timeout(app.config.shutdown_grace, app.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain grace period over with connections still open");
    }
    app.stop.cancel();
    tracing::info!("drained");
}
