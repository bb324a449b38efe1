//! `/dashboard`: the live operations page, served from assets embedded in
//! the binary (clients/dashboard, plus the JS client module itself).

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde_json::json;

use super::{ApiError, Resp, json_response};
use crate::auth::{Role, claims_for};
use crate::config::JwtKey;
use crate::node::app::App;

const INDEX: &str = include_str!("../../clients/dashboard/index.html");
const APP: &str = include_str!("../../clients/dashboard/app.js");
const STYLE: &str = include_str!("../../clients/dashboard/style.css");
const CLIENT: &str = include_str!("../../clients/js/switchboard.js");

fn asset(body: &'static str, content_type: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    r
}

/// The page or one of its assets; `None` for an unknown name.
pub fn serve(name: &str) -> Option<Resp> {
    Some(match name {
        "" | "index.html" => asset(INDEX, "text/html; charset=utf-8"),
        "app.js" => asset(APP, "text/javascript; charset=utf-8"),
        "switchboard.js" => asset(CLIENT, "text/javascript; charset=utf-8"),
        "style.css" => asset(STYLE, "text/css; charset=utf-8"),
        _ => return None,
    })
}

/// Whether a `Host` header names this machine's loopback: `localhost`,
/// `127.0.0.1` or `[::1]`, with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']')
            .next()
            .map(|h| format!("[{h}]"))
            .unwrap_or_default()
    } else {
        host.split(':').next().unwrap_or("").to_string()
    };
    matches!(
        name.to_ascii_lowercase().as_str(),
        "localhost" | "127.0.0.1" | "[::1]"
    )
}

/// In embedded dev mode only (the JWT secret was made up at start), and only
/// to a loopback client that asked for a loopback host, the page may offer a
/// dev admin token: the same token the process prints at start. The `Host`
/// check stops DNS rebinding (a page on `evil.example` that resolves to
/// 127.0.0.1 sends `Host: evil.example`). Anywhere else this is a 404.
pub fn dev_token(app: &App, peer: SocketAddr, host: Option<&str>) -> Result<Resp, ApiError> {
    let dev = matches!(
        app.config.jwt_key,
        JwtKey::Secret {
            generated: true,
            ..
        }
    );
    if !dev || !peer.ip().is_loopback() || !host.is_some_and(loopback_host) {
        return Err(ApiError::NotFound("no dev token here".into()));
    }
    let token = app
        .verifier
        .mint(claims_for(Role::Admin, 1, &[], None), 86400)
        .map_err(|e| {
            tracing::error!(error = %e, "minting the dev token failed");
            ApiError::Internal("could not mint a token".into())
        })?;
    Ok(json_response(StatusCode::OK, &json!({"token": token})))
}

#[cfg(test)]
mod tests {
    use super::loopback_host;

    #[test]
    fn only_loopback_hosts_pass() {
        for ok in [
            "localhost",
            "localhost:3000",
            "127.0.0.1:3000",
            "[::1]:3000",
            "[::1]",
            "LOCALHOST",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:3000",
            "127.0.0.1.evil.example",
            "localhost.evil",
            "[::2]:80",
            "",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }
}
