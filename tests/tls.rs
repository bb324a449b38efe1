//! Native TLS (SPEC §12): a real `switchboard` process with `TLS_CERT_FILE`
//! and `TLS_KEY_FILE` made by the test (rcgen: a CA and a server certificate
//! for `localhost` / `127.0.0.1`) serves the HTTP API, the probes, `/metrics`
//! and the socket endpoints over TLS on its one port; the Rust client
//! connects with `wss://`, trusting that CA. Then the files are replaced by a
//! certificate of another CA and the process gets SIGHUP: a new connection
//! sees the new certificate (its DER, its issuer's trust), the sockets opened
//! before keep receiving; a bad file on the next SIGHUP is logged and the
//! node keeps the certificate it has. Half a pair of settings, or a file that
//! does not parse, stops the start with a named error. Nodes also reach
//! Redis over TLS (`rediss://`, `rediss+cluster://`) against a TLS-only
//! `redis-server` with a certificate of the test's CA.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::{Value, json};
use switchboard_client::reconnect::{Client, ClientConfig, ClientEvent};
use switchboard_client::{Incoming, Socket, Tls};
use switchboard_testkit::{Launch, NodeProcess, mint};

const SECRET: &str = "tls-test-secret-0123456789abcdef";
const API_KEY: &str = "tls-test-key";
const WAIT: Duration = Duration::from_secs(10);

/// A CA and a server certificate it signed, in PEM, and the server
/// certificate's DER (what a client sees in the handshake).
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    cert_der: Vec<u8>,
}

fn pki(ca_name: &str) -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, format!("switchboard node ({ca_name})"));
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &ca).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().to_vec(),
    }
}

impl Pki {
    /// Writes the key, then the certificate (a renewal tool's order).
    fn install(&self, dir: &Path) {
        std::fs::write(dir.join("key.pem"), &self.key_pem).unwrap();
        std::fs::write(dir.join("cert.pem"), &self.cert_pem).unwrap();
    }

    fn trust(&self, server_name: &str) -> Tls {
        Tls::trusting_pem(self.ca_pem.as_bytes(), server_name).unwrap()
    }
}

/// The node binary with what every node of this file has: its own SQLite
/// file in `dir`, the test's secret and API key, node id `id`.
fn launch(dir: &Path, id: &str) -> Launch {
    NodeProcess::launch(env!("CARGO_BIN_EXE_switchboard"))
        .clean_env()
        .log_file()
        .wait_listening()
        .within(WAIT * 3)
        .env(
            "DATABASE_URL",
            format!(
                "sqlite://{}?mode=rwc",
                dir.join(format!("{id}.db")).display()
            ),
        )
        .env("JWT_SECRET", SECRET)
        .env("API_KEYS", API_KEY)
        .env("NODE_ID", id)
        .env("RUST_LOG", "info")
}

async fn start_node(dir: &Path) -> NodeProcess {
    launch(dir, "tls")
        .env("SHUTDOWN_GRACE_SECS", "3")
        .env("TLS_CERT_FILE", dir.join("cert.pem").display().to_string())
        .env("TLS_KEY_FILE", dir.join("key.pem").display().to_string())
        .start()
        .await
}

