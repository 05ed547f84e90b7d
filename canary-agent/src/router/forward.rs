//! One request through the proxy: decided by the plan (`decide`), sent to a backend of
//! that version over a pooled keep-alive connection (HTTP/1.1 or h2c), its response
//! streamed back and counted per version as the analysis reads it: the request, the
//! response's class (for gRPC the `grpc-status` of its trailers), the latency to the
//! response head. Bodies stream both ways; hop-by-hop headers stop here (RFC 9110
//! §7.6.1). An `Upgrade` request gets a connection of its own to the backend, and after
//! a `101` both sockets go to the kernel's splice.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::Result;
use canary_common::{
    client_hash, histogram::latency_bucket, Group, MAX_GROUP_BACKENDS, STICKY_CLIENT_IP,
};
use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version as HttpVersion};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::counts::Counts;
use super::decide::{decide, Head, Rule, Split};
use super::pool::CONNECT_TIMEOUT;
use super::splice::Spliced;
use super::state::{Service, Shared};
use crate::datapath::decode_backend;
use crate::policy::routing::Version;

/// A backend that accepted but sends no response head within this time: 502 too.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// gRPC's UNAVAILABLE: what a gRPC client gets when no backend answered.
const GRPC_UNAVAILABLE: &str = "14";

/// What the requests of one client connection share.
pub(super) struct ConnCtx {
    shared: Arc<Shared>,
    svc: Arc<Service>,
    peer: SocketAddr,
    /// Requests whose response has not been sent in full.
    pub busy: AtomicU32,
    /// A backend socket that answered an upgrade with 101, and the version it is of.
    upgrade: Mutex<Option<Upgraded>>,
}

pub(super) struct Upgraded {
    backend: TcpStream,
    leftover: Bytes,
    group: u8,
}

impl ConnCtx {
    pub fn new(shared: Arc<Shared>, svc: Arc<Service>, peer: SocketAddr) -> Self {
        Self {
            shared,
            svc,
            peer,
            busy: AtomicU32::new(0),
            upgrade: Mutex::new(None),
        }
    }

    pub fn take_upgrade(&self) -> Option<Upgraded> {
        self.upgrade.lock().ok()?.take()
    }
}

/// Holds `busy` up while a response is being sent.
struct Busy(Arc<ConnCtx>);

