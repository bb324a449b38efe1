//! The event outbox: events of committed changes, written in the change's
//! own transaction, published by the relay in id order; and `leases`, the
//! single-holder lease that keeps one relay draining at a time.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum EventOutbox {
    Table,
    Id,
    Event,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Leases {
    Table,
    Name,
    Holder,
    LeaseUntil,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(EventOutbox::Table)
                    .if_not_exists()
                    .col(big_pk_auto(EventOutbox::Id))
                    .col(text(EventOutbox::Event))
                    .col(timestamp_with_time_zone(EventOutbox::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Leases::Table)
                    .if_not_exists()
                    .col(string(Leases::Name).primary_key())
                    .col(string(Leases::Holder))
                    .col(timestamp_with_time_zone(Leases::LeaseUntil))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Leases::Table).if_exists().to_owned())
            .await?;
        manager
            .drop_table(
                Table::drop()
                    .table(EventOutbox::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
