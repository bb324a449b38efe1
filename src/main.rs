//! The CLI only: parse arguments, build the config, start the node, wait
//! for SIGTERM/SIGINT, drain.

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
