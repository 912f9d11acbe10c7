//! Routing and request handlers. Executing a command and writing its response are separate
//! steps: handlers submit, wait for the durable outcome, then render it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::api::linger;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::api::App;
use crate::api::auth::Caller;
use crate::api::json::{
    self, BatchRequest, FieldError, MoneyRequest, OpenAccountRequest, TransferRequest,
};
use crate::api::waiters::{Delivered, token};
use crate::core::{
    Command, CommandKind, CommandType, Currency, EventKind, Refusal, RejectCode, TransactionId,
    format_amount,
};
use crate::engine::Submitter;
use crate::views::{HistoryEntry, OutcomeView, ViewState, Views};

pub struct Route {
    pub method: &'static str,
    /// The path as written in the OpenAPI document.
    pub path: &'static str,
    pub name: &'static str,
    /// The query parameters it takes (each an unsigned integer); any other is a 400.
    pub query: &'static [&'static str],
}

/// Every route the server has. The OpenAPI test checks this list against `docs/openapi.yaml`.
pub const ROUTES: &[Route] = &[
    Route {
        method: "POST",
        path: "/v1/wallet/balance_transfer",
        name: "transfer",
        query: &[],
    },
    Route {
        method: "GET",
        path: "/v1/wallet/balance_transfer/{transaction_id}",
        name: "transfer_status",
        query: &["min_seq"],
    },
    Route {
        method: "POST",
        path: "/v1/wallet/balance_transfers",
        name: "transfer_batch",
        query: &[],
    },
    Route {
        method: "POST",
        path: "/v1/wallet/accounts",
        name: "open_account",
        query: &[],
    },
    Route {
        method: "GET",
        path: "/v1/wallet/accounts/{account_id}",
        name: "account",
        query: &["min_seq"],
    },
    Route {
        method: "GET",
        path: "/v1/wallet/accounts/{account_id}/history",
        name: "history",
        query: &["after_seq", "limit", "min_seq"],
    },
    Route {
        method: "POST",
        path: "/v1/wallet/deposit",
        name: "deposit",
        query: &[],
    },
    Route {
        method: "POST",
        path: "/v1/wallet/withdraw",
        name: "withdraw",
        query: &[],
    },
    Route {
        method: "GET",
        path: "/v1/wallet/events",
        name: "events",
        query: &["from_seq", "limit", "wait_ms"],
    },
    Route {
        method: "GET",
        path: "/v1/openapi.json",
        name: "openapi",
        query: &[],
    },
    Route {
        method: "GET",
        path: "/metrics",
        name: "metrics",
        query: &[],
    },
    Route {
        method: "GET",
        path: "/healthz",
        name: "healthz",
        query: &[],
    },
    Route {
        method: "GET",
        path: "/readyz",
        name: "readyz",
        query: &[],
    },
];

/// Decodes a path segment's `%XX` escapes (a client's URL encoder writes `a:b` as `a%3Ab`);
/// `None` for a malformed escape or bytes that are not UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    if !segment.contains('%') {
        return Some(segment.to_string());
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let text = std::str::from_utf8(hex).ok()?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(text, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Decodes a route's captured segments; a malformed one is a 400 naming its parameter.
fn decode_params(template: &str, captured: &[&str]) -> Result<Vec<String>, Reply> {
    let names = template
        .split('/')
        .filter_map(|t| t.strip_prefix('{')?.strip_suffix('}'));
    captured
        .iter()
        .zip(names)
        .map(|(segment, name)| {
            percent_decode(segment).ok_or_else(|| {
                Reply::field(FieldError::new(
                    "invalid_request",
                    name,
                    "is not a valid percent-encoded path segment",
                ))
            })
        })
        .collect()
}

/// Matches a path against a template; returns the captured `{parameters}` in order.
fn match_path<'a>(template: &str, path: &'a str) -> Option<Vec<&'a str>> {
    let mut captured = Vec::new();
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(captured),
            (Some(ts), Some(ps)) if ts.starts_with('{') => {
                if ps.is_empty() {
                    return None;
                }
                captured.push(ps);
            }
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return None,
        }
    }
}

pub type HttpResponse = Response<Full<Bytes>>;

pub struct Reply {
    status: StatusCode,
    body: Bytes,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    /// Refused with nothing done, for want of room on the server (requests, batches or
    /// event-stream journal reads in flight, the engine's ring full) or because the rest of a
    /// batch did not fit the caller's allowance: the request's rate-limit charge is given back
    /// (`handle`).
    refund_charge: bool,
}

impl Reply {
    fn json_bytes(status: StatusCode, body: Bytes) -> Reply {
        Reply {
            status,
            body,
            content_type: "application/json",
            headers: Vec::new(),
            refund_charge: false,
        }
    }

    fn json(status: StatusCode, value: Value) -> Reply {
        Reply {
            status,
            body: Bytes::from(serde_json::to_vec(&value).unwrap_or_default()),
            content_type: "application/json",
            headers: Vec::new(),
            refund_charge: false,
        }
    }

    fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            body: body.into(),
            content_type,
            headers: Vec::new(),
            refund_charge: false,
        }
    }

    fn error(status: StatusCode, code: &str, message: &str) -> Reply {
        Reply::json(status, json!({"error": {"code": code, "message": message}}))
    }

    fn field(error: FieldError) -> Reply {
        Reply::json(StatusCode::BAD_REQUEST, error.body())
    }

    fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    /// Marks a refusal whose rate-limit charge is given back (see `refund_charge`).
    fn refund_charge(mut self) -> Reply {
        self.refund_charge = true;
        self
    }

    fn overloaded() -> Reply {
        Reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the engine is at capacity; retry later",
        )
        .with_header("retry-after", "1")
        .refund_charge()
    }

    /// A read while the views are broken (`Views::read`): 503, never their half-applied state.
    fn views_broken(broken: crate::views::ViewsBroken) -> Reply {
        Reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "views_unavailable",
            &broken.to_string(),
        )
        .with_header("retry-after", "5")
    }

    /// A request whose answer the engine will not give: it stopped (a shutdown, a halt).
    fn shutting_down() -> Reply {
        Reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the engine stopped",
        )
        .with_header("retry-after", "1")
    }

    /// A status or history read while the views still load the journal's past (after start-up).
    /// The answer of a read that needs the views' past while it is not in: loading after a
    /// restart (retry shortly), or failed to load (an operator must look at the journal).
    fn still_loading(app: &App) -> Reply {
        if let Some(reason) = app.views.past_failure() {
            return Reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "views_unavailable",
                &format!("{VIEWS_FAILED}: {}", detail(app, reason)),
            );
        }
        Reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting",
            "the read views are still loading the journal after a restart; retry shortly",
        )
        .with_header("retry-after", "1")
    }

    /// A write while a `--zk-leader` engine cannot confirm its leadership
    /// (`ServeConfig::writes_refused`).
    fn not_leader() -> Reply {
        Reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_leader",
            "this engine cannot confirm its engine leadership in ZooKeeper (unreachable for \
             longer than its lease, or its session ended): writes are refused until it does \
             (another engine may lead; see the leader node). Reads are served",
        )
        .with_header("retry-after", "1")
    }

    fn too_many() -> Reply {
        Reply::error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            "too many requests in flight; retry later",
        )
        .with_header("retry-after", "1")
        .refund_charge()
    }

    pub fn into_response(self) -> HttpResponse {
        let mut response = Response::new(Full::new(self.body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        for (name, value) in self.headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
        response
    }
}

/// The route a request's method and path name, with the path's captured parameters; else the
/// 404 (no such path) or 405 (naming the path's methods in `Allow`; HEAD is GET without the
/// body, which hyper leaves out) to answer, with the route to count it under (the path's
/// first, for a 405; `ROUTES.len()`, "unmatched", for a 404).
fn resolve<'p>(
    method: &hyper::Method,
    path: &'p str,
) -> Result<(usize, Vec<&'p str>), (usize, Reply)> {
    let mut allowed: Vec<&str> = Vec::new();
    let mut path_route = ROUTES.len();
    let as_method = if method == hyper::Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    for (i, route) in ROUTES.iter().enumerate() {
        if let Some(captured) = match_path(route.path, path) {
            path_route = path_route.min(i);
            allowed.push(route.method);
            if route.method == as_method {
                return Ok((i, captured));
            }
        }
    }
    if allowed.is_empty() {
        return Err((
            path_route,
            Reply::error(StatusCode::NOT_FOUND, "not_found", "no such route"),
        ));
    }
    if allowed.contains(&"GET") {
        allowed.push("HEAD");
    }
    Err((
        path_route,
        Reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this path",
        )
        .with_header("allow", allowed.join(", ")),
    ))
}

/// The answer to any request while `serve` is still recovering its state (the listener is open
/// from the start so that health checks get an answer, not a hang). The path and method are
/// checked as they are later (404, 405), and so is the Host header with authentication off
/// (`loopback_only`); then `/healthz` is 200 (the process is alive), `/readyz` 503 naming the
/// phase, anything else 503 `starting` with `Retry-After`. Every answer closes its connection,
/// so a client's next request reaches the real server.
pub(crate) fn starting_response<B>(
    request: &Request<B>,
    loopback_only: bool,
    peer: &str,
    phase: &str,
) -> HttpResponse {
    let checked = resolve(request.method(), request.uri().path())
        .map_err(|(_, reply)| reply)
        .and_then(|(route, _)| {
            if loopback_only {
                check_host(request.headers(), request.uri(), peer, ROUTES[route].name)?;
            }
            Ok(route)
        });
    let reply = match checked.map(|route| ROUTES[route].name) {
        Err(reply) => reply,
        Ok("healthz") => Reply::text(StatusCode::OK, "text/plain", "ok\n"),
        Ok("readyz") => Reply::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("recovering: {phase}\n"),
        )
        .with_header("retry-after", "1"),
        Ok(_) => Reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting",
            &format!("the service is starting ({phase}); retry shortly"),
        )
        .with_header("retry-after", "1"),
    };
    reply.with_header("connection", "close").into_response()
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// Refuses a query naming a parameter the route does not take, or one twice: a misspelt
/// `after` instead of `after_seq` would otherwise page from the start again and again.
fn check_query(route: &Route, query: Option<&str>) -> Result<(), Reply> {
    // Probes and scrapers may add parameters of their own (cache busting): the operations
    // routes take none and ignore any.
    if matches!(route.name, "healthz" | "readyz" | "metrics" | "openapi") {
        return Ok(());
    }
    let Some(query) = query else {
        return Ok(());
    };
    let mut seen: Vec<&str> = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        if !route.query.contains(&name) {
            let takes = if route.query.is_empty() {
                "this route takes no query parameters".to_string()
            } else {
                format!("this route takes {}", route.query.join(", "))
            };
            // `?=5`: no name to put in `field`; the query is named instead.
            let (field, reason) = if name.is_empty() {
                (
                    "query",
                    format!("has a parameter without a name ({pair:?}); {takes}"),
                )
            } else {
                (
                    name,
                    format!("is not a query parameter of this route; {takes}"),
                )
            };
            return Err(Reply::field(FieldError::new(
                "invalid_request",
                field,
                reason,
            )));
        }
        if seen.contains(&name) {
            return Err(Reply::field(FieldError::new(
                "invalid_request",
                name,
                "is given more than once",
            )));
        }
        seen.push(name);
    }
    Ok(())
}

