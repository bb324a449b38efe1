//! Every setting of a node, read once from the environment (and flags) into a
//! typed [`Config`], validated before any port is bound.
//!
//! This module is a leaf: it imports nothing else of the crate. Durations are
//! given in (possibly fractional) seconds so tests can run timers at 0.2 s
//! without special cases in the code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Why a configuration was refused. Printed by `main` and the process exits.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is invalid: {why}")]
    Invalid { name: &'static str, why: String },
    #[error("cannot read {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(name: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        why: why.into(),
    }
}

/// The raw settings as clap reads them from flags and environment variables.
/// `Config::from_settings` turns them into the validated [`Config`].
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// HTTP + WebSocket listen address.
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "0.0.0.0:3000")]
    pub listen: String,
    /// Redis URL; unset = embedded single-node mode. A Redis Cluster is
    /// `redis+cluster://host:port[,host:port…]` (seed nodes;
    /// `rediss+cluster://` over TLS).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Database URL (SQLite or PostgreSQL).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://switchboard.db?mode=rwc"
    )]
    pub database_url: String,
    /// HS256 secret for JWTs.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,
    /// PEM file with an RS256 or ES256 public key for JWTs.
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `iss` claim, when set.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, when set.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Seconds of clock skew tolerated on `exp`.
    #[arg(long, env = "JWT_LEEWAY_SECS", default_value_t = 0)]
    pub jwt_leeway_secs: u64,
    /// Claim holding the user id (dotted path); unset = `sub`, `user_id`, `userId`.
    #[arg(long, env = "JWT_USER_CLAIM")]
    pub jwt_user_claim: Option<String>,
    /// Claim holding the role, a string or an array (dotted path); unset = `role`, then `groups`.
    #[arg(long, env = "JWT_ROLE_CLAIM")]
    pub jwt_role_claim: Option<String>,
    /// Claim holding the city id (dotted path); unset = `city_id`.
    #[arg(long, env = "JWT_CITY_CLAIM")]
    pub jwt_city_claim: Option<String>,
    /// Claim holding the driver id (dotted path); unset = `driver_id`.
    #[arg(long, env = "JWT_DRIVER_CLAIM")]
    pub jwt_driver_claim: Option<String>,
    /// Role claim values mapped to roles: `value=role,…` (e.g. `Driver=driver`).
    #[arg(long, env = "JWT_ROLE_MAP")]
    pub jwt_role_map: Option<String>,
    /// Role of a token that carries none.
    #[arg(long, env = "JWT_DEFAULT_ROLE", default_value = "user")]
    pub jwt_default_role: String,
    /// Comma-separated keys accepted in `X-API-Key` by `POST /api/publish`.
    #[arg(long, env = "API_KEYS", hide_env_values = true)]
    pub api_keys: Option<Secret>,
    #[arg(long, env = "OFFER_TIMEOUT_SECS", default_value_t = 300.0)]
    pub offer_timeout_secs: f64,
    /// How long a node may take to expire a claimed offer before another
    /// node takes it over.
    #[arg(long, env = "OFFER_LEASE_SECS", default_value_t = 10.0)]
    pub offer_lease_secs: f64,
    #[arg(long, env = "PING_INTERVAL_SECS", default_value_t = 30.0)]
    pub ping_interval_secs: f64,
    #[arg(long, env = "SYNC_URL")]
    pub sync_url: Option<String>,
    /// Request timeout of one sync delivery.
    #[arg(long, env = "SYNC_TIMEOUT_MS", default_value_t = 5000)]
    pub sync_timeout_ms: u64,
    #[arg(long, env = "SYNC_MAX_ATTEMPTS", default_value_t = 8)]
    pub sync_max_attempts: u32,
    #[arg(long, env = "SYNC_BACKOFF_MS", default_value_t = 500)]
    pub sync_backoff_ms: u64,
    #[arg(long, env = "NODE_ID")]
    pub node_id: Option<String>,
    #[arg(long, env = "DISPATCH_RADIUS_KM", default_value_t = 10.0)]
    pub dispatch_radius_km: f64,
    #[arg(long, env = "DRIVER_STALE_SECS", default_value_t = 60.0)]
    pub driver_stale_secs: f64,
    #[arg(long, env = "DISPATCH_COOLDOWN_SECS", default_value_t = 600.0)]
    pub dispatch_cooldown_secs: f64,
    #[arg(long, env = "DISPATCH_RETRY_SECS", default_value_t = 15.0)]
    pub dispatch_retry_secs: f64,
    #[arg(long, env = "DISPATCH_GIVE_UP_SECS", default_value_t = 3600.0)]
    pub dispatch_give_up_secs: f64,
    #[arg(long, env = "BONUS_RATE", default_value_t = 0.05)]
    pub bonus_rate: f64,
    #[arg(long, env = "MAX_FRAME_BYTES", default_value_t = 65536)]
    pub max_frame_bytes: usize,
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 25.0)]
    pub shutdown_grace_secs: f64,
    /// After SIGTERM, seconds the node keeps serving while `/readyz` answers
    /// 503, before it closes its sockets (1012); part of SHUTDOWN_GRACE_SECS.
    #[arg(long, env = "DRAIN_DELAY_SECS", default_value_t = 1.0)]
    pub drain_delay_secs: f64,
    /// Messages a socket may have queued before it is closed as a slow consumer.
    #[arg(long, env = "SEND_QUEUE_LEN", default_value_t = 1024)]
    pub send_queue_len: usize,
    /// Fault injection for tests: `hang-after-claim` makes the offer clock
    /// stop right after claiming deadlines, as if the node died there;
    /// `hang-after-publish` makes the event relay stop after publishing a
    /// row but before deleting it.
    #[arg(long, env = "SWITCHBOARD_FAULT", hide = true)]
    pub fault: Option<String>,
    /// Prefix of every Redis key and channel.
    #[arg(long, env = "REDIS_PREFIX", default_value = "sb:")]
    pub redis_prefix: String,
    /// Messages a socket may send per second (bursts to twice that); beyond
    /// it they are dropped with `rate_limited`, and after 10 s over it the
    /// socket is closed 1008.
    #[arg(long, env = "MAX_MESSAGES_PER_SEC", default_value_t = 50)]
    pub max_messages_per_sec: u32,
    /// A driver's position is applied and fanned out at most once per this
    /// interval; a report inside it replaces the pending one. 0 = every one.
    #[arg(long, env = "LOCATION_MIN_INTERVAL_MS", default_value_t = 500)]
    pub location_min_interval_ms: u64,
    /// Rooms one socket may be in.
    #[arg(long, env = "MAX_ROOMS_PER_SOCKET", default_value_t = 64)]
    pub max_rooms_per_socket: usize,
    /// Bytes a socket may have waiting (beyond the kernel's buffer) before it
    /// is closed as a slow consumer (4008).
    #[arg(long, env = "SEND_QUEUE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub send_queue_bytes: usize,
    /// Sockets one node accepts; above it an upgrade is answered 503.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Events kept per room for recovery (SPEC §10); 0 turns history off.
    #[arg(long, env = "HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: usize,
    /// A room's history is dropped this long after its last publish.
    #[arg(long, env = "HISTORY_TTL_SECS", default_value_t = 300)]
    pub history_ttl_secs: u64,
    /// PEM certificate chain: with TLS_KEY_FILE, the port speaks TLS
    /// (https, wss); re-read on SIGHUP.
    #[arg(long, env = "TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of TLS_CERT_FILE (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
}

