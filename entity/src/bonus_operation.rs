//! One movement of a bonus balance. Unique per (order, kind): an order's
//! bonuses are debited once and credited once, whatever retries happen.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "bonus_operations")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub user_id: i64,
    pub order_id: Option<i64>,
    /// `used` (debit) or `earned` (credit)
    pub kind: String,
    /// Cents.
    pub amount_cents: i64,
    pub balance_after_cents: i64,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
