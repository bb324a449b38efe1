//! SeaORM entities: one module per table. Only `store` uses them.

pub mod bonus_account;
pub mod bonus_operation;
pub mod event_outbox;
pub mod lease;
pub mod offer;
pub mod order;
pub mod sync_job;
