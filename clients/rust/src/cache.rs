//! The client-side caches of seed 000: orders keyed by id, and driver
//! positions, both kept up to date from server events without API calls.

use std::collections::HashMap;

use serde_json::Value;

/// The body of a message in any dialect: `payload`, `data`, or the message.
pub fn body_of(msg: &Value) -> &Value {
    msg.get("payload")
        .or_else(|| msg.get("data"))
        .unwrap_or(msg)
}

/// What a message did to the orders cache.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderChange {
    Added(i64),
    /// Replaced by a newer version: the caller should refetch the order.
    Updated {
        id: i64,
        refetch: bool,
    },
    Removed(i64),
}

/// Orders keyed by id: ORDER_CREATED (and seed 002's `new-order` /
/// `order-created`) adds; ORDER_UPDATED replaces only a newer `version`;
/// ORDER_DELETED removes.
#[derive(Debug, Default, Clone)]
pub struct OrdersCache {
    by_id: HashMap<i64, Value>,
}

fn version(v: &Value) -> i64 {
    v.get("version").and_then(Value::as_i64).unwrap_or(0)
}

impl OrdersCache {
    pub fn get(&self, id: i64) -> Option<&Value> {
        self.by_id.get(&id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn insert(&mut self, order: Value) {
        if let Some(id) = order.get("id").and_then(Value::as_i64) {
            self.by_id.insert(id, order);
        }
    }

    /// Applies one server message; `None` when it changed nothing (another
    /// type, or a stale version).
    pub fn apply(&mut self, msg: &Value) -> Option<OrderChange> {
        let ty = msg.get("type")?.as_str()?;
        let body = body_of(msg);
        match ty {
            "ORDER_CREATED" | "new-order" | "order-created" | "ORDER_UPDATED" => {
                let id = body.get("id")?.as_i64()?;
                if let Some(have) = self.by_id.get(&id)
                    && version(have) >= version(body)
                {
                    return None;
                }
                let mut order = body.clone();
                if let Some(o) = order.as_object_mut() {
                    o.remove("changed");
                }
                let existed = self.by_id.insert(id, order).is_some();
                Some(if ty == "ORDER_UPDATED" {
                    OrderChange::Updated { id, refetch: true }
                } else if existed {
                    OrderChange::Updated { id, refetch: false }
                } else {
                    OrderChange::Added(id)
                })
            }
            "order-status-updated" => {
                let id = body.get("orderId")?.as_i64()?;
                let have = self.by_id.get_mut(&id)?;
                have["status"] = body.get("newStatus")?.clone();
                Some(OrderChange::Updated { id, refetch: true })
            }
            "ORDER_DELETED" => {
                let id = body.get("id")?.as_i64()?;
                self.by_id.remove(&id).map(|_| OrderChange::Removed(id))
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Position {
    pub latitude: f64,
    pub longitude: f64,
    pub heading: Option<f64>,
    pub speed: Option<f64>,
}

/// Driver positions from DRIVER_LOCATION.
#[derive(Debug, Default, Clone)]
pub struct DriverPositions {
    pub by_driver: HashMap<i64, Position>,
}

impl DriverPositions {
    /// Returns the driver whose position changed.
    pub fn apply(&mut self, msg: &Value) -> Option<i64> {
        if msg.get("type")?.as_str()? != "DRIVER_LOCATION" {
            return None;
        }
        let p = body_of(msg);
        let id = p.get("driverId")?.as_i64()?;
        self.by_driver.insert(
            id,
            Position {
                latitude: p.get("latitude")?.as_f64()?,
                longitude: p.get("longitude")?.as_f64()?,
                heading: p.get("heading").and_then(Value::as_f64),
                speed: p.get("speed").and_then(Value::as_f64),
            },
        );
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn newest_version_wins() {
        let mut c = OrdersCache::default();
        let created = json!({"type": "ORDER_CREATED", "payload": {"id": 1, "status": "pending", "version": 1}});
        assert_eq!(c.apply(&created), Some(OrderChange::Added(1)));
        let v3 = json!({"type": "ORDER_UPDATED", "payload": {"id": 1, "status": "ready", "version": 3, "changed": ["status"]}});
        assert_eq!(
            c.apply(&v3),
            Some(OrderChange::Updated {
                id: 1,
                refetch: true
            })
        );
        let v2 = json!({"type": "ORDER_UPDATED", "payload": {"id": 1, "status": "confirmed", "version": 2}});
        assert_eq!(c.apply(&v2), None, "stale update dropped");
        assert_eq!(c.get(1).unwrap()["status"], "ready");
        assert!(c.get(1).unwrap().get("changed").is_none());
        assert_eq!(
            c.apply(&json!({"type": "ORDER_DELETED", "payload": {"id": 1}})),
            Some(OrderChange::Removed(1))
        );
        assert!(c.is_empty());
    }

    #[test]
    fn positions() {
        let mut d = DriverPositions::default();
        let m = json!({"type": "DRIVER_LOCATION", "payload": {"driverId": 4, "latitude": 41.3, "longitude": 69.2, "heading": null, "speed": 3.0}});
        assert_eq!(d.apply(&m), Some(4));
        assert_eq!(d.by_driver[&4].speed, Some(3.0));
        assert_eq!(d.apply(&json!({"type": "ping"})), None);
    }
}
