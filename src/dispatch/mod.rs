//! The dispatcher: the nearest available driver not yet tried gets an
//! offer; deadlines live in the [`OfferClock`]; expiry passes the order on.
//!
//! Exactly-once: an offer leaves `open` through one conditional UPDATE
//! (`store::end_offer`), and only the caller that made that change sends
//! `order_timeout` and re-dispatches. The clock's lease makes sure some node
//! gets to try; the database makes sure only one succeeds.

pub mod clock;
pub mod index;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::Value;

use crate::auth::Identity;
use crate::domain::orders::{self, ASSIGNABLE, order_json, pickup};
use crate::event::{Event, EventKind, iso_now, room};
use crate::http::ApiError;
use crate::metrics as m;
use crate::node::App;
use crate::store::{self, Offer, Order};
use crate::ws::dialect::Location;
use clock::OfferClock;
use index::DriverIndex;

pub const EXPIRED_MESSAGE: &str = "Order expired or reassigned to another driver";

impl From<index::IndexError> for ApiError {
    fn from(e: index::IndexError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl From<clock::ClockError> for ApiError {
    fn from(e: clock::ClockError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

/// When an offer made now expires.
fn offer_deadline(app: &App) -> chrono::DateTime<Utc> {
    Utc::now()
        + chrono::Duration::from_std(app.config.offer_timeout).unwrap_or(chrono::Duration::MAX)
}

/// Distance from a driver's position to the order's pickup point, when both are known.
fn pickup_distance(order: &Order, driver: Option<(f64, f64)>) -> Option<f64> {
    let (lat, lon) = pickup(order)?;
    let (dlat, dlon) = driver?;
    Some(index::haversine_km(lat, lon, dlat, dlon))
}

fn deadline_ms(o: &Offer) -> i64 {
    o.expires_at.timestamp_millis()
}

/// The order JSON of an offer, with the driver's distance to pickup.
pub fn offer_json(order: &Order, distance_km: f64) -> Value {
    let mut v = order_json(order);
    v["distance_to_pickup_km"] = serde_json::json!((distance_km * 100.0).round() / 100.0);
    v
}

/// Offers the order to the nearest available driver not yet tried. Returns
/// the offer made, or `None` (no pickup point, not dispatchable, already
/// offered, or nobody left within the radius — admins then get
/// ORDER_UPDATED).
pub async fn dispatch(app: &App, order_id: i64) -> Result<Option<Offer>, ApiError> {
    let start = Instant::now();
    let Some(order) = store::get_order(&app.db, order_id).await? else {
        return Ok(None);
    };
    if !ASSIGNABLE.contains(&order.status.as_str()) || order.driver_id.is_some() {
        return Ok(None);
    }
    let Some((lat, lon)) = pickup(&order) else {
        return Ok(None);
    };
    if store::open_offer_of_order(&app.db, order_id)
        .await?
        .is_some()
    {
        return Ok(None);
    }
    let tried = store::offered_drivers(&app.db, order_id).await?;
    let near = app
        .drivers
        .nearest(
            lat,
            lon,
            app.config.dispatch_radius_km,
            app.config.driver_stale,
            32,
        )
        .await?;
    let candidates: Vec<_> = near
        .into_iter()
        .filter(|n| !tried.contains(&n.driver_id))
        .collect();
    let ids: Vec<i64> = candidates.iter().map(|c| c.driver_id).collect();
    let busy = store::unavailable_drivers(&app.db, &ids).await?;
    for c in candidates.iter().filter(|c| !busy.contains(&c.driver_id)) {
        let expires = offer_deadline(app);
        match store::create_offer(
            &app.db,
            order_id,
            c.driver_id,
            c.distance_km,
            expires,
            &ASSIGNABLE,
        )
        .await?
        {
            Some(offer) => {
                make_offer(app, &order, &offer).await?;
                metrics::histogram!(m::DISPATCH_DURATION).record(start.elapsed().as_secs_f64());
                return Ok(Some(offer));
            }
            // The driver got another offer meanwhile (try the next one), or
            // another node offered this order first, or it was deleted or
            // taken: then stop here.
            None => {
                if store::open_offer_of_order(&app.db, order_id)
                    .await?
                    .is_some()
                {
                    return Ok(None);
                }
                match store::get_order(&app.db, order_id).await? {
                    Some(o) if ASSIGNABLE.contains(&o.status.as_str()) && o.driver_id.is_none() => {
                    }
                    _ => return Ok(None),
                }
            }
        }
    }
    metrics::histogram!(m::DISPATCH_DURATION).record(start.elapsed().as_secs_f64());
    metrics::counter!(m::OFFERS, "outcome" => "no_driver").increment(1);
    orders::emit_updated(app, &order, Vec::new(), None).await?;
    Ok(None)
}

/// Schedules the deadline and tells the driver.
async fn make_offer(app: &App, order: &Order, offer: &Offer) -> Result<(), ApiError> {
    app.offers.schedule(offer.id, deadline_ms(offer)).await?;
    metrics::counter!(m::OFFERS, "outcome" => "made").increment(1);
    let mut order = offer_json(order, offer.distance_km);
    order["offer_expires_at"] = Value::String(orders::iso(&offer.expires_at));
    app.publish(Event::new(
        vec![room::driver(offer.driver_id)],
        EventKind::OfferMade { order },
    ))
    .await
}

/// `order_timeout` to the driver whose offer ended, then the deadline is
/// dropped (after the message: the driver hears first).
pub async fn offer_ended(app: &App, offer: &Offer, message: &str) -> Result<(), ApiError> {
    let sent = app
        .publish(Event::new(
            vec![room::driver(offer.driver_id)],
            EventKind::OfferEnded {
                order_id: offer.order_id,
                message: message.to_string(),
            },
        ))
        .await;
    let _ = app.offers.cancel(offer.id).await;
    sent
}

/// Expires an offer if it is still open: `order_timeout` to its driver,
/// then the next driver gets the order. Safe to call from any node, any
/// number of times.
pub async fn expire(app: &App, offer_id: i64) -> Result<bool, ApiError> {
    let Some(offer) = store::end_offer(&app.db, offer_id, "expired").await? else {
        return Ok(false);
    };
    metrics::counter!(m::OFFERS, "outcome" => "expired").increment(1);
    offer_ended(app, &offer, EXPIRED_MESSAGE).await?;
    dispatch(app, offer.order_id).await?;
    Ok(true)
}

/// Ends the order's open offers (cancel or delete).
pub async fn cancel_offers(app: &App, order_id: i64, message: &str) -> Result<(), ApiError> {
    if let Some(open) = store::open_offer_of_order(&app.db, order_id).await?
        && let Some(offer) = store::end_offer(&app.db, open.id, "cancelled").await?
    {
        offer_ended(app, &offer, message).await?;
    }
    Ok(())
}

/// An admin assigns a driver by hand: any open offer of the order ends and
/// the named driver gets one.
pub async fn assign(app: &App, order: &Order, driver_id: i64) -> Result<Offer, ApiError> {
    if !ASSIGNABLE.contains(&order.status.as_str()) || order.driver_id.is_some() {
        return Err(ApiError::Conflict(format!(
            "order {} is {} and cannot be offered",
            order.id, order.status
        )));
    }
    if !store::unavailable_drivers(&app.db, &[driver_id])
        .await?
        .is_empty()
    {
        return Err(ApiError::Conflict(format!(
            "driver {driver_id} already holds an offer or an order"
        )));
    }
    cancel_offers(app, order.id, EXPIRED_MESSAGE).await?;
    let distance = pickup_distance(order, app.drivers.position(driver_id).await?).unwrap_or(0.0);
    let expires = offer_deadline(app);
    let offer = store::create_offer(&app.db, order.id, driver_id, distance, expires, &ASSIGNABLE)
        .await?
        .ok_or_else(|| {
            ApiError::Conflict("the driver or the order got another offer first".into())
        })?;
    make_offer(app, order, &offer).await?;
    Ok(offer)
}

/// The driver's open offers (seed 001 poll and `initial_orders`); overdue
/// ones are expired on the spot, with the same messages as the clock.
pub async fn open_offers(app: &App, who: &Identity) -> Result<Vec<Value>, ApiError> {
    let now = Utc::now();
    let pos = app.drivers.position(who.driver_id).await?;
    let mut out = Vec::new();
    for offer in store::open_offers_of_driver(&app.db, who.driver_id).await? {
        if offer.expires_at <= now {
            expire(app, offer.id).await?;
            continue;
        }
        let Some(order) = store::get_order(&app.db, offer.order_id).await? else {
            continue;
        };
        let distance = pickup_distance(&order, pos).unwrap_or(offer.distance_km);
        let mut v = offer_json(&order, distance);
        v["offer_expires_at"] = Value::String(orders::iso(&offer.expires_at));
        out.push(v);
    }
    Ok(out)
}

/// The driver's open offer of `order_id`, or 409.
async fn own_open_offer(app: &App, who: &Identity, order_id: i64) -> Result<Offer, ApiError> {
    store::open_offers_of_driver(&app.db, who.driver_id)
        .await?
        .into_iter()
        .find(|o| o.order_id == order_id)
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "no open offer of order {order_id} for this driver (expired or not yours)"
            ))
        })
}

