//! Orders: the lifecycle services (create, change, delete) and the events
//! each change produces. HTTP handlers call these after parsing and role
//! checks; the rules themselves (amounts, coordinates, bonuses, lifecycle)
//! live here and in [`super::model`]. The events are built inside the
//! change's transaction (the store calls back with the rows it wrote) and
//! leave through the event outbox, so a committed change is announced even
//! when the broker is down at that moment.

use chrono::{DateTime, Utc};

use super::model::{
    cents, check_transition, order_json, order_rooms, pickup, updated_event, visible,
};
use super::{Ctx, DomainError, bonuses};
use crate::auth::Identity;
use crate::domain::dispatch;
use crate::event::{Event, EventKind, valid_point};
use crate::store::{self, NewOrder, Order, OrderChanges};

/// A new order as the caller described it, before the rules run.
#[derive(Debug, Clone)]
pub struct OrderDraft {
    /// 1–32 characters, unique; `None` = the id as a string.
    pub order_number: Option<String>,
    pub order_type: Option<String>,
    pub user_id: i64,
    pub city_id: i64,
    pub address_from: String,
    pub address_to: String,
    /// Pickup point (latitude, longitude), when given.
    pub from: Option<(f64, f64)>,
    /// Drop-off point, when given.
    pub to: Option<(f64, f64)>,
    pub total: f64,
    pub bonuses_used: f64,
    pub scheduled_at: Option<DateTime<Utc>>,
}

/// A point as the decimal strings seed 001 stores, after the range check.
fn point(
    p: Option<(f64, f64)>,
    name: &str,
) -> Result<(Option<String>, Option<String>), DomainError> {
    match p {
        None => Ok((None, None)),
        Some((lat, lon)) if valid_point(lat, lon) => {
            Ok((Some(format!("{lat:.6}")), Some(format!("{lon:.6}"))))
        }
        Some(_) => Err(DomainError::Invalid(format!(
            "latitude_{name}/longitude_{name} out of range"
        ))),
    }
}

/// The order-create rules: amounts finite, 0 to 1e9 and kept in cents,
/// bonuses within the total, coordinates in range, a non-empty type; bonuses earned at
/// `BONUS_RATE`. The balance check runs in the create transaction.
fn validate(d: OrderDraft, bonus_rate: f64) -> Result<NewOrder, DomainError> {
    let total = cents("total", d.total)?;
    let bonuses_used = cents("bonuses_used", d.bonuses_used)?;
    if bonuses_used > total {
        return Err(DomainError::Rule {
            code: "bonuses_exceed_total",
            message: format!("bonuses_used {} exceeds total {}", d.bonuses_used, d.total),
        });
    }
    let (latitude_from, longitude_from) = point(d.from, "from")?;
    let (latitude_to, longitude_to) = point(d.to, "to")?;
    if let Some(n) = &d.order_number
        && !(1..=32).contains(&n.chars().count())
    {
        return Err(DomainError::Invalid(
            "order_number must be 1 to 32 characters".into(),
        ));
    }
    let order_type = d.order_type.unwrap_or_else(|| "delivery".into());
    if order_type.is_empty() {
        return Err(DomainError::Invalid("order_type cannot be empty".into()));
    }
    Ok(NewOrder {
        order_number: d.order_number,
        order_type,
        user_id: d.user_id,
        city_id: d.city_id,
        address_from: d.address_from,
        address_to: d.address_to,
        latitude_from,
        longitude_from,
        latitude_to,
        longitude_to,
        total,
        bonuses_used,
        bonuses_earned: (total as f64 * bonus_rate).round() as i64,
        scheduled_at: d.scheduled_at,
        dispatch_status: if d.from.is_some() {
            "searching"
        } else {
            "none"
        }
        .into(),
    })
}

/// Creates an order (debiting bonuses), announces it, and starts dispatch
/// when it has a pickup point. Succeeds once the order is committed: the
/// announcement waits in the outbox if the broker is down, and a dispatch
/// that fails is only logged (see [`dispatch::dispatch_committed`]).
pub async fn create(ctx: &Ctx, draft: OrderDraft) -> Result<Order, DomainError> {
    let new = validate(draft, ctx.rules.bonus_rate)?;
    let order = store::create_order(&ctx.db, new, ctx.sync_on(), |order, debit| {
        let mut events = vec![Event::new(
            order_rooms(order),
            EventKind::OrderCreated {
                order: order_json(order),
            },
        )];
        events.extend(debit.map(bonuses::event));
        events
    })
    .await?;
    ctx.wake_relay();
    if pickup(&order).is_some() {
        dispatch::dispatch_committed(ctx, order.id).await;
    }
    Ok(order)
}

