//! The HTTP side of the one listener: routing, JSON in and out, the error
//! body of SPEC §6, request metrics. WebSocket upgrades are handed to `ws`.
//! One file per API area.

mod bonuses;
mod dashboard;
mod driver;
mod ops;
mod orders;
mod sync;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::auth::Identity;
use crate::domain::DomainError;
use crate::metrics as m;
use crate::node::app::App;

pub type Resp = Response<Full<Bytes>>;

const MAX_BODY: usize = 1 << 20;

/// Every way a request can fail; each maps to a status and a snake_case code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A business rule was broken (422), with its own code.
    #[error("{message}")]
    Rule { code: &'static str, message: String },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// The body did not arrive in time (408).
    #[error("{0}")]
    Timeout(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Rule { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Rule { code, .. } => code,
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
            ApiError::Timeout(_) => "request_timeout",
        }
    }
}

pub fn error_response(e: ApiError) -> Resp {
    if matches!(e, ApiError::Internal(_)) {
        tracing::error!(error = %e, "internal error");
    }
    json_response(
        e.status(),
        &json!({"error": {"code": e.code(), "message": e.to_string()}}),
    )
}

pub fn json_response(status: StatusCode, v: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(v).expect("a Value always serializes"),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

pub fn empty(status: StatusCode) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// The rules' errors as HTTP: the status follows the kind of failure, the
/// code is the rule's own ([`DomainError::code`]).
impl From<DomainError> for ApiError {
    /// Rule errors keep their message (written for the client); backend
    /// failures say only which backend, and the details go to the log
    /// (SPEC §11: no internal error text in responses).
    fn from(e: DomainError) -> Self {
        let what = match &e {
            DomainError::Store(_) => "database",
            DomainError::Broker(_) => "broker",
            DomainError::Index(_) => "driver index",
            DomainError::Clock(_) => "offer clock",
            _ => "",
        };
        match e {
            DomainError::Invalid(m) => ApiError::BadRequest(m),
            DomainError::NotFound(m) => ApiError::NotFound(m),
            DomainError::Conflict(m) => ApiError::Conflict(m),
            DomainError::Rule { code, message } => ApiError::Rule { code, message },
            e if e.is_unavailable() => {
                tracing::warn!(error = %e, "{what} unavailable");
                ApiError::Unavailable(format!("{what} unavailable, retry later"))
            }
            e => {
                tracing::error!(error = %e, "{what} failed");
                ApiError::Internal(format!("{what} error"))
            }
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        DomainError::from(e).into()
    }
}

/// Query parameters of a request.
pub fn query(req: &Request<Incoming>) -> std::collections::HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// `limit` (1..=200, default 50) and `cursor` (opaque; an id here).
pub struct Page {
    pub limit: u64,
    pub cursor: Option<i64>,
}

impl Page {
    pub fn from_query(q: &std::collections::HashMap<String, String>) -> Result<Page, ApiError> {
        let limit = match q.get("limit") {
            None => 50,
            Some(l) => l
                .parse::<u64>()
                .ok()
                .filter(|l| (1..=200).contains(l))
                .ok_or_else(|| ApiError::BadRequest("limit must be 1 to 200".into()))?,
        };
        let cursor = match q.get("cursor").filter(|c| !c.is_empty()) {
            None => None,
            Some(c) => Some(
                c.parse::<i64>()
                    .map_err(|_| ApiError::BadRequest("invalid cursor".into()))?,
            ),
        };
        Ok(Page { limit, cursor })
    }

    /// `{"items": [...], "next_cursor": …}`; `id_of` gives each item's id.
    pub fn list<T>(
        &self,
        items: &[T],
        id_of: impl Fn(&T) -> i64,
        render: impl Fn(&T) -> Value,
    ) -> Value {
        let next = (items.len() as u64 == self.limit)
            .then(|| items.last().map(|i| id_of(i).to_string()))
            .flatten();
        json!({"items": items.iter().map(render).collect::<Vec<_>>(), "next_cursor": next})
    }
}

/// A path segment that must be an id.
pub fn id_segment(s: &str) -> Result<i64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::BadRequest(format!("{s:?} is not an id")))
}

