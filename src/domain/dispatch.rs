//! The dispatcher: the nearest eligible driver (online, available, not
//! busy, fresh position, not in this order's cooldown) gets an offer;
//! deadlines live in the [`OfferClock`]; expiry passes the order on.
//!
//! No stranded order (SPEC §5): an order left without an offer is marked
//! `no_drivers` and put in the index's waiting set; it is dispatched again
//! at once when a driver becomes eligible near it ([`driver_eligible`]: a
//! position report finds it in the same Redis round trip; coming online,
//! saying "available" and finishing an order look it up), and by the retry
//! pass every `DISPATCH_RETRY_SECS` ([`run_retry`], one node at a time
//! under a lease) until `DISPATCH_GIVE_UP_SECS` after its creation
//! (`gave_up`).
//! A rule module like `domain`'s services, below them: it takes the same
//! [`Ctx`] and uses `domain::model` for the order's shape, never the
//! order services (which call it).
//!
//! Exactly-once: an offer leaves `open` through one conditional UPDATE
//! (`store::end_offer`), and only the caller that made that change sends
//! `order_timeout` and re-dispatches. The clock's lease makes sure some node
//! gets to try; the database makes sure only one succeeds.
//!
//! Cities: the index and the clock take the city of what they store (the
//! order's `city_id` for an order and its offers, the driver token's city
//! for a driver, 0 for none). On a Redis Cluster they are partitioned by
//! it, so an order is offered only to drivers of its city; on one Redis
//! and embedded the city is not used.
//!
//! The events of offers (made, ended, accepted) are written to the event
//! outbox in the offer's transaction; Redis (driver index, offer clock) is
//! used before and after it. A re-dispatch that follows a committed change
//! ([`dispatch_committed`]) only logs its failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::Value;

use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::clock::OfferClock;
use crate::domain::model::{ASSIGNABLE, awaits_driver, offer_json, pickup, updated_event};
use crate::domain::{Ctx, DomainError};
use crate::event::{Event, EventKind, Position, iso, iso_now, room};
use crate::index::{DriverIndex, Nearby, Report, Scope, Via, city_of};
use crate::lock::lock;
use crate::metrics as m;
use crate::store::{self, Offer, Order};

pub const EXPIRED_MESSAGE: &str = "Order expired or reassigned to another driver";

/// When an offer made now expires.
fn offer_deadline(ctx: &Ctx) -> chrono::DateTime<Utc> {
    Utc::now()
        + chrono::Duration::from_std(ctx.rules.offer_timeout).unwrap_or(chrono::Duration::MAX)
}

/// Distance from a driver's position to the order's pickup point, when both are known.
fn pickup_distance(order: &Order, driver: Option<(f64, f64)>) -> Option<f64> {
    let (lat, lon) = pickup(order)?;
    let (dlat, dlon) = driver?;
    Some(crate::event::haversine_km(lat, lon, dlat, dlon))
}

fn deadline_ms(o: &Offer) -> i64 {
    o.expires_at.timestamp_millis()
}

/// Why a dispatch runs: an admin asked (`POST /api/orders/{id}/dispatch`,
/// which also revives a `gave_up` order), or the dispatcher itself
/// (creation, an offer ending, a driver becoming eligible, the retry pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Admin,
    Auto,
}

/// Offers the order to the nearest eligible driver. Returns the offer made,
/// or `None`: no pickup point, not waiting for a driver, already offered,
/// given up, or nobody eligible within the radius — then the order's
/// `dispatch_status` becomes `no_drivers` (`ORDER_UPDATED` once, on the
/// change) and it waits in the index for a driver to become eligible.
pub async fn dispatch(
    ctx: &Ctx,
    order_id: i64,
    trigger: Trigger,
) -> Result<Option<Offer>, DomainError> {
    dispatch_in(ctx, order_id, trigger, None).await
}

