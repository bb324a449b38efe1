//! `/ws/driver/orders/` — seed 001 (Django Channels): `{type, ...fields}` with
//! snake_case types; carries only a driver's offers.

use serde_json::{Value, json};

use crate::event::EventKind;

pub(super) fn render(kind: &EventKind) -> Option<Value> {
    Some(match kind {
        EventKind::Custom { ty, data } => super::flatten(ty, data.clone()),
        EventKind::OfferMade { order } => json!({
            "type": "new_order",
            "order": order,
            "message": "New ride request available",
        }),
        EventKind::OfferEnded { order_id, message } => json!({
            "type": "order_timeout",
            "order_id": order_id,
            "message": message,
        }),
        EventKind::OrderCreated { .. }
        | EventKind::OrderUpdated { .. }
        | EventKind::OrderDeleted { .. }
        | EventKind::DriverLocation { .. }
        | EventKind::BonusUpdated { .. }
        | EventKind::Sync { .. } => return None,
    })
}
