//! Bonus balances and operations; the debit and credit run inside the
//! order transactions of [`super::orders`].

use chrono::Utc;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};

use super::{BonusOp, StoreError, exec};
use entity::{bonus_account, bonus_operation};

/// A bonus balance change made together with an order change.
#[derive(Debug, Clone, PartialEq)]
pub struct BonusChange {
    pub user_id: i64,
    pub kind: &'static str,
    /// Cents.
    pub amount: i64,
    /// Cents, after the change.
    pub balance: i64,
    pub order_id: i64,
}

pub(super) async fn balance_in(db: &impl ConnectionTrait, user_id: i64) -> Result<i64, DbErr> {
    Ok(bonus_account::Entity::find_by_id(user_id)
        .one(db)
        .await?
        .map(|a| a.balance_cents)
        .unwrap_or(0))
}

/// Records a bonus operation unless one of this kind exists for the order;
/// returns whether it was recorded.
pub(super) async fn record_operation(
    db: &impl ConnectionTrait,
    user_id: i64,
    order_id: i64,
    kind: &str,
    amount: i64,
    balance_after: i64,
) -> Result<bool, DbErr> {
    let n = exec(
        db,
        "INSERT INTO bonus_operations (user_id, order_id, kind, amount_cents, balance_after_cents, created_at) \
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

/// Credits `amount` once per order: the operation row is unique per
/// (order, kind), and the balance moves only if it was inserted.
pub(super) async fn credit_in(
    txn: &impl ConnectionTrait,
    user_id: i64,
    order_id: i64,
    amount: i64,
) -> Result<Option<BonusChange>, DbErr> {
    credit_kind_in(txn, user_id, order_id, "earned", amount).await
}

/// Credits `amount` cents once per (order, `kind`): `earned` on completion,
/// `refunded` when an order that used bonuses is cancelled or deleted.
pub(super) async fn credit_kind_in(
    txn: &impl ConnectionTrait,
    user_id: i64,
    order_id: i64,
    kind: &'static str,
    amount: i64,
) -> Result<Option<BonusChange>, DbErr> {
    if !record_operation(txn, user_id, order_id, kind, amount, 0).await? {
        return Ok(None);
    }
    let now = Utc::now();
    exec(
        txn,
        "INSERT INTO bonus_accounts (user_id, balance_cents, updated_at) VALUES (?, ?, ?) \
         ON CONFLICT (user_id) DO UPDATE SET balance_cents = bonus_accounts.balance_cents + excluded.balance_cents, \
         updated_at = excluded.updated_at",
        vec![user_id.into(), amount.into(), now.into()],
    )
    .await?;
    let balance = balance_in(txn, user_id).await?;
    exec(
        txn,
        "UPDATE bonus_operations SET balance_after_cents = ? WHERE order_id = ? AND kind = ?",
        vec![balance.into(), order_id.into(), kind.into()],
    )
    .await?;
    Ok(Some(BonusChange {
        user_id,
        kind,
        amount,
        balance,
        order_id,
    }))
}

// ---------------------------------------------------------------- bonuses

/// The balance in cents.
pub async fn bonus_balance(db: &DatabaseConnection, user_id: i64) -> Result<i64, StoreError> {
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
