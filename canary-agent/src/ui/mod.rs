//! The dashboard the agent serves on `[agent] ui_listen` (off by default), and the
//! `canary report` renderer.
//!
//! * Read-only for everyone who can reach it: the page (`/`), its script and style,
//!   a server-sent event stream (`/api/events`, a snapshot every 500 ms while anyone
//!   watches: per service the summary, verdicts, SVG charts drawn here, backends and
//!   history), `/api/status`, `/api/history/SERVICE` and `/healthz`. Nothing is
//!   loaded from elsewhere (a strict Content-Security-Policy says so).
//! * Controls (`POST /api/control`: pause, resume, rollback, approve, promote, set
//!   weight, each with a reason) exist only when `ui_token_file` is configured; the
//!   page then offers them. Each request needs `Authorization: Bearer TOKEN` (the
//!   file's token, re-read on every request so a rotation applies at once). Browsers
//!   never attach that header on their own, so another site cannot forge a control
//!   (CSRF); on top of that a control must be `application/json` (a cross-site form
//!   cannot send that without a CORS preflight, which is never granted) and an
//!   `Origin`, when sent, must be this dashboard's own. Controls go through
//!   [`Agent::handle`] like the control socket's, as `operator:ui` in the history.

pub mod render;
pub mod report;
pub mod svg;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, Result};
use axum::{
    extract::{DefaultBodyLimit, Path, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{
        sse::{Event as SseEvent, KeepAlive, Sse},
        IntoResponse, Response,
    },
    routing::{get, post},
    Json, Router,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};

use crate::agent::{lock, Agent};
use crate::api::{Request, RolloutAction, Status, UI_ACTOR};
use crate::httpd::Cached;

/// How often a snapshot is pushed to the watching pages.
pub const PUSH_EVERY: Duration = Duration::from_millis(500);
/// Pages watching at once; more are refused with 503.
pub const MAX_WATCHERS: usize = 64;
/// Largest control request body.
const MAX_BODY: usize = 16 * 1024;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[derive(Clone)]
struct Ui {
    agent: Arc<Mutex<Agent>>,
    snapshots: watch::Receiver<Arc<String>>,
    watchers: Arc<Semaphore>,
    reads: Arc<Reads>,
}

/// How old what an unauthenticated read gets may be: all readers share one read of
/// the agent per interval.
pub const READ_CACHE: Duration = Duration::from_millis(500);

/// A read's answer, or why it failed.
type Answer = Cached<Result<serde_json::Value, String>>;

/// The read-only answers, cached (see [`crate::httpd::Cached`]).
struct Reads {
    info: Answer,
    status: Cached<Result<Status, String>>,
    token_file: Cached<Result<Option<std::path::PathBuf>, String>>,
    /// One per service of the last status (never per name a client makes up).
    history: Mutex<std::collections::HashMap<String, Arc<Answer>>>,
}

impl Default for Reads {
    fn default() -> Self {
        Self {
            info: Cached::new(READ_CACHE),
            status: Cached::new(READ_CACHE),
            token_file: Cached::new(READ_CACHE),
            history: Mutex::new(Default::default()),
        }
    }
}

/// One service as the page shows it.
#[derive(Serialize)]
struct ServiceSnapshot {
    name: String,
    weight_bp: u16,
    state: Option<String>,
    html: String,
}

#[derive(Serialize)]
struct Snapshot {
    now_ms: u64,
    services: Vec<ServiceSnapshot>,
}

/// Reads what the page shows under the agent lock (status and in-memory series), then
/// renders outside it.
fn snapshot(agent: &Mutex<Agent>) -> Result<String> {
    let (status, samples, now_ms, state_dir) = {
        let a = lock(agent)?;
        let status: Status = a.status(None)?;
        let samples: Vec<_> = status
            .services
            .iter()
            .map(|s| a.recent_samples(&s.name))
            .collect();
        (status, samples, a.now_ms(), a.state_dir().to_path_buf())
    };
    let mut services = Vec::new();
    for (s, samples) in status.services.iter().zip(samples) {
        let events = crate::agent::state::events_log(&state_dir, &s.name)
            .read()
            .unwrap_or_default();
        services.push(ServiceSnapshot {
            name: s.name.clone(),
            weight_bp: s.weight_bp,
            state: s.rollout.as_ref().map(|r| r.state.to_string()),
            html: render::live_panel(s, &samples, &events, now_ms),
        });
    }
    Ok(serde_json::to_string(&Snapshot { now_ms, services })?)
}

/// Binds the dashboard's address (so that a bad `ui_listen` stops the agent's start).
pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow!("dashboard: binding ui_listen {listen}: {e}"))
}

