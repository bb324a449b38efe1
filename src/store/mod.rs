//! The only place that speaks to the database, one file per area:
//! [`orders`], [`offers`], [`bonuses`], [`sync`], [`outbox`]. This file
//! connects, runs migrations and holds the statement helpers they share.
//!
//! A change that tells clients about itself takes a closure that builds its
//! events from the rows it produced (the new order with its version, the
//! offer ended); they go into the event outbox in the same transaction, so a
//! committed change always reaches the broker (the relay publishes them).
//!
//! Every change that must happen once is a conditional statement whose row
//! count says whether this call made it: an offer leaves `open` once, an
//! order moves only from the version it was read at, a bonus operation is
//! unique per (order, kind). Write transactions start with a write so that on
//! SQLite they take the write lock first (and wait for it via busy_timeout)
//! instead of failing to upgrade a read snapshot.

use std::time::Duration;

use migration::MigratorTrait;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, SqlErr,
    Statement, Value,
};

mod bonuses;
mod offers;
mod orders;
mod outbox;
mod sync;

pub use bonuses::{BonusChange, bonus_balance, bonus_operations};
pub use entity::bonus_operation::Model as BonusOp;
pub use entity::event_outbox::Model as OutboxRow;
pub use entity::offer::Model as Offer;
pub use entity::order::Model as Order;
pub use entity::sync_job::Model as SyncJob;
pub use offers::*;
pub use orders::*;
pub use outbox::*;
pub use sync::*;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Db(#[from] DbErr),
    /// Amounts in cents.
    #[error("bonus balance {} is less than {}", crate::event::money(*balance), crate::event::money(*needed))]
    InsufficientBonuses { balance: i64, needed: i64 },
    #[error("order_number {0:?} is taken")]
    OrderNumberTaken(String),
}

impl StoreError {
    /// Whether the database itself is unreachable (→ 503) rather than a query failing.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Db(DbErr::Conn(_) | DbErr::ConnectionAcquire(_))
        )
    }
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

/// A raw statement with `?` placeholders, numbered for PostgreSQL.
fn stmt(db: &impl ConnectionTrait, sql: &str, values: Vec<Value>) -> Statement {
    let backend = db.get_database_backend();
    let sql = if backend == DbBackend::Postgres {
        let mut out = String::with_capacity(sql.len() + 8);
        let mut n = 0;
        for ch in sql.chars() {
            if ch == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(ch);
            }
        }
        out
    } else {
        sql.to_string()
    };
    Statement::from_sql_and_values(backend, sql, values)
}

async fn exec(db: &impl ConnectionTrait, sql: &str, values: Vec<Value>) -> Result<u64, DbErr> {
    Ok(db.execute_raw(stmt(db, sql, values)).await?.rows_affected())
}

fn is_unique_violation(e: &DbErr) -> bool {
    matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}
