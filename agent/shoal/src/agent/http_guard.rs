//! Who may drive the HTTP API: the checks in front of every route.
//!
//! Loopback is not an authentication boundary: any web page the operator opens can
//! send requests to `127.0.0.1`, and any local user can run curl. So the API
//! refuses what a browser can forge, and optionally asks for a token:
//!
//! - **DNS rebinding.** The `Host` header must be an IP address, `localhost`, or a
//!   name configured with `--api-host` (`*` turns the check off). A page served
//!   from `rebind.evil.example` whose name later resolves to `127.0.0.1` still
//!   sends `Host: rebind.evil.example` and is refused, reads included.
//! - **Cross-site requests.** A mutation (any method but GET, HEAD, OPTIONS) with an
//!   `Origin` other than the agent's own is refused; and a mutation must carry the
//!   header [`CLIENT_HEADER`] (the CLI always sends it) or a content type a form
//!   cannot send (JSON, TOML, wasm…), so a cross-origin page cannot make a "simple"
//!   request that skips the browser's CORS preflight. The API never answers a
//!   preflight with permission.
//! - **Token.** With `--api-token-file`, every request except the dashboard page
//!   itself needs `Authorization: Bearer <token>` (compared in constant time). This
//!   is what keeps other users of a shared host out.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use shoal_api::ErrorView;

/// Header the CLI sends with every request; its presence makes a mutation
/// non-simple (a cross-origin page would need a CORS preflight, which is never granted).
pub const CLIENT_HEADER: &str = "x-shoal-request";

/// The API's access rules (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct HttpGuard {
    /// Host names accepted besides IP literals and `localhost`; `*` accepts any.
    pub hosts: Vec<String>,
    /// Token every request but `GET /` must carry.
    pub token: Option<Arc<str>>,
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 403: a forged `Host` or a cross-site request.
    Forbidden(String),
    /// 401: no or a wrong token.
    Unauthorized(String),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (code, error) = match self {
            Refusal::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            Refusal::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m),
        };
        (code, Json(ErrorView { error })).into_response()
    }
}

/// The host part of a `Host` header value (`[::1]:7101` -> `::1`, `a.b:80` -> `a.b`).
fn host_name(value: &str) -> &str {
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match value.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => value,
    }
}

/// Content types a cross-origin page may send without a preflight (CORS "simple").
fn is_simple_content_type(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return true; // e.g. fetch() with a Blob body
    };
    let ct = ct
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    matches!(
        ct.as_str(),
        "" | "text/plain" | "application/x-www-form-urlencoded" | "multipart/form-data"
    )
}