/// Serves the dashboard on `listener` until the runtime stops, within the limits of
/// [`crate::httpd`]; `hosts` are the names it answers to besides IP addresses.
pub async fn serve(
    listener: tokio::net::TcpListener,
    agent: Arc<Mutex<Agent>>,
    hosts: Vec<String>,
) -> Result<()> {
    let listen: SocketAddr = listener.local_addr()?;
    let (tx, rx) = watch::channel(Arc::new(String::from("{\"now_ms\":0,\"services\":[]}")));
    let watchers = Arc::new(Semaphore::new(MAX_WATCHERS));
    let watching = watchers.clone();
    let source = agent.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(PUSH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if tx.is_closed() {
                return;
            }
            // Only while someone watches.
            if watching.available_permits() == MAX_WATCHERS {
                continue;
            }
            let agent = source.clone();
            match tokio::task::spawn_blocking(move || snapshot(&agent)).await {
                Ok(Ok(text)) => {
                    let _ = tx.send(Arc::new(text));
                }
                Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "dashboard snapshot"),
                Err(e) => tracing::warn!(error = %e, "dashboard snapshot task"),
            }
        }
    });
    let ui = Ui {
        agent,
        snapshots: rx,
        watchers,
        reads: Arc::new(Reads::default()),
    };
    let hosts = Arc::new(hosts);
    let app = Router::new()
        .route("/", get(index))
        .route(
            "/app.js",
            get(|| async { asset(SCRIPT, "text/javascript") }),
        )
        .route("/app.css", get(|| async { asset(STYLE, "text/css") }))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/info", get(info))
        .route("/api/status", get(status))
        .route("/api/history/{service}", get(history))
        .route("/api/events", get(events))
        .route("/api/control", post(control))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(hosts, check_host))
        .with_state(ui);
    tracing::info!(%listen, "dashboard listening");
    let service = hyper_util::service::TowerToHyperService::new(app);
    crate::httpd::serve(
        listener,
        service,
        "dashboard",
        crate::httpd::MAX_CONNECTIONS,
    )
    .await;
    Ok(())
}

/// Refuses a request whose `Host` is a name not in `ui_hosts`: a page of another
/// site whose name was made to point here (DNS rebinding) would otherwise read
/// status and history as if it were this dashboard's own.
async fn check_host(
    State(hosts): State<Arc<Vec<String>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    match host {
        Some(h) if host_allowed(h, &hosts) => next.run(request).await,
        Some(h) => error(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "refused: this dashboard does not answer to host {:?} (add it to [agent] ui_hosts)",
                h.chars().take(100).collect::<String>()
            ),
        ),
        None => error(StatusCode::BAD_REQUEST, "refused: no Host header"),
    }
}

/// Whether `host` (a `Host` header: name or address, maybe with a port) is an IP
/// address, `localhost` or one of `allowed` (lower-case names).
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split_once(']').is_some_and(|(ip, port)| {
            ip.parse::<std::net::Ipv6Addr>().is_ok()
                && (port.is_empty()
                    || port
                        .strip_prefix(':')
                        .is_some_and(|p| p.parse::<u16>().is_ok()))
        });
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() => name,
            Some(_) => return false,
            None => host,
        }
    };
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || allowed.contains(&name)
}

