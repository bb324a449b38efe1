//! The only place that speaks to the database (and builds the Redis pool).

use std::time::Duration;

use migration::MigratorTrait;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Db(#[from] DbErr),
}

/// Connects and (unless `migrate` is false) brings the schema up to date.
pub async fn connect(url: &str, migrate: bool) -> Result<DatabaseConnection, StoreError> {
    let sqlite = url.starts_with("sqlite:");
    let mut opts = ConnectOptions::new(url.to_string());
    opts.max_connections(if sqlite { 4 } else { 16 })
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    let db = Database::connect(opts).await?;
    if sqlite {
        // WAL lets readers run beside the one writer; the setting lives in
        // the file, so one connection setting it is enough.
        db.execute_unprepared("PRAGMA journal_mode=WAL").await?;
    }
    if migrate {
        migration::Migrator::up(&db, None).await?;
    }
    Ok(db)
}

/// Runs the migrations alone (`switchboard migrate`).
pub async fn migrate(url: &str) -> Result<(), StoreError> {
    let db = connect(url, false).await?;
    migration::Migrator::up(&db, None).await?;
    Ok(())
}

/// A pool of multiplexed Redis connections with bounded waits, so a hung
/// Redis turns into errors (and 503s) instead of stuck requests.
pub fn redis_pool(url: &str) -> Result<deadpool_redis::Pool, String> {
    let mut cfg = deadpool_redis::Config::from_url(url);
    let mut pool = deadpool_redis::PoolConfig::new(16);
    pool.timeouts.wait = Some(Duration::from_secs(2));
    pool.timeouts.create = Some(Duration::from_secs(2));
    pool.timeouts.recycle = Some(Duration::from_secs(2));
    cfg.pool = Some(pool);
    cfg.create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .map_err(|e| e.to_string())
}