fn query_u64(query: Option<&str>, name: &str, default: u64, max: u64) -> Result<u64, Reply> {
    match query_param(query, name) {
        None => Ok(default),
        // Digits only: `u64::from_str` would also take a leading `+`.
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n <= max && v.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
            _ => Err(Reply::field(FieldError::new(
                "invalid_request",
                name,
                format!("must be an integer between 0 and {max}"),
            ))),
        },
    }
}

/// Handles one request; `route` is set to the matched route's index for metrics.
pub async fn handle(
    app: Arc<App>,
    submitter: Arc<std::sync::Mutex<Submitter>>,
    peer: Arc<str>,
    mut request: Request<linger::Body>,
) -> HttpResponse {
    let started = Instant::now();
    let body_read = request
        .headers()
        .get(hyper::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        .then(|| request.body_mut().expect_continue());
    let path = request.uri().path().to_string();
    let resolved = resolve(request.method(), &path);
    let route_index = match &resolved {
        Ok((route, _)) | Err((route, _)) => *route,
    };
    let reply = match resolved {
        Err((_, reply)) => reply,
        Ok((route_index, params)) => {
            let route = &ROUTES[route_index];
            let admitted = admit(&app, route_index, &peer, &request).and_then(|admitted| {
                check_query(route, request.uri().query())?;
                Ok((admitted, decode_params(route.path, &params)?))
            });
            match admitted {
                Err(reply) => reply,
                Ok(((caller, charged), params)) => {
                    let timeout = app.config.request_timeout;
                    // A transaction id the server made up for the request (an account opened without
                    // one): a timed-out caller needs it to learn the outcome.
                    let generated = std::sync::OnceLock::new();
                    let work = dispatch(
                        &app,
                        &submitter,
                        &caller,
                        route_index,
                        params,
                        request,
                        &generated,
                    );
                    let reply = match tokio::time::timeout(timeout, work).await {
                        Ok(reply) => reply,
                        Err(_) => Reply::error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "timeout",
                            if ROUTES[route_index].method == "GET" {
                                "the request timed out; retry"
                            } else {
                                "the request timed out; its outcome is unknown: retry with the same transaction_id"
                            },
                        )
                        .with_header("retry-after", "1"),
                    };
                    // Refused with nothing done (for want of room, say): the caller retries,
                    // and that is not a second request against its rate limit.
                    if reply.refund_charge
                        && let (Some(limiter), Some(until)) = (&app.caller_limiter, charged)
                    {
                        limiter.refund(&[(&caller.sub, 1, until)]);
                    }
                    match generated.get() {
                        Some(id) if reply.status == StatusCode::SERVICE_UNAVAILABLE => {
                            name_generated_id(reply, *id)
                        }
                        _ => reply,
                    }
                }
            }
        }
    };
    app.metrics.record(
        route_index,
        reply.status.as_u16(),
        started.elapsed().as_micros() as u64,
    );
    // Answered before its `100 Continue`: the client may or may not send the body now, so the
    // connection cannot carry another request (`linger::Body::expect_continue`).
    if body_read.is_some_and(|read| !read.load(std::sync::atomic::Ordering::Relaxed)) {
        return reply.with_header("connection", "close").into_response();
    }
    reply.into_response()
}

/// One batch counted against its caller's share of the batch permits until it is dropped
/// (admins are not counted).
struct CallerBatches<'a> {
    app: &'a App,
    sub: Option<String>,
}

impl<'a> CallerBatches<'a> {
    fn take(app: &'a App, caller: &Caller, share: usize) -> Option<CallerBatches<'a>> {
        if caller.admin {
            return Some(CallerBatches { app, sub: None });
        }
        let mut held = app.batch_callers.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(caller.sub.clone()).or_default();
        if *count >= share {
            return None;
        }
        *count += 1;
        Some(CallerBatches {
            app,
            sub: Some(caller.sub.clone()),
        })
    }
}

impl Drop for CallerBatches<'_> {
    fn drop(&mut self) {
        let Some(sub) = &self.sub else {
            return;
        };
        let mut held = self
            .app
            .batch_callers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(sub) {
            *count -= 1;
            if *count == 0 {
                held.remove(sub);
            }
        }
    }
}

/// Whether a `Host` header value names a loopback address or `localhost`, with or without a
/// port.
pub fn loopback_host(host: &str) -> bool {
    let port_ok = |port: &str| port.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = host.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        let port_fine = after.is_empty() || after.strip_prefix(':').is_some_and(port_ok);
        return port_fine
            && ip
                .parse::<std::net::Ipv6Addr>()
                .is_ok_and(|ip| ip.is_loopback());
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port_ok(port) => name,
        Some(_) => return false,
        None => host,
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Routes anyone may call (operations endpoints).
fn is_public(route: usize) -> bool {
    matches!(
        ROUTES[route].name,
        "healthz" | "readyz" | "metrics" | "openapi"
    )
}

/// With authentication off, a request must be addressed to a loopback name (see `admit`): one
/// Host header naming 127.0.0.0/8, [::1] or localhost, and no absolute-form target naming
/// another host.
fn check_host(
    headers: &hyper::HeaderMap,
    uri: &hyper::Uri,
    peer: &str,
    route: &str,
) -> Result<(), Reply> {
    let Some(host) = headers.get(hyper::header::HOST) else {
        tracing::warn!(target: "audit", caller = %peer, route, "request refused: no Host header");
        return Err(Reply::error(
            StatusCode::BAD_REQUEST,
            "host_required",
            "with authentication off, requests must carry a Host header naming 127.0.0.1, [::1] or localhost",
        ));
    };
    // Two Host headers are a malformed request (RFC 9112, 3.2), and a check of the first
    // alone let a second name anything; an absolute-form target names the host itself.
    if headers.get_all(hyper::header::HOST).iter().count() != 1 {
        tracing::warn!(target: "audit", caller = %peer, route, "request refused: more than one Host header");
        return Err(Reply::error(
            StatusCode::BAD_REQUEST,
            "host_required",
            "a request must carry exactly one Host header",
        ));
    }
    let target_ok = uri
        .authority()
        .is_none_or(|authority| loopback_host(authority.as_str()));
    if !target_ok || !host.to_str().is_ok_and(loopback_host) {
        tracing::warn!(target: "audit", caller = %peer, route, host = ?host, "request refused: not addressed to a loopback host");
        return Err(Reply::error(
            StatusCode::FORBIDDEN,
            "host_not_allowed",
            "with authentication off, requests must be addressed to 127.0.0.1, [::1] or localhost (the Host header or the request target names another host)",
        ));
    }
    Ok(())
}

/// Authentication and the per-caller rate limit: the caller, and the arrival time its rate
/// limit's charge for this request left (`limit::Charged::until`), to give it back if the
/// request is refused with nothing done (`Reply::refund_charge`). Every refusal is
/// audit-logged (caller, route, reason; never the token).
fn admit(
    app: &App,
    route: usize,
    peer: &str,
    request: &Request<linger::Body>,
) -> Result<(Caller, Option<u64>), Reply> {
    // With authentication off every caller is an admin, so the request must be addressed to a
    // loopback name: a web page whose name an attacker re-resolved to 127.0.0.1 (DNS rebinding)
    // reaches this port from the user's browser, but with its own name in `Host`. A request
    // without a Host header (which HTTP/1.1 requires) names no host to check: refused as well.
    // The operations routes too (`/readyz` can name files and a halt's reason, `/metrics`
    // shows the traffic); the server listens on loopback only then, so every legitimate
    // caller uses a loopback name.
    let public = is_public(route);
    if app.config.auth.is_none() {
        check_host(request.headers(), request.uri(), peer, ROUTES[route].name)?;
    }
    if public {
        return Ok((Caller::unauthenticated(peer), None));
    }
    // One Authorization header, of visible ASCII: a second one (which a proxy in front may
    // have checked instead) or a byte outside it is refused by name, not read as no token.
    let mut headers = request
        .headers()
        .get_all(hyper::header::AUTHORIZATION)
        .iter();
    let header = match (headers.next(), headers.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => Some(Err(crate::api::auth::AuthError::Repeated)),
        (Some(value), None) => Some(
            value
                .to_str()
                .map_err(|_| crate::api::auth::AuthError::Malformed),
        ),
    };
    let caller = app.config.auth.authenticate(header, peer).map_err(|e| {
        tracing::warn!(target: "audit", caller = %peer, route = ROUTES[route].name, reason = %e, "authentication refused");
        Reply::error(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string()).with_header("www-authenticate", e.challenge())
    })?;
    let charged = match &app.caller_limiter {
        None => None,
        Some(limiter) => match limiter.check_all(&[(&caller.sub, 1)]) {
            Ok(charged) => Some(charged.until(0)),
            Err((_, wait)) => {
                tracing::warn!(target: "audit", caller = %caller.sub, route = ROUTES[route].name, reason = "rate limit", "request refused");
                return Err(Reply::error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "too many requests from this caller",
                )
                .with_header("retry-after", retry_after(wait)));
            }
        },
    };
    Ok((caller, charged))
}

/// Refuses (403) and audit-logs an authorization failure. `needs` is the scope that would
/// have granted the request, sent in the `insufficient_scope` challenge (RFC 6750, 3.1).
fn forbidden(caller: &Caller, route: &str, reason: &str, needs: &str) -> Reply {
    tracing::warn!(target: "audit", caller = %caller.sub, route, reason, "authorization refused");
    Reply::error(StatusCode::FORBIDDEN, "forbidden", reason)
        .with_header("www-authenticate", insufficient_scope(needs))
}

