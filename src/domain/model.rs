//! Pure order rules, shared by the order services and the dispatcher: the
//! lifecycle, who may see an order, the order JSON every dialect carries
//! (SPEC §4), the rooms that hear about it, and the events built from it.
//! No IO here.

use serde_json::{Value, json};

use super::DomainError;
use crate::auth::{Identity, Role};
use crate::event::{Event, EventKind, iso, iso_now, money, room};
use crate::store::{Order, Scope};

/// The lifecycle, in order. `cancelled` is outside it.
pub const LIFECYCLE: [&str; 8] = [
    "pending",
    "confirmed",
    "preparing",
    "ready",
    "accepted",
    "picked_up",
    "delivered",
    "completed",
];

/// Statuses from which a driver's accept may assign the order.
pub const ASSIGNABLE: [&str; 4] = ["pending", "confirmed", "preparing", "ready"];

fn rank(status: &str) -> Option<usize> {
    LIFECYCLE.iter().position(|s| *s == status)
}

/// Whether the order waits for a driver: assignable and nobody assigned.
pub fn awaits_driver(o: &Order) -> bool {
    ASSIGNABLE.contains(&o.status.as_str()) && o.driver_id.is_none()
}

/// Whether `from → to` is allowed: forward only (skips allowed), `cancelled`
/// from anything before `delivered`, nothing out of a final status.
pub fn check_transition(from: &str, to: &str) -> Result<(), DomainError> {
    if to != "cancelled" && rank(to).is_none() {
        return Err(DomainError::Invalid(format!(
            "unknown status {to:?}; one of {} or cancelled",
            LIFECYCLE.join(", ")
        )));
    }
    if from == to {
        return Err(DomainError::Conflict(format!("order is already {from}")));
    }
    if from == "completed" || from == "cancelled" {
        return Err(DomainError::Conflict(format!("order is {from}: final")));
    }
    let f = rank(from).unwrap_or(0);
    if to == "cancelled" {
        return if f < rank("delivered").unwrap_or(6) {
            Ok(())
        } else {
            Err(DomainError::Conflict(format!(
                "a {from} order cannot be cancelled"
            )))
        };
    }
    if rank(to) > Some(f) {
        Ok(())
    } else {
        Err(DomainError::Conflict(format!(
            "status cannot go back from {from} to {to}"
        )))
    }
}

/// The order as every dialect and the HTTP API show it (SPEC §4).
pub fn order_json(o: &Order) -> Value {
    json!({
        "id": o.id,
        "order_code": format!("ORD-{:06}", o.id),
        "order_number": o.order_number.clone().unwrap_or_else(|| o.id.to_string()),
        "order_type": o.order_type,
        "status": o.status,
        "user_id": o.user_id,
        "city_id": o.city_id,
        "driver_id": o.driver_id,
        "address_from": o.address_from,
        "address_to": o.address_to,
        "latitude_from": o.latitude_from,
        "longitude_from": o.longitude_from,
        "latitude_to": o.latitude_to,
        "longitude_to": o.longitude_to,
        "total": money(o.total_cents),
        "bonuses_used": money(o.bonuses_used_cents),
        "bonuses_earned": money(o.bonuses_earned_cents),
        "scheduled_at": o.scheduled_at.as_ref().map(iso),
        "created_at": iso(&o.created_at),
        "updated_at": iso(&o.updated_at),
        "version": o.version,
        "dispatch_status": o.dispatch_status,
    })
}

/// The order JSON of an offer, with the driver's distance to pickup.
pub fn offer_json(order: &Order, distance_km: f64) -> Value {
    let mut v = order_json(order);
    v["distance_to_pickup_km"] = json!((distance_km * 100.0).round() / 100.0);
    v
}

/// The rooms that hear about an order: admins, its city, its creator.
pub fn order_rooms(o: &Order) -> Vec<String> {
    vec![
        room::ADMIN.to_string(),
        room::city(o.city_id),
        room::user(o.user_id),
    ]
}

/// `ORDER_UPDATED` (and its dialect forms) for a change of `o`.
pub fn updated_event(o: &Order, changed: Vec<String>, old_status: Option<String>) -> Event {
    Event::new(
        order_rooms(o),
        EventKind::OrderUpdated {
            order: order_json(o),
            changed,
            old_status,
            timestamp: iso_now(),
        },
    )
}

/// Pickup point, when the order has one.
pub fn pickup(o: &Order) -> Option<(f64, f64)> {
    let lat = o.latitude_from.as_deref()?.parse().ok()?;
    let lon = o.longitude_from.as_deref()?.parse().ok()?;
    Some((lat, lon))
}

/// Whether `who` may see `o` (reading outside one's scope is a 404).
pub fn visible(who: &Identity, o: &Order, offered_to_driver: bool) -> bool {
    match who.role {
        Role::Admin | Role::Ceo => true,
        Role::Manager => who.city_ids.contains(&o.city_id),
        Role::Driver => o.driver_id == Some(who.driver_id) || offered_to_driver,
        Role::User => o.user_id == who.user_id,
    }
}

/// The orders `who` may list.
pub fn scope_of(who: &Identity) -> Scope {
    match who.role {
        Role::Admin | Role::Ceo => Scope::All,
        Role::Manager => Scope::Cities(who.city_ids.clone()),
        Role::Driver => Scope::Driver(who.driver_id),
        Role::User => Scope::User(who.user_id),
    }
}

/// The largest amount of money an order may carry (SPEC §5).
pub const MAX_MONEY: f64 = 1_000_000_000.0;

/// An amount given as a number, in cents: finite, 0 to [`MAX_MONEY`],
/// rounded to the nearest cent; otherwise a 422 `invalid_amount`.
pub fn cents(name: &str, x: f64) -> Result<i64, DomainError> {
    if !(x.is_finite() && (0.0..=MAX_MONEY).contains(&x)) {
        return Err(DomainError::Rule {
            code: "invalid_amount",
            message: format!("{name} must be a finite amount from 0 to 1000000000, not {x}"),
        });
    }
    Ok((x * 100.0).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_in_cents() {
        assert_eq!(cents("total", 12.35).unwrap(), 1235);
        assert_eq!(cents("total", 0.1 + 0.2).unwrap(), 30);
        assert_eq!(cents("total", 1e9).unwrap(), 100_000_000_000);
        for bad in [
            -0.01,
            1e9 + 0.01,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            assert!(matches!(
                cents("total", bad),
                Err(DomainError::Rule {
                    code: "invalid_amount",
                    ..
                })
            ));
        }
    }

    #[test]
    fn lifecycle_rules() {
        assert!(check_transition("pending", "confirmed").is_ok());
        assert!(
            check_transition("pending", "completed").is_ok(),
            "skips allowed"
        );
        assert!(matches!(
            check_transition("ready", "pending"),
            Err(DomainError::Conflict(_))
        ));
        assert!(matches!(
            check_transition("ready", "ready"),
            Err(DomainError::Conflict(_))
        ));
        assert!(check_transition("picked_up", "cancelled").is_ok());
        assert!(matches!(
            check_transition("delivered", "cancelled"),
            Err(DomainError::Conflict(_))
        ));
        assert!(matches!(
            check_transition("completed", "cancelled"),
            Err(DomainError::Conflict(_))
        ));
        assert!(matches!(
            check_transition("cancelled", "completed"),
            Err(DomainError::Conflict(_))
        ));
        assert!(matches!(
            check_transition("pending", "flying"),
            Err(DomainError::Invalid(_))
        ));
    }
}
