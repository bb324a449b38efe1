//! Redis connections shared by the Redis implementations of the seams
//! (broker, driver index, offer clock) and the health check: [`Redis`] (one
//! Redis through the bounded pool, or a Redis Cluster through the redis
//! crate's cluster client), [`Conn`], [`HotConn`] for hot paths, [`Keys`]
//! (key names with the cluster's hash tags) and [`timed`], which times a call
//! and counts its failures.
//!
//! `REDIS_URL=redis+cluster://host:port[,host:port…][/?query]` selects
//! cluster mode (SPEC §12): every `host:port` is a seed node, the query
//! (e.g. `password=…`) applies to every node. `rediss+cluster://` is the
//! same over TLS, as `rediss://` is for one Redis: the server's
//! certificate is checked against the system's roots (rustls-native-certs,
//! so `SSL_CERT_FILE` / `SSL_CERT_DIR` can name a private CA).

use std::future::Future;
use std::time::{Duration, Instant};

use crate::lock::lock;
use crate::metrics as m;

/// A Redis call that failed: the pool could not give a connection, the
/// command failed, or it timed out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisError {
    #[error("redis pool: {0}")]
    Pool(String),
    #[error("redis: {0}")]
    Command(String),
    #[error("redis timed out")]
    Timeout,
}

/// How long one Redis call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A pool of multiplexed Redis connections with bounded waits, so a hung
/// Redis turns into errors (and 503s) instead of stuck requests.
pub fn pool(url: &str) -> Result<deadpool_redis::Pool, RedisError> {
    let mut cfg = deadpool_redis::Config::from_url(url);
    let mut pool = deadpool_redis::PoolConfig::new(16);
    pool.timeouts.wait = Some(Duration::from_secs(2));
    pool.timeouts.create = Some(Duration::from_secs(2));
    pool.timeouts.recycle = Some(Duration::from_secs(2));
    cfg.pool = Some(pool);
    cfg.create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .map_err(|e| RedisError::Pool(e.to_string()))
}

/// The URL schemes that name a Redis Cluster (plain, TLS), and the scheme
/// of their seed nodes' URLs.
const CLUSTER_SCHEMES: [(&str, &str); 2] = [
    ("redis+cluster://", "redis://"),
    ("rediss+cluster://", "rediss://"),
];

/// The seed node URLs of a `redis+cluster://` URL (`redis://host:port/…`
/// each; `rediss://…` for `rediss+cluster://`), or `None` for a plain
/// `redis://` / `rediss://` URL.
pub fn cluster_nodes(url: &str) -> Option<Result<Vec<String>, String>> {
    let (scheme, rest, node_scheme) = CLUSTER_SCHEMES
        .iter()
        .find_map(|(scheme, node)| url.strip_prefix(scheme).map(|rest| (*scheme, rest, *node)))?;
    let (hosts, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("{node_scheme}{h}{tail}"))
        .collect();
    if nodes.is_empty() {
        return Some(Err(format!("{scheme} needs at least one host:port")));
    }
    Some(Ok(nodes))
}

/// The node's way to Redis: one server through the bounded pool, or a
/// cluster through one shared cluster connection (it keeps a multiplexed
/// connection per node, routes each command by its key's slot and follows
/// `MOVED`/`ASK`), made on first use and again after an error.
#[derive(Clone)]
pub struct Redis(std::sync::Arc<Inner>);

enum Inner {
    Single {
        pool: deadpool_redis::Pool,
        url: String,
    },
    Cluster(Box<Cluster>),
}

struct Cluster {
    nodes: Vec<String>,
    client: redis::cluster::ClusterClient,
    current: std::sync::Mutex<Option<redis::cluster_async::ClusterConnection>>,
}