/// A 403 for one part of a request (a batch item), naming it as a validation error does.
fn forbidden_field(caller: &Caller, route: &str, field: &str, reason: &str, needs: &str) -> Reply {
    tracing::warn!(target: "audit", caller = %caller.sub, route, field, reason, "authorization refused");
    let error = FieldError::new("forbidden", field, reason);
    Reply::json(StatusCode::FORBIDDEN, error.body())
        .with_header("www-authenticate", insufficient_scope(needs))
}

fn insufficient_scope(needs: &str) -> String {
    format!(r#"Bearer error="insufficient_scope", scope="{needs}""#)
}

/// A 503 whose outcome is unknown (a timeout, a halt, a shutdown) for a command sent without a
/// transaction id: the error names the id the server gave it (`error.transaction_id`), the only
/// way its caller can retry it and learn the outcome.
fn name_generated_id(mut reply: Reply, id: TransactionId) -> Reply {
    let id = id.to_uuid_string();
    let Ok(mut body) = serde_json::from_slice::<serde_json::Value>(&reply.body) else {
        return reply;
    };
    let Some(error) = body.get_mut("error").and_then(|e| e.as_object_mut()) else {
        return reply;
    };
    let message = error
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_string();
    error.insert(
        "message".into(),
        json!(format!(
            "{message} (the server gave this request transaction_id {id}; retry with it)"
        )),
    );
    error.insert("transaction_id".into(), json!(id));
    reply.body = Bytes::from(body.to_string());
    reply
}

/// The answer of an operations route: `healthz`, `readyz` or (any other name) `metrics`.
fn operations(app: &App, name: &str) -> Reply {
    match name {
        "healthz" => Reply::text(StatusCode::OK, "text/plain", "ok\n"),
        "readyz" => {
            if let Some(reason) = app.shared.halt_reason() {
                Reply::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("halted: {}\n", detail(app, &reason)),
                )
            } else if app.views.broken() {
                Reply::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("halted: {}\n", crate::views::ViewsBroken),
                )
            } else if let Some(reason) = app.views.past_failure() {
                Reply::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!(
                        "failed: {VIEWS_FAILED} (status and history reads are unavailable): {}\n",
                        detail(app, reason)
                    ),
                )
            } else if !app.views.past_complete() {
                Reply::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "recovering: rebuilding the read views (writes and balances are served)\n",
                )
            } else {
                Reply::text(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        _ => Reply::text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            app.render_metrics(),
        ),
    }
}

/// The answer, as HTTP/1.1 bytes that close the connection, to a `GET` (or `HEAD`) of an
/// operations route (`/healthz`, `/readyz`, `/metrics`) on a connection over
/// `--max-connections`: a liveness probe or a metrics scrape must not find a loaded server dead
/// because long polls hold every connection. `None` for any other request (answered `too_many_connections`). With
/// authentication off, the Host checks apply as on any connection.
pub fn operations_over_limit(app: &App, peer: &str, head: &httparse::Request) -> Option<Vec<u8>> {
    let with_body = match head.method {
        Some("GET") => true,
        Some("HEAD") => false,
        _ => return None,
    };
    let target = head.path?;
    let name = match target.split('?').next()? {
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        _ => return None,
    };
    let uri: hyper::Uri = target.parse().ok()?;
    let mut headers = hyper::HeaderMap::new();
    for header in head.headers.iter() {
        let name = hyper::header::HeaderName::from_bytes(header.name.as_bytes()).ok()?;
        headers.append(name, HeaderValue::from_bytes(header.value).ok()?);
    }
    let reply = if app.config.auth.is_none() {
        check_host(&headers, &uri, peer, name).err()
    } else {
        None
    }
    .unwrap_or_else(|| operations(app, name));
    // Not counted in `wallet_http_requests_total`: the connection is counted in
    // `wallet_connections_refused_total`.
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status.as_u16(),
        reply.status.canonical_reason().unwrap_or(""),
        reply.content_type,
        reply.body.len()
    );
    for (name, value) in &reply.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if with_body {
        out.extend_from_slice(&reply.body);
    }
    Some(out)
}

async fn dispatch(
    app: &App,
    submitter: &std::sync::Mutex<Submitter>,
    caller: &Caller,
    route: usize,
    params: Vec<String>,
    request: Request<linger::Body>,
    generated: &std::sync::OnceLock<TransactionId>,
) -> Reply {
    let query = request.uri().query().map(str::to_string);
    let query = query.as_deref();
    match ROUTES[route].name {
        name @ ("healthz" | "readyz" | "metrics") => operations(app, name),
        "openapi" => Reply::text(StatusCode::OK, "application/json", app.openapi_json.clone()),
        "account" => account(app, caller, &params[0], query).await,
        "history" => history(app, caller, &params[0], query).await,
        "transfer_status" => transfer_status(app, caller, &params[0], query).await,
        "events" if !caller.admin => forbidden(
            caller,
            "events",
            "the event stream needs the wallet:admin scope",
            "wallet:admin",
        ),
        "events" => events(app, query).await,
        "open_account" | "deposit" | "withdraw" if !caller.admin => forbidden(
            caller,
            ROUTES[route].name,
            "this operation needs the wallet:admin scope",
            "wallet:admin",
        ),
        "transfer" | "transfer_batch" if !(caller.transfer || caller.admin) => forbidden(
            caller,
            ROUTES[route].name,
            "transfers need the wallet:transfer scope",
            "wallet:transfer",
        ),
        _ if app.config.writes_refused() => Reply::not_leader(),
        name => {
            // A batch holds its permit from before its body is read until it is answered
            // (only a caller that may transfer gets this far: the permits are shared).
            let (limit, _batch_permit) = if name == "transfer_batch" {
                let Ok(permit) = app.batch_permits.try_acquire() else {
                    return Reply::error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too_many_requests",
                        &format!(
                            "too many batches in flight (the server takes {} at once); retry later",
                            app.config.max_batches_in_flight
                        ),
                    )
                    .with_header("retry-after", "1")
                    .refund_charge();
                };
                let share = (app.config.max_batches_in_flight / 4).max(1);
                let Some(held) = CallerBatches::take(app, caller, share) else {
                    return Reply::error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too_many_requests",
                        &format!("this caller already has {share} batches in flight, its share of the server's; retry later"),
                    )
                    .with_header("retry-after", "1");
                };
                (app.config.max_batch_body_bytes, Some((permit, held)))
            } else {
                (app.config.max_body_bytes, None)
            };
            // Half the request timeout, so that a body that never finishes arriving is told
            // so (408: nothing was submitted) before the request's own timeout would answer
            // that its outcome is unknown.
            let deadline = app.config.request_timeout / 2;
            let body = match read_body(request, limit, deadline).await {
                Ok(body) => body,
                Err(reply) => return reply,
            };
            // Again once the body is in: it may take up to `deadline` to arrive (or the
            // process may have been paused meanwhile), and the lease may have run out since
            // the request was routed.
            if app.config.writes_refused() {
                return Reply::not_leader();
            }
            match name {
                "transfer" => transfer(app, submitter, caller, &body).await,
                "transfer_batch" => transfer_batch(app, submitter, caller, &body).await,
                "open_account" => open_account(app, submitter, caller, &body, generated).await,
                "deposit" => money(app, submitter, caller, &body, true).await,
                "withdraw" => money(app, submitter, caller, &body, false).await,
                _ => Reply::error(StatusCode::NOT_FOUND, "not_found", "no such route"),
            }
        }
    }
}

async fn read_body(
    request: Request<linger::Body>,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, Reply> {
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut parts = content_type.split(';');
    let media = parts.next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("application/json") {
        return Err(Reply::error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json",
        ));
    }
    // The body is read as UTF-8 (JSON's only encoding, RFC 8259): a charset naming another one
    // says the bytes are not, and would fail as JSON or, worse, be read wrongly.
    for parameter in parts {
        if let Some((name, value)) = parameter.split_once('=')
            && name.trim().eq_ignore_ascii_case("charset")
            && !["utf-8", "utf8"]
                .iter()
                .any(|utf8| value.trim().trim_matches('"').eq_ignore_ascii_case(utf8))
        {
            return Err(Reply::error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Content-Type's charset must be utf-8 (JSON is read as UTF-8)",
            ));
        }
    }
    let too_large = || {
        Reply::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!("the body is larger than {limit} bytes"),
        )
    };
    let length = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if length.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    let mut body = request.into_body();
    let collect = collect_body(&mut body, limit);
    let Ok(collected) = tokio::time::timeout(deadline, collect).await else {
        body.discard();
        return Err(Reply::error(
            StatusCode::REQUEST_TIMEOUT,
            "body_incomplete",
            &format!(
                "the body did not arrive whole within {} ms; nothing was submitted",
                deadline.as_millis()
            ),
        )
        .with_header("connection", "close"));
    };
    match collected {
        Ok(bytes) => Ok(bytes),
        Err(BodyError::TooLarge) => Err(too_large()),
        Err(BodyError::Unreadable) => Err(Reply::error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "could not read the body",
        )),
    }
}

/// Why `collect_body` stopped.
#[derive(Debug, PartialEq)]
enum BodyError {
    /// More than the limit's bytes of data.
    TooLarge,
    /// The connection failed or the framing was broken.
    Unreadable,
}

/// Reads a body of at most `limit` bytes into one buffer, grown as bytes arrive (not sized from
/// a Content-Length that may never arrive). Each frame's bytes are copied out and the frame dropped at once: a frame is a slice of
/// the connection's read buffer and keeps that buffer alive, so a chunked body of many tiny
/// chunks held as frames (`Collected` keeps each one) took tens of times its counted size.
/// A body that arrives as one frame is returned as that frame, uncopied.
async fn collect_body<B>(body: &mut B, limit: usize) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let mut first: Option<Bytes> = None;
    let mut buffer: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| BodyError::Unreadable)?.into_data() else {
            continue; // trailers
        };
        let held = first.as_ref().map_or(0, Bytes::len) + buffer.len();
        if data.len() > limit - held {
            return Err(BodyError::TooLarge);
        }
        if let Some(earlier) = first.take() {
            buffer.extend_from_slice(&earlier);
        }
        if buffer.is_empty() && first.is_none() {
            first = Some(data);
        } else {
            buffer.extend_from_slice(&data);
        }
    }
    Ok(match first {
        Some(only) => only,
        None => Bytes::from(buffer),
    })
}