/// One HTTPS request on a fresh connection: status and body.
async fn https(
    addr: SocketAddr,
    tls: &Tls,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Result<(u16, String), String> {
    let io = switchboard_client::connect_stream(addr, None, Some(tls))
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = req.body(Full::new(Bytes::from(body))).unwrap();
    let res = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let bytes = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

async fn publish(addr: SocketAddr, tls: &Tls, ty: &str) {
    let body = json!({"room": "admin-orders", "type": ty, "data": {"n": ty}});
    let (status, text) = https(
        addr,
        tls,
        "POST",
        "/api/publish",
        &[("x-api-key", API_KEY)],
        Some(body),
    )
    .await
    .expect("publish over https");
    assert_eq!(status, 204, "publish: {text}");
}

/// The certificate the node presents to a new connection, or the handshake
/// error.
async fn presented(addr: SocketAddr, tls: &Tls) -> Result<Vec<u8>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let stream = tls.wrap(tcp).await.map_err(|e| e.to_string())?;
    let (_, session) = stream.get_ref();
    let chain = session.peer_certificates().ok_or("no certificate")?;
    Ok(chain[0].to_vec())
}

/// The next text frame's `type` on a raw socket (skipping none).
async fn next_type(sock: &mut Socket) -> String {
    let got = tokio::time::timeout(WAIT, sock.recv())
        .await
        .expect("a frame in time");
    match got {
        Some(Incoming::Text(b)) => {
            let v: Value = serde_json::from_slice(&b).unwrap();
            v["type"].as_str().unwrap_or_default().to_string()
        }
        other => panic!("socket ended: {other:?}"),
    }
}

async fn next_message(c: &mut Client, ty: &str) {
    tokio::time::timeout(WAIT, async {
        loop {
            match c.next_event().await.expect("client ended") {
                ClientEvent::Message(v) if v["type"] == ty => return,
                ClientEvent::Message(_) | ClientEvent::Connected => {}
                other => panic!("the client left its connection: {other:?}"),
            }
        }
    })
    .await
    .expect("the message did not come");
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signal(node: &NodeProcess, sig: &str) {
    let pid = node.pid().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

fn hangup(node: &NodeProcess) {
    signal(node, "-HUP");
}

#[tokio::test]
async fn wss_and_https_on_one_port_and_a_certificate_renewed_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let one = pki("switchboard test CA one");
    one.install(dir.path());
    let node = start_node(dir.path()).await;
    let addr = node.addr;
    let trust_one = one.trust("localhost");

    // HTTP over TLS: probes, metrics, the API.
    wait_until("GET /readyz over https", || async {
        matches!(
            https(addr, &trust_one, "GET", "/readyz", &[], None).await,
            Ok((200, _))
        )
    })
    .await;
    let (s, _) = https(addr, &trust_one, "GET", "/healthz", &[], None)
        .await
        .unwrap();
    assert_eq!(s, 200);
    let (s, metrics) = https(addr, &trust_one, "GET", "/metrics", &[], None)
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert!(metrics.contains("switchboard_sockets_open"), "{metrics}");
    assert_eq!(presented(addr, &trust_one).await.unwrap(), one.cert_der);
    // By IP address too (the certificate names 127.0.0.1).
    let by_ip = one.trust("127.0.0.1");
    assert_eq!(presented(addr, &by_ip).await.unwrap(), one.cert_der);

    // Plain HTTP on the TLS port gets no answer it can read.
    let plain = switchboard_testkit::http(addr, "GET", "/healthz", &[], None).await;
    assert!(
        plain.is_err(),
        "plain HTTP answered on the TLS port: {plain:?}"
    );

    // wss: a raw socket (rooms dialect) and the reconnecting client (events
    // dialect), both on certificate one.
    let admin = mint(
        SECRET.as_bytes(),
        json!({"sub": "1", "role": "admin", "exp": 4_000_000_000u64}),
    );
    let mut old = Socket::connect_with(
        addr,
        &format!("/?token={admin}"),
        None,
        64,
        Some(&trust_one),
    )
    .await
    .expect("wss connect");
    assert_eq!(next_type(&mut old).await, "connected");
    // The other two endpoints over the same TLS port.
    let mut events = Socket::connect_with(
        addr,
        &format!("/ws?token={admin}"),
        None,
        64,
        Some(&trust_one),
    )
    .await
    .expect("wss /ws");
    assert_eq!(next_type(&mut events).await, "CONNECTED");
    let driver = mint(
        SECRET.as_bytes(),
        json!({"sub": "7", "role": "driver", "driver_id": 7, "city_id": 1}),
    );
    let mut drv = Socket::connect_with(
        addr,
        &format!("/ws/driver/orders/?token={driver}"),
        None,
        64,
        Some(&trust_one),
    )
    .await
    .expect("wss driver endpoint");
    assert_eq!(next_type(&mut drv).await, "connection_established");
    drop((events, drv));
    let mut config = ClientConfig::new(addr, "/", &admin);
    config.tls = Some(trust_one.clone());
    let mut client = Client::start(config);
    match tokio::time::timeout(WAIT, client.next_event()).await {
        Ok(Some(ClientEvent::Connected)) => {}
        other => panic!("the client did not connect over wss: {other:?}"),
    }
    next_message(&mut client, "connected").await;
    publish(addr, &trust_one, "before-reload").await;
    assert_eq!(next_type(&mut old).await, "before-reload");
    next_message(&mut client, "before-reload").await;

    // Renewal: another CA's certificate in the same files, then SIGHUP.
    let two = pki("switchboard test CA two");
    two.install(dir.path());
    hangup(&node);
    let trust_two = two.trust("localhost");
    wait_until("the new certificate on a new connection", || async {
        presented(addr, &trust_two).await.as_deref() == Ok(&two.cert_der[..])
    })
    .await;
    let refused = presented(addr, &trust_one).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("certificate")),
        "a client trusting only the old CA: {refused:?}"
    );
    let mut new = Socket::connect_with(
        addr,
        &format!("/?token={admin}"),
        None,
        64,
        Some(&trust_two),
    )
    .await
    .expect("wss connect with the new certificate");
    assert_eq!(next_type(&mut new).await, "connected");

    // The sockets opened on certificate one are still there and receive.
    publish(addr, &trust_two, "after-reload").await;
    assert_eq!(next_type(&mut old).await, "after-reload");
    assert_eq!(next_type(&mut new).await, "after-reload");
    next_message(&mut client, "after-reload").await;
    old.send_text(r#"{"type":"ping"}"#).await.unwrap();
    assert_eq!(next_type(&mut old).await, "pong");

    // A bad renewal: the error is logged, the node keeps certificate two.
    std::fs::write(dir.path().join("cert.pem"), "not a certificate\n").unwrap();
    hangup(&node);
    wait_until("the failed reload in the log", || async {
        node.log_text().contains("TLS reload failed")
    })
    .await;
    assert_eq!(presented(addr, &trust_two).await.unwrap(), two.cert_der);
    let (s, _) = https(addr, &trust_two, "GET", "/readyz", &[], None)
        .await
        .unwrap();
    assert_eq!(s, 200);
    publish(addr, &trust_two, "after-bad-reload").await;
    assert_eq!(next_type(&mut old).await, "after-bad-reload");
    let log = node.log_text();
    assert!(log.contains("TLS certificate reloaded"), "{log}");
    // The image's HEALTHCHECK speaks TLS when the node does.
    let cert = dir.path().join("cert.pem").display().to_string();
    let (ok, out) = healthcheck(&[
        ("SWITCHBOARD_LISTEN", format!("0.0.0.0:{}", addr.port())),
        ("TLS_CERT_FILE", cert),
    ]);
    assert!(ok, "healthcheck over TLS: {out}");
    let listening = log.lines().find(|l| l.contains("switchboard listening"));
    assert!(listening.is_some_and(|l| l.contains("https")), "{log}");

    // SIGTERM: a TLS socket gets its 1012 through the relay, and the node
    // exits 0 within the grace period.
    let mut node = node;
    signal(&node, "-TERM");
    let code = tokio::time::timeout(WAIT, async {
        loop {
            match old.recv().await {
                Some(Incoming::Close(code)) => return code,
                Some(Incoming::Text(_)) => {}
                None => return 0,
            }
        }
    })
    .await
    .expect("a close frame in time");
    assert_eq!(code, 1012);
    let status = node.wait_exit(WAIT).await.expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}: {}", node.log_text());
}

