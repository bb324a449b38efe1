//! Schema migrations, run at `serve` start and by `switchboard migrate`.
//! Named `mYYYYMMDD_NNNNNN_verb_noun`; each has a `down`.

pub use sea_orm_migration::prelude::*;

mod m20261125_000001_create_orders;
mod m20261126_000002_create_sync_jobs;
mod m20261201_000003_create_event_outbox;
mod m20261210_000004_money_in_cents;
mod m20261211_000005_add_order_number;
mod m20261212_000006_add_dispatch_status;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261125_000001_create_orders::Migration),
            Box::new(m20261126_000002_create_sync_jobs::Migration),
            Box::new(m20261201_000003_create_event_outbox::Migration),
            Box::new(m20261210_000004_money_in_cents::Migration),
            Box::new(m20261211_000005_add_order_number::Migration),
            Box::new(m20261212_000006_add_dispatch_status::Migration),
        ]
    }
}
