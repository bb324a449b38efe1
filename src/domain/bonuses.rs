//! Bonuses: the balance moves in the same transaction as the order change
//! that causes it (see `store`); this module tells the user.

use crate::event::{Event, EventKind, iso_now, room};
use crate::http::ApiError;
use crate::node::App;
use crate::store::BonusChange;

/// `bonus-updated` to the user's own room.
pub async fn emit(app: &App, c: &BonusChange) -> Result<(), ApiError> {
    app.publish(Event::new(
        vec![room::user(c.user_id)],
        EventKind::BonusUpdated {
            balance: c.balance,
            operation: c.kind.to_string(),
            amount: c.amount,
            order_id: Some(c.order_id),
            timestamp: iso_now(),
        },
    ))
    .await
}

/// Money is kept to cents.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