fn secure(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    secure(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    secure(
        (
            code,
            Json(serde_json::json!({ "ok": false, "error": message.into() })),
        )
            .into_response(),
    )
}

/// Runs `f` on the agent off the async workers, for a [`Cached`] read.
fn read_agent<T>(
    agent: &Mutex<Agent>,
    f: impl FnOnce(&mut Agent) -> Result<T>,
) -> Result<T, String> {
    lock(agent)
        .and_then(|mut a| f(&mut a))
        .map_err(|e| format!("{e:#}"))
}

async fn info(State(ui): State<Ui>) -> Response {
    let agent = ui.agent.clone();
    let got = ui
        .reads
        .info
        .get(move || {
            read_agent(&agent, |a| {
                Ok(serde_json::json!({
                    "controls": a.ui_token_file().is_some(),
                    "push_ms": PUSH_EVERY.as_millis() as u64,
                }))
            })
        })
        .await;
    match &*got {
        Ok(v) => secure(Json(v.clone()).into_response()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.clone()),
    }
}

async fn cached_status(ui: &Ui) -> Arc<Result<Status, String>> {
    let agent = ui.agent.clone();
    ui.reads
        .status
        .get(move || read_agent(&agent, |a| a.status(None)))
        .await
}

async fn status(State(ui): State<Ui>) -> Response {
    match &*cached_status(&ui).await {
        Ok(s) => secure(Json(s.clone()).into_response()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.clone()),
    }
}

async fn history(State(ui): State<Ui>, Path(service): Path<String>) -> Response {
    let known = match &*cached_status(&ui).await {
        Ok(s) => s.services.iter().any(|s| s.name == service),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.clone()),
    };
    if !known {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no service named {:?}",
                service.chars().take(100).collect::<String>()
            ),
        );
    }
    let cached = {
        let Ok(mut map) = ui.reads.history.lock() else {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "dashboard state poisoned",
            );
        };
        // Services removed by a reload make room.
        if map.len() > 4 * MAX_WATCHERS {
            map.clear();
        }
        map.entry(service.clone())
            .or_insert_with(|| Arc::new(Cached::new(READ_CACHE)))
            .clone()
    };
    let agent = ui.agent.clone();
    let got = cached
        .get(move || read_agent(&agent, |a| a.handle(Request::History { service })))
        .await;
    match &*got {
        Ok(v) => secure(Json(v.clone()).into_response()),
        Err(e) => error(StatusCode::NOT_FOUND, e.clone()),
    }
}

async fn events(State(ui): State<Ui>) -> Response {
    let Ok(slot) = ui.watchers.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_WATCHERS} pages are watching already"),
        );
    };
    let rx = ui.snapshots.clone();
    // The first item is the latest snapshot, then one per change.
    let stream =
        futures_util::stream::unfold((rx, true, slot), |(mut rx, first, slot)| async move {
            if !first && rx.changed().await.is_err() {
                return None;
            }
            let data = rx.borrow_and_update().clone();
            let event = SseEvent::default().event("snapshot").data(data.as_str());
            Some((Ok::<_, std::convert::Infallible>(event), (rx, false, slot)))
        });
    secure(
        Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
            .into_response(),
    )
}

/// A control from the page.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    pub service: String,
    /// pause | resume | rollback | approve | promote | promote-full | set-weight
    pub action: String,
    pub reason: String,
    /// Percent, for set-weight.
    #[serde(default)]
    pub weight: Option<f64>,
}

