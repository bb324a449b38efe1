//! Business rules over the store: orders and their lifecycle, bonuses.
//! Producers of events; they never build wire JSON (that is `ws::dialect`).

pub mod bonuses;
pub mod orders;
pub mod sync;