impl Busy {
    fn new(ctx: &Arc<ConnCtx>) -> Self {
        ctx.busy.fetch_add(1, Ordering::SeqCst);
        Self(ctx.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Headers that belong to one connection (RFC 9110 §7.6.1, RFC 9113 §8.2.2), and any
/// header a `Connection` header names. `TE: trailers` goes on: it asks for trailers
/// end to end (gRPC needs it).
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for name in [
        header::TE,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
    if !upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() != HttpVersion::HTTP_2
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The version's next backend on its ring (round robin, so shares follow the ring),
/// its group and position; a canary with none up sends to stable (never the other way).
fn pick(svc: &Service, groups: &[Group; 2], version: Version) -> Option<(SocketAddr, u8, usize)> {
    let group = match version {
        Version::Canary if groups[1].up > 0 => 1u8,
        _ if groups[0].up > 0 => 0,
        _ => return None,
    };
    let n = svc.next[group as usize].fetch_add(1, Ordering::Relaxed) as u64;
    let (index, b) = groups[group as usize].pick(n << 32)?;
    Some((
        decode_backend(b, svc.cfg.listen.is_ipv6()),
        group,
        group as usize * MAX_GROUP_BACKENDS + index as usize,
    ))
}

fn count_decision(counts: &Counts, rule: &Rule, group: usize) {
    let d = &counts.decisions;
    let fixed = match rule {
        Rule::Header => 0,
        Rule::Flag => 1,
        Rule::Split => 2,
        Rule::Cohort(name) => {
            if let Ok(mut c) = d.cohorts.lock() {
                *c.entry((name.clone(), group)).or_default() += 1;
            }
            return;
        }
    };
    d.fixed[fixed][group].fetch_add(1, Ordering::Relaxed);
}

/// The response to a client, its body streamed from the backend (or empty).
pub(super) type ProxyBody = Observed;

/// A local answer: the status, and for gRPC the `grpc-status` in a trailers-only
/// response.
fn local(status: StatusCode, grpc: bool, busy: Busy) -> Response<ProxyBody> {
    let body = Observed {
        inner: None,
        grpc: None,
        _busy: Some(busy),
    };
    let mut resp = Response::new(body);
    if grpc {
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static(GRPC_UNAVAILABLE));
        h.insert(
            "grpc-message",
            HeaderValue::from_static("no backend answered"),
        );
    } else {
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
    resp
}

/// Serves one request. Never fails: a backend that cannot be reached is a 502.
pub(super) fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>> {
    Box::pin(async move { Ok(proxy(ctx, req).await) })
}

async fn proxy(ctx: Arc<ConnCtx>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let busy = Busy::new(&ctx);
    let svc = &ctx.svc;
    let counts = &svc.counts;
    let grpc = is_grpc(req.headers());
    let found = ctx.shared.splicer().map(|s| {
        let value = s.service(&svc.key)?;
        Some((value, svc.groups(&s, &value)?))
    });
    let (value, groups) = match found {
        Ok(Some(found)) => found,
        _ => return local(StatusCode::BAD_GATEWAY, grpc, busy),
    };
    let (routing, _) = svc.rules();
    let head = Head {
        headers: req.headers(),
        client: ctx.peer.ip(),
    };
    let split = if value.sticky == STICKY_CLIENT_IP {
        Split::Hash(client_hash(&crate::datapath::encode::encode_addr(
            ctx.peer.ip(),
        )))
    } else {
        Split::Exact(&svc.exact)
    };
    let mut decision = decide(&routing, &head, value.weight_bp, split);
    // After a rollback nothing goes to canary, whatever the rules say: the services
    // map's flag is written with the rollback's weight, so the next request sees it.
    if value.rolled_back != 0 || svc.rolled_back.load(Ordering::Relaxed) {
        decision.version = Version::Stable;
    }
    let Some((to, group, slot)) = pick(svc, &groups, decision.version) else {
        return local(StatusCode::BAD_GATEWAY, grpc, busy);
    };
    count_decision(counts, &decision.rule, group as usize);
    counts.backends[slot].fetch_add(1, Ordering::Relaxed);
    let v = &counts.versions[group as usize];
    v.requests.fetch_add(1, Ordering::Relaxed);
    let failed = |busy| {
        v.failed.fetch_add(1, Ordering::Relaxed);
        v.responses[4].fetch_add(1, Ordering::Relaxed);
        local(StatusCode::BAD_GATEWAY, grpc, busy)
    };
    if is_upgrade(&req) {
        return match upgrade(&ctx, req, to, group).await {
            Some(resp) => {
                observe_head(counts, group, &resp, started, false);
                resp.map(|inner| Observed {
                    inner: inner.map(|b| b.boxed()),
                    grpc: None,
                    _busy: Some(busy),
                })
            }
            None => failed(busy),
        };
    }
    let h2 = svc.clients.h2(req.version());
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
    strip_hop_by_hop(req.headers_mut(), false);
    // hyper answers `Expect: 100-continue` itself when the body is first read.
    req.headers_mut().remove(header::EXPECT);
    if h2 {
        req.headers_mut().remove(header::HOST);
    } else if let Some(a) = authority.filter(|_| !req.headers().contains_key(header::HOST)) {
        if let Ok(v) = HeaderValue::from_str(&a) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let Ok(uri) = format!("http://{to}{path}").parse::<Uri>() else {
        return local(StatusCode::BAD_REQUEST, grpc, busy);
    };
    *req.uri_mut() = uri;
    *req.version_mut() = if h2 {
        HttpVersion::HTTP_2
    } else {
        HttpVersion::HTTP_11
    };
    let pool = &svc.clients.pools[group as usize][h2 as usize];
    let resp = match tokio::time::timeout(RESPONSE_TIMEOUT, pool.request(req)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, backend = %to, "backend request failed");
            return failed(busy);
        }
        Err(_) => return failed(busy),
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    let resp = Response::from_parts(parts, ());
    let deferred = observe_head(counts, group, &resp, started, grpc);
    resp.map(|()| Observed {
        inner: Some(body.boxed()),
        grpc: deferred.then(|| (counts.clone(), group)),
        _busy: Some(busy),
    })
}

/// Counts a response head: the latency, and the class unless a gRPC response's class
/// waits for its trailers (returns true then).
fn observe_head<B>(
    counts: &Counts,
    group: u8,
    resp: &Response<B>,
    started: Instant,
    grpc: bool,
) -> bool {
    let v = &counts.versions[group as usize];
    let ns = started.elapsed().as_nanos().min(u64::MAX as u128) as u64;
    v.latency[latency_bucket(ns) as usize].fetch_add(1, Ordering::Relaxed);
    // A trailers-only gRPC response carries grpc-status in its head.
    let status = resp.headers().get("grpc-status");
    if grpc && resp.status() == StatusCode::OK && status.is_none() {
        return true;
    }
    let class = match status {
        Some(s) if grpc && s != "0" => 4,
        _ => (resp.status().as_u16() / 100).clamp(1, 5) as usize - 1,
    };
    v.responses[class].fetch_add(1, Ordering::Relaxed);
    false
}

/// A backend's response body on its way to the client; for gRPC the class is counted
/// from `grpc-status` in the trailers (non-zero, or none at all, is an error).
pub(super) struct Observed {
    inner: Option<http_body_util::combinators::BoxBody<Bytes, hyper::Error>>,
    grpc: Option<(Arc<Counts>, u8)>,
    _busy: Option<Busy>,
}

impl Observed {
    fn grpc_done(&mut self, ok: bool) {
        if let Some((counts, group)) = self.grpc.take() {
            let class = if ok { 1 } else { 4 };
            counts.versions[group as usize].responses[class].fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // A stream that ended without trailers (cut short) has no status: an error.
        self.grpc_done(false);
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame {
            if let Some(t) = f.trailers_ref() {
                let ok = t.get("grpc-status").is_some_and(|s| s == "0");
                self.grpc_done(ok);
            }
        }
        if frame.is_none() {
            self.grpc_done(false);
            // The response is out: the connection is at a request boundary again.
            self._busy = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or(SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// An upgrade request on a connection of its own to the backend; a `101` keeps that
/// socket for the splice ([`splice_upgrade`]) and answers the client the same.
async fn upgrade(
    ctx: &Arc<ConnCtx>,
    mut req: Request<Incoming>,
    to: SocketAddr,
    group: u8,
) -> Option<Response<Option<Incoming>>> {
    let v = &ctx.svc.counts.versions[group as usize];
    v.connections.fetch_add(1, Ordering::Relaxed);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
        .await
        .ok()?
        .ok()?;
    v.connected.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    strip_hop_by_hop(req.headers_mut(), true);
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *req.uri_mut() = path.parse().ok()?;
    *req.version_mut() = HttpVersion::HTTP_11;
    let mut resp = tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(req))
        .await
        .ok()?
        .ok()?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(resp.headers_mut(), false);
        return Some(resp.map(Some));
    }
    let upgraded = hyper::upgrade::on(&mut resp).await.ok()?;
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    if let Ok(mut slot) = ctx.upgrade.lock() {
        *slot = Some(Upgraded {
            backend: parts.io.into_inner(),
            leftover: parts.read_buf,
            group,
        });
    }
    ctx.svc.counts.upgrades.fetch_add(1, Ordering::Relaxed);
    strip_hop_by_hop(resp.headers_mut(), true);
    Some(resp.map(|_| None))
}

/// After a `101`: what either side sent past the upgrade, and hyper had read, is passed
/// on, and the two sockets join the kernel's splice until they close.
pub(super) async fn splice_upgrade(
    shared: &Arc<Shared>,
    svc: &Arc<Service>,
    mut client: TcpStream,
    client_leftover: Vec<u8>,
    up: Upgraded,
) -> Result<()> {
    let mut backend = up.backend;
    let copied = client_leftover.len() + up.leftover.len();
    backend.write_all(&client_leftover).await?;
    client.write_all(&up.leftover).await?;
    svc.counts
        .userspace_bytes
        .fetch_add(copied as u64, Ordering::Relaxed);
    let spliced = Spliced::add(shared, svc, client, backend, up.group)?;
    spliced.run(shared, svc).await;
    Ok(())
}
