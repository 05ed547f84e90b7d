//! `lab-backend`: one process that serves a named version (stable, canary)
//! over HTTP, a TCP banner, TCP echo and UDP, so a test can tell from any
//! answer which backend the load balancer picked. An admin port exposes
//! Prometheus metrics and live fault injection for canary-analysis tests.

use anyhow::{bail, Context, Result};
use canary_lab::backend::{Faults, CONVERTED_HEADER, READY_LINE, VERSION_HEADER};
use clap::Parser;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::future::Future;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// Pause after a failed accept/recv (e.g. out of file descriptors) so the
/// loop does not spin.
const ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// Largest accepted `POST /faults` body.
const MAX_ADMIN_BODY: usize = 64 * 1024;

#[derive(Parser, Debug)]
#[command(about = "Serves one named version for the canary lab")]
struct Args {
    /// Version name announced in every answer (e.g. stable, canary).
    #[arg(long)]
    name: String,
    /// HTTP/1.1 service address; repeat for more (e.g. IPv4 and IPv6).
    #[arg(long)]
    http: Vec<SocketAddr>,
    /// h2c (HTTP/2 prior knowledge) address, gRPC-aware (see `backend::H2C_PORT`).
    #[arg(long)]
    h2c: Vec<SocketAddr>,
    /// HTTP/1.1 address that answers an upgrade with 101 and then echoes every byte.
    #[arg(long)]
    upgrade: Vec<SocketAddr>,
    /// TCP address that writes "NAME\n" and closes.
    #[arg(long)]
    banner: Vec<SocketAddr>,
    /// TCP address that greets with "NAME\n", then echoes every line.
    #[arg(long)]
    echo: Vec<SocketAddr>,
    /// UDP address that answers every datagram with NAME.
    #[arg(long)]
    udp: Vec<SocketAddr>,
    /// Admin HTTP address: GET /metrics, GET and POST /faults.
    #[arg(long)]
    admin: Vec<SocketAddr>,
    /// Initial share of successful /checkout requests that convert.
    #[arg(long, default_value_t = 0.0)]
    conversion_rate: f64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    version: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

struct State {
    name: String,
    /// The name, pre-validated as a header value.
    name_header: HeaderValue,
    faults: Mutex<Faults>,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    checkout_attempts: Family<VersionLabels, Counter>,
    conversions: Family<VersionLabels, Counter>,
    /// HTTP connections open now (accepted and not yet closed).
    connections_open: Family<VersionLabels, Gauge>,
    /// Wall-clock time of the latest HTTP request, seconds since the Unix epoch.
    last_request: Family<VersionLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

impl State {
    fn new(name: String, faults: Faults) -> Result<State> {
        let name_header =
            HeaderValue::from_str(&name).context("--name must be a valid header value")?;
        let requests = Family::<RequestLabels, Counter>::default();
        let checkout_attempts = Family::<VersionLabels, Counter>::default();
        let conversions = Family::<VersionLabels, Counter>::default();
        let connections_open = Family::<VersionLabels, Gauge>::default();
        let last_request =
            Family::<VersionLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        // Zero series exist from the start, so rates are defined before the
        // first checkout.
        let version = VersionLabels {
            version: name.clone(),
        };
        let _ = checkout_attempts.get_or_create(&version);
        let _ = conversions.get_or_create(&version);
        let _ = connections_open.get_or_create(&version);
        let _ = last_request.get_or_create(&version);
        let mut registry = Registry::default();
        registry.register(
            "lab_requests",
            "HTTP requests answered, by version and status code",
            requests.clone(),
        );
        registry.register(
            "lab_checkout_attempts",
            "Requests to /checkout",
            checkout_attempts.clone(),
        );
        registry.register(
            "lab_conversions",
            "Successful /checkout requests that converted",
            conversions.clone(),
        );
        registry.register(
            "lab_http_connections_open",
            "HTTP connections open now",
            connections_open.clone(),
        );
        registry.register(
            "lab_last_request_timestamp_seconds",
            "Wall-clock time of the latest HTTP request (0 before the first)",
            last_request.clone(),
        );
        Ok(State {
            name,
            name_header,
            faults: Mutex::new(faults),
            registry,
            requests,
            checkout_attempts,
            conversions,
            connections_open,
            last_request,
        })
    }

