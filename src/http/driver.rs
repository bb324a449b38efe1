//! Driver API (seed 001's poll and actions): offers, accept, decline,
//! location, availability. Drivers only.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, Resp, empty, id_segment, identity, json_response, read_json};
use crate::auth::{Identity, Role};
use crate::domain::dispatch;
use crate::domain::model::order_json;
use crate::event::Position;
use crate::index::{Via, city_of};
use crate::node::app::App;

/// The calling driver, who is online by this call (SPEC §5 "Presence": the
/// driver HTTP API counts for `DRIVER_STALE_SECS`).
async fn driver<B>(app: &Arc<App>, req: &Request<B>) -> Result<Identity, ApiError> {
    let who = identity(app, req)?;
    if who.role != Role::Driver {
        return Err(ApiError::Forbidden("drivers only".into()));
    }
    let city = city_of(who.city_id);
    if let Err(e) = dispatch::drivers_online(&app.ctx, city, &[who.driver_id], Via::Http).await {
        // The call itself may still work (a poll reads the database).
        tracing::debug!(driver = who.driver_id, error = %e, "presence not recorded");
    }
    Ok(who)
}

pub async fn offers(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let who = driver(app, &req).await?;
    let items = dispatch::open_offers(&app.ctx, &who).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"items": items, "next_cursor": null}),
    ))
}

pub async fn accept(app: &Arc<App>, req: Request<Incoming>, id: &str) -> Result<Resp, ApiError> {
    let who = driver(app, &req).await?;
    let order = dispatch::accept(&app.ctx, &who, id_segment(id)?).await?;
    Ok(json_response(StatusCode::OK, &order_json(&order)))
}

pub async fn decline(app: &Arc<App>, req: Request<Incoming>, id: &str) -> Result<Resp, ApiError> {
    let who = driver(app, &req).await?;
    dispatch::decline(&app.ctx, &who, id_segment(id)?).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LocationBody {
    latitude: f64,
    longitude: f64,
    heading: Option<f64>,
    speed: Option<f64>,
}

pub async fn location(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let who = driver(app, &req).await?;
    let b: LocationBody = read_json(req).await?;
    let loc = Position::new(b.latitude, b.longitude, b.heading, b.speed)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    app.driver_location(&who, loc).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusBody {
    available: bool,
}

pub async fn status(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let who = driver(app, &req).await?;
    let b: StatusBody = read_json(req).await?;
    dispatch::set_available(&app.ctx, city_of(who.city_id), who.driver_id, b.available).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
