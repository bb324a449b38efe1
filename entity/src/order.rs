//! An order (SPEC §4 "Order JSON"). Coordinates are decimal strings, as
//! seed 001 sends them; money is in integer cents (SPEC §5: exact to two decimals).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "orders")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The creator's number, or the id as a string; unique. `None` only when
    /// the id's string was already taken as a given number.
    pub order_number: Option<String>,
    pub order_type: String,
    pub status: String,
    pub user_id: i64,
    pub city_id: i64,
    pub driver_id: Option<i64>,
    pub address_from: String,
    pub address_to: String,
    pub latitude_from: Option<String>,
    pub longitude_from: Option<String>,
    pub latitude_to: Option<String>,
    pub longitude_to: Option<String>,
    pub total_cents: i64,
    pub bonuses_used_cents: i64,
    pub bonuses_earned_cents: i64,
    pub scheduled_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub version: i64,
    /// SPEC §5: `searching`, `offered`, `assigned`, `no_drivers`,
    /// `gave_up` or `none`.
    pub dispatch_status: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
