//! The only place that speaks to the database (and builds the Redis pool).
//!
//! Every change that must happen once is a conditional statement whose row
//! count says whether this call made it: an offer leaves `open` once, an
//! order moves only from the version it was read at, a bonus operation is
//! unique per (order, kind). Write transactions start with a write so that on
//! SQLite they take the write lock first (and wait for it via busy_timeout)
//! instead of failing to upgrade a read snapshot.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use migration::MigratorTrait;
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection,
    DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set, SqlErr, Statement,
    TransactionTrait, Value,
};

pub use entity::bonus_operation::Model as BonusOp;
pub use entity::offer::Model as Offer;
pub use entity::order::Model as Order;
pub use entity::sync_job::Model as SyncJob;
use entity::{bonus_account, bonus_operation, offer, order, sync_job};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Db(#[from] DbErr),
    #[error("bonus balance {balance} is less than {needed}")]
    InsufficientBonuses { balance: f64, needed: f64 },
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

// ---------------------------------------------------------------- orders

/// The fields of a new order, validated by the domain layer.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub order_type: String,
    pub user_id: i64,
    pub city_id: i64,
    pub address_from: String,
    pub address_to: String,
    pub latitude_from: Option<String>,
    pub longitude_from: Option<String>,
    pub latitude_to: Option<String>,
    pub longitude_to: Option<String>,
    pub total: f64,
    pub bonuses_used: f64,
    pub bonuses_earned: f64,
    pub scheduled_at: Option<DateTime<Utc>>,
}

/// A bonus balance change made together with an order change.
#[derive(Debug, Clone, PartialEq)]
pub struct BonusChange {
    pub user_id: i64,
    pub kind: &'static str,
    pub amount: f64,
    pub balance: f64,
    pub order_id: i64,
}

/// Inserts an order, debiting `bonuses_used` from the creator's balance in
/// the same transaction (refused when the balance is short).
pub async fn create_order(
    db: &DatabaseConnection,
    new: NewOrder,
    sync: bool,
) -> Result<(Order, Option<BonusChange>), StoreError> {
    let txn = db.begin().await?;
    let now = Utc::now();
    let needed = new.bonuses_used;
    if needed > 0.0 {
        // Write first: the debit is conditional on the balance, so it can
        // never go negative, however many debits race.
        let n = exec(
            &txn,
            "UPDATE bonus_accounts SET balance = balance - ?, updated_at = ? WHERE user_id = ? AND balance >= ?",
            vec![needed.into(), now.into(), new.user_id.into(), needed.into()],
        )
        .await?;
        if n == 0 {
            let balance = balance_in(&txn, new.user_id).await?;
            txn.rollback().await?;
            return Err(StoreError::InsufficientBonuses { balance, needed });
        }
    }
    let model = order::ActiveModel {
        order_type: Set(new.order_type),
        status: Set("pending".into()),
        user_id: Set(new.user_id),
        city_id: Set(new.city_id),
        driver_id: Set(None),
        address_from: Set(new.address_from),
        address_to: Set(new.address_to),
        latitude_from: Set(new.latitude_from),
        longitude_from: Set(new.longitude_from),
        latitude_to: Set(new.latitude_to),
        longitude_to: Set(new.longitude_to),
        total: Set(new.total),
        bonuses_used: Set(new.bonuses_used),
        bonuses_earned: Set(new.bonuses_earned),
        scheduled_at: Set(new.scheduled_at),
        created_at: Set(now),
        updated_at: Set(now),
        version: Set(1),
        ..Default::default()
    }
    .insert(&txn)
    .await?;
    let change = if needed > 0.0 {
        let balance = balance_in(&txn, model.user_id).await?;
        record_operation(&txn, model.user_id, model.id, "used", needed, balance).await?;
        Some(BonusChange {
            user_id: model.user_id,
            kind: "used",
            amount: needed,
            balance,
            order_id: model.id,
        })
    } else {
        None
    };
    if sync {
        enqueue_sync(&txn, model.id, "created").await?;
    }
    txn.commit().await?;
    Ok((model, change))
}