impl Default for Settings {
    /// The documented defaults, independent of the caller's environment.
    fn default() -> Self {
        use clap::{Args, FromArgMatches};
        // Parse an empty command line with the `env` lookups stripped, so the
        // defaults are exactly clap's `default_value`s above.
        let mut cmd = Settings::augment_args(clap::Command::new("defaults"));
        let ids: Vec<_> = cmd.get_arguments().map(|a| a.get_id().clone()).collect();
        for id in ids {
            cmd = cmd.mut_arg(id, |a| a.env(None::<&str>));
        }
        let matches = cmd.get_matches_from(["defaults"]);
        Settings::from_arg_matches(&matches).expect("clap defaults parse")
    }
}

/// How JWTs are verified.
#[derive(Clone)]
pub enum JwtKey {
    /// HS256 with a shared secret; `generated` = made up at start (dev mode).
    Secret { secret: Vec<u8>, generated: bool },
    /// RS256 or ES256 public key in PEM.
    PublicPem(Vec<u8>),
}

/// A secret value (a JWT secret, an API key): used as a `&str`, but printed
/// as `***` by `Debug`, so no dump of the settings or the config shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

/// The placeholder of `k8s/base/secret.yaml`: a value containing it was
/// never replaced, and must not protect anything.
const PLACEHOLDER: &str = "CHANGE-ME";

