//! Offers: create under the "one open offer per driver / per order"
//! indexes, end exactly once, accept, and the reads dispatch needs.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
    TransactionTrait, Value,
};
use std::collections::HashSet;

use super::outbox::enqueue_events;
use super::sync::enqueue_sync;
use super::{Offer, Order, StoreError, is_unique_violation, stmt};
use crate::event::Event;
use entity::{offer, order};

// ---------------------------------------------------------------- offers

/// Creates an open offer; `None` when the driver or the order already has
/// one (the partial unique indexes decide, so racing dispatchers are safe),
/// or when the order is gone or no longer waiting for a driver (checked in
/// the same statement, so a delete or an accept racing a dispatch wins).
/// The order's `dispatch_status` becomes `offered` in the same transaction
/// (with `version` + 1 when it was something else). `events`, built from
/// the new offer and, when its dispatch status changed, the order after
/// that change, go into the event outbox with it.
pub async fn create_offer(
    db: &DatabaseConnection,
    order_id: i64,
    driver_id: i64,
    distance_km: f64,
    expires_at: DateTime<Utc>,
    assignable: &[&str],
    events: impl FnOnce(&Offer, Option<&Order>) -> Vec<Event>,
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
    let txn = db.begin().await?;
    let r = offer::Entity::find()
        .from_raw_sql(stmt(&txn, &sql, values))
        .one(&txn)
        .await;
    let offer = match r {
        Ok(Some(o)) => o,
        Ok(None) => {
            txn.rollback().await?;
            return Ok(None);
        }
        Err(e) => {
            txn.rollback().await?;
            return if is_unique_violation(&e) {
                Ok(None)
            } else {
                Err(e.into())
            };
        }
    };
    let changed = order::Entity::find()
        .from_raw_sql(stmt(
            &txn,
            "UPDATE orders SET dispatch_status = 'offered', version = version + 1, updated_at = ? \
             WHERE id = ? AND dispatch_status <> 'offered' RETURNING *",
            vec![Utc::now().into(), order_id.into()],
        ))
        .one(&txn)
        .await?;
    enqueue_events(&txn, events(&offer, changed.as_ref())).await?;
    txn.commit().await?;
    Ok(Some(offer))
}

/// Sets the `dispatch_status` of an order that waits for a driver and has
/// no open offer (`no_drivers`, `gave_up`), with `version` + 1; `None` when
/// it already had that status or no longer waits. `events`, built from the
/// changed order, go into the event outbox in the same transaction.
pub async fn set_dispatch_status(
    db: &DatabaseConnection,
    order_id: i64,
    to: &str,
    assignable: &[&str],
    events: impl FnOnce(&Order) -> Vec<Event>,
) -> Result<Option<Order>, StoreError> {
    let marks = vec!["?"; assignable.len()].join(", ");
    let sql = format!(
        "UPDATE orders SET dispatch_status = ?, version = version + 1, updated_at = ? \
         WHERE id = ? AND dispatch_status <> ? AND driver_id IS NULL AND status IN ({marks}) \
         AND NOT EXISTS (SELECT 1 FROM offers WHERE offers.order_id = orders.id \
         AND offers.status = 'open') RETURNING *"
    );
    let mut values: Vec<Value> = vec![to.into(), Utc::now().into(), order_id.into(), to.into()];
    values.extend(assignable.iter().map(|s| Value::from(*s)));
    let txn = db.begin().await?;
    let Some(o) = order::Entity::find()
        .from_raw_sql(stmt(&txn, &sql, values))
        .one(&txn)
        .await?
    else {
        txn.rollback().await?;
        return Ok(None);
    };
    enqueue_events(&txn, events(&o)).await?;
    txn.commit().await?;
    Ok(Some(o))
}