impl Redis {
    /// Opens (lazily: nothing connects here) what `url` names.
    pub fn open(url: &str) -> Result<Redis, RedisError> {
        match cluster_nodes(url) {
            None => Ok(Redis(std::sync::Arc::new(Inner::Single {
                pool: pool(url)?,
                url: url.to_string(),
            }))),
            Some(nodes) => {
                let nodes = nodes.map_err(RedisError::Pool)?;
                let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(CALL_TIMEOUT)
                    .build()
                    .map_err(|e| RedisError::Pool(e.to_string()))?;
                Ok(Redis(std::sync::Arc::new(Inner::Cluster(Box::new(
                    Cluster {
                        nodes,
                        client,
                        current: std::sync::Mutex::new(None),
                    },
                )))))
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(*self.0, Inner::Cluster(_))
    }

    /// The seed node URLs in cluster mode.
    pub fn cluster_seeds(&self) -> Option<&[String]> {
        match &*self.0 {
            Inner::Single { .. } => None,
            Inner::Cluster(c) => Some(&c.nodes),
        }
    }

    /// A client for a dedicated pub/sub connection to the one Redis.
    pub(crate) fn single_client(&self) -> Option<Result<redis::Client, RedisError>> {
        match &*self.0 {
            Inner::Single { url, .. } => {
                Some(redis::Client::open(url.as_str()).map_err(|e| RedisError::Pool(e.to_string())))
            }
            Inner::Cluster(_) => None,
        }
    }

    /// A cluster client for sharded subscriptions (RESP3): every push
    /// (messages, confirmations, disconnections) goes to `push`. The
    /// crate tracks the subscriptions and re-subscribes them on the node
    /// that serves their slot after a reconnect or a slot move.
    pub(crate) fn cluster_subscriber(
        &self,
        push: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ) -> Option<Result<redis::cluster::ClusterClient, RedisError>> {
        match &*self.0 {
            Inner::Single { .. } => None,
            Inner::Cluster(c) => Some(
                redis::cluster::ClusterClientBuilder::new(c.nodes.clone())
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(push)
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(CALL_TIMEOUT)
                    .build()
                    .map_err(|e| RedisError::Pool(e.to_string())),
            ),
        }
    }

    /// A connection: a pooled one (returned to the pool at once, it is
    /// multiplexed) or the shared cluster connection.
    pub async fn get(&self) -> Result<Conn, RedisError> {
        match &*self.0 {
            Inner::Single { pool, .. } => {
                let obj = pool
                    .get()
                    .await
                    .map_err(|e| RedisError::Pool(e.to_string()))?;
                Ok(Conn::Single((*obj).clone()))
            }
            Inner::Cluster(cl) => {
                if let Some(c) = lock(&cl.current).clone() {
                    return Ok(Conn::Cluster(c));
                }
                let c = tokio::time::timeout(CALL_TIMEOUT, cl.client.get_async_connection())
                    .await
                    .map_err(|_| RedisError::Timeout)?
                    .map_err(|e| RedisError::Pool(e.to_string()))?;
                *lock(&cl.current) = Some(c.clone());
                Ok(Conn::Cluster(c))
            }
        }
    }

    /// Forget the cluster connection after an error (the next call makes a
    /// new one from the seeds); a no-op for one Redis.
    pub fn broken(&self) {
        if let Inner::Cluster(c) = &*self.0 {
            *lock(&c.current) = None;
        }
    }
}

/// One connection of either kind; commands, pipelines and scripts run on it
/// alike (a cluster pipeline must stay in one slot).
#[derive(Clone)]
pub enum Conn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Key names. On one Redis a family's keys are `{prefix}{family}:…` (as
/// they always were); on a cluster the family is a hash tag,
/// `{prefix}{{family}}:…`, so every key of the family (and every Lua
/// script over them) lives in one slot.
#[derive(Clone, Debug)]
pub struct Keys {
    pub prefix: String,
    pub cluster: bool,
}

impl Keys {
    pub fn new(prefix: &str, cluster: bool) -> Keys {
        Keys {
            prefix: prefix.to_string(),
            cluster,
        }
    }

    /// `sb:drivers` on one Redis, `sb:{drivers}` on a cluster.
    pub fn family(&self, family: &str) -> String {
        if self.cluster {
            format!("{}{{{family}}}", self.prefix)
        } else {
            format!("{}{family}", self.prefix)
        }
    }

    /// A city's partition on a cluster: `sb:{c1}` (city 0 for none, `{c0}`).
    /// Keys under it (`sb:{c1}:drivers:geo`, `sb:{c1}:offers:due`, …) share
    /// one slot, so a script over one city's keys stays in one slot.
    pub fn city(&self, city: i64) -> String {
        format!("{}{{c{city}}}", self.prefix)
    }

    /// The registry of cities with a partition (`sb:{cities}`, a set):
    /// what the operations that span cities (claiming deadlines, an admin's
    /// nearby) go over on a cluster.
    pub fn cities(&self) -> String {
        self.family("cities")
    }

    /// The set of live node ids (`sb:nodes`; `sb:{nodes}` on a cluster).
    pub fn nodes(&self) -> String {
        self.family("nodes")
    }

    /// A node's heartbeat line (`sb:node:<id>`; `sb:{nodes}:node:<id>` on a
    /// cluster, in the slot of [`Keys::nodes`] so one pipeline writes both).
    pub fn node(&self, id: &str) -> String {
        if self.cluster {
            format!("{}:node:{id}", self.nodes())
        } else {
            format!("{}node:{id}", self.prefix)
        }
    }
}

/// The cities with a partition on a cluster ([`Keys::cities`]): a city is
/// registered (`SADD`) the first time this node writes its partition, and
/// remembered, so a position costs no extra command; the list is read back
/// (`SMEMBERS`) at most once per `max_age` for the operations that span
/// cities.
pub(crate) struct CityRegistry {
    key: String,
    known: std::sync::Mutex<std::collections::BTreeSet<i64>>,
    listed: std::sync::Mutex<Option<Instant>>,
}

impl CityRegistry {
    pub(crate) fn new(keys: &Keys) -> CityRegistry {
        CityRegistry {
            key: keys.cities(),
            known: Default::default(),
            listed: std::sync::Mutex::new(None),
        }
    }

    /// Registers the cities not registered by this node yet (one `SADD`
    /// for all of them, none when all are known).
    pub(crate) async fn register(
        &self,
        conn: &mut Conn,
        cities: impl IntoIterator<Item = i64>,
    ) -> Result<(), RedisError> {
        let new: Vec<i64> = {
            let known = lock(&self.known);
            let mut new: Vec<i64> = cities.into_iter().filter(|c| !known.contains(c)).collect();
            new.sort_unstable();
            new.dedup();
            new
        };
        if new.is_empty() {
            return Ok(());
        }
        timed(
            "cities",
            redis::cmd("SADD").arg(&self.key).arg(&new).exec_async(conn),
        )
        .await?;
        lock(&self.known).extend(new);
        Ok(())
    }

    /// Every registered city: those this node registered, and the
    /// registry as read at most `max_age` ago.
    pub(crate) async fn all(
        &self,
        conn: &mut Conn,
        max_age: Duration,
    ) -> Result<Vec<i64>, RedisError> {
        let stale = lock(&self.listed).is_none_or(|t| t.elapsed() >= max_age);
        if stale {
            let listed: Vec<i64> = timed(
                "cities",
                redis::cmd("SMEMBERS").arg(&self.key).query_async(conn),
            )
            .await?;
            lock(&self.known).extend(listed);
            *lock(&self.listed) = Some(Instant::now());
        }
        Ok(lock(&self.known).iter().copied().collect())
    }
}

/// A shared multiplexed Redis connection for hot paths (positions, offer
/// deadlines): each call clones it (no pool checkout, no recycle PING per
/// command — CRATES.md measured that as a full extra round trip) and
/// concurrent commands pipeline on it. After an error it is dropped and the
/// next call takes a fresh one from the pool.
pub(crate) struct HotConn {
    redis: Redis,
    current: std::sync::Mutex<Option<Conn>>,
}

impl HotConn {
    pub(crate) fn new(redis: Redis) -> HotConn {
        HotConn {
            redis,
            current: std::sync::Mutex::new(None),
        }
    }

    pub(crate) async fn get(&self) -> Result<Conn, RedisError> {
        if let Some(c) = lock(&self.current).clone() {
            return Ok(c);
        }
        let c = self.redis.get().await?;
        *lock(&self.current) = Some(c.clone());
        Ok(c)
    }

    /// Forget the connection after an error.
    pub(crate) fn broken(&self) {
        *lock(&self.current) = None;
        self.redis.broken();
    }
}

/// Times a Redis call and counts its errors under `op`.
pub(crate) async fn timed<T, E: std::fmt::Display>(
    op: &'static str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, RedisError> {
    let start = Instant::now();
    let r = tokio::time::timeout(CALL_TIMEOUT, f).await;
    metrics::histogram!(m::REDIS_DURATION, "op" => op).record(start.elapsed().as_secs_f64());
    let r = match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(RedisError::Command(e.to_string())),
        Err(_) => Err(RedisError::Timeout),
    };
    if r.is_err() {
        metrics::counter!(m::REDIS_ERRORS, "op" => op).increment(1);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_name_their_seeds() {
        assert_eq!(cluster_nodes("redis://127.0.0.1:6379/"), None);
        assert_eq!(
            cluster_nodes("redis+cluster://10.0.0.1:7000,10.0.0.2:7001").unwrap(),
            Ok(vec![
                "redis://10.0.0.1:7000/".to_string(),
                "redis://10.0.0.2:7001/".to_string()
            ])
        );
        assert_eq!(
            cluster_nodes("redis+cluster://h:1/?password=x").unwrap(),
            Ok(vec!["redis://h:1/?password=x".to_string()])
        );
        assert!(cluster_nodes("redis+cluster://").unwrap().is_err());
        assert_eq!(cluster_nodes("rediss://h:1/"), None);
        assert_eq!(
            cluster_nodes("rediss+cluster://10.0.0.1:7000,10.0.0.2:7001/?password=x").unwrap(),
            Ok(vec![
                "rediss://10.0.0.1:7000/?password=x".to_string(),
                "rediss://10.0.0.2:7001/?password=x".to_string()
            ])
        );
        assert!(cluster_nodes("rediss+cluster://").unwrap().is_err());
    }

    #[test]
    fn keys_keep_single_names_and_tag_cluster_families() {
        let one = Keys::new("sb:", false);
        assert_eq!(one.family("drivers"), "sb:drivers");
        assert_eq!(
            (one.nodes(), one.node("n1")),
            ("sb:nodes".into(), "sb:node:n1".into())
        );
        let many = Keys::new("sb:", true);
        assert_eq!(many.family("drivers"), "sb:{drivers}");
        assert_eq!(
            (many.city(1), many.city(0), many.cities()),
            ("sb:{c1}".into(), "sb:{c0}".into(), "sb:{cities}".into())
        );
        assert_eq!(
            (many.nodes(), many.node("n1")),
            ("sb:{nodes}".into(), "sb:{nodes}:node:n1".into())
        );
    }
}