/// [`dispatch`], with the city the order was found waiting in, if any
/// (to drop it from there when the order is gone).
async fn dispatch_in(
    ctx: &Ctx,
    order_id: i64,
    trigger: Trigger,
    waiting_in: Option<i64>,
) -> Result<Option<Offer>, DomainError> {
    let start = Instant::now();
    let Some(order) = store::get_order(&ctx.db, order_id).await? else {
        ctx.drivers
            .unwait_order(waiting_in.unwrap_or(0), order_id)
            .await?;
        return Ok(None);
    };
    let city = order.city_id;
    let Some((lat, lon)) = pickup(&order) else {
        return Ok(None);
    };
    if !awaits_driver(&order)
        || store::open_offer_of_order(&ctx.db, order_id)
            .await?
            .is_some()
    {
        ctx.drivers.unwait_order(city, order_id).await?;
        return Ok(None);
    }
    if trigger == Trigger::Auto && given_up(ctx, &order) {
        give_up(ctx, &order).await?;
        return Ok(None);
    }
    let cooling = store::offered_drivers(&ctx.db, order_id, Utc::now() - cooldown(ctx)).await?;
    let near = ctx
        .drivers
        .nearest(
            Scope::City(city),
            lat,
            lon,
            ctx.rules.dispatch_radius_km,
            ctx.rules.driver_stale,
            32,
        )
        .await?;
    let candidates: Vec<_> = near
        .into_iter()
        .filter(|n| !cooling.contains(&n.driver_id))
        .collect();
    let ids: Vec<i64> = candidates.iter().map(|c| c.driver_id).collect();
    let busy = store::unavailable_drivers(&ctx.db, &ids).await?;
    for c in candidates.iter().filter(|c| !busy.contains(&c.driver_id)) {
        let expires = offer_deadline(ctx);
        match store::create_offer(
            &ctx.db,
            order_id,
            c.driver_id,
            c.distance_km,
            expires,
            &ASSIGNABLE,
            |offer, changed| offer_made_events(&order, offer, changed),
        )
        .await?
        {
            Some(offer) => {
                offer_made(ctx, &offer, &order).await;
                metrics::histogram!(m::DISPATCH_DURATION).record(start.elapsed().as_secs_f64());
                return Ok(Some(offer));
            }
            // The driver got another offer meanwhile (try the next one), or
            // another node offered this order first, or it was deleted or
            // taken: then stop here.
            None => {
                if store::open_offer_of_order(&ctx.db, order_id)
                    .await?
                    .is_some()
                {
                    return Ok(None);
                }
                match store::get_order(&ctx.db, order_id).await? {
                    Some(o) if awaits_driver(&o) => {}
                    _ => return Ok(None),
                }
            }
        }
    }
    metrics::histogram!(m::DISPATCH_DURATION).record(start.elapsed().as_secs_f64());
    metrics::counter!(m::OFFERS, "outcome" => "no_driver").increment(1);
    // Waiting first, then the status: a driver that becomes eligible
    // between the two still finds the order.
    ctx.drivers.wait_order(city, order_id, lat, lon).await?;
    if store::set_dispatch_status(&ctx.db, order_id, "no_drivers", &ASSIGNABLE, |o| {
        vec![updated_event(o, vec!["dispatch_status".into()], None)]
    })
    .await?
    .is_some()
    {
        ctx.wake_relay();
    }
    Ok(None)
}

fn cooldown(ctx: &Ctx) -> chrono::Duration {
    chrono::Duration::from_std(ctx.rules.dispatch_cooldown).unwrap_or(chrono::Duration::MAX)
}

/// Whether `DISPATCH_GIVE_UP_SECS` have passed since the order was created.
fn given_up(ctx: &Ctx, order: &Order) -> bool {
    let give_up =
        chrono::Duration::from_std(ctx.rules.dispatch_give_up).unwrap_or(chrono::Duration::MAX);
    Utc::now() - order.created_at >= give_up
}

/// The order is no longer offered by itself: `gave_up` (once, with its
/// `ORDER_UPDATED`), out of the waiting set. An admin's dispatch revives it.
async fn give_up(ctx: &Ctx, order: &Order) -> Result<(), DomainError> {
    ctx.drivers.unwait_order(order.city_id, order.id).await?;
    if store::set_dispatch_status(&ctx.db, order.id, "gave_up", &ASSIGNABLE, |o| {
        vec![updated_event(o, vec!["dispatch_status".into()], None)]
    })
    .await?
    .is_some()
    {
        ctx.wake_relay();
        metrics::counter!(m::OFFERS, "outcome" => "gave_up").increment(1);
        tracing::info!(order = order.id, "dispatch gave up");
    }
    Ok(())
}

