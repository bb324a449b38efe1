//! Orders: the lifecycle rules, the order JSON every dialect carries, and
//! the events each change produces. HTTP handlers call these; they never
//! build wire JSON themselves.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use super::bonuses;
use crate::auth::{Identity, Role};
use crate::dispatch;
use crate::event::{Event, EventKind, iso_now, room};
use crate::http::ApiError;
use crate::node::App;
use crate::store::{self, NewOrder, Order, OrderChanges, Scope};

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

/// Whether `from → to` is allowed: forward only (skips allowed), `cancelled`
/// from anything before `delivered`, nothing out of a final status.
pub fn check_transition(from: &str, to: &str) -> Result<(), ApiError> {
    if to != "cancelled" && rank(to).is_none() {
        return Err(ApiError::BadRequest(format!(
            "unknown status {to:?}; one of {} or cancelled",
            LIFECYCLE.join(", ")
        )));
    }
    if from == to {
        return Err(ApiError::Conflict(format!("order is already {from}")));
    }
    if from == "completed" || from == "cancelled" {
        return Err(ApiError::Conflict(format!("order is {from}: final")));
    }
    let f = rank(from).unwrap_or(0);
    if to == "cancelled" {
        return if f < rank("delivered").unwrap_or(6) {
            Ok(())
        } else {
            Err(ApiError::Conflict(format!(
                "a {from} order cannot be cancelled"
            )))
        };
    }
    if rank(to) > Some(f) {
        Ok(())
    } else {
        Err(ApiError::Conflict(format!(
            "status cannot go back from {from} to {to}"
        )))
    }
}

pub fn iso(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The order as every dialect and the HTTP API show it (SPEC §4).
pub fn order_json(o: &Order) -> Value {
    json!({
        "id": o.id,
        "order_code": format!("ORD-{:06}", o.id),
        "order_number": o.id.to_string(),
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
        "total": o.total,
        "bonuses_used": o.bonuses_used,
        "bonuses_earned": o.bonuses_earned,
        "scheduled_at": o.scheduled_at.as_ref().map(iso),
        "created_at": iso(&o.created_at),
        "updated_at": iso(&o.updated_at),
        "version": o.version,
    })
}

/// The rooms that hear about an order: admins, its city, its creator.
pub fn order_rooms(o: &Order) -> Vec<String> {
    vec![
        room::ADMIN.to_string(),
        room::city(o.city_id),
        room::user(o.user_id),
    ]
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

pub fn scope_of(who: &Identity) -> Scope {
    match who.role {
        Role::Admin | Role::Ceo => Scope::All,
        Role::Manager => Scope::Cities(who.city_ids.clone()),
        Role::Driver => Scope::Driver(who.driver_id),
        Role::User => Scope::User(who.user_id),
    }
}

pub async fn emit_updated(
    app: &App,
    o: &Order,
    changed: Vec<String>,
    old_status: Option<String>,
) -> Result<(), ApiError> {
    app.publish(Event::new(
        order_rooms(o),
        EventKind::OrderUpdated {
            order: order_json(o),
            changed,
            old_status,
            timestamp: iso_now(),
        },
    ))
    .await
}

/// Creates an order (debiting bonuses), announces it, and starts dispatch
/// when it has a pickup point.
pub async fn create(app: &App, new: NewOrder) -> Result<Order, ApiError> {
    let (order, debit) = store::create_order(&app.db, new, app.sync_on()).await?;
    app.publish(Event::new(
        order_rooms(&order),
        EventKind::OrderCreated {
            order: order_json(&order),
        },
    ))
    .await?;
    if let Some(change) = debit {
        bonuses::emit(app, &change).await?;
    }
    if pickup(&order).is_some() {
        dispatch::dispatch(app, order.id).await?;
    }
    Ok(order)
}

/// Applies a PATCH: status along the lifecycle, `scheduled_at`, and
/// `driver_id` (which makes an offer to that driver; the order row itself
/// does not change until the driver accepts).
pub async fn update(
    app: &App,
    id: i64,
    status: Option<String>,
    scheduled_at: Option<Option<DateTime<Utc>>>,
    driver_id: Option<i64>,
    who: &Identity,
) -> Result<Order, ApiError> {
    let order = apply_fields(app, id, status, scheduled_at, who).await?;
    if let Some(d) = driver_id {
        dispatch::assign(app, &order, d).await?;
    }
    Ok(order)
}

/// Status and `scheduled_at`, with their events; retries a few times when
/// another writer moved the order first. Nothing to change: the order as is.
async fn apply_fields(
    app: &App,
    id: i64,
    status: Option<String>,
    scheduled_at: Option<Option<DateTime<Utc>>>,
    who: &Identity,
) -> Result<Order, ApiError> {
    for _ in 0..5 {
        let current = store::get_order(&app.db, id)
            .await?
            .filter(|o| visible(who, o, false))
            .ok_or_else(|| ApiError::NotFound(format!("order {id} not found")))?;
        let mut changes = OrderChanges::default();
        let mut changed = Vec::new();
        if let Some(s) = &status {
            check_transition(&current.status, s)?;
            changes.status = Some(s.clone());
            changed.push("status".to_string());
        }
        if let Some(t) = scheduled_at
            && t != current.scheduled_at
        {
            changes.scheduled_at = Some(t);
            changed.push("scheduled_at".to_string());
        }
        if changed.is_empty() {
            return Ok(current);
        }
        let Some((order, credit)) =
            store::update_order(&app.db, &current, &changes, app.sync_on()).await?
        else {
            continue; // someone else changed it: re-read and re-check
        };
        let old_status = status.as_ref().map(|_| current.status.clone());
        emit_updated(app, &order, changed, old_status).await?;
        if let Some(c) = credit {
            bonuses::emit(app, &c).await?;
        }
        if order.status == "cancelled" {
            dispatch::cancel_offers(app, order.id, "Order cancelled").await?;
        }
        return Ok(order);
    }
    Err(ApiError::Conflict(format!(
        "order {id} is changing too fast; retry"
    )))
}

pub async fn delete(app: &App, id: i64) -> Result<(), ApiError> {
    let order = store::get_order(&app.db, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("order {id} not found")))?;
    let ended = store::delete_order(&app.db, id, app.sync_on()).await?;
    for offer in ended {
        dispatch::offer_ended(app, &offer, "Order cancelled").await?;
    }
    app.publish(Event::new(
        order_rooms(&order),
        EventKind::OrderDeleted { id },
    ))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_rules() {
        assert!(check_transition("pending", "confirmed").is_ok());
        assert!(
            check_transition("pending", "completed").is_ok(),
            "skips allowed"
        );
        assert!(matches!(
            check_transition("ready", "pending"),
            Err(ApiError::Conflict(_))
        ));
        assert!(matches!(
            check_transition("ready", "ready"),
            Err(ApiError::Conflict(_))
        ));
        assert!(check_transition("picked_up", "cancelled").is_ok());
        assert!(matches!(
            check_transition("delivered", "cancelled"),
            Err(ApiError::Conflict(_))
        ));
        assert!(matches!(
            check_transition("completed", "cancelled"),
            Err(ApiError::Conflict(_))
        ));
        assert!(matches!(
            check_transition("cancelled", "completed"),
            Err(ApiError::Conflict(_))
        ));
        assert!(matches!(
            check_transition("pending", "flying"),
            Err(ApiError::BadRequest(_))
        ));
    }
}