impl Control {
    /// The control-socket request this control is.
    pub fn request(self) -> Result<Request, String> {
        let reason = self.reason.trim().to_string();
        if reason.is_empty() {
            return Err("a reason is required: it goes into the history".into());
        }
        if reason.len() > 500 {
            return Err("the reason is longer than 500 characters".into());
        }
        let by = UI_ACTOR.to_string();
        let service = self.service;
        let action = match self.action.as_str() {
            "pause" => RolloutAction::Pause { reason },
            "resume" => RolloutAction::Resume { reason },
            "rollback" => RolloutAction::Rollback { reason },
            "approve" => RolloutAction::Approve { reason },
            "promote" => RolloutAction::Promote {
                full: false,
                reason,
            },
            "promote-full" => RolloutAction::Promote { full: true, reason },
            "set-weight" => {
                let weight = self
                    .weight
                    .ok_or("set-weight needs a weight in percent (0 to 100)")?;
                let weight_bp = crate::units::percent_to_bp(weight)?;
                return Ok(Request::SetWeight {
                    service,
                    weight_bp,
                    by,
                    reason,
                });
            }
            other => {
                return Err(format!(
                    "unknown action {other:?}: pause, resume, rollback, approve, promote, \
                     promote-full or set-weight"
                ))
            }
        };
        Ok(Request::Rollout {
            service,
            action,
            by,
        })
    }
}

/// Compares the SHA-256 digests of both in constant time: neither the token's bytes
/// nor its length can be learnt from how long a wrong guess takes.
fn same(a: &[u8], b: &[u8]) -> bool {
    let digest = |x: &[u8]| ring::digest::digest(&ring::digest::SHA256, x);
    let (a, b) = (digest(a), digest(b));
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Why a control request may not be carried out, or None when it may.
fn refuse(headers: &HeaderMap, token: &str) -> Option<(StatusCode, String)> {
    let text = |name: header::HeaderName| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("(not text)").to_string())
    };
    let Some(auth) = text(header::AUTHORIZATION) else {
        return Some((
            StatusCode::UNAUTHORIZED,
            "refused: controls need the dashboard token (Authorization: Bearer …, from the \
             agent's ui_token_file); without it the dashboard is read-only"
                .into(),
        ));
    };
    let given = auth.strip_prefix("Bearer ").unwrap_or("").trim();
    if !same(given.as_bytes(), token.as_bytes()) {
        return Some((
            StatusCode::UNAUTHORIZED,
            "refused: wrong token (it is the contents of the agent's ui_token_file)".into(),
        ));
    }
    let json = text(header::CONTENT_TYPE)
        .is_some_and(|c| c.split(';').next().unwrap_or("").trim() == "application/json");
    if !json {
        return Some((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "refused: a control is a JSON body (Content-Type: application/json)".into(),
        ));
    }
    if let (Some(origin), Some(host)) = (text(header::ORIGIN), text(header::HOST)) {
        if origin != format!("http://{host}") {
            return Some((
                StatusCode::FORBIDDEN,
                format!("refused: request from another site ({origin})"),
            ));
        }
    }
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site")) {
        if site != "same-origin" && site != "none" {
            return Some((
                StatusCode::FORBIDDEN,
                format!("refused: cross-site request ({site})"),
            ));
        }
    }
    None
}