/// [`dispatch`] after a change that is already committed (an order created,
/// an offer expired or declined): a failure, typically Redis (driver index)
/// being down, is logged instead of turning the committed change into an
/// error. The clock's 5 s database sweep catches up offers whose deadline
/// could not be scheduled, and the next dispatch of the order (an admin's
/// `POST /api/orders/{id}/dispatch`, a later expiry) or the retry pass
/// ([`run_retry`]) the rest.
pub async fn dispatch_committed(ctx: &Ctx, order_id: i64) {
    if let Err(e) = dispatch(ctx, order_id, Trigger::Auto).await {
        tracing::warn!(order = order_id, error = %e, "dispatch after commit failed; left for a later dispatch");
    }
}

/// The driver's `new_order` (the order with the distance and the
/// deadline), and `ORDER_UPDATED` when the order's `dispatch_status`
/// changed with the offer (`changed`: the order after that change).
fn offer_made_events(order: &Order, offer: &Offer, changed: Option<&Order>) -> Vec<Event> {
    let order = changed.unwrap_or(order);
    let mut json = offer_json(order, offer.distance_km);
    json["offer_expires_at"] = Value::String(iso(&offer.expires_at));
    let mut events = vec![Event::new(
        vec![room::driver(offer.driver_id)],
        EventKind::OfferMade { order: json },
    )];
    events.extend(changed.map(|o| updated_event(o, vec!["dispatch_status".into()], None)));
    events
}

/// After an offer (and its `new_order` event) is committed: wakes the relay
/// and schedules the deadline. A deadline the clock cannot take (Redis
/// down) is logged: the offer is committed, and the clock's database sweep
/// expires it.
async fn offer_made(ctx: &Ctx, offer: &Offer, order: &Order) {
    ctx.wake_relay();
    // Only an order that was waiting is in the waiting set: the others
    // save the round trip (a stale entry is dropped by the dispatch it
    // triggers).
    if matches!(order.dispatch_status.as_str(), "no_drivers" | "gave_up") {
        let _ = ctx
            .drivers
            .unwait_order(order.city_id, offer.order_id)
            .await;
    }
    metrics::counter!(m::OFFERS, "outcome" => "made").increment(1);
    if let Err(e) = ctx
        .offers
        .schedule(order.city_id, offer.id, deadline_ms(offer))
        .await
    {
        tracing::warn!(offer = offer.id, error = %e, "offer deadline not scheduled; the database sweep expires it");
    }
}

/// `order_timeout` to the driver whose offer ended.
pub fn offer_ended_event(offer: &Offer, message: &str) -> Event {
    Event::new(
        vec![room::driver(offer.driver_id)],
        EventKind::OfferEnded {
            order_id: offer.order_id,
            message: message.to_string(),
        },
    )
}

/// Drops the deadline of an offer that ended (best effort: the clock finds
/// the offer ended anyway); `city`: its order's.
pub async fn drop_deadline(ctx: &Ctx, city: i64, offer: &Offer) {
    let _ = ctx.offers.cancel(city, offer.id).await;
}

/// The city of an order, to drop its offer's deadline. 0 when the order
/// is gone or the database does not answer (best effort, like the drop:
/// a deadline left behind is claimed later and found ended).
async fn order_city(ctx: &Ctx, order_id: i64) -> i64 {
    match store::get_order(&ctx.db, order_id).await {
        Ok(order) => order.map_or(0, |o| o.city_id),
        Err(e) => {
            tracing::debug!(order = order_id, error = %e, "order's city not read");
            0
        }
    }
}

/// Expires an offer if it is still open: `order_timeout` to its driver,
/// then the next driver gets the order. Safe to call from any node, any
/// number of times.
pub async fn expire(ctx: &Ctx, offer_id: i64) -> Result<bool, DomainError> {
    let Some(offer) = store::end_offer(&ctx.db, offer_id, "expired", |offer| {
        vec![offer_ended_event(offer, EXPIRED_MESSAGE)]
    })
    .await?
    else {
        return Ok(false);
    };
    ctx.wake_relay();
    metrics::counter!(m::OFFERS, "outcome" => "expired").increment(1);
    drop_deadline(ctx, order_city(ctx, offer.order_id).await, &offer).await;
    dispatch_committed(ctx, offer.order_id).await;
    Ok(true)
}