/// `serve` with the settings given; its exit status and output.
fn serve_once(dir: &Path, env: &[(&str, String)]) -> (bool, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.arg("serve")
        .env_clear()
        .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
        .env(
            "DATABASE_URL",
            format!("sqlite://{}?mode=rwc", dir.join("sb.db").display()),
        )
        .env("JWT_SECRET", SECRET)
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), text)
}

#[test]
fn half_a_pair_or_a_bad_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem").display().to_string();
    let key = dir.path().join("key.pem").display().to_string();
    let (ok, out) = serve_once(dir.path(), &[("TLS_CERT_FILE", cert.clone())]);
    assert!(!ok && out.contains("TLS_KEY_FILE"), "{out}");
    let (ok, out) = serve_once(dir.path(), &[("TLS_KEY_FILE", key.clone())]);
    assert!(!ok && out.contains("TLS_CERT_FILE"), "{out}");
    // Missing files.
    let both = [
        ("TLS_CERT_FILE", cert.clone()),
        ("TLS_KEY_FILE", key.clone()),
    ];
    let (ok, out) = serve_once(dir.path(), &both);
    assert!(!ok && out.contains("TLS_CERT_FILE"), "{out}");
    // A key that is not the certificate's.
    let one = pki("one");
    let two = pki("two");
    std::fs::write(&cert, &one.cert_pem).unwrap();
    std::fs::write(&key, &two.key_pem).unwrap();
    let (ok, out) = serve_once(dir.path(), &both);
    assert!(!ok && out.contains("tls"), "{out}");
}