/// How long a request body may take to arrive (SPEC §11).
const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads a JSON body of at most 1 MiB, arriving within 10 s.
pub async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = tokio::time::timeout(
        BODY_DEADLINE,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    .map_err(|_| ApiError::Timeout("the request body did not arrive within 10 s".into()))?
    .map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            ApiError::BadRequest(format!("the body is larger than {MAX_BODY} bytes"))
        } else {
            tracing::debug!(error = %e, "request body not read");
            ApiError::BadRequest("cannot read the request body".into())
        }
    })?
    .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// The caller's identity from `Authorization: Bearer` (or `?token=`).
pub fn identity<B>(app: &App, req: &Request<B>) -> Result<Identity, ApiError> {
    app.verifier
        .verify(crate::ws::token_of(req, None).as_deref())
        .map_err(|e| {
            // The client gets our wording; the parser's, here (never the token).
            tracing::debug!(error = %e, detail = e.detail(), "token refused");
            ApiError::Unauthorized(e.to_string())
        })
}

pub async fn handle(
    app: Arc<App>,
    peer: std::net::SocketAddr,
    req: Request<Incoming>,
) -> Result<Resp, Infallible> {
    let start = Instant::now();
    if let Some((dialect, path_token)) = crate::ws::endpoint(req.uri().path())
        && fastwebsockets::upgrade::is_upgrade_request(&req)
    {
        if app.drain.is_cancelled() {
            metrics::counter!(m::UPGRADES_REJECTED, "reason" => "draining").increment(1);
            return Ok(error_response(ApiError::Unavailable(
                "node is draining".into(),
            )));
        }
        if app.hub.socket_count() >= app.config.limits.max_connections {
            // 503 so the load balancer retries on another node.
            metrics::counter!(m::UPGRADES_REJECTED, "reason" => "max_connections").increment(1);
            return Ok(error_response(ApiError::Unavailable(
                "node is at MAX_CONNECTIONS".into(),
            )));
        }
        return Ok(
            crate::ws::upgrade(app, req, dialect, path_token).unwrap_or_else(|e| {
                error_response(ApiError::BadRequest(format!("bad WebSocket upgrade: {e}")))
            }),
        );
    }
    let (route, result) = route(&app, peer, req).await;
    let resp = result.unwrap_or_else(error_response);
    let status = resp.status().as_u16().to_string();
    metrics::histogram!(m::HTTP_DURATION, "route" => route, "status" => status.clone())
        .record(start.elapsed().as_secs_f64());
    metrics::counter!(m::HTTP_REQUESTS, "route" => route, "status" => status).increment(1);
    Ok(resp)
}

