//! Bonuses: the balance moves in the same transaction as the order change
//! that causes it (see `store`); this module builds the event that tells the
//! user, which goes into the event outbox in that transaction too.

use crate::event::{Event, EventKind, cents_f64, iso_now, room};
use crate::store::BonusChange;

/// `bonus-updated` to the user's own room.
pub fn event(c: &BonusChange) -> Event {
    Event::new(
        vec![room::user(c.user_id)],
        EventKind::BonusUpdated {
            // Cents as the nearest double: it prints as the decimal itself.
            balance: cents_f64(c.balance),
            operation: c.kind.to_string(),
            amount: cents_f64(c.amount),
            order_id: Some(c.order_id),
            timestamp: iso_now(),
        },
    )
}
