//! The sync outbox.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum SyncJobs {
    Table,
    Id,
    Entity,
    EntityId,
    Action,
    Status,
    Attempts,
    NextAttemptAt,
    LeaseUntil,
    LastError,
    CreatedAt,
    UpdatedAt,
    DeliveredAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SyncJobs::Table)
                    .if_not_exists()
                    .col(big_pk_auto(SyncJobs::Id))
                    .col(string(SyncJobs::Entity))
                    .col(big_integer(SyncJobs::EntityId))
                    .col(string(SyncJobs::Action))
                    .col(string(SyncJobs::Status))
                    .col(integer(SyncJobs::Attempts))
                    .col(timestamp_with_time_zone(SyncJobs::NextAttemptAt))
                    .col(timestamp_with_time_zone_null(SyncJobs::LeaseUntil))
                    .col(text_null(SyncJobs::LastError))
                    .col(timestamp_with_time_zone(SyncJobs::CreatedAt))
                    .col(timestamp_with_time_zone(SyncJobs::UpdatedAt))
                    .col(timestamp_with_time_zone_null(SyncJobs::DeliveredAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_sync_jobs_status_next")
                    .table(SyncJobs::Table)
                    .col(SyncJobs::Status)
                    .col(SyncJobs::NextAttemptAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(SyncJobs::Table).if_exists().to_owned())
            .await
    }
}
