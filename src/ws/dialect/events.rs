//! `/ws` — seed 000 (OpenSpec): `{type, payload}` with upper-case types.

use serde_json::{Value, json};

use crate::event::EventKind;

pub(super) fn render(kind: &EventKind) -> Option<Value> {
    Some(match kind {
        EventKind::Custom { ty, data } => json!({"type": ty, "payload": data}),
        EventKind::OrderCreated { order } => json!({"type": "ORDER_CREATED", "payload": order}),
        EventKind::OrderUpdated { order, changed, .. } => {
            let mut payload = order.clone();
            if let Some(obj) = payload.as_object_mut() {
                obj.insert("changed".into(), json!(changed));
            }
            json!({"type": "ORDER_UPDATED", "payload": payload})
        }
        EventKind::OrderDeleted { id } => json!({"type": "ORDER_DELETED", "payload": {"id": id}}),
        EventKind::DriverLocation {
            driver_id,
            latitude,
            longitude,
            heading,
            speed,
            timestamp,
        } => json!({
            "type": "DRIVER_LOCATION",
            "payload": {
                "driverId": driver_id,
                "latitude": latitude,
                "longitude": longitude,
                "heading": heading,
                "speed": speed,
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
            let mut payload =
                json!({"entity": entity, "entityId": entity_id, "timestamp": timestamp});
            if let Some(e) = error {
                payload["error"] = json!(e);
            }
            json!({"type": if *ok { "SYNC_SUCCESS" } else { "SYNC_ERROR" }, "payload": payload})
        }
        EventKind::OfferMade { .. }
        | EventKind::OfferEnded { .. }
        | EventKind::BonusUpdated { .. } => return None,
    })
}