impl std::fmt::Debug for JwtKey {
    // Never print a secret, not even in a debug dump of the config.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwtKey::Secret { generated, .. } => write!(f, "Secret {{ generated: {generated} }}"),
            JwtKey::PublicPem(_) => write!(f, "PublicPem"),
        }
    }
}

/// The validated configuration of one node.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub redis_url: Option<String>,
    pub database_url: String,
    pub jwt_key: JwtKey,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub jwt_leeway_secs: u64,
    /// Where the identity's claims are read from (`JWT_*_CLAIM`, role map).
    pub claims: ClaimMapping,
    pub api_keys: Vec<Secret>,
    pub offer_timeout: Duration,
    pub offer_lease: Duration,
    pub ping_interval: Duration,
    pub sync_url: Option<String>,
    pub sync_max_attempts: u32,
    pub sync_backoff: Duration,
    pub sync_timeout: Duration,
    pub node_id: String,
    pub dispatch_radius_km: f64,
    pub driver_stale: Duration,
    /// A driver that declined or let an offer expire is not offered that
    /// order again for this long.
    pub dispatch_cooldown: Duration,
    /// How often orders left without an offer are dispatched again.
    pub dispatch_retry: Duration,
    /// After this long since its creation an order is no longer retried.
    pub dispatch_give_up: Duration,
    pub bonus_rate: f64,
    pub max_frame_bytes: usize,
    pub shutdown_grace: Duration,
    /// SIGTERM → unready (readyz 503) for this long → drain. Shorter than
    /// `shutdown_grace`, which bounds the whole shutdown (see `main`).
    pub drain_delay: Duration,
    pub send_queue_len: usize,
    pub send_queue_bytes: usize,
    pub redis_prefix: String,
    /// Limits against abusive clients (SPEC §11).
    pub limits: Limits,
    /// Room history for recovery (`HISTORY_SIZE`, `HISTORY_TTL_SECS`).
    pub history: HistoryConfig,
    /// Test-only fault: the offer clock hangs after claiming (see Settings).
    pub fault_hang_after_claim: bool,
    /// Test-only fault: the event relay hangs between publish and delete.
    pub fault_hang_after_publish: bool,
    /// Run migrations at start (`serve --no-migrate` turns it off).
    pub migrate: bool,
    /// Native TLS on the listen port (`TLS_CERT_FILE` + `TLS_KEY_FILE`);
    /// `None` = plain HTTP.
    pub tls: Option<TlsFiles>,
}

/// The PEM files a TLS node reads at start and again on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Per-socket and per-node limits (SPEC §11).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub messages_per_sec: u32,
    pub location_interval: Duration,
    pub rooms_per_socket: usize,
    pub max_connections: usize,
}

/// The role names a token may map to (SPEC §2).
pub const ROLE_NAMES: [&str; 5] = ["admin", "ceo", "manager", "driver", "user"];

/// Which claims hold the identity (SPEC §2, `JWT_*_CLAIM`, `JWT_ROLE_MAP`,
/// `JWT_DEFAULT_ROLE`). Paths are dotted (`app.role` reaches into `app`);
/// `None` = the built-in variants of the three source systems.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClaimMapping {
    pub user: Option<Vec<String>>,
    pub role: Option<Vec<String>>,
    pub city: Option<Vec<String>>,
    pub driver: Option<Vec<String>>,
    /// Role claim value → one of [`ROLE_NAMES`], tried before the names themselves.
    pub role_map: Vec<(String, String)>,
    /// One of [`ROLE_NAMES`].
    pub default_role: String,
}