    fn faults(&self) -> Faults {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn version(&self) -> VersionLabels {
        VersionLabels {
            version: self.name.clone(),
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // The lab sends stderr to a log file, where colour codes are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    if args.http.is_empty()
        && args.h2c.is_empty()
        && args.upgrade.is_empty()
        && args.banner.is_empty()
        && args.echo.is_empty()
        && args.udp.is_empty()
        && args.admin.is_empty()
    {
        bail!("nothing to serve: give at least one of --http, --banner, --echo, --udp, --admin");
    }
    let faults = Faults {
        conversion_rate: args.conversion_rate,
        ..Faults::default()
    };
    faults.validate()?;
    let state = Arc::new(State::new(args.name.clone(), faults)?);
    let name: Arc<str> = Arc::from(args.name.as_str());

    // Everything is bound before READY_LINE, so a reader of it can connect
    // to any port at once.
    for addr in &args.http {
        tokio::spawn(serve_http(bind(*addr).await?, state.clone()));
    }
    for addr in &args.admin {
        tokio::spawn(serve_admin(bind(*addr).await?, state.clone()));
    }
    for addr in &args.h2c {
        tokio::spawn(serve_h2c(bind(*addr).await?, state.clone()));
    }
    for addr in &args.upgrade {
        tokio::spawn(serve_upgrade(bind(*addr).await?, state.clone()));
    }
    for addr in &args.banner {
        tokio::spawn(serve_banner(bind(*addr).await?, name.clone()));
    }
    for addr in &args.echo {
        tokio::spawn(serve_echo(bind(*addr).await?, name.clone()));
    }
    for addr in &args.udp {
        let socket = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding udp {addr}"))?;
        tokio::spawn(serve_udp(socket, name.clone()));
    }
    println!("{READY_LINE}");
    info!(?args, "serving");
    tokio::signal::ctrl_c().await?;
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding tcp {addr}"))
}

/// Accepts every connection on `listener` and runs `handle` on it in its
/// own task; lives as long as the process.
async fn accept_loop<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream));
            }
            Err(e) => {
                warn!(%e, "accept failed");
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
        }
    }
}

async fn serve_banner(listener: TcpListener, name: Arc<str>) {
    let banner = Bytes::from(format!("{name}\n"));
    accept_loop(listener, |mut stream| {
        let banner = banner.clone();
        async move {
            // Shutting down first makes this side hold TIME_WAIT, so clients
            // can reuse source ports at once.
            let sent = async {
                stream.write_all(&banner).await?;
                stream.shutdown().await
            };
            if let Err(e) = sent.await {
                debug!(%e, "banner");
            }
        }
    })
    .await
}

async fn serve_echo(listener: TcpListener, name: Arc<str>) {
    accept_loop(listener, |stream| {
        let name = name.clone();
        async move {
            let (reader, mut writer) = stream.into_split();
            let echoed = async {
                writer.write_all(format!("{name}\n").as_bytes()).await?;
                let mut lines = BufReader::new(reader).lines();
                while let Some(line) = lines.next_line().await? {
                    writer.write_all(format!("{line}\n").as_bytes()).await?;
                }
                std::io::Result::Ok(())
            };
            if let Err(e) = echoed.await {
                debug!(%e, "echo");
            }
        }
    })
    .await
}

async fn serve_udp(socket: UdpSocket, name: Arc<str>) {
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((_, peer)) => {
                if let Err(e) = socket.send_to(name.as_bytes(), peer).await {
                    debug!(%e, %peer, "udp reply");
                }
            }
            Err(e) => {
                warn!(%e, "udp recv failed");
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
        }
    }
}