/// `switchboard healthcheck` with `env`: whether it exited 0, and its output.
fn healthcheck(env: &[(&str, String)]) -> (bool, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.arg("healthcheck").env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), text)
}

#[tokio::test]
async fn healthcheck_subcommand_on_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::launch(env!("CARGO_BIN_EXE_switchboard"))
        .clean_env()
        .log_file()
        .within(WAIT * 3)
        .env(
            "DATABASE_URL",
            format!("sqlite://{}?mode=rwc", dir.path().join("sb.db").display()),
        )
        .env("JWT_SECRET", SECRET)
        .start()
        .await;
    let port = node.addr.port();
    // Plain HTTP is what it was without the TLS settings.
    let (status, _) = switchboard_testkit::http(node.addr, "GET", "/healthz", &[], None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let listen = ("SWITCHBOARD_LISTEN", format!("0.0.0.0:{port}"));
    let (ok, out) = healthcheck(std::slice::from_ref(&listen));
    assert!(ok, "{out}");
    node.kill();
    let (ok, out) = healthcheck(&[listen]);
    assert!(!ok && out.contains("unhealthy"), "{out}");
}

/// A `redis-server` that speaks TLS only (its plain port is 0), with the
/// certificate of `pki`; a one-master cluster holding every slot when
/// `cluster`. Killed on drop.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
    ca: std::path::PathBuf,
}