/// Ends the order's open offers (cancel or delete).
pub async fn cancel_offers(ctx: &Ctx, order: &Order, message: &str) -> Result<(), DomainError> {
    if let Some(open) = store::open_offer_of_order(&ctx.db, order.id).await?
        && let Some(offer) = store::end_offer(&ctx.db, open.id, "cancelled", |offer| {
            vec![offer_ended_event(offer, message)]
        })
        .await?
    {
        ctx.wake_relay();
        drop_deadline(ctx, order.city_id, &offer).await;
    }
    Ok(())
}

/// An admin assigns a driver by hand: any open offer of the order ends and
/// the named driver gets one.
pub async fn assign(ctx: &Ctx, order: &Order, driver_id: i64) -> Result<Offer, DomainError> {
    if !awaits_driver(order) {
        return Err(DomainError::Conflict(format!(
            "order {} is {} and cannot be offered",
            order.id, order.status
        )));
    }
    if !store::unavailable_drivers(&ctx.db, &[driver_id])
        .await?
        .is_empty()
    {
        return Err(DomainError::Conflict(format!(
            "driver {driver_id} already holds an offer or an order"
        )));
    }
    cancel_offers(ctx, order, EXPIRED_MESSAGE).await?;
    // On a cluster the driver is looked up in the order's city first, then
    // in the others (an admin may assign a driver of another city).
    let distance =
        pickup_distance(order, ctx.drivers.locate(order.city_id, driver_id).await?).unwrap_or(0.0);
    let expires = offer_deadline(ctx);
    let offer = store::create_offer(
        &ctx.db,
        order.id,
        driver_id,
        distance,
        expires,
        &ASSIGNABLE,
        |offer, changed| offer_made_events(order, offer, changed),
    )
    .await?
    .ok_or_else(|| {
        DomainError::Conflict("the driver or the order got another offer first".into())
    })?;
    offer_made(ctx, &offer, order).await;
    Ok(offer)
}

/// The driver's open offers (seed 001 poll and `initial_orders`); overdue
/// ones are expired on the spot, with the same messages as the clock.
pub async fn open_offers(ctx: &Ctx, who: &Identity) -> Result<Vec<Value>, DomainError> {
    let now = Utc::now();
    let pos = ctx
        .drivers
        .position(city_of(who.city_id), who.driver_id)
        .await?;
    let mut out = Vec::new();
    for offer in store::open_offers_of_driver(&ctx.db, who.driver_id).await? {
        if offer.expires_at <= now {
            expire(ctx, offer.id).await?;
            continue;
        }
        let Some(order) = store::get_order(&ctx.db, offer.order_id).await? else {
            continue;
        };
        let distance = pickup_distance(&order, pos).unwrap_or(offer.distance_km);
        let mut v = offer_json(&order, distance);
        v["offer_expires_at"] = Value::String(iso(&offer.expires_at));
        out.push(v);
    }
    Ok(out)
}

/// The driver's open offer of `order_id`, or 409.
async fn own_open_offer(ctx: &Ctx, who: &Identity, order_id: i64) -> Result<Offer, DomainError> {
    store::open_offers_of_driver(&ctx.db, who.driver_id)
        .await?
        .into_iter()
        .find(|o| o.order_id == order_id)
        .ok_or_else(|| {
            DomainError::Conflict(format!(
                "no open offer of order {order_id} for this driver (expired or not yours)"
            ))
        })
}

pub async fn accept(ctx: &Ctx, who: &Identity, order_id: i64) -> Result<Order, DomainError> {
    let offer = own_open_offer(ctx, who, order_id).await?;
    if offer.expires_at <= Utc::now() {
        expire(ctx, offer.id).await?;
        return Err(DomainError::Conflict(format!(
            "the offer of order {order_id} expired"
        )));
    }
    let before = store::get_order(&ctx.db, order_id).await?;
    let city = before.as_ref().map_or(0, |o| o.city_id);
    let order = store::accept_offer(&ctx.db, &offer, &ASSIGNABLE, ctx.sync_on(), |order| {
        let mut changed = vec!["status".to_string(), "driver_id".to_string()];
        if before.as_ref().map(|b| b.dispatch_status.as_str()) != Some("assigned") {
            changed.push("dispatch_status".into());
        }
        vec![updated_event(order, changed, before.map(|b| b.status))]
    })
    .await?
    .ok_or_else(|| {
        DomainError::Conflict(format!("the offer of order {order_id} is no longer open"))
    })?;
    ctx.wake_relay();
    drop_deadline(ctx, city, &offer).await;
    metrics::counter!(m::OFFERS, "outcome" => "accepted").increment(1);
    Ok(order)
}

