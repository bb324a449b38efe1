//! The sync outbox: jobs written in order transactions, claimed with a
//! lease, finished once per attempt.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
};
use std::time::Duration;

use super::{StoreError, SyncJob, exec, stmt};
use entity::sync_job;

// ---------------------------------------------------------------- sync outbox

/// Adds a sync job for an order change, inside the caller's transaction.
pub(super) async fn enqueue_sync(
    db: &impl ConnectionTrait,
    order_id: i64,
    action: &str,
) -> Result<(), DbErr> {
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
/// Only the oldest unfinished job of an entity is claimable, so the changes
/// of one order reach the external system in order (a failed job no longer
/// holds the later ones back: it waits for a manual retry).
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
         WHERE id IN (SELECT j.id FROM sync_jobs j WHERE ((j.status = 'pending' AND j.next_attempt_at <= ?) \
         OR (j.status = 'delivering' AND j.lease_until < ?)) \
         AND NOT EXISTS (SELECT 1 FROM sync_jobs e WHERE e.entity = j.entity AND e.entity_id = j.entity_id \
         AND e.id < j.id AND e.status IN ('pending', 'delivering')) \
         ORDER BY j.id LIMIT {max}{lock}) RETURNING *"
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