async fn serve_http(listener: TcpListener, state: Arc<State>) {
    accept_loop(listener, |mut stream| {
        let state = state.clone();
        async move {
            let open = state
                .connections_open
                .get_or_create(&state.version())
                .clone();
            open.inc();
            // Counted down however the connection ends (the task is never aborted).
            let _closed = DecOnDrop(open);
            let reset = Arc::new(Notify::new());
            let reset_now = {
                let reset_svc = reset.clone();
                let svc = service_fn(move |req| handle_http(state.clone(), reset_svc.clone(), req));
                let conn = http1::Builder::new().serve_connection(TokioIo::new(&mut stream), svc);
                tokio::select! {
                    served = conn => {
                        if let Err(e) = served {
                            debug!(%e, "http connection");
                        }
                        false
                    }
                    _ = reset.notified() => true,
                }
            };
            // With a zero linger, dropping the socket sends RST instead of FIN.
            if reset_now {
                if let Err(e) = stream.set_zero_linger() {
                    warn!(%e, "SO_LINGER 0");
                }
            }
        }
    })
    .await
}

async fn serve_h2c(listener: TcpListener, state: Arc<State>) {
    accept_loop(listener, |stream| {
        let state = state.clone();
        async move {
            let svc = service_fn(move |req| handle_h2c(state.clone(), req));
            let served =
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            if let Err(e) = served {
                debug!(%e, "h2c connection");
            }
        }
    })
    .await
}

/// An h2c answer: plain requests as `handle_http` (faults give 503); a gRPC call gets
/// a one-message body and `grpc-status` in its trailers (14 at the `error_rate`).
async fn handle_h2c(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>, Infallible> {
    let faults = state.faults();
    delay(&faults).await;
    let grpc = req
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // The request body is read whole (small test calls) before the answer.
    let _ = req.into_body().collect().await;
    let failed = chance(faults.error_rate);
    let status = if failed && !grpc {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    state
        .requests
        .get_or_create(&RequestLabels {
            version: state.name.clone(),
            code: status.as_u16(),
        })
        .inc();
    let mut resp = if grpc {
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert(
            "grpc-status",
            HeaderValue::from_static(if failed { "14" } else { "0" }),
        );
        // One length-prefixed message carrying the version name.
        let mut msg = vec![0u8];
        msg.extend_from_slice(&(state.name.len() as u32).to_be_bytes());
        msg.extend_from_slice(state.name.as_bytes());
        let frames = frames_body(vec![
            hyper::body::Frame::data(Bytes::from(msg)),
            hyper::body::Frame::trailers(trailers),
        ]);
        let mut resp = Response::new(frames);
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        resp
    } else {
        Response::new(Full::new(Bytes::from(state.name.clone())).boxed())
    };
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(VERSION_HEADER, state.name_header.clone());
    Ok(resp)
}

/// A body of the given frames, in order.
fn frames_body(
    frames: Vec<hyper::body::Frame<Bytes>>,
) -> http_body_util::combinators::BoxBody<Bytes, Infallible> {
    struct Frames(std::collections::VecDeque<hyper::body::Frame<Bytes>>);
    impl hyper::body::Body for Frames {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
            std::task::Poll::Ready(self.0.pop_front().map(Ok))
        }
    }
    Frames(frames.into()).boxed()
}

async fn serve_upgrade(listener: TcpListener, state: Arc<State>) {
    accept_loop(listener, |stream| {
        let state = state.clone();
        async move {
            let svc = service_fn(move |req| handle_upgrade(state.clone(), req));
            let served = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
            if let Err(e) = served {
                debug!(%e, "upgrade connection");
            }
        }
    })
    .await
}

/// `101` to a request with `Upgrade`, then an echo of every byte; else 400.
async fn handle_upgrade(
    state: Arc<State>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let Some(protocol) = req.headers().get(hyper::header::UPGRADE).cloned() else {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"upgrade only\n")));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(resp);
    };
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on.await {
            Ok(upgraded) => {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                if let Err(e) = tokio::io::copy(&mut r, &mut w).await {
                    debug!(%e, "upgraded echo");
                }
                let _ = w.shutdown().await;
            }
            Err(e) => debug!(%e, "upgrade"),
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(hyper::header::UPGRADE, protocol);
    h.insert(
        hyper::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    h.insert(VERSION_HEADER, state.name_header.clone());
    Ok(resp)
}

/// Decrements a gauge when dropped.
struct DecOnDrop(Gauge);

impl Drop for DecOnDrop {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn handle_http(
    state: Arc<State>,
    reset: Arc<Notify>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    state.last_request.get_or_create(&state.version()).set(now);
    let faults = state.faults();
    delay(&faults).await;
    if chance(faults.reset_rate) {
        // The connection task drops this request's future and resets.
        reset.notify_one();
        return std::future::pending().await;
    }
    let checkout = req.uri().path() == "/checkout";
    if checkout {
        state
            .checkout_attempts
            .get_or_create(&state.version())
            .inc();
    }
    let failed = chance(faults.error_rate);
    let converted = checkout && !failed && chance(faults.conversion_rate);
    if converted {
        state.conversions.get_or_create(&state.version()).inc();
    }
    let status = if failed {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    state
        .requests
        .get_or_create(&RequestLabels {
            version: state.name.clone(),
            code: status.as_u16(),
        })
        .inc();
    let body = if failed {
        format!("{}: injected error\n", state.name)
    } else {
        state.name.clone()
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(VERSION_HEADER, state.name_header.clone());
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if checkout {
        headers.insert(
            CONVERTED_HEADER,
            HeaderValue::from_static(if converted { "true" } else { "false" }),
        );
    }
    Ok(resp)
}

async fn serve_admin(listener: TcpListener, state: Arc<State>) {
    accept_loop(listener, |stream| {
        let state = state.clone();
        async move {
            let svc = service_fn(move |req| handle_admin(state.clone(), req));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(%e, "admin connection");
            }
        }
    })
    .await
}

async fn handle_admin(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const JSON: &str = "application/json";
    const TEXT: &str = "text/plain";
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
                Ok(()) => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, TEXT, e.to_string()),
            }
        }
        (&Method::GET, "/faults") => (StatusCode::OK, JSON, faults_json(&state.faults())),
        (&Method::POST, "/faults") => match update_faults(&state, req.into_body()).await {
            Ok(faults) => (StatusCode::OK, JSON, faults_json(&faults)),
            Err(e) => (StatusCode::BAD_REQUEST, TEXT, format!("{e:#}\n")),
        },
        _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(resp)
}

