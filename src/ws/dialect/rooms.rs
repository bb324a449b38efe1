//! `/` — seed 002 (Node.js server): `{type, data}` with kebab-case types.

use serde_json::{Value, json};

use crate::event::EventKind;

pub(super) fn render(kind: &EventKind, personal: bool) -> Option<Value> {
    Some(match kind {
        EventKind::Custom { ty, data } => json!({"type": ty, "data": data}),
        // Staff rooms hear `new-order`; the creator's own room `order-created`.
        EventKind::OrderCreated { order } => json!({
            "type": if personal { "order-created" } else { "new-order" },
            "data": order,
        }),
        // Seed 002 only announces status changes.
        EventKind::OrderUpdated {
            order,
            old_status: Some(old),
            timestamp,
            ..
        } => json!({
            "type": "order-status-updated",
            "data": {
                "orderId": order.get("id"),
                "newStatus": order.get("status"),
                "oldStatus": old,
                "timestamp": timestamp,
            },
        }),
        EventKind::BonusUpdated {
            balance,
            operation,
            amount,
            order_id,
            timestamp,
        } => json!({
            "type": "bonus-updated",
            "data": {
                "balance": money_of(*balance),
                "operation": {"type": operation, "amount": money_of(*amount), "orderId": order_id},
                "timestamp": timestamp,
            },
        }),
        EventKind::Sync {
            ok,
            entity,
            entity_id,
            error,
            timestamp,
        } => {
            let mut data = json!({"entity": entity, "entityId": entity_id, "timestamp": timestamp});
            if let Some(e) = error {
                data["error"] = json!(e);
            }
            json!({"type": if *ok { "sync-success" } else { "sync-error" }, "data": data})
        }
        EventKind::OrderUpdated { .. }
        | EventKind::OrderDeleted { .. }
        | EventKind::OfferMade { .. }
        | EventKind::OfferEnded { .. }
        | EventKind::DriverLocation { .. } => return None,
    })
}

/// Seed 002 prints whole amounts as integers (`"amount": 75`). An `f64`
/// serializes as `75.0`, which strictly typed clients (an `Int` field in a
/// Kotlin or Swift decoder) refuse, so whole values go out as integers.
/// An amount carried as a double made from cents, rendered as every amount
/// is (`event::money`): `75`, `12.5`.
fn money_of(x: f64) -> Value {
    crate::event::money((x * 100.0).round() as i64)
}
