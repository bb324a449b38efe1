//! Nodes: in-process (`Node::start` behind [`TestNode`]) with a test
//! [`config`], or the real binary as a process ([`start_server`]), and the
//! `redis-server` guard from the testkit.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard::Node;
use switchboard::config::{Config, JwtKey};
#[allow(unused_imports)] // not every test binary uses them all
pub use switchboard_testkit::{NodeProcess, RedisCluster, RedisServer, free_port};

use super::{API_KEY, SECRET, TestDb, WAIT, http};

/// A node config for tests: loopback, free port, fixed secret and API key.
pub fn config(db: &TestDb, redis: Option<&RedisServer>, node_id: &str) -> Config {
    let mut c = Config::defaults();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.database_url = db.url.clone();
    c.redis_url = redis.map(RedisServer::url);
    c.jwt_key = JwtKey::Secret {
        secret: SECRET.as_bytes().to_vec(),
        generated: false,
    };
    c.api_keys = vec![API_KEY.into()];
    c.node_id = node_id.to_string();
    c.shutdown_grace = Duration::from_secs(5);
    c
}

/// A running node, drained and stopped on drop.
pub struct TestNode {
    pub node: Option<Node>,
    pub addr: SocketAddr,
}

impl TestNode {
    pub async fn start(config: Config) -> TestNode {
        let node = Node::start(config).await.expect("node starts");
        let addr = node.addr();
        TestNode {
            node: Some(node),
            addr,
        }
    }

    pub fn node(&self) -> &Node {
        self.node.as_ref().unwrap()
    }

    pub async fn stop(&mut self) {
        if let Some(n) = self.node.take() {
            n.stop().await;
        }
    }

    /// Waits until `/readyz` answers `ready` (or panics after `WAIT`).
    pub async fn wait_ready(&self, ready: bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, _) = http(self.addr, "GET", "/readyz", &[], None).await;
            if (status == 200) == ready {
                return;
            }
            assert!(Instant::now() < deadline, "readyz never became {ready}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn publish(&self, room: &str, ty: &str, data: Value) {
        let (s, b) = http(
            self.addr,
            "POST",
            "/api/publish",
            &[("x-api-key", API_KEY)],
            Some(json!({"room": room, "type": ty, "data": data})),
        )
        .await;
        assert_eq!(s, 204, "publish failed: {b}");
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(n) = self.node.take() {
            // Dropping without awaiting: start the drain so tasks end.
            n.shutdown();
        }
    }
}

/// The real `switchboard serve` binary with a clean environment, the tests'
/// settings and `env`, its output in a log file ([`NodeProcess::log_text`]),
/// ready on `/readyz`; SIGKILLed on drop.
pub async fn start_server(
    db: &TestDb,
    redis: &RedisServer,
    node_id: &str,
    env: &[(&str, &str)],
) -> NodeProcess {
    NodeProcess::launch(env!("CARGO_BIN_EXE_switchboard"))
        .clean_env()
        .log_file()
        .wait_ready()
        .within(WAIT)
        .env("REDIS_URL", redis.url())
        .env("DATABASE_URL", &db.url)
        .env("JWT_SECRET", SECRET)
        .env("API_KEYS", crate::common::API_KEY)
        .env("NODE_ID", node_id)
        .env("RUST_LOG", "info")
        .envs(env)
        .start()
        .await
}

/// Redis replicates asynchronously: what a replica has not received when
/// its master dies is gone (README "Known limits"). Failover tests call
/// this before the kill, so that on a loaded machine the replica holds at
/// least the run so far; publishes go on meanwhile and through the kill.
/// Waits (up to 10 s) until the replica of the master on `port` has acked
/// the master's replication offset as of now.
pub async fn replica_caught_up(port: u16) {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let c = client.get_multiplexed_async_connection().await.unwrap();
    let info = || {
        let mut c = c.clone();
        async move {
            let text: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut c)
                .await
                .unwrap();
            let field = |line: &str, key: &str| -> Option<u64> {
                line.split(',')
                    .find_map(|kv| kv.strip_prefix(key))
                    .and_then(|v| v.trim().parse().ok())
            };
            let master = text
                .lines()
                .find_map(|l| field(l, "master_repl_offset:"))
                .unwrap_or(0);
            let replica = text
                .lines()
                .filter(|l| l.starts_with("slave"))
                .filter_map(|l| field(l.split_once(':')?.1, "offset="))
                .max()
                .unwrap_or(0);
            (master, replica)
        }
    };
    let (target, _) = info().await;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while info().await.1 < target {
        assert!(
            std::time::Instant::now() < until,
            "the replica did not catch up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
