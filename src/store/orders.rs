//! Orders: create (with the bonus debit), read, list by scope, change
//! from a known version, delete.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set, TransactionTrait,
};

use super::bonuses::{BonusChange, balance_in, credit_in, credit_kind_in, record_operation};
use super::offers::end_offer_in;
use super::outbox::enqueue_events;
use super::sync::enqueue_sync;
use super::{Offer, Order, StoreError, exec, is_unique_violation};
use crate::event::Event;
use entity::{offer, order};

// ---------------------------------------------------------------- orders

/// The fields of a new order, validated by the domain layer.
#[derive(Debug, Clone)]
pub struct NewOrder {
    /// The creator's `order_number`; `None` = the id as a string.
    pub order_number: Option<String>,
    pub order_type: String,
    pub user_id: i64,
    pub city_id: i64,
    pub address_from: String,
    pub address_to: String,
    pub latitude_from: Option<String>,
    pub longitude_from: Option<String>,
    pub latitude_to: Option<String>,
    pub longitude_to: Option<String>,
    /// Cents.
    pub total: i64,
    pub bonuses_used: i64,
    pub bonuses_earned: i64,
    pub scheduled_at: Option<DateTime<Utc>>,
    /// `searching` with a pickup point, else `none`.
    pub dispatch_status: String,
}

/// Inserts an order, debiting `bonuses_used` from the creator's balance in
/// the same transaction (refused when the balance is short); `events` are
/// built from the new order and the debit and go into the event outbox in
/// that transaction too.
pub async fn create_order(
    db: &DatabaseConnection,
    new: NewOrder,
    sync: bool,
    events: impl FnOnce(&Order, Option<&BonusChange>) -> Vec<Event>,
) -> Result<Order, StoreError> {
    let txn = db.begin().await?;
    let now = Utc::now();
    let needed = new.bonuses_used;
    if needed > 0 {
        // Write first: the debit is conditional on the balance, so it can
        // never go negative, however many debits race.
        let n = exec(
            &txn,
            "UPDATE bonus_accounts SET balance_cents = balance_cents - ?, updated_at = ? \
             WHERE user_id = ? AND balance_cents >= ?",
            vec![needed.into(), now.into(), new.user_id.into(), needed.into()],
        )
        .await?;
        if n == 0 {
            let balance = balance_in(&txn, new.user_id).await?;
            txn.rollback().await?;
            return Err(StoreError::InsufficientBonuses { balance, needed });
        }
    }
    let given_number = new.order_number.clone();
    let model = order::ActiveModel {
        order_number: Set(new.order_number),
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
        total_cents: Set(new.total),
        bonuses_used_cents: Set(new.bonuses_used),
        bonuses_earned_cents: Set(new.bonuses_earned),
        scheduled_at: Set(new.scheduled_at),
        created_at: Set(now),
        updated_at: Set(now),
        version: Set(1),
        dispatch_status: Set(new.dispatch_status),
        ..Default::default()
    }
    .insert(&txn)
    .await;
    let mut model = match model {
        Ok(m) => m,
        Err(e) if is_unique_violation(&e) => {
            txn.rollback().await?;
            return Err(StoreError::OrderNumberTaken(
                given_number.unwrap_or_default(),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    if model.order_number.is_none() {
        // The id as a string, unless a creator already gave that number.
        let number = model.id.to_string();
        let n = exec(
            &txn,
            "UPDATE orders SET order_number = ? WHERE id = ? \
             AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_number = ?)",
            vec![
                number.clone().into(),
                model.id.into(),
                number.clone().into(),
            ],
        )
        .await?;
        if n == 1 {
            model.order_number = Some(number);
        }
    }
    let change = if needed > 0 {
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
    enqueue_events(&txn, events(&model, change.as_ref())).await?;
    txn.commit().await?;
    Ok(model)
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
    /// Orders the driver holds an open offer for or is assigned to.
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
                        .and_where(offer::Column::Status.eq("open"))
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
    pub dispatch_status: Option<String>,
}

/// Applies `changes` if the order is still at `version`; returns the new
/// order (None when someone else changed it first). `events` are built from
/// the new order and, when the status became `completed`, the bonus credit
/// made in the same transaction; they go into the event outbox with it.
pub async fn update_order(
    db: &DatabaseConnection,
    current: &Order,
    changes: &OrderChanges,
    sync: bool,
    events: impl FnOnce(&Order, Option<&BonusChange>) -> Vec<Event>,
) -> Result<Option<Order>, StoreError> {
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
    if let Some(d) = &changes.dispatch_status {
        q = q.col_expr(order::Column::DispatchStatus, Expr::value(d.clone()));
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
    if changes.status.as_deref() == Some("completed") && current.bonuses_earned_cents > 0 {
        credit = credit_in(
            &txn,
            current.user_id,
            current.id,
            current.bonuses_earned_cents,
        )
        .await?;
    }
    // Cancelled (only possible before delivery): the bonuses used go back, once.
    if changes.status.as_deref() == Some("cancelled") && current.bonuses_used_cents > 0 {
        credit = credit_kind_in(
            &txn,
            current.user_id,
            current.id,
            "refunded",
            current.bonuses_used_cents,
        )
        .await?;
    }
    let updated = order::Entity::find_by_id(current.id)
        .one(&txn)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("order vanished in its own transaction".into()))?;
    if sync {
        enqueue_sync(&txn, current.id, "updated").await?;
    }
    enqueue_events(&txn, events(&updated, credit.as_ref())).await?;
    txn.commit().await?;
    Ok(Some(updated))
}

/// Deletes an order in one transaction: its open offers end as
/// `cancelled` (each announced with `offer_events`), the bonuses it used go
/// back once (`refunded`) unless it was completed, the order row goes, and
/// `events` (built by the caller, given the refund) go into the event
/// outbox after the offers'. Returns the offers ended; `None` when the
/// order was already gone (nothing changed, nothing announced).
pub async fn delete_order(
    db: &DatabaseConnection,
    id: i64,
    sync: bool,
    offer_events: impl Fn(&Offer) -> Vec<Event>,
    events: impl FnOnce(Option<&BonusChange>) -> Vec<Event>,
) -> Result<Option<Vec<Offer>>, StoreError> {
    let txn = db.begin().await?;
    // Write first (SQLite takes the write lock here, see the module doc),
    // then read the row as it is under that lock.
    exec(
        &txn,
        "UPDATE orders SET version = version + 1 WHERE id = ?",
        vec![id.into()],
    )
    .await?;
    let before = order::Entity::find_by_id(id).one(&txn).await?;
    let refund = match &before {
        Some(o) if o.status != "completed" && o.bonuses_used_cents > 0 => {
            credit_kind_in(&txn, o.user_id, o.id, "refunded", o.bonuses_used_cents).await?
        }
        _ => None,
    };
    let n = order::Entity::delete_by_id(id)
        .exec(&txn)
        .await?
        .rows_affected;
    if n == 0 {
        txn.rollback().await?;
        return Ok(None);
    }
    let open = offer::Entity::find()
        .filter(offer::Column::OrderId.eq(id))
        .filter(offer::Column::Status.eq("open"))
        .all(&txn)
        .await?;
    let mut ended = Vec::new();
    for o in open {
        if let Some(o) = end_offer_in(&txn, o.id, "cancelled").await? {
            enqueue_events(&txn, offer_events(&o)).await?;
            ended.push(o);
        }
    }
    if sync {
        enqueue_sync(&txn, id, "deleted").await?;
    }
    enqueue_events(&txn, events(refund.as_ref())).await?;
    txn.commit().await?;
    Ok(Some(ended))
}
