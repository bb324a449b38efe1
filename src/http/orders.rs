//! Orders API (SPEC §6): create, list, read, change, delete, dispatch, and
//! nearby drivers. Role checks happen here; rules live in `domain::orders`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde_json::{Map, Value, json};

use super::{ApiError, Page, Resp, empty, id_segment, identity, json_response, query, read_json};
use crate::auth::{Identity, Role};
use crate::domain::dispatch;
use crate::domain::model::{order_json, pickup, scope_of};
use crate::domain::orders::{self as domain, OrderDraft, visible_order};
use crate::event::iso;
use crate::node::app::App;
use crate::store;

fn field<'a>(body: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    body.get(key).filter(|v| !v.is_null())
}

/// A number given as a JSON number or a decimal string.
fn number(body: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match field(body, key) {
        None => Ok(None),
        Some(v) => crate::event::number(v).map(Some).ok_or_else(|| {
            ApiError::BadRequest(format!("{key} must be a number or a decimal string"))
        }),
    }
}

/// An amount as given: a JSON number or a decimal string. Non-finite
/// values (`"NaN"`, `"Infinity"`) pass through for the money rule to refuse
/// with 422 (SPEC §5); anything else that is not a number is a 400.
fn amount(body: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match field(body, key) {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(Value::String(s)) => s.trim().parse::<f64>().map(Some).map_err(|_| {
            ApiError::BadRequest(format!("{key} must be a number or a decimal string"))
        }),
        Some(_) => Err(ApiError::BadRequest(format!(
            "{key} must be a number or a decimal string"
        ))),
    }
}

fn text(body: &Map<String, Value>, key: &str, max: usize) -> Result<Option<String>, ApiError> {
    match field(body, key) {
        None => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= max => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(ApiError::BadRequest(format!(
            "{key} is longer than {max} characters"
        ))),
        Some(_) => Err(ApiError::BadRequest(format!("{key} must be a string"))),
    }
}

fn int(body: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    match field(body, key) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .map(Some)
            .ok_or_else(|| ApiError::BadRequest(format!("{key} must be an integer"))),
    }
}

fn timestamp(body: &Map<String, Value>, key: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    match text(body, key, 64)? {
        None => Ok(None),
        Some(s) => DateTime::parse_from_rfc3339(&s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| ApiError::BadRequest(format!("{key} must be an ISO 8601 timestamp"))),
    }
}

/// A coordinate pair, both or neither (the range is the domain's rule).
fn point(body: &Map<String, Value>, lat: &str, lon: &str) -> Result<Option<(f64, f64)>, ApiError> {
    match (number(body, lat)?, number(body, lon)?) {
        (None, None) => Ok(None),
        (Some(a), Some(o)) => Ok(Some((a, o))),
        _ => Err(ApiError::BadRequest(format!("{lat} and {lon} go together"))),
    }
}

fn object(v: Value) -> Result<Map<String, Value>, ApiError> {
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        )),
    }
}

pub async fn create(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let who = identity(app, &req)?;
    if !matches!(who.role, Role::User | Role::Admin | Role::Ceo) {
        return Err(ApiError::Forbidden(
            "only users and admins create orders".into(),
        ));
    }
    let body = object(read_json(req).await?)?;
    let user_id = match int(&body, "user_id")? {
        Some(u) if who.role.is_staff() => u,
        Some(u) if u != who.user_id => {
            return Err(ApiError::Forbidden(
                "only admins create orders for someone else".into(),
            ));
        }
        _ => who.user_id,
    };
    let city_id = int(&body, "city_id")?
        .or(who.city_id)
        .ok_or_else(|| ApiError::BadRequest("city_id is required".into()))?;
    let order_number = match field(&body, "order_number") {
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => text(&body, "order_number", 32)?,
    };
    let draft = OrderDraft {
        order_number,
        order_type: text(&body, "order_type", 32)?,
        user_id,
        city_id,
        address_from: text(&body, "address_from", 500)?.unwrap_or_default(),
        address_to: text(&body, "address_to", 500)?.unwrap_or_default(),
        from: point(&body, "latitude_from", "longitude_from")?,
        to: point(&body, "latitude_to", "longitude_to")?,
        total: amount(&body, "total")?.unwrap_or(0.0),
        bonuses_used: amount(&body, "bonuses_used")?.unwrap_or(0.0),
        scheduled_at: timestamp(&body, "scheduled_at")?,
    };
    let order = domain::create(&app.ctx, draft).await?;
    // Dispatch may already have moved things on; answer with what was created.
    Ok(json_response(StatusCode::CREATED, &order_json(&order)))
}

pub async fn list(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let who = identity(app, &req)?;
    let q = query(&req);
    let page = Page::from_query(&q)?;
    let status = q.get("status").map(String::as_str);
    let items = store::list_orders(
        &app.ctx.db,
        &scope_of(&who),
        status,
        page.cursor,
        page.limit,
    )
    .await?;
    Ok(json_response(
        StatusCode::OK,
        &page.list(&items, |o| o.id, order_json),
    ))
}

