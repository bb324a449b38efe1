//! An event outbox row: one event of a committed change, written in the
//! change's transaction, deleted once the relay has published it.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "event_outbox")]
pub struct Model {
    /// Publish order; the event's history key is `outbox-{id}`.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The event as JSON (`switchboard::event::Event`, without `id`).
    pub event: String,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