/// Submits one command and waits for its durable outcome.
async fn execute(
    app: &App,
    submitter: &std::sync::Mutex<Submitter>,
    command: Command,
) -> Result<Delivered, Reply> {
    let receiver = submit(app, submitter, command)?;
    wait_outcome(receiver).await
}

/// Publishes one command; an error (429 or 503) means it was not published.
fn submit(
    app: &App,
    submitter: &std::sync::Mutex<Submitter>,
    command: Command,
) -> Result<tokio::sync::oneshot::Receiver<Delivered>, Reply> {
    let Some((slot, receiver)) = app.waiters.wait_single() else {
        return Err(Reply::too_many());
    };
    let submitted = {
        let mut submitter = submitter.lock().unwrap_or_else(|e| e.into_inner());
        submitter.try_submit(command, token(slot, 0), 0)
    };
    if submitted.is_err() {
        app.waiters.cancel(slot);
        return Err(Reply::overloaded());
    }
    Ok(receiver)
}

async fn wait_outcome(
    receiver: tokio::sync::oneshot::Receiver<Delivered>,
) -> Result<Delivered, Reply> {
    receiver.await.map_err(|_| Reply::shutting_down())
}

fn money_string(amount: u64, currency: crate::core::Currency) -> String {
    format_amount(amount, currency)
}

/// A response body. The typed variants hold plain values (ids, minor units, currencies) and
/// borrow account names from the views; `write_json` writes them straight into the response
/// buffer without a `String` per field or an escape scan (every value in them is JSON-safe by
/// construction: UUIDs, digits, ISO codes, validated account ids).
pub enum Body<'a> {
    Rejected {
        transaction_id: TransactionId,
        sequence: u64,
        code: RejectCode,
    },
    Transfer {
        transaction_id: TransactionId,
        sequence: u64,
        from_account: &'a str,
        to_account: &'a str,
        amount: u64,
        currency: Currency,
        balances: [u64; 2],
        /// Whether each side's balance is shown: an owner sees only its own account's
        /// (`Body::for_caller`).
        shown: [bool; 2],
    },
    Money {
        transaction_id: TransactionId,
        sequence: u64,
        account_id: &'a str,
        amount: u64,
        currency: Currency,
        balance: u64,
    },
    Opened {
        transaction_id: TransactionId,
        sequence: u64,
        account_id: &'a str,
    },
    Bare {
        transaction_id: TransactionId,
        sequence: u64,
    },
    Other(Value),
}

/// Appends `"key":` (keys are literals without characters to escape).
fn key(out: &mut Vec<u8>, name: &str) {
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// Appends `,"key":` (a member after the first).
fn next_key(out: &mut Vec<u8>, name: &str) {
    out.push(b',');
    key(out, name);
}

/// Appends a string value; escaped through serde_json unless every byte is plainly safe.
fn string(out: &mut Vec<u8>, text: &str) {
    if text
        .bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7F)
    {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, text);
    }
}

/// Appends an account id: its alphabet (`[A-Za-z0-9._:-]`, enforced by `AccountId`) needs no
/// escaping, so no byte is scanned.
fn account_string(out: &mut Vec<u8>, account: &str) {
    debug_assert!(crate::core::AccountId::new(account).is_ok() || account.is_empty());
    out.push(b'"');
    out.extend_from_slice(account.as_bytes());
    out.push(b'"');
}

fn number(out: &mut Vec<u8>, value: u64) {
    let mut buffer = itoa::Buffer::new();
    out.extend_from_slice(buffer.format(value).as_bytes());
}

fn money_value(out: &mut Vec<u8>, value: u64, currency: Currency) {
    out.push(b'"');
    crate::core::types::write_amount(out, value, currency);
    out.push(b'"');
}

/// Appends `,"name":"12.34"`.
fn money_field(out: &mut Vec<u8>, name: &str, value: u64, currency: Currency) {
    next_key(out, name);
    money_value(out, value, currency);
}

/// Appends `,"currency":"USD"`.
fn currency_field(out: &mut Vec<u8>, currency: Currency) {
    next_key(out, "currency");
    currency_code(out, currency);
}

fn currency_code(out: &mut Vec<u8>, currency: Currency) {
    out.push(b'"');
    out.extend_from_slice(&currency.code());
    out.push(b'"');
}

impl Body<'_> {
    /// Hides what `caller` may not read: an owner sees the balance of its own side of a
    /// transfer, not the other party's.
    fn for_caller(mut self, caller: &Caller) -> Self {
        if let Body::Transfer {
            from_account,
            to_account,
            shown,
            ..
        } = &mut self
        {
            *shown = [caller.may_read(from_account), caller.may_read(to_account)];
        }
        self
    }

    fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(256);
        self.write_json(&mut out);
        Bytes::from(out)
    }

    /// Appends the body's JSON: `{"transaction_id":…,"status":…,"sequence":…, …}`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let (transaction_id, status, sequence) = match self {
            Body::Other(value) => {
                let _ = serde_json::to_writer(&mut *out, value);
                return;
            }
            Body::Rejected {
                transaction_id,
                sequence,
                ..
            } => (transaction_id, "rejected", sequence),
            Body::Transfer {
                transaction_id,
                sequence,
                ..
            }
            | Body::Money {
                transaction_id,
                sequence,
                ..
            }
            | Body::Opened {
                transaction_id,
                sequence,
                ..
            }
            | Body::Bare {
                transaction_id,
                sequence,
            } => (transaction_id, "committed", sequence),
        };
        out.push(b'{');
        key(out, "transaction_id");
        out.push(b'"');
        transaction_id.write_uuid(out);
        out.extend_from_slice(b"\",");
        key(out, "status");
        string(out, status);
        next_key(out, "sequence");
        number(out, *sequence);
        match self {
            Body::Other(_) | Body::Bare { .. } => {}
            Body::Rejected { code, .. } => {
                next_key(out, "error");
                out.push(b'{');
                key(out, "code");
                string(out, code.code());
                next_key(out, "message");
                string(out, code.message());
                out.push(b'}');
            }
            Body::Transfer {
                from_account,
                to_account,
                amount,
                currency,
                balances,
                shown,
                ..
            } => {
                next_key(out, "from_account");
                account_string(out, from_account);
                next_key(out, "to_account");
                account_string(out, to_account);
                money_field(out, "amount", *amount, *currency);
                currency_field(out, *currency);
                next_key(out, "balances");
                out.push(b'[');
                let mut first = true;
                for ((account, balance), shown) in [from_account, to_account]
                    .into_iter()
                    .zip(balances)
                    .zip(shown)
                {
                    if !shown {
                        continue;
                    }
                    if !first {
                        out.push(b',');
                    }
                    first = false;
                    out.push(b'{');
                    key(out, "account_id");
                    account_string(out, account);
                    currency_field(out, *currency);
                    money_field(out, "balance", *balance, *currency);
                    out.push(b'}');
                }
                out.push(b']');
            }
            Body::Money {
                account_id,
                amount,
                currency,
                balance,
                ..
            } => {
                next_key(out, "account_id");
                account_string(out, account_id);
                money_field(out, "amount", *amount, *currency);
                currency_field(out, *currency);
                money_field(out, "balance", *balance, *currency);
            }
            Body::Opened { account_id, .. } => {
                next_key(out, "account_id");
                account_string(out, account_id);
            }
        }
        out.push(b'}');
    }
}

/// Renders an outcome the same way whether it is fresh, replayed or looked up.
pub fn outcome_body<'a>(
    state: &'a ViewState,
    transaction_id: TransactionId,
    outcome: &OutcomeView,
) -> Body<'a> {
    let sequence = outcome.seq;
    if let Some(code) = outcome.rejection {
        return Body::Rejected {
            transaction_id,
            sequence,
            code,
        };
    }
    let name = |i: usize| state.name(outcome.accounts[i]);
    match outcome.command_type {
        CommandType::Transfer => Body::Transfer {
            transaction_id,
            sequence,
            from_account: name(0),
            to_account: name(1),
            amount: outcome.amount,
            currency: outcome.currency,
            balances: outcome.balances_after,
            shown: [true, true],
        },
        CommandType::Deposit | CommandType::Withdraw => Body::Money {
            transaction_id,
            sequence,
            account_id: name(0),
            amount: outcome.amount,
            currency: outcome.currency,
            balance: outcome.balances_after[0],
        },
        CommandType::OpenAccount => Body::Opened {
            transaction_id,
            sequence,
            account_id: name(0),
        },
        CommandType::Checkpoint => Body::Bare {
            transaction_id,
            sequence,
        },
    }
}