fn faults_json(faults: &Faults) -> String {
    serde_json::to_string(faults).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Applies a JSON object of fault fields; fields left out keep their value,
/// so `{"error_rate":0.5}` alone is a valid change.
async fn update_faults(state: &State, body: Incoming) -> Result<Faults> {
    let bytes = Limited::new(body, MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading body: {e}"))?
        .to_bytes();
    let patch: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes).context("body must be a JSON object")?;
    let mut current = state.faults.lock().unwrap_or_else(|e| e.into_inner());
    let mut merged = serde_json::to_value(&*current)?;
    if let Some(fields) = merged.as_object_mut() {
        fields.extend(patch);
    }
    let faults: Faults = serde_json::from_value(merged).context("invalid faults")?;
    faults.validate()?;
    *current = faults.clone();
    info!(?faults, "faults changed");
    Ok(faults)
}

/// True with probability `p`. Each `RandomState` gets fresh keys, so hashing
/// nothing with it yields a new pseudo-random value without a rand crate.
/// The response delay the faults ask for: the fixed part plus an exponential tail.
async fn delay(faults: &Faults) {
    let mean = faults.latency_jitter_ms as f64;
    let tail = (-(1.0 - uniform()).ln() * mean).min(20.0 * mean);
    let delay =
        Duration::from_millis(faults.extra_latency_ms) + Duration::from_secs_f64(tail / 1e3);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// A uniform draw from [0, 1).
fn uniform() -> f64 {
    let bits = RandomState::new().build_hasher().finish() >> 11;
    bits as f64 / (1u64 << 53) as f64
}

fn chance(p: f64) -> bool {
    if p <= 0.0 {
        return false;
    }
    uniform() < p
}