pub async fn accept(app: &App, who: &Identity, order_id: i64) -> Result<Order, ApiError> {
    let offer = own_open_offer(app, who, order_id).await?;
    if offer.expires_at <= Utc::now() {
        expire(app, offer.id).await?;
        return Err(ApiError::Conflict(format!(
            "the offer of order {order_id} expired"
        )));
    }
    let before = store::get_order(&app.db, order_id).await?;
    let order = store::accept_offer(&app.db, &offer, &ASSIGNABLE, app.sync_on())
        .await?
        .ok_or_else(|| {
            ApiError::Conflict(format!("the offer of order {order_id} is no longer open"))
        })?;
    let _ = app.offers.cancel(offer.id).await;
    metrics::counter!(m::OFFERS, "outcome" => "accepted").increment(1);
    orders::emit_updated(
        app,
        &order,
        vec!["status".into(), "driver_id".into()],
        before.map(|b| b.status),
    )
    .await?;
    Ok(order)
}

pub async fn decline(app: &App, who: &Identity, order_id: i64) -> Result<(), ApiError> {
    let offer = own_open_offer(app, who, order_id).await?;
    let Some(offer) = store::end_offer(&app.db, offer.id, "declined").await? else {
        return Err(ApiError::Conflict(format!(
            "the offer of order {order_id} is no longer open"
        )));
    };
    let _ = app.offers.cancel(offer.id).await;
    metrics::counter!(m::OFFERS, "outcome" => "declined").increment(1);
    dispatch(app, order_id).await?;
    Ok(())
}

