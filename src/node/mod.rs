//! Wires the seams together and owns the node's life: start, readiness,
//! drain on shutdown.
//!
//! [`Node::start`] builds the rules' [`Ctx`] and the edges' [`App`] from a
//! [`Config`], binds the listener and returns; tests start several nodes in
//! one process this way.

pub(crate) mod app;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::{AnyBroker, Broker, BrokerError};
use crate::clock::{AnyClock, MemoryClock, RedisClock};
use crate::config::Config;
use crate::domain::{Ctx, Rules};
use crate::event::{Event, iso_now};
use crate::hub::Hub;
use crate::index::{AnyIndex, MemoryIndex, RedisIndex};
use crate::metrics as m;
use crate::node::app::{App, Health};
use crate::redis_conn::RedisError;
use crate::tls::Acceptor;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Db(#[from] crate::store::StoreError),
    #[error("{0}")]
    Redis(#[from] RedisError),
    #[error("redis: {0}")]
    RedisUrl(String),
    #[error("jwt: {0}")]
    Jwt(String),
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
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
                AnyBroker::Memory(MemoryBroker::new(hub.clone(), config.history)),
                AnyIndex::Memory(MemoryIndex::default()),
                AnyClock::Memory(MemoryClock::default()),
                None,
            ),
            Some(url) => {
                let redis = crate::redis_conn::Redis::open(url)
                    .map_err(|e| StartError::RedisUrl(e.to_string()))?;
                let broker = RedisBroker::start(
                    redis.clone(),
                    &config.redis_prefix,
                    hub.clone(),
                    stop.clone(),
                    config.history,
                );
                (
                    AnyBroker::Redis(broker),
                    AnyIndex::Redis(RedisIndex::new(redis.clone(), &config.redis_prefix)),
                    AnyClock::Redis(Box::new(RedisClock::new(
                        redis.clone(),
                        &config.redis_prefix,
                        config.offer_lease,
                    ))),
                    Some(redis),
                )
            }
        };
        let tls = config.tls.as_ref().map(Acceptor::load).transpose()?;
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
        let ctx = Arc::new(Ctx {
            db,
            broker,
            drivers,
            offers,
            rules: Rules::from_config(&config),
            relay: tokio::sync::Notify::new(),
            eligible_tries: Default::default(),
        });
        let app = Arc::new(App {
            config,
            ctx: ctx.clone(),
            hub,
            verifier,
            redis,
            drain: CancellationToken::new(),
            stop,
            tracker: TaskTracker::new(),
            health: Health::default(),
            metrics,
            started_at: iso_now(),
            dev_api_key,
            next_conn: AtomicU64::new(1),
            locations: Default::default(),
            drivers_here: Default::default(),
        });
        crate::health::check_once(&app).await;
        tokio::spawn(crate::health::run(app.clone()));
        match crate::domain::dispatch::reseed(&ctx).await {
            Ok(n) if n > 0 => tracing::info!(offers = n, "re-seeded open offer deadlines"),
            Ok(_) => {}
            // The clock's database sweep catches these up once Redis is back.
            Err(e) => tracing::warn!(error = %e, "could not re-seed offer deadlines"),
        }
        tokio::spawn(crate::domain::dispatch::run_clock(
            ctx.clone(),
            app.stop.clone(),
        ));
        tokio::spawn(crate::domain::dispatch::run_retry(
            ctx.clone(),
            app.config.node_id.clone(),
            app.stop.clone(),
        ));
        tokio::spawn(app.clone().run_presence());
        if ctx.sync_on() {
            tokio::spawn(crate::domain::sync::run(ctx.clone(), app.stop.clone()));
        }
        let relay = crate::domain::relay::Relay::new(
            &app.config.node_id,
            app.config.fault_hang_after_publish,
        );
        tokio::spawn(relay.run(ctx.clone(), app.stop.clone()));
        if let Some(tls) = &tls {
            tls.reload_on_sighup(app.stop.clone());
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let done = tokio::spawn(serve(listener, tls, app.clone()));
        tracing::info!(%addr, scheme, node_id = %app.config.node_id, mode = if app.redis.is_some() { "cluster" } else { "embedded" }, "switchboard listening");
        Ok(Node { addr, app, done })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn config(&self) -> &Config {
        &self.app.config
    }

    /// The token verifier (and, in dev mode, minter) this node runs with.
    pub fn verifier(&self) -> &Verifier {
        &self.app.verifier
    }

    /// The `/api/publish` key made up in dev mode (no `API_KEYS`, no
    /// `JWT_SECRET`); `None` otherwise.
    pub fn dev_api_key(&self) -> Option<&str> {
        self.app.dev_api_key.as_deref()
    }

    /// Publishes an event to its rooms on every node (what `/api/publish`
    /// does, for an embedder).
    pub async fn publish(&self, event: Event) -> Result<(), BrokerError> {
        self.app.ctx.broker.publish(Arc::new(event)).await
    }

    /// What `/metrics` serves (Prometheus text).
    pub fn render_metrics(&self) -> String {
        self.app.metrics.render()
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.app.is_ready()
    }

    /// Open sockets on this node.
    pub fn socket_count(&self) -> usize {
        self.app.hub.socket_count()
    }

    /// Hands `event` to this node's sockets in `room` as if the broker had
    /// delivered it (no other node hears it).
    pub fn deliver_local(&self, room: &str, event: &Event) {
        self.app.hub.deliver(room, None, event)
    }

    /// Readiness goes false at once while the node keeps serving (the
    /// SIGTERM delay before [`Node::shutdown`]).
    pub fn mark_unready(&self) {
        self.app.mark_unready();
    }

    /// Starts the drain: readiness goes false at once, no new connections,
    /// sockets get their queued frames and then close 1012.
    pub fn shutdown(&self) {
        self.app.mark_unready();
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
/// With `tls`, each connection's TLS handshake runs in its own task, with the
/// certificate current when it was accepted.
async fn serve(listener: TcpListener, tls: Option<Acceptor>, app: Arc<App>) {
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
        let tls = tls.as_ref().map(Acceptor::acceptor);
        let app2 = app.clone();
        app.tracker.spawn(async move {
            let Some(tls) = tls else {
                return serve_conn(app2, peer, TokioIo::new(tcp), draining).await;
            };
            match tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(stream)) => serve_conn(app2, peer, TokioIo::new(stream), draining).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
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

/// Serves one connection (plain TCP or TLS) until it ends or the drain
/// closes it.
async fn serve_conn<I>(app: Arc<App>, peer: SocketAddr, io: I, draining: bool)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let app3 = app.clone();
    let svc = service_fn(move |req| crate::http::handle(app3.clone(), peer, req));
    // A connection accepted while draining answers one request and
    // closes; older ones finish their request and close.
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .keep_alive(!draining)
        .serve_connection(io, svc)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    if draining {
        let _ = tokio::time::timeout(app.config.shutdown_grace, conn).await;
        return;
    }
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = app.drain.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(app.config.shutdown_grace, conn).await;
        }
    }
}
