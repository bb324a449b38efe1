//! The event outbox: the events of a change are written in the change's own
//! transaction ([`enqueue_events`]); the relay reads them in id order,
//! publishes them and deletes them. One relay drains at a time: it holds the
//! `leases` row named [`RELAY_LEASE`], taken when free or run out.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, PaginatorTrait, QueryOrder,
    QuerySelect, TransactionTrait, Value,
};

use super::{OutboxRow, StoreError, exec};
use crate::event::Event;
use entity::event_outbox;

/// The lease the event relay holds while it drains.
pub const RELAY_LEASE: &str = "event-relay";

/// Appends `events` to the outbox, in order, inside the caller's
/// transaction. The row id fixes the publish order and the event's key
/// (`outbox-{id}`), so the event is stored without one.
pub(super) async fn enqueue_events(
    db: &impl ConnectionTrait,
    events: Vec<Event>,
) -> Result<(), DbErr> {
    let now = Utc::now();
    for mut event in events {
        event.id = None;
        let json = serde_json::to_string(&event).expect("events serialize");
        exec(
            db,
            "INSERT INTO event_outbox (event, created_at) VALUES (?, ?)",
            vec![json.into(), now.into()],
        )
        .await?;
    }
    Ok(())
}

/// The oldest `max` outbox rows, in id order.
pub async fn outbox_batch(db: &DatabaseConnection, max: u64) -> Result<Vec<OutboxRow>, StoreError> {
    Ok(event_outbox::Entity::find()
        .order_by_asc(event_outbox::Column::Id)
        .limit(max)
        .all(db)
        .await?)
}

/// Rows waiting to be published (for the metrics gauge).
pub async fn count_outbox(db: &DatabaseConnection) -> Result<u64, StoreError> {
    Ok(event_outbox::Entity::find().count(db).await?)
}

/// Deletes published rows, by id (not by range: on PostgreSQL a row with a
/// smaller id may commit later, and must still be published). With
/// `release`, the relay's lease is given back in the same transaction.
pub async fn delete_outbox(
    db: &DatabaseConnection,
    ids: &[i64],
    release: Option<&str>,
) -> Result<(), StoreError> {
    let txn = db.begin().await?;
    for chunk in ids.chunks(500) {
        let marks = vec!["?"; chunk.len()].join(", ");
        exec(
            &txn,
            &format!("DELETE FROM event_outbox WHERE id IN ({marks})"),
            chunk.iter().map(|id| Value::from(*id)).collect(),
        )
        .await?;
    }
    if let Some(holder) = release {
        release_in(&txn, RELAY_LEASE, holder).await?;
    }
    txn.commit().await?;
    Ok(())
}

/// Takes or renews the lease `name` for `holder` until `ttl` from now;
/// false while another holder's lease runs. One conditional upsert, so two
/// takers racing for a free lease cannot both win.
pub async fn take_lease(
    db: &DatabaseConnection,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> Result<bool, StoreError> {
    let now = Utc::now();
    let until = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(5));
    let n = exec(
        db,
        "INSERT INTO leases (name, holder, lease_until) VALUES (?, ?, ?) \
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, lease_until = excluded.lease_until \
         WHERE leases.holder = excluded.holder OR leases.lease_until < ?",
        vec![name.into(), holder.into(), until.into(), now.into()],
    )
    .await?;
    Ok(n == 1)
}

/// Gives the lease back if `holder` still has it.
pub async fn release_lease(
    db: &DatabaseConnection,
    name: &str,
    holder: &str,
) -> Result<(), StoreError> {
    Ok(release_in(db, name, holder).await?)
}

async fn release_in(db: &impl ConnectionTrait, name: &str, holder: &str) -> Result<(), DbErr> {
    exec(
        db,
        "UPDATE leases SET lease_until = ? WHERE name = ? AND holder = ?",
        vec![
            DateTime::<Utc>::UNIX_EPOCH.into(),
            name.into(),
            holder.into(),
        ],
    )
    .await?;
    Ok(())
}