fn status_for(outcome: &OutcomeView) -> StatusCode {
    match outcome.rejection {
        None if outcome.command_type == CommandType::OpenAccount => StatusCode::CREATED,
        None => StatusCode::OK,
        Some(RejectCode::TransactionIdReused | RejectCode::AccountAlreadyExists) => {
            StatusCode::CONFLICT
        }
        Some(_) => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

/// Turns a delivered record into the reply a caller gets.
fn render(app: &App, caller: &Caller, delivered: &Delivered) -> Reply {
    let past = PastState::of(&app.views);
    let read = app.views.read(|state| {
        let (status, body, replayed) = render_value(state, caller, delivered, &past);
        (status, body.to_bytes(), replayed)
    });
    let (status, body, replayed) = match read {
        Ok(rendered) => rendered,
        // The outcome is in the journal if it was durable: a retry after the restart gets it.
        Err(broken) => return Reply::views_broken(broken),
    };
    let reply = Reply::json_bytes(status, body);
    match (replayed, status) {
        (_, StatusCode::SERVICE_UNAVAILABLE) => reply.with_header("retry-after", "5"),
        (_, StatusCode::INSUFFICIENT_STORAGE)
            if delivered.record.refused == Some(Refusal::JournalFull) =>
        {
            reply.with_header("retry-after", "5")
        }
        (true, _) => reply.with_header("idempotent-replayed", "true"),
        _ => reply,
    }
}

/// The status, body and replay mark of an outcome; shared by single and batch requests.
fn render_value<'a>(
    state: &'a ViewState,
    caller: &Caller,
    delivered: &Delivered,
    past: &PastState,
) -> (StatusCode, Body<'a>, bool) {
    let record = &delivered.record;
    if let Some(why) = record.refused {
        let (code, message) = match why {
            Refusal::LedgerFull => (
                "ledger_full",
                "the ledger remembers as many transaction ids as this server's --max-transaction-ids allows; nothing was executed, and the same request may be sent again once the limit is raised",
            ),
            Refusal::JournalFull => (
                "journal_full",
                "the disk holding the journal is full; nothing was executed, and the same request may be sent again after Retry-After",
            ),
        };
        // The id at the top level and in the error, where every error about one command
        // names it (a 503 for an account opening sent without an id carries only the latter).
        let id = record.transaction_id.to_uuid_string();
        let body = json!({"transaction_id": id, "error": {"code": code, "message": message, "transaction_id": id}});
        return (StatusCode::INSUFFICIENT_STORAGE, Body::Other(body), false);
    }
    if !delivered.durable {
        let body = json!({"error": {"code": "outcome_unknown", "message": "the engine halted (a journal failure or an internal error) before this outcome was durable; retry with the same transaction_id after the service restarts"}});
        return (StatusCode::SERVICE_UNAVAILABLE, Body::Other(body), false);
    }
    if record.rejection == Some(RejectCode::TransactionIdReused) {
        let code = RejectCode::TransactionIdReused;
        let id = record.transaction_id.to_uuid_string();
        let body = json!({"transaction_id": id, "error": {"code": code.code(), "message": code.message(), "transaction_id": id}});
        return (StatusCode::CONFLICT, Body::Other(body), false);
    }
    let (outcome, replayed) = if record.replayed {
        match state.outcomes.get(&record.transaction_id.0) {
            Some(original) => (*original, true),
            // The views are still loading the journal's past: the original body is not known
            // yet, and a retry will get it.
            None if past.failed.is_some() => {
                let body = json!({"error": {"code": "views_unavailable", "message": format!("the original outcome of this transaction_id cannot be shown: {VIEWS_FAILED} (the server's log says why)")}});
                return (StatusCode::SERVICE_UNAVAILABLE, Body::Other(body), false);
            }
            None if !past.complete => {
                let body = json!({"error": {"code": "starting", "message": "the original outcome of this transaction_id is still loading; retry shortly"}});
                return (StatusCode::SERVICE_UNAVAILABLE, Body::Other(body), false);
            }
            // The original predates the views (it is inside a snapshot): the ledger still knows
            // its sequence and code.
            None => {
                let mut minimal = OutcomeView::from_record(record);
                minimal.command_type = CommandType::Checkpoint;
                (minimal, true)
            }
        }
    } else {
        (OutcomeView::from_record(record), false)
    };
    (
        status_for(&outcome),
        outcome_body(state, record.transaction_id, &outcome).for_caller(caller),
        replayed,
    )
}

/// Owners move only their own money; the per-account velocity limit applies to the debit side,
/// and only to transfers not decided yet: a retry of one that was (answered from its original
/// outcome, or refused as a reused id) moves no money, and must get that answer, not a 429.
/// Returns whether the allowance was charged.
fn check_debit(
    app: &App,
    caller: &Caller,
    from: &str,
    transaction_id: TransactionId,
) -> Result<Option<u64>, Reply> {
    may_debit(caller, from)?;
    if app.velocity_limiter.is_none() || already_decided(app, transaction_id) {
        return Ok(None);
    }
    Ok(Some(check_velocity(app, caller, &[(from, 1)])?.until(0)))
}

/// Whether the read views hold an outcome for `transaction_id` (the engine executes an id at
/// most once, so such a command moves no money again). The views trail the engine by a moment:
/// a retry sent before they saw the original is charged like a new transfer.
/// Broken views (the server is halting) decide nothing: the transfer is charged as a new one.
fn already_decided(app: &App, transaction_id: TransactionId) -> bool {
    app.views
        .read(|state| state.outcomes.get(&transaction_id.0).is_some())
        .unwrap_or(false)
}

fn may_debit(caller: &Caller, from: &str) -> Result<(), Reply> {
    if !caller.may_debit(from) {
        return Err(forbidden(
            caller,
            "transfer",
            "a caller may only transfer from its own account with wallet:transfer",
            "wallet:admin",
        ));
    }
    Ok(())
}

/// Whole seconds for a `Retry-After` header, at least 1.
fn retry_after(wait: Duration) -> String {
    wait.as_secs_f64().ceil().max(1.0).to_string()
}

/// Takes each `(account, n)` transfers out of that debit account's velocity allowance, all or
/// none (429 naming the first account that has not enough left).
fn check_velocity(
    app: &App,
    caller: &Caller,
    charges: &[(&str, u32)],
) -> Result<crate::api::limit::Charged, Reply> {
    let Some(limiter) = &app.velocity_limiter else {
        return Ok(Default::default());
    };
    limiter.check_all(charges).map_err(|(index, wait)| {
        let (account, n) = charges[index];
        tracing::warn!(target: "audit", caller = %caller.sub, account, transfers = n, reason = "velocity limit", "transfer refused");
        Reply::error(
            StatusCode::TOO_MANY_REQUESTS,
            "velocity_limit",
            &format!("too many transfers out of account {account} per second"),
        )
        .with_header("retry-after", retry_after(wait))
    })
}

/// Gives back what `check_velocity` took for transfers that were then not submitted (the
/// engine was at capacity) or moved no money (`(account, n, until)`: `until` from the charge's
/// `Charged`): a client told to retry later has not spent its allowance.
fn refund_velocity(app: &App, charges: &[(&str, u32, u64)]) {
    if let Some(limiter) = &app.velocity_limiter {
        limiter.refund(charges);
    }
}

async fn transfer(
    app: &App,
    submitter: &std::sync::Mutex<Submitter>,
    caller: &Caller,
    body: &[u8],
) -> Reply {
    let request: TransferRequest = match json::decode(body) {
        Ok(r) => r,
        Err(e) => return Reply::field(e),
    };
    let command = match request.to_command(now_ns()) {
        Ok(c) => c,
        Err(e) => return Reply::field(e),
    };
    let charged = match check_debit(app, caller, &request.from_account, command.transaction_id) {
        Ok(charged) => charged,
        Err(reply) => return reply,
    };
    let receiver = match submit(app, submitter, command) {
        Ok(receiver) => receiver,
        Err(reply) => {
            if let Some(until) = charged {
                refund_velocity(app, &[(&request.from_account, 1, until)]);
            }
            return reply;
        }
    };
    match wait_outcome(receiver).await {
        Ok(delivered) => {
            if let Some(until) = charged
                && moved_no_money_again(&delivered)
            {
                refund_velocity(app, &[(&request.from_account, 1, until)]);
            }
            render(app, caller, &delivered)
        }
        Err(reply) => reply,
    }
}

/// Whether the engine found the command's id decided before (a retry answered from its
/// original outcome, or a reused id refused) or refused it unexecuted (the ledger is full): it
/// moved no money, so the velocity allowance charged for it (the views had not seen the
/// original yet: after a restart, while they load, or a moment after the original) is given
/// back.
fn moved_no_money_again(delivered: &Delivered) -> bool {
    delivered.record.refused.is_some()
        || (delivered.durable
            && (delivered.record.replayed
                || delivered.record.rejection == Some(RejectCode::TransactionIdReused)))
}

pub use super::json::MAX_BATCH;

async fn transfer_batch(
    app: &App,
    submitter: &std::sync::Mutex<Submitter>,
    caller: &Caller,
    body: &[u8],
) -> Reply {
    // A batch is published to the ring whole: one larger than the ring could never be.
    let max = MAX_BATCH.min(app.config.ring_size);
    let size_error = || {
        Reply::field(FieldError::new(
            "invalid_request",
            "transfers",
            format!("must hold 1 to {max} transfers"),
        ))
    };
    let request: BatchRequest = match json::decode(body) {
        Ok(r) => r,
        // Past `MAX_BATCH` the decoder stops reading; the limit named is this server's.
        Err(e) if e.field == "transfers" && e.message.contains(json::BATCH_CAPPED) => {
            return size_error();
        }
        Err(e) => return Reply::field(e),
    };
    if request.transfers.is_empty() || request.transfers.len() > max {
        return size_error();
    }
    // The per-caller rate limit counts a batch's transfers one by one (its request took the
    // first): a batch is as much work, and as many remembered ids, as that many requests. One
    // that the limit can never let through at once is wrong for good: a 400, as for velocity.
    if let Some(limit) = std::num::NonZeroU32::new(app.config.rate_limit_per_caller)
        && request.transfers.len() > limit.get() as usize
    {
        return Reply::field(FieldError::new(
            "invalid_request",
            "transfers",
            format!(
                "holds {} transfers, more than this caller's rate limit of {limit} per second lets through at once",
                request.transfers.len()
            ),
        ));
    }
    let timestamp = now_ns();
    let mut commands = Vec::with_capacity(request.transfers.len());
    // Each transaction id once per batch: a repeat would be answered as a replay of the
    // first, and a caller counting successes would count one transfer twice.
    let mut first_of: std::collections::HashMap<u128, usize> =
        std::collections::HashMap::with_capacity(request.transfers.len());
    for (i, transfer) in request.transfers.iter().enumerate() {
        match transfer.to_command(timestamp) {
            Ok(c) => commands.push(c),
            // The whole batch is refused before anything runs, so nothing is half-submitted.
            Err(e) => return Reply::field(e.within(&format!("transfers[{i}]"))),
        }
        let id = commands[i].transaction_id.0;
        if let Some(first) = first_of.insert(id, i) {
            return Reply::field(FieldError::new(
                "invalid_request",
                &format!("transfers[{i}].transaction_id"),
                format!(
                    "repeats the transaction_id of transfers[{first}]; a batch holds each id once"
                ),
            ));
        }
        if !caller.may_debit(&transfer.from_account) {
            return forbidden_field(
                caller,
                "transfer_batch",
                &format!("transfers[{i}].from_account"),
                "a caller may only transfer from its own account with wallet:transfer",
                "wallet:admin",
            );
        }
    }
    // The velocity limit, once the whole batch is known to be valid: every debit account's
    // transfers at once and all accounts or none, so a refused batch has spent no allowance
    // (and one the engine had no room for gets its allowance back).
    // Each debit account's charge: (account, transfers, its arrival time after the charge).
    let mut charges: Vec<(&str, u32, u64)> = Vec::new();
    // Which items were charged (by index).
    let mut charged: Vec<bool> = Vec::new();
    if let Some(limit) = std::num::NonZeroU32::new(app.config.velocity_per_account) {
        let mut per_account: std::collections::HashMap<&str, u32> =
            std::collections::HashMap::new();
        // Items decided before (retries) move no money again: not charged.
        let decided = app.views.read(|state| {
            commands
                .iter()
                .map(|c| state.outcomes.get(&c.transaction_id.0).is_some())
                .collect::<Vec<bool>>()
        });
        let decided = match decided {
            Ok(decided) => decided,
            Err(broken) => return Reply::views_broken(broken),
        };
        charged = decided.iter().map(|d| !d).collect();
        for (transfer, decided) in request.transfers.iter().zip(decided) {
            if !decided {
                *per_account
                    .entry(transfer.from_account.as_ref())
                    .or_default() += 1;
            }
        }
        if let Some((from, n)) = per_account.iter().find(|(_, n)| **n > limit.get()) {
            // Until the views hold the journal's outcomes after a restart, retries count as new
            // here: whether the batch is over the limit is not known yet (503, retried), and a
            // 400 would tell the client that its batch is wrong for good.
            if !app.views.past_complete() {
                return Reply::still_loading(app);
            }
            return Reply::field(FieldError::new(
                "invalid_request",
                "transfers",
                format!(
                    "holds {n} transfers out of account {from}, more than its velocity limit of {limit} per second lets through at once"
                ),
            ));
        }
        let wanted: Vec<(&str, u32)> = per_account.into_iter().collect();
        match check_velocity(app, caller, &wanted) {
            Ok(taken) => {
                charges = wanted
                    .iter()
                    .enumerate()
                    .map(|(i, &(account, n))| (account, n, taken.until(i)))
                    .collect();
            }
            Err(reply) => return reply,
        }
    }
    // The rest of the batch against the caller's rate limit, once it is otherwise admitted.
    let mut caller_charge: Option<(u32, u64)> = None;
    if let Some(limiter) = &app.caller_limiter
        && commands.len() > 1
    {
        let rest = (commands.len() - 1) as u32;
        match limiter.check_all(&[(&caller.sub, rest)]) {
            Ok(charged) => caller_charge = Some((rest, charged.until(0))),
            Err((_, wait)) => {
                refund_velocity(app, &charges);
                tracing::warn!(target: "audit", caller = %caller.sub, transfers = commands.len(), reason = "rate limit", "batch refused");
                // The request's own unit back too: nothing was submitted (a request refused
                // at `admit` spends nothing either).
                return Reply::error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    &format!(
                        "a batch of {} transfers is more than this caller's rate limit has left now",
                        commands.len()
                    ),
                )
                .with_header("retry-after", retry_after(wait))
                .refund_charge();
            }
        }
    }
    let refund_caller = || {
        if let (Some(limiter), Some((rest, until))) = (&app.caller_limiter, caller_charge) {
            limiter.refund(&[(&caller.sub, rest, until)]);
        }
    };
    let Some((slot, receiver)) = app.waiters.wait_batch(commands.len()) else {
        refund_velocity(app, &charges);
        refund_caller();
        return Reply::too_many();
    };
    let tagged: Vec<(Command, u64)> = commands
        .iter()
        .enumerate()
        .map(|(i, c)| (*c, token(slot, i as u32)))
        .collect();
    let submitted = {
        let mut submitter = submitter.lock().unwrap_or_else(|e| e.into_inner());
        submitter.try_submit_batch(&tagged, 0)
    };
    if submitted.is_err() {
        app.waiters.cancel(slot);
        refund_velocity(app, &charges);
        refund_caller();
        return Reply::overloaded();
    }
    let Ok(results) = receiver.await else {
        return Reply::shutting_down();
    };
    // Items charged that turn out decided before: their allowance back, one refund per
    // account's charge.
    let mut refunds: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    for ((result, transfer), charged) in results.iter().zip(&request.transfers).zip(&charged) {
        if *charged && result.as_ref().is_some_and(moved_no_money_again) {
            *refunds.entry(transfer.from_account.as_ref()).or_default() += 1;
        }
    }
    if !refunds.is_empty() {
        let refunds: Vec<(&str, u32, u64)> = charges
            .iter()
            .filter_map(|&(account, _, until)| Some((account, *refunds.get(account)?, until)))
            .collect();
        refund_velocity(app, &refunds);
    }
    // Each outcome written straight into the response:
    // {"results":[{"index":i,"http_status":s,"replayed":b,"result":{…}},…]}, under the read lock
    // a chunk of items at a time: the journal and reply thread takes the write lock for every
    // durable batch, and must not wait for thousands of items to be rendered. An item's outcome
    // does not change once decided, so chunks read at different moments agree.
    let past = PastState::of(&app.views);
    let mut out = Vec::with_capacity(64 + results.len() * 400);
    out.extend_from_slice(b"{\"results\":[");
    for (first, chunk) in (0usize..)
        .step_by(RENDER_CHUNK)
        .zip(results.chunks(RENDER_CHUNK))
    {
        let rendered = app.views.read(|state| {
            for (index, result) in (first..).zip(chunk) {
                let (status, result, replayed) = match result {
                    Some(delivered) => render_value(state, caller, delivered, &past),
                    None => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Body::Other(
                            json!({"error": {"code": "outcome_unknown", "message": "no outcome was delivered"}}),
                        ),
                        false,
                    ),
                };
                if index > 0 {
                    out.push(b',');
                }
                out.push(b'{');
                key(&mut out, "index");
                number(&mut out, index as u64);
                out.push(b',');
                key(&mut out, "http_status");
                number(&mut out, u64::from(status.as_u16()));
                out.push(b',');
                key(&mut out, "replayed");
                out.extend_from_slice(if replayed { b"true" } else { b"false" });
                out.push(b',');
                key(&mut out, "result");
                result.write_json(&mut out);
                out.push(b'}');
            }
        });
        if let Err(broken) = rendered {
            return Reply::views_broken(broken);
        }
    }
    out.extend_from_slice(b"]}");
    Reply::json_bytes(StatusCode::OK, Bytes::from(out))
}