pub async fn decline(ctx: &Ctx, who: &Identity, order_id: i64) -> Result<(), DomainError> {
    let offer = own_open_offer(ctx, who, order_id).await?;
    // A decline tells nobody (the driver knows); the offer ends silently.
    let Some(offer) = store::end_offer(&ctx.db, offer.id, "declined", |_| Vec::new()).await? else {
        return Err(DomainError::Conflict(format!(
            "the offer of order {order_id} is no longer open"
        )));
    };
    drop_deadline(ctx, order_city(ctx, order_id).await, &offer).await;
    metrics::counter!(m::OFFERS, "outcome" => "declined").increment(1);
    dispatch_committed(ctx, order_id).await;
    Ok(())
}

/// A driver's position (socket or HTTP): into the index, then
/// DRIVER_LOCATION to admins and the driver's city. Orders waiting near
/// the driver (found in the same Redis round trip) are tried again.
pub async fn driver_location(
    ctx: &Arc<Ctx>,
    who: &Identity,
    loc: Position,
) -> Result<(), DomainError> {
    let waiting = ctx
        .drivers
        .put(Report {
            driver_id: who.driver_id,
            city_id: who.city_id,
            lat: loc.latitude(),
            lon: loc.longitude(),
            radius_km: ctx.rules.dispatch_radius_km,
        })
        .await?;
    metrics::counter!(m::DRIVER_LOCATIONS).increment(1);
    if !waiting.is_empty() {
        spawn_eligible(ctx, who.driver_id, city_of(who.city_id), Some(waiting));
    }
    let mut rooms = vec![room::ADMIN.to_string()];
    rooms.extend(who.city_id.map(room::city));
    ctx.publish(Event::new(
        rooms,
        EventKind::DriverLocation {
            driver_id: who.driver_id,
            latitude: loc.latitude(),
            longitude: loc.longitude(),
            heading: loc.heading(),
            speed: loc.speed(),
            timestamp: iso_now(),
        },
    ))
    .await
}

/// A driver (of `city`: its token's) says it can (or cannot) take offers
/// now; "can" makes it eligible for the orders waiting near it.
pub async fn set_available(
    ctx: &Arc<Ctx>,
    city: i64,
    driver_id: i64,
    available: bool,
) -> Result<(), DomainError> {
    ctx.drivers
        .set_available(city, driver_id, available)
        .await?;
    if available {
        spawn_eligible(ctx, driver_id, city, None);
    }
    Ok(())
}

/// How long a driver socket's presence lasts without a refresh: a node that
/// dies takes its drivers offline within this (SPEC §5: 15 s).
pub const SOCKET_PRESENCE_TTL: Duration = Duration::from_secs(12);
/// How often a node refreshes the presence of the drivers whose sockets it
/// holds.
pub const PRESENCE_REFRESH: Duration = Duration::from_secs(4);

/// Drivers (of `city`: their tokens') online `via` a socket on this node
/// or the HTTP API: presence in the index; those that just came online are
/// eligible for the orders waiting near them.
pub async fn drivers_online(
    ctx: &Arc<Ctx>,
    city: i64,
    ids: &[i64],
    via: Via,
) -> Result<(), DomainError> {
    let ttl = match via {
        Via::Socket => SOCKET_PRESENCE_TTL,
        Via::Http => ctx.rules.driver_stale,
    };
    for id in ctx.drivers.online(city, ids, via, ttl).await? {
        spawn_eligible(ctx, id, city, None);
    }
    Ok(())
}

/// The driver's (of `city`) last socket on this node closed.
pub async fn driver_offline(ctx: &Ctx, city: i64, driver_id: i64) -> Result<(), DomainError> {
    Ok(ctx.drivers.offline(city, driver_id).await?)
}

/// At most one eligibility-triggered dispatch per order per this, per node:
/// a driver in an order's cooldown reporting its position every second
/// must not re-run the order's dispatch every second.
pub const ELIGIBLE_GAP: Duration = Duration::from_millis(500);

fn spawn_eligible(ctx: &Arc<Ctx>, driver_id: i64, city: i64, waiting: Option<Vec<i64>>) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        if let Err(e) = driver_eligible(&ctx, driver_id, city, waiting).await {
            tracing::debug!(driver = driver_id, error = %e, "re-dispatch for an eligible driver failed; the retry pass catches up");
        }
    });
}