fn claim_path(name: &'static str, v: Option<String>) -> Result<Option<Vec<String>>, ConfigError> {
    let Some(v) = v.filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    let parts: Vec<String> = v.trim().split('.').map(String::from).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(invalid(name, format!("{v:?} is not a dotted claim path")));
    }
    Ok(Some(parts))
}

fn role_name(name: &'static str, r: &str) -> Result<String, ConfigError> {
    let r = r.trim();
    if ROLE_NAMES.contains(&r) {
        Ok(r.to_string())
    } else {
        Err(invalid(
            name,
            format!("{r:?} is not a role ({})", ROLE_NAMES.join(", ")),
        ))
    }
}

impl ClaimMapping {
    fn from_settings(s: &Settings) -> Result<ClaimMapping, ConfigError> {
        let mut role_map = Vec::new();
        for pair in s.jwt_role_map.as_deref().unwrap_or("").split(',') {
            if pair.trim().is_empty() {
                continue;
            }
            let (value, role) = pair
                .split_once('=')
                .ok_or_else(|| invalid("JWT_ROLE_MAP", format!("{pair:?} is not value=role")))?;
            role_map.push((value.trim().to_string(), role_name("JWT_ROLE_MAP", role)?));
        }
        Ok(ClaimMapping {
            user: claim_path("JWT_USER_CLAIM", s.jwt_user_claim.clone())?,
            role: claim_path("JWT_ROLE_CLAIM", s.jwt_role_claim.clone())?,
            city: claim_path("JWT_CITY_CLAIM", s.jwt_city_claim.clone())?,
            driver: claim_path("JWT_DRIVER_CLAIM", s.jwt_driver_claim.clone())?,
            role_map,
            default_role: role_name("JWT_DEFAULT_ROLE", &s.jwt_default_role)?,
        })
    }
}

/// How much of each room's past is kept for recovery.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistoryConfig {
    /// Events per room; 0 = history off (no positions, no recovery).
    pub size: usize,
    pub ttl: Duration,
}

impl HistoryConfig {
    pub fn enabled(&self) -> bool {
        self.size > 0
    }
}