/// Batch items rendered under one hold of the views' read lock.
const RENDER_CHUNK: usize = 256;

async fn open_account(
    app: &App,
    submitter: &std::sync::Mutex<Submitter>,
    caller: &Caller,
    body: &[u8],
    generated: &std::sync::OnceLock<TransactionId>,
) -> Reply {
    let request: OpenAccountRequest = match json::decode(body) {
        Ok(r) => r,
        Err(e) => return Reply::field(e),
    };
    let account = match json::new_account("account_id", &request.account_id) {
        Ok(a) => a,
        Err(e) => return Reply::field(e),
    };
    let transaction_id = match &request.transaction_id {
        Some(text) => match json::new_transaction_id("transaction_id", text) {
            Ok(id) => id,
            Err(e) => return Reply::field(e),
        },
        None => *generated.get_or_init(|| TransactionId(uuid::Uuid::new_v4().as_u128())),
    };
    let command = Command {
        transaction_id,
        timestamp_ns: now_ns(),
        kind: CommandKind::OpenAccount { account },
    };
    match execute(app, submitter, command).await {
        Ok(delivered) => render(app, caller, &delivered),
        Err(reply) => reply,
    }
}

async fn money(
    app: &App,
    submitter: &std::sync::Mutex<Submitter>,
    caller: &Caller,
    body: &[u8],
    deposit: bool,
) -> Reply {
    let request: MoneyRequest = match json::decode(body) {
        Ok(r) => r,
        Err(e) => return Reply::field(e),
    };
    let command = match request.to_command(now_ns(), deposit) {
        Ok(c) => c,
        Err(e) => return Reply::field(e),
    };
    match execute(app, submitter, command).await {
        Ok(delivered) => render(app, caller, &delivered),
        Err(reply) => reply,
    }
}

/// Read-your-writes: `?min_seq=S` waits (bounded) until the views reflect sequence S.
async fn wait_min_seq(app: &App, query: Option<&str>) -> Result<(), Reply> {
    let min_seq = query_u64(query, "min_seq", 0, u64::MAX)?;
    // Every sequence an answer has named is durable (replies wait for the sync), so one past
    // the durable end was never handed out: a client error, answered at once rather than
    // after the bounded wait.
    let durable = app
        .shared
        .durable_seq
        .load(std::sync::atomic::Ordering::Acquire);
    if min_seq > durable {
        return Err(Reply::field(FieldError::new(
            "invalid_request",
            "min_seq",
            format!("is past the last durable sequence ({durable}); no answer has named it"),
        )));
    }
    // Bounded inside the request timeout too, so that a short `--request-timeout-ms` still
    // gets `view_behind` (retry) rather than the request's `timeout`.
    let wait = app
        .config
        .read_wait
        .min(long_poll_limit(app.config.request_timeout));
    if min_seq > 0 && !app.views.wait_for(min_seq, wait).await {
        // Broken views never advance: say so rather than "behind".
        if app.views.broken() {
            return Err(Reply::views_broken(crate::views::ViewsBroken));
        }
        return Err(Reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "view_behind",
            "the read view has not reached min_seq yet; retry",
        )
        .with_header("retry-after", "1"));
    }
    Ok(())
}

async fn account(app: &App, caller: &Caller, id: &str, query: Option<&str>) -> Reply {
    if let Err(e) = json::account("account_id", id) {
        return Reply::field(e);
    }
    if let Some((reason, needs)) = caller.read_refusal(id) {
        return forbidden(caller, "account", reason, needs);
    }
    if let Err(reply) = wait_min_seq(app, query).await {
        return reply;
    }
    let read = app.views.read(|state| match state.account(id) {
        None => Reply::error(
            StatusCode::NOT_FOUND,
            "account_not_found",
            RejectCode::AccountNotFound.message(),
        ),
        Some(index) => {
            // Read under the views' lock, so that it is the sequence these balances reflect.
            let sequence = app.views.applied_seq();
            let balances: Vec<Value> = state.balances[index as usize]
                .iter()
                .map(|(c, b)| json!({"currency": c.to_string(), "balance": money_string(*b, *c)}))
                .collect();
            Reply::json(
                StatusCode::OK,
                json!({"account_id": id, "balances": balances, "sequence": sequence}),
            )
        }
    });
    read.unwrap_or_else(Reply::views_broken)
}

