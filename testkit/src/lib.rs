//! Process guards for switchboard's integration tests and load generator
//! (`redis-server`, node processes) that kill what they started on drop, a
//! free-port finder, a minimal HTTP/1 client and a token minter. It never
//! depends on the server crate: nodes are started as processes of its binary.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Runs a command on the Redis at 127.0.0.1:`port` (synchronously, on a
/// connection of its own; for setup and checks).
pub fn command_on(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    cmd.query(&mut conn)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A `redis-server` of our own on a free port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut r = RedisServer {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        // A port found free can be taken before the server binds it (by a
        // parallel test's server, or as some client's ephemeral port): then
        // another one.
        for _ in 0..10 {
            if r.launch() {
                return r;
            }
            r.port = free_port();
        }
        panic!("redis-server did not start on any of 10 free ports");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's process id while it runs (benchmarks read its CPU).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// (Re)starts the server on the same port and waits until it answers.
    pub fn restart(&mut self) {
        assert!(
            self.launch(),
            "redis-server did not start again on port {}",
            self.port
        );
    }

    /// Starts the server on `self.port`; false when it exited instead (the
    /// port was taken).
    fn launch(&mut self) -> bool {
        assert!(self.child.is_none(), "redis-server already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--maxclients", "20000"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test-all installs it)");
        let mut child = child;
        if !answers(&mut child, self.port) {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        self.child = Some(child);
        true
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A plain redis client connection, for assertions.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real Redis Cluster of our own: `masters` masters and `replicas`
/// replicas per master, each a `redis-server --cluster-enabled yes` on free
/// ports (client and bus port), joined by `redis-cli --cluster create`;
/// ready when every node reports `cluster_state:ok` (one master with no
/// replica takes every slot itself: `redis-cli` wants three nodes at least).
/// Every process is SIGKILLed on drop.
pub struct RedisCluster {
    /// Client ports, in the order given to `redis-cli --cluster create`
    /// (the masters first).
    pub ports: Vec<u16>,
    children: Vec<Option<Child>>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        RedisCluster::start_with(masters, 0)
    }

    pub fn start_with(masters: usize, replicas: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let n = masters * (1 + replicas);
        let mut c = RedisCluster {
            ports: Vec::new(),
            children: Vec::new(),
            _dir: dir,
        };
        for _ in 0..n {
            let (port, child) = (0..10)
                .find_map(|_| {
                    let (port, bus) = (free_port(), free_port());
                    let mut child = Command::new("redis-server")
                        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                        .args([
                            "--cluster-enabled",
                            "yes",
                            "--cluster-port",
                            &bus.to_string(),
                        ])
                        .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                        .args(["--cluster-node-timeout", "1000"])
                        // A replica may take over whatever its replication lag.
                        .args(["--cluster-replica-validity-factor", "0"])
                        .args(["--save", "", "--appendonly", "no", "--maxclients", "20000"])
                        .arg("--dir")
                        .arg(c._dir.path())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("redis-server must be installed (scripts/test-all installs it)");
                    if answers(&mut child, port) {
                        return Some((port, child));
                    }
                    // The port was taken before the server bound it.
                    let _ = child.kill();
                    let _ = child.wait();
                    None
                })
                .expect("a cluster node did not start on any of 10 free ports");
            c.ports.push(port);
            c.children.push(Some(child));
        }
        if n == 1 {
            // `redis-cli --cluster create` wants 3 masters at least: one
            // master takes every slot by itself (a benchmark's baseline).
            c.on(
                c.ports[0],
                redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(0).arg(16383),
            )
            .expect("CLUSTER ADDSLOTSRANGE on the only master");
        } else {
            let out = Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(c.ports.iter().map(|p| format!("127.0.0.1:{p}")))
                .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
                .output()
                .expect("redis-cli must be installed");
            assert!(
                out.status.success(),
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        c.wait_ok(Duration::from_secs(30));
        // Every replica has synced with its master (a failover test kills
        // one). A node that is still a bare master counts as nothing: right
        // after `--cluster create` the replicas may not be replicas yet.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let synced = c
                .ports
                .iter()
                .filter(|p| {
                    c.on(**p, redis::cmd("INFO").arg("replication"))
                        .ok()
                        .and_then(|v| redis::from_redis_value::<String>(v).ok())
                        .is_some_and(|info| {
                            info.contains("role:slave") && info.contains("master_link_status:up")
                        })
                })
                .count();
            if synced == masters * replicas {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{synced} of {} replicas synced",
                masters * replicas
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    /// `redis+cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The process ids of the nodes that run, in the order of `ports`
    /// (benchmarks read and cap their CPU).
    pub fn pids(&self) -> Vec<Option<u32>> {
        self.children
            .iter()
            .map(|c| c.as_ref().map(Child::id))
            .collect()
    }

    /// The live nodes' plain URLs.
    pub fn node_urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .zip(&self.children)
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }

    /// Runs a command on one node (synchronously; for setup and checks).
    pub fn on(&self, port: u16, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
        command_on(port, cmd)
    }

    /// Waits until every live node says `cluster_state:ok` and agrees on
    /// the masters of all 16384 slots.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self
                .ports
                .iter()
                .zip(&self.children)
                .filter(|(_, c)| c.is_some())
                .all(|(p, _)| {
                    self.on(*p, redis::cmd("CLUSTER").arg("INFO"))
                        .ok()
                        .and_then(|v| redis::from_redis_value::<String>(v).ok())
                        .is_some_and(|info| info.contains("cluster_state:ok"))
                });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis cluster not ok in {within:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The client port of the master that serves `key`'s slot now.
    pub fn master_of(&self, key: &str) -> u16 {
        let live = self
            .ports
            .iter()
            .zip(&self.children)
            .find(|(_, c)| c.is_some())
            .map(|(p, _)| *p)
            .expect("a live node");
        let slot: i64 = redis::from_redis_value(
            self.on(live, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
                .expect("CLUSTER KEYSLOT"),
        )
        .expect("a slot");
        // CLUSTER SLOTS: [[start, end, [host, port, id], replicas…], …]
        let slots: Vec<redis::Value> = redis::from_redis_value(
            self.on(live, redis::cmd("CLUSTER").arg("SLOTS"))
                .expect("CLUSTER SLOTS"),
        )
        .expect("slot ranges");
        for range in slots {
            let r: Vec<redis::Value> = redis::from_redis_value(range).expect("a range");
            let mut it = r.into_iter();
            let start: i64 = redis::from_redis_value(it.next().unwrap()).unwrap();
            let end: i64 = redis::from_redis_value(it.next().unwrap()).unwrap();
            if (start..=end).contains(&slot) {
                let master: Vec<redis::Value> =
                    redis::from_redis_value(it.next().unwrap()).unwrap();
                let port: i64 = redis::from_redis_value(master[1].clone()).unwrap();
                return port as u16;
            }
        }
        panic!("no master serves slot {slot} of {key:?}");
    }

    /// SIGKILLs the node on `port` (a master's replica then takes over).
    pub fn kill(&mut self, port: u16) {
        let i = self
            .ports
            .iter()
            .position(|p| *p == port)
            .expect("a node of this cluster");
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id of the node on `port` while it runs.
    pub fn pid(&self, port: u16) -> Option<u32> {
        let i = self.ports.iter().position(|p| *p == port)?;
        self.children[i].as_ref().map(Child::id)
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut() {
            if let Some(mut c) = c.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Waits until the `redis-server` just spawned answers on `port`; false
/// when it exited first (it could not bind). A PING answered while the
/// child is gone came from somebody else's server on that port.
fn answers(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        if ping(port) {
            // A server that failed to bind exits at once.
            std::thread::sleep(Duration::from_millis(30));
            return matches!(child.try_wait(), Ok(None));
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on {port} did not answer"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A `switchboard serve` process (or a binary that answers the same probes,
/// like the bench's `baseline`) on a free loopback port, SIGKILLed on drop.
pub struct NodeProcess {
    pub addr: SocketAddr,
    child: Option<Child>,
    /// The file stdout and stderr go to, in a temp dir that lives as long as
    /// the guard ([`Launch::log_file`]).
    log: Option<(PathBuf, tempfile::TempDir)>,
}

/// How to start a [`NodeProcess`]: `NodeProcess::launch(binary)`, then
/// options, then [`Launch::start`].
pub struct Launch {
    binary: PathBuf,
    env: Vec<(String, String)>,
    clean_env: bool,
    log_file: bool,
    probe: &'static str,
    within: Duration,
}

impl Launch {
    /// One more environment variable (applied after the defaults, in order).
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Launch {
        self.env.push((key.to_string(), value.into()));
        self
    }

    pub fn envs<V: AsRef<str>>(mut self, env: &[(&str, V)]) -> Launch {
        for (k, v) in env {
            self.env.push((k.to_string(), v.as_ref().to_string()));
        }
        self
    }

    /// Starts from an empty environment instead of inheriting this process's.
    pub fn clean_env(mut self) -> Launch {
        self.clean_env = true;
        self
    }

    /// Sends stdout and stderr to a file, readable with
    /// [`NodeProcess::log_text`] (default: stdout discarded, stderr inherited).
    pub fn log_file(mut self) -> Launch {
        self.log_file = true;
        self
    }

    /// Waits for `GET /readyz` to answer 200 instead of `GET /healthz`.
    pub fn wait_ready(mut self) -> Launch {
        self.probe = "/readyz";
        self
    }

    /// Waits only until the port accepts a TCP connection (a node serving
    /// TLS, which this crate's plain HTTP probe cannot ask; the caller
    /// probes over TLS itself).
    pub fn wait_listening(mut self) -> Launch {
        self.probe = "";
        self
    }

    /// How long to wait for the probe (default 30 s).
    pub fn within(mut self, within: Duration) -> Launch {
        self.within = within;
        self
    }

    /// Starts `binary serve` with `SWITCHBOARD_LISTEN` on a free port and
    /// `RUST_LOG` (this process's, or `warn`) before the given variables, and
    /// waits until the probe answers 200. Panics (with the log, when there is
    /// one) if the process exits first or the probe does not answer in time.
    pub async fn start(self) -> NodeProcess {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut cmd = Command::new(&self.binary);
        cmd.arg("serve");
        if self.clean_env {
            cmd.env_clear();
        }
        cmd.env("SWITCHBOARD_LISTEN", addr.to_string())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null());
        let log = if self.log_file {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("switchboard.log");
            let out = std::fs::File::create(&path).expect("log file");
            let err = out.try_clone().expect("log file");
            cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err));
            Some((path, dir))
        } else {
            cmd.stdout(Stdio::null());
            None
        };
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("{} does not start: {e}", self.binary.display());
        });
        let mut node = NodeProcess {
            addr,
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + self.within;
        loop {
            if self.probe.is_empty() {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    return node;
                }
            } else if let Ok((200, _)) = http(addr, "GET", self.probe, &[], None).await {
                return node;
            }
            if let Some(Ok(Some(status))) = node.child.as_mut().map(Child::try_wait) {
                node.child = None;
                panic!(
                    "{} exited ({status}) before {} answered:\n{}",
                    self.binary.display(),
                    self.probe,
                    node.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not answer {} within {:?}:\n{}",
                self.binary.display(),
                self.probe,
                self.within,
                node.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl NodeProcess {
    /// Starts `binary serve` with `env` (plus `SWITCHBOARD_LISTEN`) and waits
    /// until `/healthz` answers.
    pub async fn start(binary: &Path, env: &[(&str, String)]) -> NodeProcess {
        NodeProcess::launch(binary).envs(env).start().await
    }

    /// A start with options (clean environment, log file, readiness probe).
    pub fn launch(binary: impl Into<PathBuf>) -> Launch {
        Launch {
            binary: binary.into(),
            env: Vec::new(),
            clean_env: false,
            log_file: false,
            probe: "/healthz",
            within: Duration::from_secs(30),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the process wrote so far, when started with a log file
    /// (empty otherwise).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|(path, _)| std::fs::read_to_string(path).ok())
            .unwrap_or_default()
    }

    /// Waits up to `within` for the process to exit by itself (after a
    /// signal the test sent it): its exit status, or `None` while it runs.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.as_mut()?.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no drain, no cleanup, like a crashed machine.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP/1 request on a fresh connection; the status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Result<(u16, Bytes), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    // The caller's `Host`, if it gives one (tests of the Host check).
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", addr.to_string());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .map_err(|_| "http timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes))
}

/// An HS256 token for `claims` (an `exp` one hour ahead is added if missing).
pub fn mint(secret: &[u8], mut claims: serde_json::Value) -> String {
    if claims.get("exp").is_none() {
        claims["exp"] = serde_json::json!(jsonwebtoken::get_current_timestamp() + 3600);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("HS256 encodes")
}