pub async fn get(app: &Arc<App>, req: Request<Incoming>, id: &str) -> Result<Resp, ApiError> {
    let who = identity(app, &req)?;
    let order = visible_order(&app.ctx, &who, id_segment(id)?).await?;
    Ok(json_response(StatusCode::OK, &order_json(&order)))
}

fn require_staff_or_manager(who: &Identity) -> Result<(), ApiError> {
    if who.role.is_staff() || who.role == Role::Manager {
        Ok(())
    } else {
        Err(ApiError::Forbidden("admins and managers only".into()))
    }
}

pub async fn patch(app: &Arc<App>, req: Request<Incoming>, id: &str) -> Result<Resp, ApiError> {
    let who = identity(app, &req)?;
    require_staff_or_manager(&who)?;
    let id = id_segment(id)?;
    let body = object(read_json(req).await?)?;
    if let Some(k) = body
        .keys()
        .find(|k| !["status", "scheduled_at", "driver_id"].contains(&k.as_str()))
    {
        return Err(ApiError::BadRequest(format!(
            "{k} cannot be changed; use status, scheduled_at, driver_id"
        )));
    }
    let status = match body.get("status") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::BadRequest("status must be a string".into())),
    };
    let scheduled_at = if body.contains_key("scheduled_at") {
        Some(timestamp(&body, "scheduled_at")?)
    } else {
        None
    };
    let driver_id = int(&body, "driver_id")?;
    if status.is_none() && scheduled_at.is_none() && driver_id.is_none() {
        return Err(ApiError::BadRequest(
            "nothing to change: give status, scheduled_at or driver_id".into(),
        ));
    }
    let order = domain::update(&app.ctx, id, status, scheduled_at, driver_id, &who).await?;
    Ok(json_response(StatusCode::OK, &order_json(&order)))
}

pub async fn delete(app: &Arc<App>, req: Request<Incoming>, id: &str) -> Result<Resp, ApiError> {
    let who = identity(app, &req)?;
    if !who.role.is_staff() {
        return Err(ApiError::Forbidden("admins only".into()));
    }
    domain::delete(&app.ctx, id_segment(id)?).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

pub async fn dispatch(app: &Arc<App>, req: Request<Incoming>, id: &str) -> Result<Resp, ApiError> {
    let who = identity(app, &req)?;
    require_staff_or_manager(&who)?;
    let order = visible_order(&app.ctx, &who, id_segment(id)?).await?;
    if pickup(&order).is_none() {
        return Err(ApiError::Rule {
            code: "no_pickup_point",
            message: "the order has no pickup coordinates to dispatch from".into(),
        });
    }
    let offer = dispatch::dispatch(&app.ctx, order.id, dispatch::Trigger::Admin).await?;
    let mut body = order_json(&order);
    body["offer"] = match offer {
        Some(o) => {
            json!({"driver_id": o.driver_id, "distance_km": o.distance_km, "expires_at": iso(&o.expires_at)})
        }
        None => Value::Null,
    };
    Ok(json_response(StatusCode::OK, &body))
}

pub async fn nearby(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let who = identity(app, &req)?;
    require_staff_or_manager(&who)?;
    let q = query(&req);
    let num = |k: &str| -> Result<Option<f64>, ApiError> {
        q.get(k)
            .map(|v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .ok_or_else(|| ApiError::BadRequest(format!("{k} must be a number")))
            })
            .transpose()
    };
    let lat = num("lat")?.ok_or_else(|| ApiError::BadRequest("lat is required".into()))?;
    let lon = num("lon")?.ok_or_else(|| ApiError::BadRequest("lon is required".into()))?;
    if !crate::event::valid_point(lat, lon) {
        return Err(ApiError::BadRequest("lat/lon out of range".into()));
    }
    let radius = num("radius_km")?.unwrap_or(app.config.dispatch_radius_km);
    if !(radius > 0.0 && radius <= 500.0) {
        return Err(ApiError::BadRequest("radius_km must be in (0, 500]".into()));
    }
    let limit = Page::from_query(&q)?.limit as usize;
    // A manager sees only the drivers of its cities (SPEC §5).
    let cities = (who.role == Role::Manager).then_some(who.city_ids.as_slice());
    let near = dispatch::nearby(&app.ctx, lat, lon, radius, limit, cities).await?;
    let items: Vec<Value> = near
        .iter()
        .map(|n| {
            json!({
                "driver_id": n.driver_id,
                "distance_km": (n.distance_km * 1000.0).round() / 1000.0,
                "latitude": n.latitude,
                "longitude": n.longitude,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"items": items, "next_cursor": null}),
    ))
}
