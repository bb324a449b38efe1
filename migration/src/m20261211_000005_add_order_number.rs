//! `order_number` (SPEC §5): given by the creator (1–32 characters) or the
//! order id as a string; unique. Existing orders get their id.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("ALTER TABLE orders ADD COLUMN order_number VARCHAR(32) NULL")
            .await?;
        db.execute_unprepared("UPDATE orders SET order_number = CAST(id AS TEXT)")
            .await?;
        db.execute_unprepared(
            "CREATE UNIQUE INDEX uq_orders_order_number ON orders (order_number)",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("DROP INDEX uq_orders_order_number")
            .await?;
        db.execute_unprepared("ALTER TABLE orders DROP COLUMN order_number")
            .await?;
        Ok(())
    }
}