async fn history(app: &App, caller: &Caller, id: &str, query: Option<&str>) -> Reply {
    if let Err(e) = json::account("account_id", id) {
        return Reply::field(e);
    }
    if let Some((reason, needs)) = caller.read_refusal(id) {
        return forbidden(caller, "history", reason, needs);
    }
    let after_seq = match query_u64(query, "after_seq", 0, u64::MAX) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let limit = match query_u64(query, "limit", 100, 1000) {
        Ok(v) => v as usize,
        Err(r) => return r,
    };
    if let Err(reply) = wait_min_seq(app, query).await {
        return reply;
    }
    if !app.views.past_complete() {
        return Reply::still_loading(app);
    }
    // Copied out under the read lock, rendered after it: the output thread takes the write
    // lock for every durable batch, and waits while a reader holds it.
    let copied = app.views.read(|state| {
        let index = state.account(id)?;
        let entries: Vec<(HistoryEntry, Option<String>)> = state
            .history_after(index, after_seq)
            .take(limit)
            .map(|e| {
                let counterparty =
                    (e.counterparty != u32::MAX).then(|| state.name(e.counterparty).to_string());
                (e, counterparty)
            })
            .collect();
        Some((entries, state.oldest_history_seq(index)))
    });
    let copied = match copied {
        Ok(copied) => copied,
        Err(broken) => return Reply::views_broken(broken),
    };
    let Some((entries, oldest)) = copied else {
        return Reply::error(
            StatusCode::NOT_FOUND,
            "account_not_found",
            RejectCode::AccountNotFound.message(),
        );
    };
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|(e, counterparty)| {
            let mut entry = json!({
                "sequence": e.seq,
                "transaction_id": TransactionId(e.transaction_id).to_uuid_string(),
                "kind": e.kind.name(),
                "currency": e.currency.to_string(),
                "amount": money_string(e.amount, e.currency),
                "balance_after": money_string(e.balance_after, e.currency),
                "timestamp_ns": e.timestamp_ns,
            });
            if let Some(name) = counterparty {
                entry["counterparty"] = json!(name);
            }
            entry
        })
        .collect();
    Reply::json(
        StatusCode::OK,
        json!({"account_id": id, "entries": entries, "oldest_sequence_in_view": oldest}),
    )
}

async fn transfer_status(app: &App, caller: &Caller, id: &str, query: Option<&str>) -> Reply {
    let transaction_id = match json::transaction_id("transaction_id", id) {
        Ok(t) => t,
        Err(e) => return Reply::field(e),
    };
    // The scope first: a caller that may not read does not get to wait.
    if !(caller.admin || caller.read || caller.transfer) {
        return forbidden(
            caller,
            "transfer_status",
            "reading needs wallet:read or wallet:transfer",
            "wallet:read",
        );
    }
    if let Err(reply) = wait_min_seq(app, query).await {
        return reply;
    }
    if !app.views.past_complete() {
        return Reply::still_loading(app);
    }
    let read = app.views.read(|state| {
        // Visible to its two parties only; to anyone else it looks exactly like an unknown id.
        let visible = |o: &OutcomeView| {
            caller.admin
                || o.accounts
                    .iter()
                    .any(|a| *a != u32::MAX && state.name(*a) == caller.sub)
        };
        match state.outcomes.get(&transaction_id.0).filter(|o| visible(o)) {
            Some(outcome) => Reply::json_bytes(
                StatusCode::OK,
                outcome_body(state, transaction_id, outcome)
                    .for_caller(caller)
                    .to_bytes(),
            ),
            None => Reply::error(
                StatusCode::NOT_FOUND,
                "transaction_not_found",
                "no outcome is known for this transaction_id",
            ),
        }
    });
    read.unwrap_or_else(Reply::views_broken)
}

/// One NDJSON line per event with `seq >= from_seq`, from the in-memory window or the journal.
async fn events(app: &App, query: Option<&str>) -> Reply {
    let from_seq = match query_u64(query, "from_seq", 1, u64::MAX) {
        Ok(v) => v.max(1),
        Err(r) => return r,
    };
    let limit = match query_u64(query, "limit", 1000, 10_000) {
        Ok(v) => v as usize,
        Err(r) => return r,
    };
    let wait_ms = match query_u64(query, "wait_ms", 0, 30_000) {
        Ok(v) => v,
        Err(r) => return r,
    };
    // A reader's next position is at most one past the last durable event: every event it
    // read, and every sequence an answer named, was durable. Further on, it follows another
    // history (a server restored from an older backup, or a `--sync none` journal that lost
    // its tail in a power loss): said at once, not answered with empty pages forever.
    let durable = app
        .shared
        .durable_seq
        .load(std::sync::atomic::Ordering::Acquire);
    if from_seq > durable.saturating_add(1) {
        return Reply::field(FieldError::new(
            "invalid_request",
            "from_seq",
            format!(
                "is past the end of this server's event stream (its last event is {durable}): \
                 no reader of this history can be there"
            ),
        ));
    }
    if wait_ms > 0 {
        // A long poll ends with an answer (possibly no lines) before the request timeout,
        // which would otherwise cut it off with a 503.
        let wait = Duration::from_millis(wait_ms).min(long_poll_limit(app.config.request_timeout));
        app.views.wait_for(from_seq, wait).await;
    }
    // The records and the names they need are copied out under the read lock and rendered
    // after it (the output thread waits for the write lock while a reader holds it); the
    // window's records are in sequence order, so the first one wanted is found by bisection.
    let window = app.views.read(|state| {
        let first = state.recent.front().map(|r| r.first_seq)?;
        if from_seq < first {
            return None;
        }
        let start = state.recent.partition_point(|r| r.next_seq() <= from_seq);
        let mut records = Vec::new();
        let mut count = 0;
        for record in state.recent.range(start..) {
            // As the journal path below: whole records while fewer than `limit` events.
            if count >= limit {
                break;
            }
            count += record.events().iter().filter(|e| e.seq >= from_seq).count();
            records.push(*record);
        }
        let names = names_of(state, &records);
        Some((records, names))
    });
    let window = match window {
        Ok(window) => window,
        Err(broken) => return Reply::views_broken(broken),
    };
    let lines = match window {
        Some((records, names)) => {
            let mut lines = String::new();
            for record in &records {
                event_lines(&names, record, from_seq, &mut lines);
            }
            lines
        }
        // Nothing at or after `from_seq` is applied yet (a poll at the end, with a window
        // that is empty after a restart): no journal read finds more.
        None if from_seq > app.views.applied_seq() => String::new(),
        None => {
            // Older than the in-memory window: read the journal, if a read permit is free
            // (held by the read itself, which a caller hanging up does not stop).
            let Ok(permit) = app.journal_reads.clone().try_acquire_owned() else {
                return Reply::error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_requests",
                    "too many event-stream reads from the journal files at once; retry",
                )
                .with_header("retry-after", "1")
                .refund_charge();
            };
            app.metrics
                .events_journal_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = crate::journal::journal_dir(&app.config.data_dir);
            let app_views = app.views.clone();
            let durable = app.views.applied_seq();
            // The record that holds event `from_seq` may start up to
            // `MAX_EVENTS_PER_COMMAND - 1` before it (a transfer's credit event is the second
            // of its record).
            let start = from_seq
                .saturating_sub(crate::core::command::MAX_EVENTS_PER_COMMAND as u64 - 1)
                .max(1);
            // Where an earlier read ended, at or before `from_seq`: a consumer catching up poll
            // by poll then reads only its new bytes, not its segment from the start each time.
            // A position is a record boundary, so the record holding `from_seq` starts at or
            // after it.
            let resume = app.events_positions.nearest(from_seq);
            let result = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let mut records = Vec::new();
                let mut events = 0;
                // Read with `JournalTail` (positioned reads, durable records only) rather than
                // a mapping the engine's writer stores into.
                let mut tail = crate::journal::tail::JournalTail::new(&dir);
                // The records skipped to reach `from_seq` are indexed on the way: a read deep
                // into a segment that no earlier read passed scans it from the start (tens of
                // megabytes into a 64 MiB segment) once, not for every such read.
                tail.note_passed_every(EVENTS_INDEX_EVERY);
                match resume {
                    Some(position) => tail.resume_at(position, start.max(position.next_seq)),
                    None => tail.start_at(start),
                }
                .map_err(|e| format!("{e:#}"))?;
                let mut positions = Vec::new();
                let mut batch = Vec::new();
                'reading: loop {
                    batch.clear();
                    tail.fetch_records(limit.saturating_sub(events).max(1), &mut batch)
                        .map_err(|e| format!("{e:#}"))?;
                    positions.extend(tail.position());
                    if batch.is_empty() {
                        break;
                    }
                    for record in &batch {
                        if record.next_seq() <= from_seq {
                            continue;
                        }
                        if events >= limit || record.first_seq > durable {
                            break 'reading;
                        }
                        events += record.events().iter().filter(|e| e.seq >= from_seq).count();
                        records.push(*record);
                    }
                }
                // Short of the limit and of the views' sequence: the tail stopped at a frame it
                // cannot read yet. Usually the durable-watermark file a little behind the
                // views; a damaged record is an error, as it would be for any reader.
                if events < limit && tail.next_seq() <= durable {
                    let checked =
                        crate::journal::scan(&dir, tail.next_seq(), |_| Err("stop".into()));
                    if let Err(e @ crate::journal::JournalError::Corrupt { .. }) = checked {
                        return Err(e.to_string());
                    }
                }
                let names = app_views
                    .read(|state| names_of(state, &records))
                    .map_err(|broken| broken.to_string())?;
                let mut lines = String::new();
                for record in &records {
                    event_lines(&names, record, from_seq, &mut lines);
                }
                Ok((lines, positions, tail.take_passed(), tail.bytes_read()))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            match result {
                Ok((lines, positions, passed, bytes_read)) => {
                    app.metrics
                        .events_journal_bytes
                        .fetch_add(bytes_read, std::sync::atomic::Ordering::Relaxed);
                    app.events_positions.remember(&positions);
                    app.events_positions.index(&passed);
                    lines
                }
                // The views broke while the journal was read (the window's read above saw
                // them whole): their 503, not a journal failure.
                Err(_) if app.views.broken() => {
                    return Reply::views_broken(crate::views::ViewsBroken);
                }
                Err(e) => {
                    tracing::error!(error = %e, from_seq, "reading the event stream from the journal failed");
                    return Reply::error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "journal_read_failed",
                        "the journal could not be read at this sequence; see the server log",
                    );
                }
            }
        }
    };
    Reply::text(StatusCode::OK, "application/x-ndjson", lines)
}

