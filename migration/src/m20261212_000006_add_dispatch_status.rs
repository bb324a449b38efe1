//! `dispatch_status` (SPEC §5): where the search for a driver stands —
//! `searching`, `offered`, `assigned`, `no_drivers`, `gave_up` or `none`.
//! Existing orders get the value their row and open offers imply.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(
            "ALTER TABLE orders ADD COLUMN dispatch_status VARCHAR(16) NOT NULL DEFAULT 'none'",
        )
        .await?;
        db.execute_unprepared(
            "UPDATE orders SET dispatch_status = 'assigned' \
             WHERE driver_id IS NOT NULL AND status NOT IN ('completed', 'cancelled')",
        )
        .await?;
        let waiting = "driver_id IS NULL AND status IN ('pending', 'confirmed', 'preparing', 'ready') \
             AND latitude_from IS NOT NULL AND longitude_from IS NOT NULL";
        let open = "EXISTS (SELECT 1 FROM offers WHERE offers.order_id = orders.id AND offers.status = 'open')";
        db.execute_unprepared(&format!(
            "UPDATE orders SET dispatch_status = 'offered' WHERE {waiting} AND {open}"
        ))
        .await?;
        db.execute_unprepared(&format!(
            "UPDATE orders SET dispatch_status = 'searching' WHERE {waiting} AND NOT {open}"
        ))
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("ALTER TABLE orders DROP COLUMN dispatch_status")
            .await?;
        Ok(())
    }
}
