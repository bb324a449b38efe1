//! Money exact to two decimals (SPEC §5): every amount moves from a double
//! to an integer number of cents (`*_cents`, BIGINT). Existing rows are
//! converted exactly: they were stored rounded to cents, so `x * 100` is
//! within rounding noise of an integer and `ROUND` recovers it.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// (table, double column, cents column)
const MONEY: [(&str, &str, &str); 6] = [
    ("orders", "total", "total_cents"),
    ("orders", "bonuses_used", "bonuses_used_cents"),
    ("orders", "bonuses_earned", "bonuses_earned_cents"),
    ("bonus_accounts", "balance", "balance_cents"),
    ("bonus_operations", "amount", "amount_cents"),
    ("bonus_operations", "balance_after", "balance_after_cents"),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for (table, old, new) in MONEY {
            db.execute_unprepared(&format!(
                "ALTER TABLE {table} ADD COLUMN {new} BIGINT NOT NULL DEFAULT 0"
            ))
            .await?;
            db.execute_unprepared(&format!(
                "UPDATE {table} SET {new} = CAST(ROUND({old} * 100) AS BIGINT)"
            ))
            .await?;
            db.execute_unprepared(&format!("ALTER TABLE {table} DROP COLUMN {old}"))
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for (table, old, new) in MONEY {
            db.execute_unprepared(&format!(
                "ALTER TABLE {table} ADD COLUMN {old} DOUBLE PRECISION NOT NULL DEFAULT 0"
            ))
            .await?;
            db.execute_unprepared(&format!("UPDATE {table} SET {old} = {new} / 100.0"))
                .await?;
            db.execute_unprepared(&format!("ALTER TABLE {table} DROP COLUMN {new}"))
                .await?;
        }
        Ok(())
    }
}