/// Events between the positions an event-stream read from the journal keeps of the records it
/// skips (`JournalTail::note_passed_every`): about 0.9 MB of journal for transfers, so a later
/// read in that stretch scans at most that much; some 80 bytes a position in
/// `TailPositions::index`, about 0.5 MB for 100 M events.
const EVENTS_INDEX_EVERY: u64 = 16_384;

/// The longest an event-stream long poll waits: a margin inside the request timeout, so that
/// the poll's own answer wins the race.
fn long_poll_limit(request_timeout: Duration) -> Duration {
    request_timeout.saturating_sub(request_timeout / 10 + Duration::from_millis(100))
}

/// The names of the accounts that `records`' events name, by account index (copied, so that
/// lines can be rendered without the views' lock).
/// What a failed rebuild of the views' past is called in every answer that reports it.
const VIEWS_FAILED: &str = "the read views could not be rebuilt from the journal";

/// An internal failure's reason as answers show it: in full with `--auth none` (loopback
/// only: the caller is on this machine), otherwise only a pointer to the log, which has it.
/// Reasons name files of the data directory, offsets, and an engine panic's transaction and
/// message, which are not for callers that `/readyz` does not even authenticate.
fn detail<'a>(app: &App, reason: &'a str) -> std::borrow::Cow<'a, str> {
    if app.config.auth.is_none() {
        reason.into()
    } else {
        "the reason is in the server's log".into()
    }
}

/// Whether the views' past is in (see `Views::past_complete`), and why not if it failed.
struct PastState {
    complete: bool,
    failed: Option<String>,
}

impl PastState {
    fn of(views: &Views) -> PastState {
        PastState {
            complete: views.past_complete(),
            failed: views.past_failure().map(str::to_string),
        }
    }
}

fn names_of(
    state: &ViewState,
    records: &[crate::core::CommandRecord],
) -> std::collections::HashMap<u32, String> {
    let mut names = std::collections::HashMap::new();
    for record in records {
        for event in record.events() {
            if event.account != u32::MAX {
                names
                    .entry(event.account)
                    .or_insert_with(|| state.name(event.account).to_string());
            }
        }
    }
    names
}

fn event_lines(
    names: &std::collections::HashMap<u32, String>,
    record: &crate::core::CommandRecord,
    from_seq: u64,
    out: &mut String,
) -> usize {
    let mut count = 0;
    for event in record.events().iter().filter(|e| e.seq >= from_seq) {
        let mut line = json!({
            "sequence": event.seq,
            "transaction_id": record.transaction_id.to_uuid_string(),
            "kind": event.kind.name(),
            "timestamp_ns": record.timestamp_ns,
        });
        match event.kind {
            EventKind::Rejected => {
                line["code"] = json!(record.rejection.map(|c| c.code()).unwrap_or(""));
                if event.account != u32::MAX {
                    line["account_id"] = json!(name(names, event.account));
                }
            }
            EventKind::Checkpoint => line["state_hash"] = json!(format!("{:016x}", event.amount)),
            EventKind::AccountOpened => {
                line["account_id"] = json!(record.opened_account.to_string())
            }
            _ => {
                line["account_id"] = json!(name(names, event.account));
                line["currency"] = json!(event.currency.to_string());
                line["amount"] = json!(money_string(event.amount, event.currency));
                line["balance_after"] = json!(money_string(event.balance_after, event.currency));
            }
        }
        out.push_str(&line.to_string());
        out.push('\n');
        count += 1;
    }
    count
}

fn name(names: &std::collections::HashMap<u32, String>, account: u32) -> &str {
    names.get(&account).map_or("", String::as_str)
}

#[cfg(test)]
mod tests {
    use super::{Body, loopback_host, match_path};
    use crate::core::{Currency, RejectCode, TransactionId};
    use serde_json::json;

    fn written(body: &Body) -> serde_json::Value {
        let mut out = Vec::new();
        body.write_json(&mut out);
        serde_json::from_slice(&out).expect("write_json writes valid JSON")
    }

    /// A chunked body of `chunks` one-byte chunks, each a fresh buffer; counts the chunks that
    /// were still held by the reader when it asked for the next one.
    struct TinyChunks {
        chunks: usize,
        previous: Option<bytes::Bytes>,
        held: usize,
    }

    impl hyper::body::Body for TinyChunks {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>>
        {
            if let Some(previous) = self.previous.take()
                && !previous.is_unique()
            {
                self.held += 1;
            }
            if self.chunks == 0 {
                return std::task::Poll::Ready(None);
            }
            self.chunks -= 1;
            let chunk = bytes::Bytes::from(vec![b'0' + (self.chunks % 10) as u8]);
            self.previous = Some(chunk.clone());
            std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
        }
    }

    #[test]
    fn a_body_is_read_into_one_buffer_and_its_frames_dropped_as_they_come() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        // Many tiny chunks: copied out one by one (each frame keeps the connection's read
        // buffer alive; holding them all took tens of times the body's counted size).
        let mut body = TinyChunks {
            chunks: 10_000,
            previous: None,
            held: 0,
        };
        let bytes = runtime
            .block_on(super::collect_body(&mut body, 10_000))
            .expect("a body at the limit is read");
        assert_eq!(bytes.len(), 10_000);
        assert_eq!(&bytes[..3], b"987");
        // Only the first frame is kept past the next one's arrival (it may be the whole body).
        assert_eq!(body.held, 1, "frames were held while the body was read");
        // One byte over the limit: refused.
        let mut body = TinyChunks {
            chunks: 10_001,
            previous: None,
            held: 0,
        };
        let refused = runtime.block_on(super::collect_body(&mut body, 10_000));
        assert_eq!(refused, Err(super::BodyError::TooLarge));
        // A body of one frame is that frame, not a copy.
        let whole = bytes::Bytes::from(vec![7u8; 100]);
        let mut body = http_body_util::Full::new(whole.clone());
        let read = runtime
            .block_on(super::collect_body(&mut body, 100))
            .expect("read");
        assert_eq!(read.as_ptr(), whole.as_ptr());
        let mut empty = http_body_util::Empty::<bytes::Bytes>::new();
        let read = runtime
            .block_on(super::collect_body(&mut empty, 100))
            .expect("read");
        assert!(read.is_empty());
    }

    #[test]
    fn loopback_hosts_are_told_from_other_names() {
        for host in [
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:1",
            "localhost",
            "LOCALHOST:8080",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "10.0.0.1:8080",
            "[::2]:80",
            "[::1",
            "[::1]x",
            "127.0.0.1:80x",
            "::1",
            "",
        ] {
            assert!(!loopback_host(host), "{host}");
        }
    }

    #[test]
    fn response_bodies_are_the_documented_json() {
        let id = TransactionId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        let uuid = "01234567-89ab-cdef-fedc-ba9876543210";
        let usd = Currency::new("USD").expect("ISO code");
        let jpy = Currency::new("JPY").expect("ISO code");
        assert_eq!(
            written(&Body::Transfer {
                transaction_id: id,
                sequence: 41,
                from_account: "alice",
                to_account: "bob.2:x-y_z",
                amount: 1_205,
                currency: usd,
                balances: [5, 100_000_000_000],
                shown: [true, true],
            }),
            json!({"transaction_id": uuid, "status": "committed", "sequence": 41,
                "from_account": "alice", "to_account": "bob.2:x-y_z", "amount": "12.05",
                "currency": "USD", "balances": [
                    {"account_id": "alice", "currency": "USD", "balance": "0.05"},
                    {"account_id": "bob.2:x-y_z", "currency": "USD", "balance": "1000000000.00"}]})
        );
        assert_eq!(
            written(&Body::Money {
                transaction_id: id,
                sequence: u64::MAX,
                account_id: "carol",
                amount: 7,
                currency: jpy,
                balance: 0,
            }),
            json!({"transaction_id": uuid, "status": "committed", "sequence": u64::MAX,
                "account_id": "carol", "amount": "7", "currency": "JPY", "balance": "0"})
        );
        assert_eq!(
            written(&Body::Rejected {
                transaction_id: id,
                sequence: 3,
                code: RejectCode::InsufficientFunds,
            }),
            json!({"transaction_id": uuid, "status": "rejected", "sequence": 3, "error": {
                "code": "insufficient_funds", "message": RejectCode::InsufficientFunds.message()}})
        );
        assert_eq!(
            written(&Body::Opened {
                transaction_id: id,
                sequence: 1,
                account_id: "dave",
            }),
            json!({"transaction_id": uuid, "status": "committed", "sequence": 1, "account_id": "dave"})
        );
        assert_eq!(
            written(&Body::Bare {
                transaction_id: id,
                sequence: 9,
            }),
            json!({"transaction_id": uuid, "status": "committed", "sequence": 9})
        );
        // A string that needs escaping still comes out as valid JSON.
        let mut out = Vec::new();
        super::string(&mut out, "a\"b\\c\u{1}é");
        assert_eq!(
            serde_json::from_slice::<String>(&out).expect("valid JSON string"),
            "a\"b\\c\u{1}é"
        );
    }

    #[test]
    fn paths_match_templates() {
        let cases: &[(&str, &str, Option<Vec<&str>>)] = &[
            (
                "/v1/wallet/accounts/{account_id}",
                "/v1/wallet/accounts/alice",
                Some(vec!["alice"]),
            ),
            (
                "/v1/wallet/accounts/{account_id}",
                "/v1/wallet/accounts/",
                None,
            ),
            (
                "/v1/wallet/accounts/{account_id}",
                "/v1/wallet/accounts/a/history",
                None,
            ),
            (
                "/v1/wallet/accounts/{account_id}/history",
                "/v1/wallet/accounts/a/history",
                Some(vec!["a"]),
            ),
            ("/healthz", "/healthz", Some(vec![])),
            ("/healthz", "/healthz/", None),
        ];
        for (template, path, expected) in cases {
            assert_eq!(
                &match_path(template, path),
                expected,
                "{template} vs {path}"
            );
        }
    }
}