async fn balance_in(db: &impl ConnectionTrait, user_id: i64) -> Result<f64, DbErr> {
    Ok(bonus_account::Entity::find_by_id(user_id)
        .one(db)
        .await?
        .map(|a| a.balance)
        .unwrap_or(0.0))
}

/// Records a bonus operation unless one of this kind exists for the order;
/// returns whether it was recorded.
async fn record_operation(
    db: &impl ConnectionTrait,
    user_id: i64,
    order_id: i64,
    kind: &str,
    amount: f64,
    balance_after: f64,
) -> Result<bool, DbErr> {
    let n = exec(
        db,
        "INSERT INTO bonus_operations (user_id, order_id, kind, amount, balance_after, created_at) \
         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (order_id, kind) DO NOTHING",
        vec![
            user_id.into(),
            order_id.into(),
            kind.into(),
            amount.into(),
            balance_after.into(),
            Utc::now().into(),
        ],
    )
    .await?;
    Ok(n == 1)
}

pub async fn get_order(db: &DatabaseConnection, id: i64) -> Result<Option<Order>, StoreError> {
    Ok(order::Entity::find_by_id(id).one(db).await?)
}

/// Who may see which orders.
#[derive(Debug, Clone)]
pub enum Scope {
    All,
    Cities(Vec<i64>),
    User(i64),
    /// Orders offered to or assigned to the driver.
    Driver(i64),
}