/// A driver became eligible (came online, reported a position, said it is
/// available, finished an order): the orders waiting near it (`waiting`,
/// or looked up around its last position) are dispatched again, nearest
/// first. Each goes to its nearest eligible driver, which may be another.
/// `city`: the driver's (where it and the orders are looked up on a
/// cluster).
pub async fn driver_eligible(
    ctx: &Ctx,
    driver_id: i64,
    city: i64,
    waiting: Option<Vec<i64>>,
) -> Result<(), DomainError> {
    let waiting = match waiting {
        Some(w) => w,
        None => match ctx.drivers.position(city, driver_id).await? {
            Some((lat, lon)) => {
                ctx.drivers
                    .waiting_near(city, lat, lon, ctx.rules.dispatch_radius_km)
                    .await?
            }
            None => return Ok(()),
        },
    };
    if waiting.is_empty()
        || !store::unavailable_drivers(&ctx.db, &[driver_id])
            .await?
            .is_empty()
    {
        return Ok(());
    }
    for order_id in waiting {
        let due = {
            let mut tries = lock(&ctx.eligible_tries);
            let now = Instant::now();
            if tries.len() > 4096 {
                tries.retain(|_, t| now.duration_since(*t) < ELIGIBLE_GAP);
            }
            match tries.get(&order_id) {
                Some(t) if now.duration_since(*t) < ELIGIBLE_GAP => false,
                _ => {
                    tries.insert(order_id, now);
                    true
                }
            }
        };
        if due {
            dispatch_in(ctx, order_id, Trigger::Auto, Some(city)).await?;
        }
    }
    Ok(())
}

/// Drivers near a point who could take an offer now (online, available,
/// fresh, not holding an offer or an order), nearest first:
/// `GET /api/drivers/nearby`. `cities` limits them to those cities (a
/// manager's: on a cluster only their partitions are searched); `None`
/// shows all (on a cluster: every registered city, merged by distance).
pub async fn nearby(
    ctx: &Ctx,
    lat: f64,
    lon: f64,
    radius_km: f64,
    limit: usize,
    cities: Option<&[i64]>,
) -> Result<Vec<Nearby>, DomainError> {
    let in_scope = |n: &Nearby| cities.is_none_or(|c| n.city_id.is_some_and(|id| c.contains(&id)));
    // A manager's drivers may be a few among many: look further than
    // `limit` before the city filter.
    let fetch = if cities.is_some() {
        limit * 8 + 32
    } else {
        limit
    };
    let scope = cities.map_or(Scope::All, Scope::Cities);
    let near = ctx
        .drivers
        .nearest(scope, lat, lon, radius_km, ctx.rules.driver_stale, fetch)
        .await?;
    let near: Vec<Nearby> = near.into_iter().filter(in_scope).collect();
    let ids: Vec<i64> = near.iter().map(|n| n.driver_id).collect();
    let busy = store::unavailable_drivers(&ctx.db, &ids).await?;
    Ok(near
        .into_iter()
        .filter(|n| !busy.contains(&n.driver_id))
        .take(limit)
        .collect())
}

/// The lease under which one node at a time runs the retry pass.
const RETRY_LEASE: &str = "dispatch-retry";

/// Every node runs this; the one holding the lease dispatches again, every
/// `DISPATCH_RETRY_SECS`, each order waiting for a driver with no open
/// offer (and gives up those past `DISPATCH_GIVE_UP_SECS`).
pub async fn run_retry(ctx: Arc<Ctx>, holder: String, stop: CancellationToken) {
    let period = ctx.rules.dispatch_retry;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.cancelled() => return,
        }
        match store::take_lease(&ctx.db, RETRY_LEASE, &holder, period * 2).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "retry lease not taken");
                continue;
            }
        }
        if let Err(e) = retry_pass(&ctx).await {
            tracing::warn!(error = %e, "dispatch retry pass failed");
        }
    }
}

/// One retry pass over the orders left without an offer.
pub async fn retry_pass(ctx: &Ctx) -> Result<usize, DomainError> {
    let orders = store::orders_awaiting_dispatch(&ctx.db, &ASSIGNABLE, 5000).await?;
    let n = orders.len();
    for order in orders {
        if let Err(e) = dispatch(ctx, order.id, Trigger::Auto).await {
            tracing::debug!(order = order.id, error = %e, "retry of a waiting order failed");
            if e.is_unavailable() {
                return Err(e);
            }
        }
    }
    Ok(n)
}