/// A driver's position (socket or HTTP): into the index, then
/// DRIVER_LOCATION to admins and the driver's city.
pub async fn driver_location(app: &App, who: &Identity, loc: Location) -> Result<(), ApiError> {
    app.drivers
        .put(who.driver_id, loc.latitude, loc.longitude)
        .await?;
    metrics::counter!(m::DRIVER_LOCATIONS).increment(1);
    let mut rooms = vec![room::ADMIN.to_string()];
    rooms.extend(who.city_id.map(room::city));
    app.publish(Event::new(
        rooms,
        EventKind::DriverLocation {
            driver_id: who.driver_id,
            latitude: loc.latitude,
            longitude: loc.longitude,
            heading: loc.heading,
            speed: loc.speed,
            timestamp: iso_now(),
        },
    ))
    .await
}

/// Every node runs this: claim due deadlines and expire them; every few
/// seconds also sweep the database for open offers past their deadline
/// (a deadline Redis lost, or one scheduled while Redis was down).
pub async fn run_clock(app: Arc<App>) {
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
            _ = app.stop.cancelled() => return,
        }
        let free = permits.available_permits();
        wait = BUSY_TICK;
        if free > 0 {
            let now_ms = Utc::now().timestamp_millis();
            match app.offers.claim_due(now_ms, free).await {
                Ok(claimed) => {
                    if app.config.fault_hang_after_claim && !claimed.ids.is_empty() {
                        tracing::error!(offers = ?claimed.ids, "fault injection: hanging after claim");
                        std::future::pending::<()>().await;
                    }
                    if claimed.ids.is_empty() {
                        wait = idle_wait(claimed.next_ms, now_ms);
                    }
                    for id in claimed.ids {
                        let Ok(permit) = permits.clone().try_acquire_owned() else {
                            break; // cannot happen: we claimed at most `free`
                        };
                        let app = app.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            match expire(&app, id).await {
                                Ok(_) => {
                                    let _ = app.offers.done(id).await;
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
            if let Err(e) = sweep(&app).await {
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
async fn sweep(app: &App) -> Result<(), ApiError> {
    let cutoff = Utc::now()
        - chrono::Duration::from_std(app.config.offer_lease).unwrap_or(chrono::Duration::zero());
    for offer in store::open_offers(&app.db).await? {
        if offer.expires_at < cutoff {
            expire(app, offer.id).await?;
        }
    }
    Ok(())
}

/// At start: re-schedule deadlines of open offers that Redis lost. An offer
/// another node has claimed keeps its lease: it is taken over only when the
/// lease runs out, never at once by whichever node starts next.
pub async fn reseed(app: &App) -> Result<usize, ApiError> {
    let open = store::open_offers(&app.db).await?;
    for o in &open {
        app.offers.seed(o.id, deadline_ms(o)).await?;
    }
    Ok(open.len())
}