pub async fn list_orders(
    db: &DatabaseConnection,
    scope: &Scope,
    status: Option<&str>,
    cursor: Option<i64>,
    limit: u64,
) -> Result<Vec<Order>, StoreError> {
    let mut q = order::Entity::find();
    q = match scope {
        Scope::All => q,
        Scope::Cities(c) => q.filter(order::Column::CityId.is_in(c.clone())),
        Scope::User(u) => q.filter(order::Column::UserId.eq(*u)),
        Scope::Driver(d) => q.filter(
            order::Column::DriverId
                .eq(*d)
                .or(order::Column::Id.in_subquery(
                    Query::select()
                        .column(offer::Column::OrderId)
                        .from(offer::Entity)
                        .and_where(offer::Column::DriverId.eq(*d))
                        .to_owned(),
                )),
        ),
    };
    if let Some(s) = status {
        q = q.filter(order::Column::Status.eq(s));
    }
    if let Some(c) = cursor {
        q = q.filter(order::Column::Id.lt(c));
    }
    Ok(q.order_by_desc(order::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// Changes to an order; `None` = leave as is.
#[derive(Debug, Clone, Default)]
pub struct OrderChanges {
    pub status: Option<String>,
    pub scheduled_at: Option<Option<DateTime<Utc>>>,
    pub driver_id: Option<Option<i64>>,
}

/// Applies `changes` if the order is still at `version`; returns the new
/// order (None when someone else changed it first) and, when the status
/// became `completed`, the bonus credit made in the same transaction.
pub async fn update_order(
    db: &DatabaseConnection,
    current: &Order,
    changes: &OrderChanges,
    sync: bool,
) -> Result<Option<(Order, Option<BonusChange>)>, StoreError> {
    let txn = db.begin().await?;
    let now = Utc::now();
    let mut q = order::Entity::update_many()
        .col_expr(
            order::Column::Version,
            Expr::col(order::Column::Version).add(1),
        )
        .col_expr(order::Column::UpdatedAt, Expr::value(now));
    if let Some(s) = &changes.status {
        q = q.col_expr(order::Column::Status, Expr::value(s.clone()));
    }
    if let Some(s) = changes.scheduled_at {
        q = q.col_expr(order::Column::ScheduledAt, Expr::value(s));
    }
    if let Some(d) = changes.driver_id {
        q = q.col_expr(order::Column::DriverId, Expr::value(d));
    }
    let n = q
        .filter(order::Column::Id.eq(current.id))
        .filter(order::Column::Version.eq(current.version))
        .exec(&txn)
        .await?
        .rows_affected;
    if n == 0 {
        txn.rollback().await?;
        return Ok(None);
    }
    let mut credit = None;
    if changes.status.as_deref() == Some("completed") && current.bonuses_earned > 0.0 {
        credit = credit_in(&txn, current.user_id, current.id, current.bonuses_earned).await?;
    }
    let updated = order::Entity::find_by_id(current.id)
        .one(&txn)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("order vanished in its own transaction".into()))?;
    if sync {
        enqueue_sync(&txn, current.id, "updated").await?;
    }
    txn.commit().await?;
    Ok(Some((updated, credit)))
}

/// Credits `amount` once per order: the operation row is unique per
/// (order, kind), and the balance moves only if it was inserted.
async fn credit_in(
    txn: &impl ConnectionTrait,
    user_id: i64,
    order_id: i64,
    amount: f64,
) -> Result<Option<BonusChange>, DbErr> {
    if !record_operation(txn, user_id, order_id, "earned", amount, 0.0).await? {
        return Ok(None);
    }
    let now = Utc::now();
    exec(
        txn,
        "INSERT INTO bonus_accounts (user_id, balance, updated_at) VALUES (?, ?, ?) \
         ON CONFLICT (user_id) DO UPDATE SET balance = bonus_accounts.balance + excluded.balance, \
         updated_at = excluded.updated_at",
        vec![user_id.into(), amount.into(), now.into()],
    )
    .await?;
    let balance = balance_in(txn, user_id).await?;
    exec(
        txn,
        "UPDATE bonus_operations SET balance_after = ? WHERE order_id = ? AND kind = 'earned'",
        vec![balance.into(), order_id.into()],
    )
    .await?;
    Ok(Some(BonusChange {
        user_id,
        kind: "earned",
        amount,
        balance,
        order_id,
    }))
}

/// Deletes an order; open offers of it are ended as `cancelled` and returned.
pub async fn delete_order(
    db: &DatabaseConnection,
    id: i64,
    sync: bool,
) -> Result<Vec<Offer>, StoreError> {
    let open = offer::Entity::find()
        .filter(offer::Column::OrderId.eq(id))
        .filter(offer::Column::Status.eq("open"))
        .all(db)
        .await?;
    let mut ended = Vec::new();
    for o in open {
        if let Some(o) = end_offer(db, o.id, "cancelled").await? {
            ended.push(o);
        }
    }
    let txn = db.begin().await?;
    order::Entity::delete_by_id(id).exec(&txn).await?;
    if sync {
        enqueue_sync(&txn, id, "deleted").await?;
    }
    txn.commit().await?;
    Ok(ended)
}

// ---------------------------------------------------------------- offers

/// Creates an open offer; `None` when the driver or the order already has
/// one (the partial unique indexes decide, so racing dispatchers are safe),
/// or when the order is gone or no longer waiting for a driver (checked in
/// the same statement, so a delete or an accept racing a dispatch wins).
pub async fn create_offer(
    db: &DatabaseConnection,
    order_id: i64,
    driver_id: i64,
    distance_km: f64,
    expires_at: DateTime<Utc>,
    assignable: &[&str],
) -> Result<Option<Offer>, StoreError> {
    let marks = vec!["?"; assignable.len()].join(", ");
    let sql = format!(
        "INSERT INTO offers (order_id, driver_id, status, distance_km, created_at, expires_at) \
         SELECT ?, ?, 'open', ?, ?, ? WHERE EXISTS (SELECT 1 FROM orders WHERE id = ? \
         AND driver_id IS NULL AND status IN ({marks})) RETURNING *"
    );
    let mut values: Vec<Value> = vec![
        order_id.into(),
        driver_id.into(),
        distance_km.into(),
        Utc::now().into(),
        expires_at.into(),
        order_id.into(),
    ];
    values.extend(assignable.iter().map(|s| Value::from(*s)));
    let r = offer::Entity::find()
        .from_raw_sql(stmt(db, &sql, values))
        .one(db)
        .await;
    match r {
        Ok(o) => Ok(o),
        Err(e) if is_unique_violation(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Moves an offer out of `open` to `status`; returns it if this call did
/// (exactly one caller ever gets `Some` for an offer).
pub async fn end_offer(
    db: &impl ConnectionTrait,
    offer_id: i64,
    status: &str,
) -> Result<Option<Offer>, StoreError> {
    // One round trip: the conditional UPDATE returns the row it changed.
    let st = stmt(
        db,
        "UPDATE offers SET status = ?, ended_at = ? WHERE id = ? AND status = 'open' RETURNING *",
        vec![status.into(), Utc::now().into(), offer_id.into()],
    );
    Ok(offer::Entity::find().from_raw_sql(st).one(db).await?)
}

pub async fn get_offer(db: &DatabaseConnection, id: i64) -> Result<Option<Offer>, StoreError> {
    Ok(offer::Entity::find_by_id(id).one(db).await?)
}

pub async fn open_offer_of_order(
    db: &DatabaseConnection,
    order_id: i64,
) -> Result<Option<Offer>, StoreError> {
    Ok(offer::Entity::find()
        .filter(offer::Column::OrderId.eq(order_id))
        .filter(offer::Column::Status.eq("open"))
        .one(db)
        .await?)
}

pub async fn open_offers_of_driver(
    db: &DatabaseConnection,
    driver_id: i64,
) -> Result<Vec<Offer>, StoreError> {
    Ok(offer::Entity::find()
        .filter(offer::Column::DriverId.eq(driver_id))
        .filter(offer::Column::Status.eq("open"))
        .order_by_asc(offer::Column::Id)
        .all(db)
        .await?)
}

/// Every open offer (deadlines are re-seeded from these at start).
pub async fn open_offers(db: &DatabaseConnection) -> Result<Vec<Offer>, StoreError> {
    Ok(offer::Entity::find()
        .filter(offer::Column::Status.eq("open"))
        .all(db)
        .await?)
}

/// Drivers this order was already offered to.
pub async fn offered_drivers(
    db: &DatabaseConnection,
    order_id: i64,
) -> Result<HashSet<i64>, StoreError> {
    Ok(offer::Entity::find()
        .filter(offer::Column::OrderId.eq(order_id))
        .all(db)
        .await?
        .into_iter()
        .map(|o| o.driver_id)
        .collect())
}

/// Of `drivers`, those who cannot take an offer now: holding an open offer,
/// or carrying an accepted order not yet delivered.
pub async fn unavailable_drivers(
    db: &DatabaseConnection,
    drivers: &[i64],
) -> Result<HashSet<i64>, StoreError> {
    if drivers.is_empty() {
        return Ok(HashSet::new());
    }
    let mut out: HashSet<i64> = offer::Entity::find()
        .filter(offer::Column::DriverId.is_in(drivers.to_vec()))
        .filter(offer::Column::Status.eq("open"))
        .all(db)
        .await?
        .into_iter()
        .map(|o| o.driver_id)
        .collect();
    out.extend(
        order::Entity::find()
            .filter(order::Column::DriverId.is_in(drivers.to_vec()))
            .filter(order::Column::Status.is_in(["accepted", "picked_up"]))
            .all(db)
            .await?
            .into_iter()
            .filter_map(|o| o.driver_id),
    );
    Ok(out)
}

/// Accepts an open, unexpired offer and assigns its driver in one
/// transaction; `None` when the offer is no longer open or the order moved
/// past the point a driver can take it.
pub async fn accept_offer(
    db: &DatabaseConnection,
    offer: &Offer,
    assignable: &[&str],
    sync: bool,
) -> Result<Option<Order>, StoreError> {
    let txn = db.begin().await?;
    let now = Utc::now();
    let n = offer::Entity::update_many()
        .col_expr(offer::Column::Status, Expr::value("accepted"))
        .col_expr(offer::Column::EndedAt, Expr::value(now))
        .filter(offer::Column::Id.eq(offer.id))
        .filter(offer::Column::Status.eq("open"))
        .filter(offer::Column::ExpiresAt.gt(now))
        .exec(&txn)
        .await?
        .rows_affected;
    if n == 0 {
        txn.rollback().await?;
        return Ok(None);
    }
    let n = order::Entity::update_many()
        .col_expr(order::Column::Status, Expr::value("accepted"))
        .col_expr(order::Column::DriverId, Expr::value(offer.driver_id))
        .col_expr(
            order::Column::Version,
            Expr::col(order::Column::Version).add(1),
        )
        .col_expr(order::Column::UpdatedAt, Expr::value(now))
        .filter(order::Column::Id.eq(offer.order_id))
        .filter(order::Column::Status.is_in(assignable.iter().copied()))
        .exec(&txn)
        .await?
        .rows_affected;
    if n == 0 {
        txn.rollback().await?;
        return Ok(None);
    }
    let o = order::Entity::find_by_id(offer.order_id).one(&txn).await?;
    if sync {
        enqueue_sync(&txn, offer.order_id, "updated").await?;
    }
    txn.commit().await?;
    Ok(o)
}

// ---------------------------------------------------------------- bonuses

pub async fn bonus_balance(db: &DatabaseConnection, user_id: i64) -> Result<f64, StoreError> {
    Ok(balance_in(db, user_id).await?)
}

pub async fn bonus_operations(
    db: &DatabaseConnection,
    user_id: i64,
    cursor: Option<i64>,
    limit: u64,
) -> Result<Vec<BonusOp>, StoreError> {
    let mut q = bonus_operation::Entity::find().filter(bonus_operation::Column::UserId.eq(user_id));
    if let Some(c) = cursor {
        q = q.filter(bonus_operation::Column::Id.lt(c));
    }
    Ok(q.order_by_desc(bonus_operation::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}

// ---------------------------------------------------------------- sync outbox

/// Adds a sync job for an order change, inside the caller's transaction.
async fn enqueue_sync(db: &impl ConnectionTrait, order_id: i64, action: &str) -> Result<(), DbErr> {
    let now = Utc::now();
    exec(
        db,
        "INSERT INTO sync_jobs (entity, entity_id, action, status, attempts, next_attempt_at, created_at, updated_at) \
         VALUES ('order', ?, ?, 'pending', 0, ?, ?, ?)",
        vec![order_id.into(), action.into(), now.into(), now.into(), now.into()],
    )
    .await?;
    Ok(())
}

/// Claims up to `max` jobs that are due, or whose delivering node's lease
/// ran out: they become `delivering` with a lease and one more attempt.
/// PostgreSQL skips rows another node is claiming (`FOR UPDATE SKIP
/// LOCKED`); SQLite runs the one UPDATE under its write lock, which is the
/// same guarantee.
pub async fn claim_sync_jobs(
    db: &DatabaseConnection,
    lease: Duration,
    max: u64,
) -> Result<Vec<SyncJob>, StoreError> {
    let now = Utc::now();
    let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(60));
    let lock = if db.get_database_backend() == DbBackend::Postgres {
        " FOR UPDATE SKIP LOCKED"
    } else {
        ""
    };
    let sql = format!(
        "UPDATE sync_jobs SET status = 'delivering', attempts = attempts + 1, lease_until = ?, updated_at = ? \
         WHERE id IN (SELECT id FROM sync_jobs WHERE (status = 'pending' AND next_attempt_at <= ?) \
         OR (status = 'delivering' AND lease_until < ?) ORDER BY id LIMIT {max}{lock}) RETURNING *"
    );
    let st = stmt(
        db,
        &sql,
        vec![until.into(), now.into(), now.into(), now.into()],
    );
    Ok(sync_job::Entity::find().from_raw_sql(st).all(db).await?)
}

/// How a delivery attempt ended.
pub enum SyncOutcome {
    Delivered,
    Retry { at: DateTime<Utc>, error: String },
    Failed { error: String },
}

/// Records the end of an attempt, if the job is still this attempt's
/// (a node whose lease was taken over changes nothing). Returns the job.
pub async fn finish_sync_job(
    db: &DatabaseConnection,
    job: &SyncJob,
    outcome: SyncOutcome,
) -> Result<Option<SyncJob>, StoreError> {
    let now = Utc::now();
    let (status, next, error, delivered): (
        &str,
        DateTime<Utc>,
        Option<String>,
        Option<DateTime<Utc>>,
    ) = match outcome {
        SyncOutcome::Delivered => ("delivered", job.next_attempt_at, None, Some(now)),
        SyncOutcome::Retry { at, error } => ("pending", at, Some(error), None),
        SyncOutcome::Failed { error } => ("failed", job.next_attempt_at, Some(error), None),
    };
    let n = exec(
        db,
        "UPDATE sync_jobs SET status = ?, next_attempt_at = ?, last_error = ?, delivered_at = ?, \
         lease_until = NULL, updated_at = ? WHERE id = ? AND status = 'delivering' AND attempts = ?",
        vec![
            status.into(),
            next.into(),
            error.into(),
            delivered.into(),
            now.into(),
            job.id.into(),
            job.attempts.into(),
        ],
    )
    .await?;
    if n == 0 {
        return Ok(None);
    }
    Ok(sync_job::Entity::find_by_id(job.id).one(db).await?)
}

/// Puts a failed job back in the queue with fresh attempts; `None` when it
/// is not failed.
pub async fn retry_sync_job(
    db: &DatabaseConnection,
    id: i64,
) -> Result<Option<SyncJob>, StoreError> {
    let now = Utc::now();
    let n = exec(
        db,
        "UPDATE sync_jobs SET status = 'pending', attempts = 0, next_attempt_at = ?, updated_at = ? \
         WHERE id = ? AND status = 'failed'",
        vec![now.into(), now.into(), id.into()],
    )
    .await?;
    if n == 0 {
        return Ok(None);
    }
    Ok(sync_job::Entity::find_by_id(id).one(db).await?)
}

pub async fn get_sync_job(db: &DatabaseConnection, id: i64) -> Result<Option<SyncJob>, StoreError> {
    Ok(sync_job::Entity::find_by_id(id).one(db).await?)
}

pub async fn list_sync_jobs(
    db: &DatabaseConnection,
    status: Option<&str>,
    cursor: Option<i64>,
    limit: u64,
) -> Result<Vec<SyncJob>, StoreError> {
    let mut q = sync_job::Entity::find();
    if let Some(s) = status {
        q = q.filter(sync_job::Column::Status.eq(s));
    }
    if let Some(c) = cursor {
        q = q.filter(sync_job::Column::Id.lt(c));
    }
    Ok(q.order_by_desc(sync_job::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// Jobs by status (for the metrics gauge).
pub async fn count_sync_jobs(db: &DatabaseConnection, status: &str) -> Result<u64, StoreError> {
    use sea_orm::PaginatorTrait;
    Ok(sync_job::Entity::find()
        .filter(sync_job::Column::Status.eq(status))
        .count(db)
        .await?)
}

/// A shared multiplexed Redis connection for hot paths (positions, offer
/// deadlines): each call clones it (no pool checkout, no recycle PING per
/// command — CRATES.md measured that as a full extra round trip) and
/// concurrent commands pipeline on it. After an error it is dropped and the
/// next call takes a fresh one from the pool.
pub struct HotConn {
    pool: deadpool_redis::Pool,
    current: std::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl HotConn {
    pub fn new(pool: deadpool_redis::Pool) -> HotConn {
        HotConn {
            pool,
            current: std::sync::Mutex::new(None),
        }
    }

    pub async fn get(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        if let Some(c) = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(c);
        }
        let obj = self.pool.get().await.map_err(|e| e.to_string())?;
        let c = (*obj).clone();
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }

    /// Forget the connection after an error.
    pub fn broken(&self) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Runs `f` on the connection and drops the connection if it failed.
    pub async fn run<T, F, Fut>(&self, f: F) -> Result<T, String>
    where
        F: FnOnce(redis::aio::MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let c = self.get().await?;
        let r = f(c).await;
        if r.is_err() {
            self.broken();
        }
        r
    }
}