/// Every node runs this: claim due deadlines and expire them; every few
/// seconds also sweep the database for open offers past their deadline
/// (a deadline Redis lost, or one scheduled while Redis was down).
pub async fn run_clock(ctx: Arc<Ctx>, stop: CancellationToken) {
    // Up to 64 expiries in flight; the loop claims only what it can start
    // at once, and never waits for a batch (a slow re-dispatch must not
    // delay the next deadline).
    const IN_FLIGHT: usize = 64;
    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut wait = BUSY_TICK;
    let mut last_sweep = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        let free = permits.available_permits();
        wait = BUSY_TICK;
        if free > 0 {
            let now_ms = Utc::now().timestamp_millis();
            match ctx.offers.claim_due(now_ms, free).await {
                Ok(claimed) => {
                    if ctx.rules.fault_hang_after_claim && !claimed.ids.is_empty() {
                        tracing::error!(offers = ?claimed.ids, "fault injection: hanging after claim");
                        std::future::pending::<()>().await;
                    }
                    if claimed.ids.is_empty() {
                        wait = idle_wait(claimed.next_ms, now_ms);
                    }
                    for due in claimed.ids {
                        let Ok(permit) = permits.clone().try_acquire_owned() else {
                            break; // cannot happen: we claimed at most `free`
                        };
                        let ctx = ctx.clone();
                        let id = due.offer_id;
                        tokio::spawn(async move {
                            let _permit = permit;
                            match expire(&ctx, id).await {
                                Ok(_) => {
                                    let _ = ctx.offers.done(due.city, id).await;
                                }
                                // Not marked done: the lease runs out and
                                // some node retries it.
                                Err(e) => {
                                    tracing::warn!(offer = id, error = %e, "offer expiry failed")
                                }
                            }
                        });
                    }
                }
                Err(e) => {
                    wait = IDLE_TICK;
                    tracing::debug!(error = %e, "claiming due offers failed");
                }
            }
        }
        if last_sweep.elapsed() >= Duration::from_secs(5) {
            last_sweep = Instant::now();
            if let Err(e) = sweep(&ctx).await {
                tracing::debug!(error = %e, "offer sweep failed");
            }
        }
    }
}

/// While deadlines are being expired the clock polls every 20 ms.
const BUSY_TICK: Duration = Duration::from_millis(20);
/// An idle clock sleeps until the next deadline or lease expiry, at most
/// this long. A deadline scheduled meanwhile is at least OFFER_TIMEOUT
/// ahead, so it cannot fall before the wake-up unless that timeout is
/// shorter than this.
const IDLE_TICK: Duration = Duration::from_millis(100);

fn idle_wait(next_ms: Option<i64>, now_ms: i64) -> Duration {
    match next_ms {
        Some(t) => {
            Duration::from_millis((t - now_ms).clamp(5, IDLE_TICK.as_millis() as i64) as u64)
        }
        None => IDLE_TICK,
    }
}

/// Expires open offers whose deadline passed more than a lease ago.
async fn sweep(ctx: &Ctx) -> Result<(), DomainError> {
    let cutoff = Utc::now()
        - chrono::Duration::from_std(ctx.rules.offer_lease).unwrap_or(chrono::Duration::zero());
    for offer in store::open_offers(&ctx.db).await? {
        if offer.expires_at < cutoff {
            expire(ctx, offer.id).await?;
        }
    }
    Ok(())
}

/// At start: re-schedule deadlines of open offers that Redis lost. An offer
/// another node has claimed keeps its lease: it is taken over only when the
/// lease runs out, never at once by whichever node starts next.
pub async fn reseed(ctx: &Ctx) -> Result<usize, DomainError> {
    let open = store::open_offers(&ctx.db).await?;
    let orders: Vec<i64> = open.iter().map(|o| o.order_id).collect();
    let cities = store::order_cities(&ctx.db, &orders).await?;
    for o in &open {
        let city = cities.get(&o.order_id).copied().unwrap_or(0);
        ctx.offers.seed(city, o.id, deadline_ms(o)).await?;
    }
    Ok(open.len())
}
