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
                "balance": balance,
                "operation": {"type": operation, "amount": amount, "orderId": order_id},
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