async fn control(State(ui): State<Ui>, headers: HeaderMap, body: String) -> Response {
    let agent = ui.agent.clone();
    let token_file = ui
        .reads
        .token_file
        .get(move || read_agent(&agent, |a| Ok(a.ui_token_file())))
        .await;
    let token_file = match &*token_file {
        Ok(Some(path)) => path.clone(),
        Ok(None) => {
            return error(
                StatusCode::FORBIDDEN,
                "refused: controls are disabled (no ui_token_file in the agent's config); \
                 the dashboard is read-only",
            )
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.clone()),
    };
    let token = match crate::config::load_ui_token(&token_file) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "dashboard token unusable: controls refused");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("refused: the dashboard token is unusable: {e}"),
            );
        }
    };
    if let Some((code, why)) = refuse(&headers, &token) {
        tracing::info!(%why, "dashboard control refused");
        return error(code, why);
    }
    let control: Control = match serde_json::from_str(&body) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad control: {e}")),
    };
    let request = match control.request() {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    tracing::info!(?request, "dashboard control");
    let host: crate::fleet::SharedHost = ui.agent.clone();
    match crate::fleet::dispatch(&host, request).await {
        Ok(v) => secure(Json(serde_json::json!({ "ok": true, "status": v })).into_response()),
        Err(e) => error(StatusCode::CONFLICT, format!("{e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    const TOKEN: &str = "0123456789abcdef";

    #[test]
    fn controls_need_the_token_and_a_same_origin_json_request() {
        let ok = [
            ("authorization", "Bearer 0123456789abcdef"),
            ("content-type", "application/json"),
            ("origin", "http://198.18.1.1:9480"),
            ("host", "198.18.1.1:9480"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert_eq!(refuse(&headers(&ok), TOKEN), None);
        let without = |name: &str| {
            let h: Vec<_> = ok.iter().copied().filter(|(k, _)| *k != name).collect();
            refuse(&headers(&h), TOKEN)
        };
        let (code, why) = without("authorization").unwrap();
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        assert!(why.contains("need the dashboard token"), "{why}");
        assert_eq!(
            without("content-type").unwrap().0,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        // Origin and Sec-Fetch-Site are checked when a browser sends them.
        assert_eq!(without("origin"), None);
        let mut wrong = ok;
        wrong[0].1 = "Bearer 0123456789abcdeX";
        assert!(refuse(&headers(&wrong), TOKEN)
            .unwrap()
            .1
            .contains("wrong token"));
        let mut foreign = ok;
        foreign[2].1 = "http://evil.example";
        assert_eq!(
            refuse(&headers(&foreign), TOKEN).unwrap().0,
            StatusCode::FORBIDDEN
        );
        let mut cross = ok;
        cross[4].1 = "cross-site";
        assert_eq!(
            refuse(&headers(&cross), TOKEN).unwrap().0,
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn only_addresses_localhost_and_listed_names_are_answered() {
        let allowed = vec!["canary.example".to_string()];
        for ok in [
            "198.18.1.1:9480",
            "198.18.1.1",
            "[2001:db8::1]:9480",
            "[2001:db8::1]",
            "localhost:9480",
            "canary.example:9480",
            "CANARY.example.",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for refused in [
            "evil.example:9480",
            "canary.example.evil.example",
            "198.18.1.1:x",
            "[2001:db8::1",
            "[nonsense]:80",
            "",
        ] {
            assert!(!host_allowed(refused, &allowed), "{refused}");
        }
    }

    #[test]
    fn token_comparison_is_by_digest() {
        assert!(same(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcdeX"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcdef0"));
        assert!(!same(b"", b"0123456789abcdef"));
    }

    #[test]
    fn controls_become_control_socket_requests_by_ui() {
        let c = |action: &str, reason: &str, weight: Option<f64>| Control {
            service: "web".into(),
            action: action.into(),
            reason: reason.into(),
            weight,
        };
        assert_eq!(
            c("rollback", " bad canary ", None).request(),
            Ok(Request::Rollout {
                service: "web".into(),
                action: RolloutAction::Rollback {
                    reason: "bad canary".into()
                },
                by: "ui".into()
            })
        );
        assert_eq!(
            c("set-weight", "more", Some(12.5)).request(),
            Ok(Request::SetWeight {
                service: "web".into(),
                weight_bp: 1250,
                by: "ui".into(),
                reason: "more".into()
            })
        );
        assert!(c("rollback", "  ", None)
            .request()
            .unwrap_err()
            .contains("reason is required"));
        assert!(c("set-weight", "x", None)
            .request()
            .unwrap_err()
            .contains("needs a weight"));
        assert!(c("set-weight", "x", Some(101.0)).request().is_err());
        assert!(c("explode", "x", None)
            .request()
            .unwrap_err()
            .contains("unknown action"));
    }
}