/// Picks the handler; the first value is the bounded route label for metrics.
async fn route(
    app: &Arc<App>,
    peer: std::net::SocketAddr,
    req: Request<Incoming>,
) -> (&'static str, Result<Resp, ApiError>) {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&method, segs.as_slice()) {
        (&Method::GET, [""]) => ("/", Ok(ops::index(app))),
        (&Method::GET, ["ws"]) | (&Method::GET, ["ws", "driver", "orders", ..]) => (
            "/ws",
            Err(ApiError::BadRequest(
                "this is a WebSocket endpoint: connect with a WebSocket client".into(),
            )),
        ),
        (&Method::GET, ["healthz"]) => ("/healthz", Ok(ops::healthz())),
        (&Method::GET, ["dashboard", "dev-token"]) => {
            let host = req
                .headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok());
            ("/dashboard", dashboard::dev_token(app, peer, host))
        }
        (&Method::GET, ["dashboard", rest @ ..]) => (
            "/dashboard",
            dashboard::serve(rest.first().copied().unwrap_or(""))
                .filter(|_| rest.len() <= 1)
                .ok_or_else(|| ApiError::NotFound(format!("no dashboard asset {path}"))),
        ),
        (&Method::GET, ["readyz"]) => ("/readyz", Ok(ops::readyz(app))),
        (&Method::GET, ["metrics"]) => ("/metrics", Ok(ops::metrics(app))),
        (&Method::POST, ["api", "publish"]) => ("/api/publish", ops::publish(app, req).await),
        (&Method::GET, ["api", "stats"]) => ("/api/stats", ops::stats(app, req).await),
        (&Method::POST, ["api", "orders"]) => ("/api/orders", orders::create(app, req).await),
        (&Method::GET, ["api", "orders"]) => ("/api/orders", orders::list(app, req).await),
        (&Method::GET, ["api", "orders", id]) => {
            let id = id.to_string();
            ("/api/orders/{id}", orders::get(app, req, &id).await)
        }
        (&Method::PATCH, ["api", "orders", id]) => {
            let id = id.to_string();
            ("/api/orders/{id}", orders::patch(app, req, &id).await)
        }
        (&Method::DELETE, ["api", "orders", id]) => {
            let id = id.to_string();
            ("/api/orders/{id}", orders::delete(app, req, &id).await)
        }
        (&Method::POST, ["api", "orders", id, "dispatch"]) => {
            let id = id.to_string();
            (
                "/api/orders/{id}/dispatch",
                orders::dispatch(app, req, &id).await,
            )
        }
        (&Method::GET, ["api", "drivers", "nearby"]) => {
            ("/api/drivers/nearby", orders::nearby(app, req).await)
        }
        (&Method::GET, ["api", "driver", "orders"]) => {
            ("/api/driver/orders", driver::offers(app, req).await)
        }
        (&Method::POST, ["api", "driver", "orders", id, "accept"]) => {
            let id = id.to_string();
            (
                "/api/driver/orders/{id}/accept",
                driver::accept(app, req, &id).await,
            )
        }
        (&Method::POST, ["api", "driver", "orders", id, "decline"]) => {
            let id = id.to_string();
            (
                "/api/driver/orders/{id}/decline",
                driver::decline(app, req, &id).await,
            )
        }
        (&Method::POST, ["api", "driver", "location"]) => {
            ("/api/driver/location", driver::location(app, req).await)
        }
        (&Method::POST, ["api", "driver", "status"]) => {
            ("/api/driver/status", driver::status(app, req).await)
        }
        (&Method::GET, ["api", "bonuses", "me"]) => {
            ("/api/bonuses/me", bonuses::me(app, req).await)
        }
        (&Method::GET, ["api", "sync", "jobs"]) => ("/api/sync/jobs", sync::list(app, req).await),
        (&Method::POST, ["api", "sync", "jobs", id, "retry"]) => {
            let id = id.to_string();
            (
                "/api/sync/jobs/{id}/retry",
                sync::retry(app, req, &id).await,
            )
        }
        _ => (
            "unmatched",
            Err(ApiError::NotFound(format!("no route for {method} {path}"))),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    /// Backend failures reach clients as which backend failed, never as the
    /// driver's own text (SPEC §11).
    #[test]
    fn internal_error_text_stays_in_the_log() {
        let secret = "relation \"orders\" does not exist at 10.0.0.5";
        let e = DomainError::Store(StoreError::Db(sea_orm::DbErr::Custom(secret.into())));
        let api = ApiError::from(e);
        assert_eq!(api.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!api.to_string().contains("10.0.0.5"), "{api}");
        let conn = sea_orm::DbErr::Conn(sea_orm::RuntimeErr::Internal(secret.into()));
        let api = ApiError::from(DomainError::Store(StoreError::Db(conn)));
        assert_eq!(api.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(api.to_string(), "database unavailable, retry later");
        // Rule errors keep their message: it is written for the client.
        let rule = ApiError::from(DomainError::Conflict("order is already ready".into()));
        assert_eq!(rule.to_string(), "order is already ready");
    }
}
