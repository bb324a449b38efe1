//! The client-side caches of seed 000: orders keyed by id, and driver
//! positions, both kept up to date from server events without API calls.
//! When a room could not be recovered after a reconnect (SPEC §10), the
//! orders of that room are refetched and [`OrdersCache::replace`]d.

use std::collections::{HashMap, HashSet};

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

/// Rooms whose events change orders: `admin-orders`, `city-{id}-orders`,
/// `user-{id}`.
pub fn is_orders_room(room: &str) -> bool {
    room == "admin-orders" || city_of(room).is_some() || user_of(room).is_some()
}

fn city_of(room: &str) -> Option<i64> {
    room.strip_prefix("city-")?
        .strip_suffix("-orders")?
        .parse()
        .ok()
}

fn user_of(room: &str) -> Option<i64> {
    room.strip_prefix("user-")?.parse().ok()
}

/// Whether `room` carries the events of `order`.
pub fn order_in_room(order: &Value, room: &str) -> bool {
    let field = |k: &str| {
        let v = order.get(k);
        v.and_then(Value::as_i64)
            .or_else(|| v.and_then(Value::as_str).and_then(|s| s.parse().ok()))
    };
    if room == "admin-orders" {
        return true;
    }
    if let Some(c) = city_of(room) {
        return field("city_id") == Some(c);
    }
    if let Some(u) = user_of(room) {
        return field("user_id") == Some(u);
    }
    false
}

/// Orders keyed by id: ORDER_CREATED (and seed 002's `new-order` /
/// `order-created`) adds; ORDER_UPDATED replaces only a newer `version`;
/// ORDER_DELETED removes.
///
/// A refetch after a resync goes [`OrdersCache::begin_reload`] (before the
/// request: from then on the cache notes which orders live events touch),
/// then [`OrdersCache::replace`] with the list.
#[derive(Debug, Default, Clone)]
pub struct OrdersCache {
    by_id: HashMap<i64, Value>,
    /// While a reload is in flight: ids live events changed, and deleted.
    reload: Option<(HashSet<i64>, HashSet<i64>)>,
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

    /// A refetch starts: until [`OrdersCache::replace`], note the orders
    /// live events change, which the list may predate.
    pub fn begin_reload(&mut self) {
        self.reload = Some(Default::default());
    }

    /// Replaces the orders of `rooms` with `items`, what the server has now
    /// (the token's scope, e.g. every page of `GET /api/orders`): a newer
    /// version wins; an order of those rooms missing from the list is
    /// removed when the list is `complete` and no live event touched it
    /// since [`OrdersCache::begin_reload`]; an order deleted live meanwhile
    /// is not brought back.
    pub fn replace(
        &mut self,
        items: &[Value],
        rooms: &[String],
        complete: bool,
    ) -> Vec<OrderChange> {
        let (touched, deleted) = self.reload.take().unwrap_or_default();
        let mut changes = Vec::new();
        let mut fetched = HashSet::new();
        for o in items {
            let Some(id) = o.get("id").and_then(Value::as_i64) else {
                continue;
            };
            fetched.insert(id);
            if deleted.contains(&id) {
                continue;
            }
            let have = self.by_id.get(&id);
            if have.is_some_and(|h| version(h) >= version(o)) {
                continue;
            }
            let existed = have.is_some();
            self.by_id.insert(id, o.clone());
            changes.push(if existed {
                OrderChange::Updated { id, refetch: false }
            } else {
                OrderChange::Added(id)
            });
        }
        if complete {
            let gone: Vec<i64> = self
                .by_id
                .iter()
                .filter(|(id, o)| {
                    !fetched.contains(*id)
                        && !touched.contains(*id)
                        && rooms.iter().any(|r| order_in_room(o, r))
                })
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                self.by_id.remove(&id);
                changes.push(OrderChange::Removed(id));
            }
        }
        changes
    }

    /// Applies one server message; `None` when it changed nothing (another
    /// type, or a stale version).
    pub fn apply(&mut self, msg: &Value) -> Option<OrderChange> {
        let ty = msg.get("type")?.as_str()?;
        let body = body_of(msg);
        if let Some((touched, deleted)) = self.reload.as_mut() {
            let id = match ty {
                "order-status-updated" => body.get("orderId"),
                "ORDER_CREATED" | "new-order" | "order-created" | "ORDER_UPDATED"
                | "ORDER_DELETED" => body.get("id"),
                _ => None,
            };
            if let Some(id) = id.and_then(Value::as_i64) {
                if ty == "ORDER_DELETED" {
                    deleted.insert(id);
                } else {
                    touched.insert(id);
                }
            }
        }
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
    fn orders_of_a_room() {
        let o = json!({"id": 1, "city_id": 3, "user_id": "9"});
        assert!(order_in_room(&o, "admin-orders"));
        assert!(order_in_room(&o, "city-3-orders"));
        assert!(!order_in_room(&o, "city-4-orders"));
        assert!(order_in_room(&o, "user-9"));
        assert!(!order_in_room(&o, "user-1"));
        assert!(!order_in_room(&o, "driver-9"));
        assert!(is_orders_room("user-2") && is_orders_room("city-10-orders"));
        assert!(!is_orders_room("driver-2") && !is_orders_room("city-x-orders"));
    }

    #[test]
    fn replace_after_resync_keeps_live_changes() {
        let mut c = OrdersCache::default();
        let created = |id: i64, city: i64| json!({"type": "ORDER_CREATED", "payload": {"id": id, "city_id": city, "version": 1}});
        c.apply(&created(1, 1)); // gone from the list: removed
        c.apply(&created(2, 1)); // newer in the list
        c.apply(&created(3, 2)); // another city: untouched
        c.begin_reload();
        c.apply(&created(7, 1)); // created live during the load: kept
        c.apply(&json!({"type": "ORDER_DELETED", "payload": {"id": 4}}));
        let list = [
            json!({"id": 2, "city_id": 1, "version": 2}),
            json!({"id": 4, "city_id": 1, "version": 1}), // deleted meanwhile
            json!({"id": 5, "city_id": 1, "version": 1}),
        ];
        let changes = c.replace(&list, &["city-1-orders".to_string()], true);
        assert_eq!(
            changes,
            [
                OrderChange::Updated {
                    id: 2,
                    refetch: false
                },
                OrderChange::Added(5),
                OrderChange::Removed(1)
            ]
        );
        let mut ids: Vec<i64> = c.by_id.keys().copied().collect();
        ids.sort();
        assert_eq!(ids, [2, 3, 5, 7]);
        // An incomplete list removes nothing.
        assert!(
            c.replace(&[], &["admin-orders".to_string()], false)
                .is_empty()
        );
        assert_eq!(c.len(), 4);
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