impl TlsRedis {
    fn start(dir: &Path, pki: &Pki, cluster: bool) -> TlsRedis {
        let (cert, key, ca) = (
            dir.join("redis-cert.pem"),
            dir.join("redis-key.pem"),
            dir.join("redis-ca.pem"),
        );
        std::fs::write(&cert, &pki.cert_pem).unwrap();
        std::fs::write(&key, &pki.key_pem).unwrap();
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        for _ in 0..10 {
            let port = switchboard_testkit::free_port();
            let mut cmd = std::process::Command::new("redis-server");
            cmd.args(["--port", "0", "--bind", "127.0.0.1"])
                .args(["--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(&cert)
                .arg("--tls-key-file")
                .arg(&key)
                .arg("--tls-ca-cert-file")
                .arg(&ca)
                .args([
                    "--tls-auth-clients",
                    "no",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            if cluster {
                let bus = switchboard_testkit::free_port().to_string();
                cmd.args(["--cluster-enabled", "yes", "--tls-cluster", "yes"])
                    .args(["--cluster-port", &bus])
                    .args(["--cluster-config-file", &format!("nodes-{port}.conf")]);
            }
            let child = cmd.spawn().expect("redis-server");
            let r = TlsRedis {
                child,
                port,
                ca: ca.clone(),
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && r.cli(&["PING"]) != "PONG" {
                std::thread::sleep(Duration::from_millis(50));
            }
            if r.cli(&["PING"]) != "PONG" {
                continue; // the port was taken before the server bound it
            }
            if cluster {
                assert_eq!(r.cli(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]), "OK");
                let deadline = Instant::now() + Duration::from_secs(10);
                while !r.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                    assert!(Instant::now() < deadline, "the TLS cluster is not ok");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            return r;
        }
        panic!("a TLS redis-server did not start on any of 10 free ports");
    }

    /// `redis-cli` over TLS, trusting the test CA; its output, trimmed.
    fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["--tls", "--cacert"])
            .arg(&self.ca)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain-HTTP node on `redis_url`, trusting `ca` (through `SSL_CERT_FILE`)
/// or only the system's roots.
async fn node_on_redis(dir: &Path, id: &str, redis_url: &str, ca: Option<&Path>) -> NodeProcess {
    let mut launch = launch(dir, id).env("REDIS_URL", redis_url);
    if let Some(ca) = ca {
        launch = launch.env("SSL_CERT_FILE", ca.display().to_string());
    }
    launch.start().await
}

async fn readyz(addr: SocketAddr) -> Option<u16> {
    switchboard_testkit::http(addr, "GET", "/readyz", &[], None)
        .await
        .ok()
        .map(|(s, _)| s)
}

/// Nodes reach one Redis (`rediss://`) and a Redis Cluster
/// (`rediss+cluster://`) over TLS only: an event published on one node
/// reaches a socket on the other through Redis. A node that does not trust
/// Redis's CA never becomes ready and logs why: the certificate is checked.
#[tokio::test]
async fn nodes_reach_redis_and_a_redis_cluster_over_tls() {
    let admin = mint(
        SECRET.as_bytes(),
        json!({"sub": "1", "role": "admin", "exp": 4_000_000_000u64}),
    );
    let pki = pki("redis test CA");
    for (scheme, cluster) in [("rediss", false), ("rediss+cluster", true)] {
        let dir = tempfile::tempdir().unwrap();
        let redis = TlsRedis::start(dir.path(), &pki, cluster);
        let url = format!("{scheme}://127.0.0.1:{}/", redis.port);
        let ca = redis.ca.clone();
        let a = node_on_redis(dir.path(), "a", &url, Some(&ca)).await;
        let b = node_on_redis(dir.path(), "b", &url, Some(&ca)).await;
        for n in [&a, &b] {
            wait_until(&format!("{scheme}: /readyz 200"), || async {
                readyz(n.addr).await == Some(200)
            })
            .await;
        }
        let mut sock = Socket::connect_with(b.addr, &format!("/?token={admin}"), None, 64, None)
            .await
            .expect("ws connect");
        assert_eq!(next_type(&mut sock).await, "connected");
        let body = json!({"room": "admin-orders", "type": "over-tls", "data": {}});
        let (status, text) = switchboard_testkit::http(
            a.addr,
            "POST",
            "/api/publish",
            &[("x-api-key", API_KEY)],
            Some(body.to_string()),
        )
        .await
        .unwrap();
        assert_eq!(status, 204, "{scheme}: {}", String::from_utf8_lossy(&text));
        assert_eq!(next_type(&mut sock).await, "over-tls", "{scheme}");
        // The room's history is in Redis, which only TLS reaches.
        let key = if cluster {
            "sb:hist:{admin-orders}"
        } else {
            "sb:hist:admin-orders"
        };
        assert_eq!(redis.cli(&["XLEN", key]), "1", "{scheme}: {key}");

        // Without the CA: never ready.
        let untrusting = node_on_redis(dir.path(), "c", &url, None).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_ne!(
            readyz(untrusting.addr).await,
            Some(200),
            "{scheme}: ready without trusting Redis's certificate: {}",
            untrusting.log_text()
        );
        let log = untrusting.log_text();
        assert!(log.contains("UnknownIssuer"), "{scheme}: {log}");
    }
}