/// Equal in time that depends only on the lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl HttpGuard {
    /// Checks one request's method, path and headers.
    pub fn check(&self, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), Refusal> {
        let host = match headers.get(header::HOST) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| Refusal::Forbidden("the Host header is not valid text".into()))?,
            ),
        };
        if let Some(h) = host {
            let name = host_name(h);
            let ok = name.parse::<std::net::IpAddr>().is_ok()
                || name.eq_ignore_ascii_case("localhost")
                || self
                    .hosts
                    .iter()
                    .any(|a| a == "*" || a.eq_ignore_ascii_case(name));
            if !ok {
                return Err(Refusal::Forbidden(format!(
                    "host {name:?} is not one this agent answers to (use its IP address, localhost, or add --api-host {name})"
                )));
            }
        }
        let mutation = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        if mutation {
            if let Some(origin) = headers.get(header::ORIGIN) {
                let origin = origin.to_str().unwrap_or("");
                let own = host.map(|h| format!("http://{h}"));
                if own
                    .as_deref()
                    .is_none_or(|o| !o.eq_ignore_ascii_case(origin))
                {
                    return Err(Refusal::Forbidden(format!(
                        "cross-origin request from {origin:?} refused"
                    )));
                }
            }
            if headers.get(CLIENT_HEADER).is_none() && is_simple_content_type(headers) {
                return Err(Refusal::Forbidden(format!(
                    "a {method} needs the header `{CLIENT_HEADER}: 1` (the shoal CLI sends it) or a JSON/TOML content type"
                )));
            }
        }
        if let Some(token) = &self.token {
            if !(*method == Method::GET && path == "/") {
                let given = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim);
                match given {
                    Some(g) if same_secret(g.as_bytes(), token.as_bytes()) => {}
                    Some(_) => {
                        return Err(Refusal::Unauthorized(
                            "wrong API token (the CLI reads SHOAL_TOKEN or --token-file)".into(),
                        ))
                    }
                    None => {
                        return Err(Refusal::Unauthorized(
                            "this agent requires an API token: set SHOAL_TOKEN or --token-file"
                                .into(),
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}

/// The axum middleware applying [`HttpGuard::check`] to every request.
pub async fn enforce(State(guard): State<Arc<HttpGuard>>, req: Request, next: Next) -> Response {
    match guard.check(req.method(), req.uri().path(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            tracing::debug!(method = %req.method(), path = %req.uri().path(), "API request refused: {refusal:?}");
            refusal.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn forged_hosts_and_cross_site_posts_are_refused() {
        let g = HttpGuard::default();
        let ok = |m: Method, h: &[(&str, &str)]| g.check(&m, "/v1/services", &headers(h));
        assert!(ok(Method::GET, &[("host", "127.0.0.1:7101")]).is_ok());
        assert!(ok(Method::GET, &[("host", "[::1]:7101")]).is_ok());
        assert!(ok(Method::GET, &[("host", "localhost:7101")]).is_ok());
        assert!(matches!(
            ok(Method::GET, &[("host", "rebind.evil.example:7101")]),
            Err(Refusal::Forbidden(_))
        ));
        // The CSRF of the issue: text/plain POST from another origin.
        assert!(matches!(
            ok(
                Method::POST,
                &[
                    ("host", "127.0.0.1:7101"),
                    ("origin", "http://evil.example"),
                    ("content-type", "text/plain")
                ]
            ),
            Err(Refusal::Forbidden(_))
        ));
        // Same origin, but a simple request without the CLI's header: refused too.
        assert!(matches!(
            ok(
                Method::POST,
                &[("host", "127.0.0.1:7101"), ("content-type", "text/plain")]
            ),
            Err(Refusal::Forbidden(_))
        ));
        assert!(ok(
            Method::POST,
            &[("host", "127.0.0.1:7101"), (CLIENT_HEADER, "1")]
        )
        .is_ok());
        assert!(ok(
            Method::PUT,
            &[
                ("host", "127.0.0.1:7101"),
                ("origin", "http://127.0.0.1:7101"),
                ("content-type", "application/json")
            ]
        )
        .is_ok());
        let named = HttpGuard {
            hosts: vec!["shoal.lan".into()],
            token: None,
        };
        assert!(named
            .check(&Method::GET, "/", &headers(&[("host", "shoal.lan:7101")]))
            .is_ok());
    }

    #[test]
    fn a_token_is_required_everywhere_but_the_page() {
        let g = HttpGuard {
            hosts: vec![],
            token: Some("0123456789abcdef".into()),
        };
        let h = |auth: Option<&str>| {
            let mut v = vec![("host", "127.0.0.1:7101")];
            if let Some(a) = auth {
                v.push(("authorization", a));
            }
            headers(&v)
        };
        assert!(g.check(&Method::GET, "/", &h(None)).is_ok());
        assert!(matches!(
            g.check(&Method::GET, "/v1/nodes", &h(None)),
            Err(Refusal::Unauthorized(_))
        ));
        assert!(matches!(
            g.check(&Method::GET, "/v1/nodes", &h(Some("Bearer nope"))),
            Err(Refusal::Unauthorized(_))
        ));
        assert!(g
            .check(
                &Method::GET,
                "/v1/nodes",
                &h(Some("Bearer 0123456789abcdef"))
            )
            .is_ok());
    }
}
