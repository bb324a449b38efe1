//! The CLI only: parse arguments, build the config, start the node, wait
//! for SIGTERM/SIGINT, drain; `healthcheck`, the container's probe.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use switchboard::auth::{Role, Verifier, claims_for};
use switchboard::config::{Config, JwtKey, Settings};

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Real-time order and driver dispatch server"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node (the default).
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate {
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "sqlite://switchboard.db?mode=rwc"
        )]
        database_url: String,
    },
    /// Mint a JWT with JWT_SECRET (for operators and tests).
    Token(TokenArgs),
    /// GET /healthz on this machine's node and exit 0 on 200, 1 otherwise
    /// (the container image's HEALTHCHECK: the image has no curl).
    Healthcheck(HealthcheckArgs),
}

#[derive(Args)]
struct HealthcheckArgs {
    /// The node's listen address; the probe asks its port on loopback
    /// (or its address, when it is a specific one).
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "0.0.0.0:3000")]
    listen: String,
    /// Set when the node serves TLS: the probe speaks TLS too.
    #[arg(long, env = "TLS_CERT_FILE")]
    tls_cert_file: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 3.0)]
    timeout_secs: f64,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    settings: Settings,
    /// Do not run migrations at start.
    #[arg(long)]
    no_migrate: bool,
}

#[derive(Args)]
struct TokenArgs {
    #[arg(long, default_value = "admin")]
    role: String,
    /// User id (`sub`).
    #[arg(long, default_value_t = 1)]
    sub: i64,
    /// City ids (managers: the cities they manage; drivers, users: their city).
    #[arg(long, value_delimiter = ',')]
    city: Vec<i64>,
    #[arg(long)]
    driver_id: Option<i64>,
    #[arg(long, default_value_t = 86400)]
    ttl_secs: u64,
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Some(Cmd::Token(t)) => token(t),
        Some(Cmd::Healthcheck(h)) => match rt.block_on(healthcheck(h)) {
            Ok(()) => Ok(()),
            Err(e) => {
                eprintln!("unhealthy: {e:#}");
                std::process::exit(1);
            }
        },
        Some(Cmd::Migrate { database_url }) => {
            telemetry();
            rt.block_on(switchboard::migrate(&database_url))?;
            println!("migrations applied");
            Ok(())
        }
        Some(Cmd::Serve(args)) => rt.block_on(serve(*args)),
        None => {
            // `switchboard` alone = `switchboard serve` with env settings.
            let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
            let m = cmd.get_matches_from(["serve"]);
            rt.block_on(serve(
                <ServeArgs as clap::FromArgMatches>::from_arg_matches(&m)?,
            ))
        }
    }
}

