//! WebSocket endpoints: which path speaks which dialect, where the token is,
//! and the upgrade. The per-socket tasks live in [`conn`].

pub(crate) mod assemble;
pub(crate) mod conn;
pub mod dialect;
pub(crate) mod frame;
/// Fuzz targets under `cargo test` (test builds only).
#[cfg(test)]
mod fuzz;
pub(crate) mod outbox;
/// The Autobahn echo testee (`scripts/autobahn`); not part of the product.
#[cfg(feature = "autobahn")]
#[doc(hidden)]
pub mod testee;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};

use crate::node::app::App;
use dialect::Dialect;

/// The dialect served at `path`, and a token carried in the path (driver
/// endpoint, seed 001: `/ws/driver/orders/{token}` with or without a trailing
/// slash).
pub(crate) fn endpoint(path: &str) -> Option<(Dialect, Option<String>)> {
    match path {
        "/" => Some((Dialect::Rooms, None)),
        "/ws" | "/ws/" => Some((Dialect::Events, None)),
        "/ws/driver/orders" | "/ws/driver/orders/" => Some((Dialect::Driver, None)),
        _ => {
            let rest = path.strip_prefix("/ws/driver/orders/")?;
            let token = rest.strip_suffix('/').unwrap_or(rest);
            (!token.is_empty() && !token.contains('/'))
                .then(|| (Dialect::Driver, Some(token.to_string())))
        }
    }
}

/// The token of a request: `?token=`, else the path, else `Authorization: Bearer`.
pub(crate) fn token_of<B>(req: &Request<B>, path_token: Option<String>) -> Option<String> {
    req.uri()
        .query()
        .and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        })
        .filter(|t| !t.is_empty())
        .or(path_token)
        .or_else(|| bearer(req))
}

pub(crate) fn bearer<B>(req: &Request<B>) -> Option<String> {
    let h = req
        .headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = h.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// Rooms a `since` may name at most.
const MAX_SINCE_ROOMS: usize = 64;

/// The `since` query parameter: base64url (no padding) of
/// `{"<room>": {"epoch": "…", "offset": N}, …}`.
fn since_of<B>(req: &Request<B>) -> conn::Since {
    let Some(raw) = req.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "since")
            .map(|(_, v)| v.into_owned())
    }) else {
        return conn::Since::None;
    };
    parse_since(&raw)
}

fn parse_since(raw: &str) -> conn::Since {
    use base64::Engine;
    let bad = |why: &str| conn::Since::Bad(format!("since: {why}"));
    if raw.is_empty() {
        return conn::Since::None;
    }
    let Ok(json) =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(raw.trim_end_matches('='))
    else {
        return bad("not base64url");
    };
    let Ok(map) = serde_json::from_slice::<
        std::collections::BTreeMap<String, crate::event::StreamPos>,
    >(&json) else {
        return bad(r#"not a JSON object of {"epoch": string, "offset": integer}"#);
    };
    if map.len() > MAX_SINCE_ROOMS {
        return bad(&format!("names more than {MAX_SINCE_ROOMS} rooms"));
    }
    conn::Since::Rooms(map.into_iter().collect())
}

/// Answers the upgrade and spawns the socket's task. The token is checked
/// here, but a refusal is told over the socket (error message, then close
/// 4001/4003), as the seeds' clients expect. A request that is not a valid
/// upgrade is refused with the reason (the caller answers 400).
pub(crate) fn upgrade(
    app: Arc<App>,
    mut req: Request<Incoming>,
    dialect: Dialect,
    path_token: Option<String>,
) -> Result<Response<Full<Bytes>>, fastwebsockets::WebSocketError> {
    let token = token_of(&req, path_token);
    let auth = app.verifier.verify(token.as_deref());
    if let Err(e) = &auth {
        // The client is told in our words (`conn::serve`); the parser's
        // words go here (never the token).
        tracing::debug!(error = %e, detail = e.detail(), "token refused");
    }
    let since = since_of(&req);
    let (resp, fut) = fastwebsockets::upgrade::upgrade(&mut req)?;
    let tracker = app.tracker.clone();
    tracker.spawn(conn::serve(app, fut, dialect, auth, since));
    Ok(resp.map(|_| Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(endpoint("/"), Some((Dialect::Rooms, None)));
        assert_eq!(endpoint("/ws"), Some((Dialect::Events, None)));
        assert_eq!(
            endpoint("/ws/driver/orders/"),
            Some((Dialect::Driver, None))
        );
        assert_eq!(
            endpoint("/ws/driver/orders/abc.def"),
            Some((Dialect::Driver, Some("abc.def".into())))
        );
        assert_eq!(
            endpoint("/ws/driver/orders/abc.def/"),
            Some((Dialect::Driver, Some("abc.def".into())))
        );
        assert_eq!(endpoint("/api/orders"), None);
        assert_eq!(endpoint("/ws/driver/orders/a/b"), None);
    }

    #[test]
    fn token_sources() {
        let r = Request::builder().uri("/?token=q").body(()).unwrap();
        assert_eq!(token_of(&r, Some("p".into())).as_deref(), Some("q"));
        let r = Request::builder()
            .uri("/ws")
            .header("authorization", "Bearer h")
            .body(())
            .unwrap();
        assert_eq!(token_of(&r, None).as_deref(), Some("h"));
        assert_eq!(token_of(&r, Some("p".into())).as_deref(), Some("p"));
    }
}