/// Applies a PATCH: status along the lifecycle, `scheduled_at`, and
/// `driver_id` (which makes an offer to that driver; the order row itself
/// does not change until the driver accepts).
pub async fn update(
    ctx: &Ctx,
    id: i64,
    status: Option<String>,
    scheduled_at: Option<Option<DateTime<Utc>>>,
    driver_id: Option<i64>,
    who: &Identity,
) -> Result<Order, DomainError> {
    let order = apply_fields(ctx, id, status, scheduled_at, who).await?;
    if let Some(d) = driver_id {
        dispatch::assign(ctx, &order, d).await?;
    }
    Ok(order)
}

/// Status and `scheduled_at`, with their events; retries a few times when
/// another writer moved the order first. Nothing to change: the order as is.
async fn apply_fields(
    ctx: &Ctx,
    id: i64,
    status: Option<String>,
    scheduled_at: Option<Option<DateTime<Utc>>>,
    who: &Identity,
) -> Result<Order, DomainError> {
    for _ in 0..5 {
        let current = store::get_order(&ctx.db, id)
            .await?
            .filter(|o| visible(who, o, false))
            .ok_or_else(|| DomainError::NotFound(format!("order {id} not found")))?;
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
        let after = changes
            .status
            .clone()
            .unwrap_or_else(|| current.status.clone());
        let ds = dispatch_status_after(&current, &after);
        if ds != current.dispatch_status {
            changes.dispatch_status = Some(ds.to_string());
            changed.push("dispatch_status".to_string());
        }
        let old_status = status.as_ref().map(|_| current.status.clone());
        let Some(order) = store::update_order(
            &ctx.db,
            &current,
            &changes,
            ctx.sync_on(),
            |order, credit| {
                let mut events = vec![updated_event(order, changed, old_status)];
                events.extend(credit.map(bonuses::event));
                events
            },
        )
        .await?
        else {
            continue; // someone else changed it: re-read and re-check
        };
        ctx.wake_relay();
        if order.status == "cancelled" {
            dispatch::cancel_offers(ctx, &order, "Order cancelled").await?;
        }
        if let Some(d) = order.driver_id
            && !busy_status(&order.status)
            && busy_status(&current.status)
        {
            // The driver finished (delivered, completed or cancelled): it
            // is eligible for the orders waiting near it.
            if let Err(e) = dispatch::driver_eligible(ctx, d, order.city_id, None).await {
                tracing::debug!(driver = d, error = %e, "re-dispatch for a freed driver failed; the retry pass catches up");
            }
        }
        return Ok(order);
    }
    Err(DomainError::Conflict(format!(
        "order {id} is changing too fast; retry"
    )))
}

pub async fn delete(ctx: &Ctx, id: i64) -> Result<(), DomainError> {
    let not_found = || DomainError::NotFound(format!("order {id} not found"));
    let order = store::get_order(&ctx.db, id).await?.ok_or_else(not_found)?;
    let ended = store::delete_order(
        &ctx.db,
        id,
        ctx.sync_on(),
        |offer| vec![dispatch::offer_ended_event(offer, "Order cancelled")],
        |refund| {
            let mut events = vec![Event::new(
                order_rooms(&order),
                EventKind::OrderDeleted { id },
            )];
            events.extend(refund.map(bonuses::event));
            events
        },
    )
    .await?
    .ok_or_else(not_found)?; // deleted meanwhile
    ctx.wake_relay();
    for offer in ended {
        dispatch::drop_deadline(ctx, order.city_id, &offer).await;
    }
    Ok(())
}

/// Whether an order in `status` keeps its driver busy (SPEC §5).
fn busy_status(status: &str) -> bool {
    matches!(status, "accepted" | "picked_up")
}

/// The `dispatch_status` an order has after its status becomes `status`:
/// `none` once final (or moved past the point a driver can be assigned
/// without one), `assigned` with a driver, else unchanged.
fn dispatch_status_after<'a>(o: &'a Order, status: &str) -> &'a str {
    if matches!(status, "completed" | "cancelled") {
        "none"
    } else if o.driver_id.is_some() {
        "assigned"
    } else if !super::model::ASSIGNABLE.contains(&status) {
        "none"
    } else {
        &o.dispatch_status
    }
}

/// The order if `who` may see it; 404 otherwise (existence not revealed).
/// A driver sees orders it holds an open offer for or is assigned to.
pub async fn visible_order(ctx: &Ctx, who: &Identity, id: i64) -> Result<Order, DomainError> {
    let not_found = || DomainError::NotFound(format!("order {id} not found"));
    let order = store::get_order(&ctx.db, id).await?.ok_or_else(not_found)?;
    let offered = who.role == crate::auth::Role::Driver
        && store::open_offer_of_order(&ctx.db, id)
            .await?
            .is_some_and(|o| o.driver_id == who.driver_id);
    if visible(who, &order, offered) {
        Ok(order)
    } else {
        Err(not_found())
    }
}