fn telemetry() {
    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn token(t: TokenArgs) -> anyhow::Result<()> {
    let role =
        Role::parse(&t.role).context("--role must be admin, ceo, manager, driver or user")?;
    let mut config = Config::defaults();
    config.jwt_key = JwtKey::Secret {
        secret: t.jwt_secret.into_bytes(),
        generated: false,
    };
    let v = Verifier::new(&config)?;
    let driver_id = t.driver_id.or((role == Role::Driver).then_some(t.sub));
    println!(
        "{}",
        v.mint(claims_for(role, t.sub, &t.city, driver_id), t.ttl_secs)?
    );
    Ok(())
}

/// One `GET /healthz` to the local node. Over TLS it does not check the
/// certificate: it asks its own process on its own machine whether it is
/// alive, and the certificate may name a host that loopback is not.
async fn healthcheck(h: HealthcheckArgs) -> anyhow::Result<()> {
    use http_body_util::Empty;
    use hyper_util::rt::TokioIo;
    let listen: std::net::SocketAddr = h
        .listen
        .parse()
        .with_context(|| format!("SWITCHBOARD_LISTEN {:?}", h.listen))?;
    let ip = match listen.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => std::net::Ipv4Addr::LOCALHOST.into(),
        ip if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let addr = std::net::SocketAddr::new(ip, listen.port());
    let probe = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let io: Box<dyn Io> = match h.tls_cert_file {
            None => Box::new(tcp),
            Some(_) => {
                let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate))
                .with_no_client_auth();
                let name = rustls::pki_types::ServerName::IpAddress(ip.into());
                let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
                Box::new(tls.connect(name, tcp).await?)
            }
        };
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/healthz")
            .header("host", addr.to_string())
            .body(Empty::<bytes::Bytes>::new())?;
        let status = send.send_request(req).await?.status();
        anyhow::ensure!(status == 200, "GET /healthz answered {status}");
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs_f64(h.timeout_secs), probe)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within {}s", h.timeout_secs))?
        .with_context(|| {
            format!(
                "GET http{}://{addr}/healthz",
                if h.tls_cert_file.is_some() { "s" } else { "" }
            )
        })
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// The health check's TLS verifier: any certificate (see [`healthcheck`]);
/// the handshake signatures are still checked.
#[derive(Debug)]
struct AnyCertificate;

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    telemetry();
    raise_open_file_limit();
    let mut config = Config::from_settings(args.settings)?;
    config.migrate = !args.no_migrate;
    let dev = matches!(
        config.jwt_key,
        JwtKey::Secret {
            generated: true,
            ..
        }
    );
    let node = switchboard::Node::start(config).await?;
    if dev {
        print_dev_banner(&node)?;
    }
    let sig = wait_for_signal().await;
    let started = std::time::Instant::now();
    let config = node.config().clone();
    if sig == Signal::Term && !config.drain_delay.is_zero() {
        // Unready first, still serving: `/readyz` answers 503 so a load
        // balancer that routes by readiness stops sending clients here before
        // the sockets are told to reconnect elsewhere (1012). SIGINT (Ctrl-C)
        // or a second signal skips the wait.
        node.mark_unready();
        tracing::info!(delay = ?config.drain_delay, "SIGTERM: unready, draining after the delay");
        tokio::select! {
            _ = tokio::time::sleep(config.drain_delay) => {}
            _ = wait_for_signal() => {}
        }
    }
    tracing::info!("draining");
    // The whole shutdown, delay included, fits in SHUTDOWN_GRACE_SECS.
    let left = config.shutdown_grace.saturating_sub(started.elapsed());
    if tokio::time::timeout(left, node.stop()).await.is_err() {
        tracing::warn!("grace period over: exiting with connections still open");
    }
    Ok(())
}

#[derive(PartialEq)]
enum Signal {
    Term,
    Int,
}

/// Every socket is a file: take the hard limit as the soft one, and say so.
fn raise_open_file_limit() {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(0);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) if now != before => {
            tracing::info!(from = before, to = now, "raised the open-file limit")
        }
        Ok(now) => tracing::info!(limit = now, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, limit = before, "could not raise the open-file limit"),
    }
}

async fn wait_for_signal() -> Signal {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => Signal::Term,
        _ = tokio::signal::ctrl_c() => Signal::Int,
    }
}

/// Embedded dev mode: the secret was made up at start, so print tokens that
/// work against this process (never the secret itself).
fn print_dev_banner(node: &switchboard::Node) -> anyhow::Result<()> {
    let v = node.verifier();
    let day = 86400;
    let admin = v.mint(claims_for(Role::Admin, 1, &[], None), day)?;
    let manager = v.mint(claims_for(Role::Manager, 2, &[1], None), day)?;
    let driver = v.mint(claims_for(Role::Driver, 3, &[1], Some(3)), day)?;
    let user = v.mint(claims_for(Role::User, 4, &[1], None), day)?;
    let port = node.addr().port();
    let host = if node.addr().ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        node.addr().ip().to_string()
    };
    let key = node.dev_api_key().unwrap_or_default();
    println!(
        "\nswitchboard dev mode: JWT secret generated for this run (tokens valid 24 h)\n\
         \n  admin   (sub 1)           {admin}\
         \n  manager (sub 2, city 1)   {manager}\
         \n  driver  (sub 3, city 1)   {driver}\
         \n  user    (sub 4, city 1)   {user}\
         \n  API key (X-API-Key)       {key}\n\
         \nTry it:\
         \n  websocat 'ws://{host}:{port}/?token={admin}'\
         \n  curl -s -XPOST http://{host}:{port}/api/publish -H 'X-API-Key: {key}' -H 'content-type: application/json' \\\
         \n       -d '{{\"room\":\"admin-orders\",\"type\":\"hello\",\"data\":{{\"text\":\"hi\"}}}}'\n"
    );
    Ok(())
}