fn secs(name: &'static str, v: f64) -> Result<Duration, ConfigError> {
    if !(v.is_finite() && v > 0.0 && v < 1e9) {
        return Err(invalid(
            name,
            format!("{v} is not a positive number of seconds"),
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".into())
}

impl Config {
    /// Validates raw settings. Reads the public key file when one is named.
    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let listen: SocketAddr = s
            .listen
            .parse()
            .map_err(|e| invalid("SWITCHBOARD_LISTEN", format!("{:?}: {e}", s.listen)))?;
        if let Some(url) = &s.redis_url
            && ![
                "redis://",
                "rediss://",
                "redis+cluster://",
                "rediss+cluster://",
            ]
            .iter()
            .any(|scheme| url.starts_with(scheme))
        {
            return Err(invalid(
                "REDIS_URL",
                "must start with redis://, rediss://, redis+cluster:// or rediss+cluster://",
            ));
        }
        if !(s.database_url.starts_with("sqlite:")
            || s.database_url.starts_with("postgres://")
            || s.database_url.starts_with("postgresql://"))
        {
            return Err(invalid("DATABASE_URL", "must be sqlite:… or postgres://…"));
        }
        let jwt_key = match (&s.jwt_secret, &s.jwt_public_key_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "JWT_SECRET",
                    "set either JWT_SECRET or JWT_PUBLIC_KEY_FILE, not both",
                ));
            }
            (Some(secret), None) => {
                let secret = secret.expose();
                if secret.contains(PLACEHOLDER) {
                    return Err(invalid(
                        "JWT_SECRET",
                        "is still the CHANGE-ME placeholder of k8s/base/secret.yaml: set a real secret",
                    ));
                }
                if secret.len() < 16 {
                    return Err(invalid("JWT_SECRET", "must be at least 16 bytes"));
                }
                JwtKey::Secret {
                    secret: secret.as_bytes().to_vec(),
                    generated: false,
                }
            }
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|source| ConfigError::ReadKey {
                    path: path.clone(),
                    source,
                })?;
                JwtKey::PublicPem(pem)
            }
            (None, None) => {
                use rand::RngCore;
                let mut secret = vec![0u8; 32];
                rand::rng().fill_bytes(&mut secret);
                JwtKey::Secret {
                    secret,
                    generated: true,
                }
            }
        };
        let api_keys: Vec<Secret> = s
            .api_keys
            .as_ref()
            .map(Secret::expose)
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(Secret::from)
            .collect();
        if api_keys.iter().any(|k| k.expose().contains(PLACEHOLDER)) {
            return Err(invalid(
                "API_KEYS",
                "holds the CHANGE-ME placeholder of k8s/base/secret.yaml: set real keys",
            ));
        }
        if let Some(url) = &s.sync_url
            && url
                .parse::<hyper::Uri>()
                .ok()
                .filter(|u| u.scheme_str() == Some("http") && u.host().is_some())
                .is_none()
        {
            return Err(invalid(
                "SYNC_URL",
                "must be an http://host[:port]/path URL (TLS: put a sidecar or proxy in front)",
            ));
        }
        if s.sync_max_attempts == 0 {
            return Err(invalid("SYNC_MAX_ATTEMPTS", "must be at least 1"));
        }
        if !(s.dispatch_radius_km.is_finite() && s.dispatch_radius_km > 0.0) {
            return Err(invalid("DISPATCH_RADIUS_KM", "must be a positive number"));
        }
        if !(s.bonus_rate.is_finite() && (0.0..=1.0).contains(&s.bonus_rate)) {
            return Err(invalid("BONUS_RATE", "must be between 0 and 1"));
        }
        if !(128..=16 << 20).contains(&s.max_frame_bytes) {
            return Err(invalid("MAX_FRAME_BYTES", "must be between 128 and 16 MiB"));
        }
        let shutdown_grace = secs("SHUTDOWN_GRACE_SECS", s.shutdown_grace_secs)?;
        if !(s.drain_delay_secs.is_finite()
            && s.drain_delay_secs >= 0.0
            && s.drain_delay_secs < s.shutdown_grace_secs)
        {
            return Err(invalid(
                "DRAIN_DELAY_SECS",
                "must be at least 0 and less than SHUTDOWN_GRACE_SECS",
            ));
        }
        if s.send_queue_len == 0 {
            return Err(invalid("SEND_QUEUE_LEN", "must be at least 1"));
        }
        if s.send_queue_bytes < 64 * 1024 {
            return Err(invalid("SEND_QUEUE_BYTES", "must be at least 65536"));
        }
        if s.max_messages_per_sec == 0 {
            return Err(invalid("MAX_MESSAGES_PER_SEC", "must be at least 1"));
        }
        if s.max_rooms_per_socket == 0 {
            return Err(invalid("MAX_ROOMS_PER_SOCKET", "must be at least 1"));
        }
        if s.max_connections == 0 {
            return Err(invalid("MAX_CONNECTIONS", "must be at least 1"));
        }
        if s.redis_prefix.is_empty() || s.redis_prefix.contains(char::is_whitespace) {
            return Err(invalid("REDIS_PREFIX", "must be a non-empty word"));
        }
        if s.history_size > 1_000_000 {
            return Err(invalid("HISTORY_SIZE", "at most 1000000 events per room"));
        }
        if s.history_ttl_secs == 0 || s.history_ttl_secs > 30 * 86400 {
            return Err(invalid("HISTORY_TTL_SECS", "must be 1 s to 30 days"));
        }
        let tls = match (s.tls_cert_file.clone(), s.tls_key_file.clone()) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (Some(_), None) => {
                return Err(invalid(
                    "TLS_KEY_FILE",
                    "must be set with TLS_CERT_FILE (both or neither)",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "TLS_CERT_FILE",
                    "must be set with TLS_KEY_FILE (both or neither)",
                ));
            }
        };
        let claims = ClaimMapping::from_settings(&s)?;
        Ok(Config {
            listen,
            redis_url: s.redis_url,
            database_url: s.database_url,
            jwt_key,
            jwt_issuer: s.jwt_issuer,
            jwt_audience: s.jwt_audience,
            jwt_leeway_secs: s.jwt_leeway_secs,
            claims,
            api_keys,
            offer_timeout: secs("OFFER_TIMEOUT_SECS", s.offer_timeout_secs)?,
            offer_lease: secs("OFFER_LEASE_SECS", s.offer_lease_secs)?,
            ping_interval: secs("PING_INTERVAL_SECS", s.ping_interval_secs)?,
            sync_url: s.sync_url,
            sync_max_attempts: s.sync_max_attempts,
            sync_backoff: Duration::from_millis(s.sync_backoff_ms.max(1)),
            sync_timeout: Duration::from_millis(s.sync_timeout_ms.max(1)),
            node_id: s.node_id.filter(|n| !n.is_empty()).unwrap_or_else(hostname),
            dispatch_radius_km: s.dispatch_radius_km,
            driver_stale: secs("DRIVER_STALE_SECS", s.driver_stale_secs)?,
            dispatch_cooldown: secs("DISPATCH_COOLDOWN_SECS", s.dispatch_cooldown_secs)?,
            dispatch_retry: secs("DISPATCH_RETRY_SECS", s.dispatch_retry_secs)?,
            dispatch_give_up: secs("DISPATCH_GIVE_UP_SECS", s.dispatch_give_up_secs)?,
            bonus_rate: s.bonus_rate,
            max_frame_bytes: s.max_frame_bytes,
            shutdown_grace,
            drain_delay: Duration::from_secs_f64(s.drain_delay_secs),
            send_queue_len: s.send_queue_len,
            send_queue_bytes: s.send_queue_bytes,
            redis_prefix: s.redis_prefix,
            limits: Limits {
                messages_per_sec: s.max_messages_per_sec,
                location_interval: Duration::from_millis(s.location_min_interval_ms),
                rooms_per_socket: s.max_rooms_per_socket,
                max_connections: s.max_connections,
            },
            history: HistoryConfig {
                size: s.history_size,
                ttl: Duration::from_secs(s.history_ttl_secs),
            },
            fault_hang_after_claim: s.fault.as_deref() == Some("hang-after-claim"),
            fault_hang_after_publish: s.fault.as_deref() == Some("hang-after-publish"),
            migrate: true,
            tls,
        })
    }

    /// A valid config with the documented defaults and nothing read from the
    /// environment; tests adjust fields from here.
    pub fn defaults() -> Config {
        Config::from_settings(Settings::default()).expect("the defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_secrets_stop_the_start_and_secrets_never_print() {
        let s = Settings {
            jwt_secret: Some("CHANGE-ME-to-a-long-random-string".into()),
            ..Settings::default()
        };
        let e = Config::from_settings(s).unwrap_err().to_string();
        assert!(e.contains("JWT_SECRET") && e.contains("CHANGE-ME"), "{e}");
        let s = Settings {
            api_keys: Some("good-key,CHANGE-ME".into()),
            ..Settings::default()
        };
        let e = Config::from_settings(s).unwrap_err().to_string();
        assert!(e.contains("API_KEYS"), "{e}");

        let s = Settings {
            jwt_secret: Some("a-real-secret-0123456789".into()),
            api_keys: Some("key-one,key-two".into()),
            ..Settings::default()
        };
        let printed = format!("{s:?}");
        let c = Config::from_settings(s).unwrap();
        let printed_config = format!("{c:?}");
        for p in [printed, printed_config] {
            for secret in ["a-real-secret", "key-one", "key-two"] {
                assert!(!p.contains(secret), "{secret} printed: {p}");
            }
        }
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::defaults();
        assert_eq!(c.listen.port(), 3000);
        assert!(c.redis_url.is_none());
        assert_eq!(c.offer_timeout, Duration::from_secs(300));
        assert_eq!(c.ping_interval, Duration::from_secs(30));
        assert_eq!(c.max_frame_bytes, 65536);
        assert_eq!(c.shutdown_grace, Duration::from_secs(25));
        assert_eq!(c.drain_delay, Duration::from_secs(1));
        assert_eq!(c.redis_prefix, "sb:");
        assert!(matches!(
            c.jwt_key,
            JwtKey::Secret {
                generated: true,
                ..
            }
        ));
    }

    #[test]
    fn bad_values_are_named() {
        let s = Settings {
            listen: "nope".into(),
            ..Settings::default()
        };
        let e = Config::from_settings(s).unwrap_err().to_string();
        assert!(e.contains("SWITCHBOARD_LISTEN"), "{e}");
        let s = Settings {
            jwt_secret: Some("short".into()),
            ..Settings::default()
        };
        let e = Config::from_settings(s).unwrap_err().to_string();
        assert!(e.contains("JWT_SECRET"), "{e}");
        let s = Settings {
            offer_timeout_secs: -1.0,
            ..Settings::default()
        };
        let e = Config::from_settings(s).unwrap_err().to_string();
        assert!(e.contains("OFFER_TIMEOUT_SECS"), "{e}");
        let s = Settings {
            drain_delay_secs: 30.0,
            ..Settings::default()
        };
        let e = Config::from_settings(s).unwrap_err().to_string();
        assert!(e.contains("DRAIN_DELAY_SECS"), "{e}");
        let s = Settings {
            jwt_role_map: Some("Staff=boss".into()),
            ..Settings::default()
        };
        let e = Config::from_settings(s).unwrap_err().to_string();
        assert!(e.contains("JWT_ROLE_MAP"), "{e}");
    }

    #[test]
    fn tls_files_come_in_pairs() {
        assert_eq!(Config::defaults().tls, None);
        let s = Settings {
            tls_cert_file: Some("cert.pem".into()),
            ..Settings::default()
        };
        let e = Config::from_settings(s).unwrap_err().to_string();
        assert!(e.contains("TLS_KEY_FILE") && e.contains("both"), "{e}");
        let s = Settings {
            tls_key_file: Some("key.pem".into()),
            ..Settings::default()
        };
        let e = Config::from_settings(s).unwrap_err().to_string();
        assert!(e.contains("TLS_CERT_FILE"), "{e}");
        let s = Settings {
            tls_cert_file: Some("cert.pem".into()),
            tls_key_file: Some("key.pem".into()),
            ..Settings::default()
        };
        let tls = Config::from_settings(s).unwrap().tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("cert.pem"));
        assert_eq!(tls.key, PathBuf::from("key.pem"));
    }

    #[test]
    fn redis_urls_name_one_redis_or_a_cluster() {
        for ok in [
            "redis://127.0.0.1:6379/",
            "rediss://redis.example:6380/",
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7000",
            "rediss+cluster://10.0.0.1:7000,10.0.0.2:7000",
        ] {
            let s = Settings {
                redis_url: Some(ok.into()),
                ..Settings::default()
            };
            assert_eq!(
                Config::from_settings(s).unwrap().redis_url.as_deref(),
                Some(ok)
            );
        }
        let s = Settings {
            redis_url: Some("http://10.0.0.1:7000".into()),
            ..Settings::default()
        };
        let e = Config::from_settings(s).unwrap_err().to_string();
        assert!(
            e.contains("REDIS_URL") && e.contains("redis+cluster://"),
            "{e}"
        );
    }

    #[test]
    fn claim_mapping_parses() {
        let s = Settings {
            jwt_role_claim: Some("app.role".into()),
            jwt_role_map: Some("Driver=driver, Staff=manager".into()),
            jwt_default_role: "driver".into(),
            ..Settings::default()
        };
        let c = Config::from_settings(s).unwrap().claims;
        assert_eq!(c.role, Some(vec!["app".to_string(), "role".to_string()]));
        assert_eq!(c.role_map[1], ("Staff".to_string(), "manager".to_string()));
        assert_eq!(c.default_role, "driver");
        assert_eq!(Config::defaults().claims.default_role, "user");
    }
}