/// Orders a retry pass re-dispatches: waiting for a driver, with a pickup
/// point, not given up, and no open offer; oldest first, at most `limit`.
pub async fn orders_awaiting_dispatch(
    db: &DatabaseConnection,
    assignable: &[&str],
    limit: u64,
) -> Result<Vec<Order>, StoreError> {
    let marks = vec!["?"; assignable.len()].join(", ");
    let sql = format!(
        "SELECT * FROM orders WHERE driver_id IS NULL AND status IN ({marks}) \
         AND dispatch_status IN ('searching', 'offered', 'no_drivers') \
         AND latitude_from IS NOT NULL AND longitude_from IS NOT NULL \
         AND NOT EXISTS (SELECT 1 FROM offers WHERE offers.order_id = orders.id \
         AND offers.status = 'open') ORDER BY id LIMIT {limit}"
    );
    let values: Vec<Value> = assignable.iter().map(|s| Value::from(*s)).collect();
    Ok(order::Entity::find()
        .from_raw_sql(stmt(db, &sql, values))
        .all(db)
        .await?)
}

/// Moves an offer out of `open` to `status`; returns it if this call did
/// (exactly one caller ever gets `Some` for an offer). `events`, built from
/// the ended offer, go into the event outbox in the same transaction.
pub async fn end_offer(
    db: &DatabaseConnection,
    offer_id: i64,
    status: &str,
    events: impl FnOnce(&Offer) -> Vec<Event>,
) -> Result<Option<Offer>, StoreError> {
    let txn = db.begin().await?;
    let Some(offer) = end_offer_in(&txn, offer_id, status).await? else {
        txn.rollback().await?;
        return Ok(None);
    };
    enqueue_events(&txn, events(&offer)).await?;
    txn.commit().await?;
    Ok(Some(offer))
}

/// [`end_offer`] inside the caller's transaction, without events.
pub(super) async fn end_offer_in(
    db: &impl ConnectionTrait,
    offer_id: i64,
    status: &str,
) -> Result<Option<Offer>, DbErr> {
    // One round trip: the conditional UPDATE returns the row it changed.
    let st = stmt(
        db,
        "UPDATE offers SET status = ?, ended_at = ? WHERE id = ? AND status = 'open' RETURNING *",
        vec![status.into(), Utc::now().into(), offer_id.into()],
    );
    offer::Entity::find().from_raw_sql(st).one(db).await
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

/// The city of each of these orders that exists (order id → `city_id`).
pub async fn order_cities(
    db: &DatabaseConnection,
    orders: &[i64],
) -> Result<std::collections::HashMap<i64, i64>, StoreError> {
    let mut out = std::collections::HashMap::new();
    for chunk in orders.chunks(500) {
        let rows = order::Entity::find()
            .filter(order::Column::Id.is_in(chunk.to_vec()))
            .all(db)
            .await?;
        out.extend(rows.into_iter().map(|o| (o.id, o.city_id)));
    }
    Ok(out)
}

/// Drivers this order was offered to whose offer is open or ended after
/// `since` (the cooldown: a driver that declined or let its offer expire
/// is not offered the order again until `since` passes its decline).
pub async fn offered_drivers(
    db: &DatabaseConnection,
    order_id: i64,
    since: DateTime<Utc>,
) -> Result<HashSet<i64>, StoreError> {
    Ok(offer::Entity::find()
        .filter(offer::Column::OrderId.eq(order_id))
        .filter(
            offer::Column::EndedAt
                .is_null()
                .or(offer::Column::EndedAt.gt(since)),
        )
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
/// past the point a driver can take it. `events`, built from the order
/// after the change, go into the event outbox in that transaction.
pub async fn accept_offer(
    db: &DatabaseConnection,
    offer: &Offer,
    assignable: &[&str],
    sync: bool,
    events: impl FnOnce(&Order) -> Vec<Event>,
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
        .col_expr(order::Column::DispatchStatus, Expr::value("assigned"))
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
    let Some(o) = order::Entity::find_by_id(offer.order_id).one(&txn).await? else {
        txn.rollback().await?;
        return Ok(None);
    };
    if sync {
        enqueue_sync(&txn, offer.order_id, "updated").await?;
    }
    enqueue_events(&txn, events(&o)).await?;
    txn.commit().await?;
    Ok(Some(o))
}
