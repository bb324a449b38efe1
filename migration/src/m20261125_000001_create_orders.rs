//! Orders, offers, bonus accounts and bonus operations.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Orders {
    Table,
    Id,
    OrderType,
    Status,
    UserId,
    CityId,
    DriverId,
    AddressFrom,
    AddressTo,
    LatitudeFrom,
    LongitudeFrom,
    LatitudeTo,
    LongitudeTo,
    Total,
    BonusesUsed,
    BonusesEarned,
    ScheduledAt,
    CreatedAt,
    UpdatedAt,
    Version,
}

#[derive(DeriveIden)]
enum Offers {
    Table,
    Id,
    OrderId,
    DriverId,
    Status,
    DistanceKm,
    CreatedAt,
    ExpiresAt,
    EndedAt,
}

#[derive(DeriveIden)]
enum BonusAccounts {
    Table,
    UserId,
    Balance,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum BonusOperations {
    Table,
    Id,
    UserId,
    OrderId,
    Kind,
    Amount,
    BalanceAfter,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Orders::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Orders::Id))
                    .col(string(Orders::OrderType))
                    .col(string(Orders::Status))
                    .col(big_integer(Orders::UserId))
                    .col(big_integer(Orders::CityId))
                    .col(big_integer_null(Orders::DriverId))
                    .col(string(Orders::AddressFrom))
                    .col(string(Orders::AddressTo))
                    .col(string_null(Orders::LatitudeFrom))
                    .col(string_null(Orders::LongitudeFrom))
                    .col(string_null(Orders::LatitudeTo))
                    .col(string_null(Orders::LongitudeTo))
                    .col(double(Orders::Total))
                    .col(double(Orders::BonusesUsed))
                    .col(double(Orders::BonusesEarned))
                    .col(timestamp_with_time_zone_null(Orders::ScheduledAt))
                    .col(timestamp_with_time_zone(Orders::CreatedAt))
                    .col(timestamp_with_time_zone(Orders::UpdatedAt))
                    .col(big_integer(Orders::Version))
                    .to_owned(),
            )
            .await?;
        for (name, col) in [
            ("idx_orders_city", Orders::CityId),
            ("idx_orders_user", Orders::UserId),
            ("idx_orders_driver", Orders::DriverId),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(Orders::Table)
                        .col(col)
                        .if_not_exists()
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(Offers::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Offers::Id))
                    .col(big_integer(Offers::OrderId))
                    .col(big_integer(Offers::DriverId))
                    .col(string(Offers::Status))
                    .col(double(Offers::DistanceKm))
                    .col(timestamp_with_time_zone(Offers::CreatedAt))
                    .col(timestamp_with_time_zone(Offers::ExpiresAt))
                    .col(timestamp_with_time_zone_null(Offers::EndedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_offers_order")
                    .table(Offers::Table)
                    .col(Offers::OrderId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        // One open offer per driver and per order: partial unique indexes,
        // the same SQL on SQLite and PostgreSQL.
        let db = manager.get_connection();
        db.execute_unprepared(
            "CREATE UNIQUE INDEX IF NOT EXISTS uq_offers_open_driver ON offers (driver_id) WHERE status = 'open'",
        )
        .await?;
        db.execute_unprepared(
            "CREATE UNIQUE INDEX IF NOT EXISTS uq_offers_open_order ON offers (order_id) WHERE status = 'open'",
        )
        .await?;
        manager
            .create_table(
                Table::create()
                    .table(BonusAccounts::Table)
                    .if_not_exists()
                    .col(big_integer(BonusAccounts::UserId).primary_key())
                    .col(double(BonusAccounts::Balance))
                    .col(timestamp_with_time_zone(BonusAccounts::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(BonusOperations::Table)
                    .if_not_exists()
                    .col(big_pk_auto(BonusOperations::Id))
                    .col(big_integer(BonusOperations::UserId))
                    .col(big_integer_null(BonusOperations::OrderId))
                    .col(string(BonusOperations::Kind))
                    .col(double(BonusOperations::Amount))
                    .col(double(BonusOperations::BalanceAfter))
                    .col(timestamp_with_time_zone(BonusOperations::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("uq_bonus_operations_order_kind")
                    .table(BonusOperations::Table)
                    .col(BonusOperations::OrderId)
                    .col(BonusOperations::Kind)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_bonus_operations_user")
                    .table(BonusOperations::Table)
                    .col(BonusOperations::UserId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            BonusOperations::Table.into_iden(),
            BonusAccounts::Table.into_iden(),
            Offers::Table.into_iden(),
            Orders::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(t).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
