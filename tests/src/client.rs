//! Traffic drivers for the client namespace.
//!
//! Every function here is blocking and meant to run inside
//! [`NetNs::enter`](crate::NetNs::enter), so its sockets live in that
//! namespace. Internally they use a current-thread tokio runtime on the
//! calling thread: std's `TcpStream` cannot bind a source address before
//! connecting, which the per-client stickiness tests need. Every loop is
//! bounded in count and time.

use crate::backend::VERSION_HEADER;
use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, Instant, MissedTickBehavior};

/// Longest banner line read; anything longer is not a version name.
const MAX_BANNER: u64 = 256;
/// Connect timeout for long-lived connections.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often each long-lived connection sends a message.
const ECHO_PERIOD: Duration = Duration::from_millis(50);
/// An echo later than this counts as a stall.
const STALL_AFTER: Duration = Duration::from_secs(2);
/// Long-lived connections stop by themselves after this, even without
/// [`LongLived::stop`].
const LONG_LIVED_MAX: Duration = Duration::from_secs(600);
/// Per-request timeout of [`http_load`].
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Tally of short exchanges (TCP banners or UDP probes) by answering backend.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BannerReport {
    /// Successful exchanges per backend name.
    pub by_name: BTreeMap<String, usize>,
    /// Successful exchanges per local source address, then per backend name.
    pub by_source: BTreeMap<IpAddr, BTreeMap<String, usize>>,
    /// Failed exchanges per reason.
    pub failures: BTreeMap<String, usize>,
}

impl BannerReport {
    /// Successful exchanges answered by `name`.
    pub fn count(&self, name: &str) -> usize {
        self.by_name.get(name).copied().unwrap_or(0)
    }

    /// All successful exchanges.
    pub fn ok(&self) -> usize {
        self.by_name.values().sum()
    }

    /// All failed exchanges.
    pub fn failed(&self) -> usize {
        self.failures.values().sum()
    }

    fn record(&mut self, outcome: Result<(IpAddr, String), String>) {
        match outcome {
            Ok((source, name)) => {
                *self
                    .by_source
                    .entry(source)
                    .or_default()
                    .entry(name.clone())
                    .or_default() += 1;
                *self.by_name.entry(name).or_default() += 1;
            }
            Err(reason) => *self.failures.entry(reason).or_default() += 1,
        }
    }
}

/// Opens `count` TCP connections to a banner service, at most `concurrency`
/// at a time, each reading the backend's name until the server closes.
/// Connections cycle through those `sources` of the target's family (the
/// default source if `sources` is empty); each one is bounded by `timeout`.
pub fn banner_connections(
    target: SocketAddr,
    count: usize,
    concurrency: usize,
    sources: &[IpAddr],
    timeout: Duration,
) -> Result<BannerReport> {
    let sources = matching_sources(target, sources)?;
    runtime()?.block_on(async {
        let slots = Arc::new(Semaphore::new(concurrency.max(1)));
        let mut tasks = JoinSet::new();
        for i in 0..count {
            let permit = slots.clone().acquire_owned().await?;
            let source = sources[i % sources.len()];
            tasks.spawn(async move {
                let outcome = tokio::time::timeout(timeout, banner_once(target, source))
                    .await
                    .unwrap_or_else(|_| Err("timeout".to_string()));
                drop(permit);
                outcome
            });
        }
        let mut report = BannerReport::default();
        while let Some(outcome) = tasks.join_next().await {
            report.record(outcome?);
        }
        Ok(report)
    })
}

async fn banner_once(
    target: SocketAddr,
    source: Option<IpAddr>,
) -> Result<(IpAddr, String), String> {
    let stream = tcp_connect(target, source)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let local = stream
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?
        .ip();
    let mut banner = Vec::new();
    stream
        .take(MAX_BANNER)
        .read_to_end(&mut banner)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let name = String::from_utf8_lossy(&banner)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if name.is_empty() {
        return Err("empty banner".to_string());
    }
    Ok((local, name))
}

/// Sends `count` UDP datagrams one after another, each from a fresh socket
/// (hence a fresh source port, i.e. a new flow) cycling through `sources`,
/// and tallies who answered within `timeout`. The socket is connected, so
/// a reply from any other address than `target` is not seen and counts as a
/// timeout, which is how a missing source restore shows up.
pub fn udp_probe(
    target: SocketAddr,
    count: usize,
    sources: &[IpAddr],
    timeout: Duration,
) -> Result<BannerReport> {
    if timeout.is_zero() {
        bail!("udp_probe needs a non-zero timeout");
    }
    let sources = matching_sources(target, sources)?;
    let mut report = BannerReport::default();
    for i in 0..count {
        report.record(udp_once(target, sources[i % sources.len()], timeout, i));
    }
    Ok(report)
}

fn udp_once(
    target: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
    seq: usize,
) -> Result<(IpAddr, String), String> {
    let unspecified = match target {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let socket = UdpSocket::bind(SocketAddr::new(source.unwrap_or(unspecified), 0))
        .map_err(|e| format!("bind: {e}"))?;
    socket
        .connect(target)
        .map_err(|e| format!("connect: {e}"))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| format!("set timeout: {e}"))?;
    socket
        .send(format!("probe {seq}").as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; MAX_BANNER as usize];
    let n = socket.recv(&mut buf).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timeout".to_string(),
        _ => format!("recv: {e}"),
    })?;
    let local = socket
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?
        .ip();
    let name = String::from_utf8_lossy(&buf[..n]).trim().to_string();
    if name.is_empty() {
        return Err("empty reply".to_string());
    }
    Ok((local, name))
}

/// One long-lived echo connection's history.
#[derive(Clone, Debug, Serialize)]
pub struct ConnStats {
    /// The client's end of the connection.
    pub local: SocketAddr,
    /// The name the echo server greeted with, i.e. the backend it reached.
    pub backend: String,
    /// Messages echoed back intact.
    pub messages_ok: u64,
    /// Times an echo took longer than 2 s (the wait then goes on).
    pub stalls: u64,
    /// The connection was reset (RST, or a broken pipe after one).
    pub reset: bool,
    /// Why the connection ended before it was stopped, if it did.
    pub ended: Option<String>,
}

/// Snapshot of all long-lived connections.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LongLivedReport {
    pub conns: Vec<ConnStats>,
}

impl LongLivedReport {
    /// Connections that were reset.
    pub fn resets(&self) -> usize {
        self.conns.iter().filter(|c| c.reset).count()
    }

    /// Stalls over all connections.
    pub fn stalls(&self) -> u64 {
        self.conns.iter().map(|c| c.stalls).sum()
    }

    /// Connections that ended on their own (reset, closed or broken).
    pub fn ended(&self) -> usize {
        self.conns.iter().filter(|c| c.ended.is_some()).count()
    }

    /// The fewest messages any connection got echoed; shows every connection
    /// made progress.
    pub fn min_messages_ok(&self) -> u64 {
        self.conns.iter().map(|c| c.messages_ok).min().unwrap_or(0)
    }

    /// Connections per backend name.
    pub fn by_backend(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for c in &self.conns {
            *out.entry(c.backend.clone()).or_default() += 1;
        }
        out
    }
}

/// Long-lived TCP connections to an echo service, each exchanging a small
/// message every ~50 ms on a background thread until [`stop`](Self::stop),
/// drop, or a 10-minute hard limit.
pub struct LongLived {
    stats: Arc<Mutex<Vec<ConnStats>>>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl LongLived {
    /// Opens `n` connections (cycling through `sources` of the target's
    /// family) and returns once all are greeted; fails if any is not.
    /// Call it inside the client namespace: the background thread inherits
    /// the caller's namespace.
    pub fn open(target: SocketAddr, n: usize, sources: &[IpAddr]) -> Result<LongLived> {
        let sources = matching_sources(target, sources)?;
        let stats = Arc::new(Mutex::new(Vec::with_capacity(n)));
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("canary-lab-long-lived".into())
            .spawn(move || match runtime() {
                Ok(rt) => rt.block_on(run_long_lived(
                    target,
                    n,
                    sources,
                    thread_stats,
                    stop_rx,
                    ready_tx,
                )),
                Err(e) => drop(ready_tx.send(Err(e))),
            })?;
        let ready = ready_rx.recv();
        let long_lived = LongLived {
            stats,
            stop,
            thread: Some(thread),
        };
        match ready {
            Ok(Ok(())) => Ok(long_lived),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(anyhow!("the long-lived connection thread died")),
        }
    }

    /// Current per-connection statistics.
    pub fn report(&self) -> LongLivedReport {
        LongLivedReport {
            conns: lock(&self.stats).clone(),
        }
    }

    /// Stops every connection and returns the final statistics.
    pub fn stop(mut self) -> LongLivedReport {
        self.halt();
        self.report()
    }

    fn halt(&mut self) {
        // A send error only means the connections are already done.
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for LongLived {
    fn drop(&mut self) {
        self.halt();
    }
}

async fn run_long_lived(
    target: SocketAddr,
    n: usize,
    sources: Vec<Option<IpAddr>>,
    stats: Arc<Mutex<Vec<ConnStats>>>,
    stop: watch::Receiver<bool>,
    ready: mpsc::Sender<Result<()>>,
) {
    let deadline = Instant::now() + LONG_LIVED_MAX;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let opened = timeout(
            CONNECT_TIMEOUT,
            open_echo(target, sources[i % sources.len()]),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow!("timed out after {CONNECT_TIMEOUT:?}")));
        match opened {
            Ok(conn) => conns.push(conn),
            Err(e) => {
                let _ = ready.send(Err(
                    e.context(format!("long-lived connection {i} to {target}"))
                ));
                return;
            }
        }
    }
    lock(&stats).extend(conns.iter().map(|(_, _, s)| s.clone()));
    let mut tasks = JoinSet::new();
    for (idx, (lines, writer, _)) in conns.into_iter().enumerate() {
        tasks.spawn(exchange(
            idx,
            lines,
            writer,
            stats.clone(),
            stop.clone(),
            deadline,
        ));
    }
    let _ = ready.send(Ok(()));
    while tasks.join_next().await.is_some() {}
}

type EchoConn = (Lines<BufReader<OwnedReadHalf>>, OwnedWriteHalf, ConnStats);

async fn open_echo(target: SocketAddr, source: Option<IpAddr>) -> Result<EchoConn> {
    let stream = tcp_connect(target, source).await.context("connect")?;
    stream.set_nodelay(true)?;
    let local = stream.local_addr()?;
    let (reader, writer) = stream.into_split();
    let mut lines = BufReader::new(reader).lines();
    let backend = lines
        .next_line()
        .await
        .context("reading the greeting")?
        .context("closed before greeting")?;
    let stats = ConnStats {
        local,
        backend,
        messages_ok: 0,
        stalls: 0,
        reset: false,
        ended: None,
    };
    Ok((lines, writer, stats))
}

/// Why an exchange loop ended early.
enum End {
    Reset(io::Error),
    Other(String),
}

async fn exchange(
    idx: usize,
    mut lines: Lines<BufReader<OwnedReadHalf>>,
    mut writer: OwnedWriteHalf,
    stats: Arc<Mutex<Vec<ConnStats>>>,
    mut stop: watch::Receiver<bool>,
    deadline: Instant,
) {
    let update = |f: &dyn Fn(&mut ConnStats)| f(&mut lock(&stats)[idx]);
    let io_end = |e: io::Error| match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => End::Reset(e),
        _ => End::Other(e.to_string()),
    };
    let mut tick = tokio::time::interval(ECHO_PERIOD);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let end = 'conn: loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break None,
        }
        if *stop.borrow() || Instant::now() >= deadline {
            break None;
        }
        seq += 1;
        let msg = format!("ping {seq}");
        if let Err(e) = writer.write_all(format!("{msg}\n").as_bytes()).await {
            break Some(io_end(e));
        }
        loop {
            tokio::select! {
                read = timeout(STALL_AFTER, lines.next_line()) => match read {
                    Err(_) => {
                        update(&|s| s.stalls += 1);
                        if Instant::now() >= deadline {
                            break 'conn None;
                        }
                    }
                    Ok(Ok(Some(line))) if line == msg => {
                        update(&|s| s.messages_ok += 1);
                        break;
                    }
                    Ok(Ok(Some(line))) => break 'conn Some(End::Other(format!("echo {line:?} for {msg:?}"))),
                    Ok(Ok(None)) => break 'conn Some(End::Other("closed by the server".into())),
                    Ok(Err(e)) => break 'conn Some(io_end(e)),
                },
                _ = stop.changed() => break 'conn None,
            }
        }
    };
    match end {
        Some(End::Reset(e)) => update(&|s| {
            s.reset = true;
            s.ended = Some(format!("reset: {e}"));
        }),
        Some(End::Other(reason)) => update(&|s| s.ended = Some(reason.clone())),
        None => {}
    }
}

/// Latency percentiles of the requests that got a response, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn from_samples(mut samples: Vec<Duration>) -> Latency {
        samples.sort_unstable();
        let pick = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len().max(1));
            samples
                .get(rank - 1)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        Latency {
            p50_ms: pick(0.50),
            p90_ms: pick(0.90),
            p99_ms: pick(0.99),
            max_ms: pick(1.0),
        }
    }
}

/// Outcome of [`http_load`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct HttpReport {
    /// Requests sent (responses plus failures other than "not sent").
    pub sent: u64,
    /// Responses per status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Responses per `x-canary-version` header ("none" if absent).
    pub by_version: BTreeMap<String, u64>,
    /// Requests without a response, per reason.
    pub failures: BTreeMap<String, u64>,
    /// Requests sent again, once, on a new connection because their reused
    /// keep-alive connection closed before any byte of the response arrived
    /// (RFC 9112 §9.3.1; every request here is an idempotent GET), per reason of
    /// the first attempt. The second attempt is counted like any request: a
    /// response, or a failure.
    pub retries: BTreeMap<String, u64>,
    /// Pooled connections found closed when a request was about to use them
    /// (the server closed them while idle), or that closed before the request
    /// was written: discarded and replaced by a new connection, as any HTTP/1.1
    /// client's pool does. No request was sent on them.
    pub closed_idle: u64,
    pub latency: Latency,
}

impl HttpReport {
    /// Responses with status `code`.
    pub fn status(&self, code: u16) -> u64 {
        self.by_status.get(&code).copied().unwrap_or(0)
    }

    /// Responses from backend `name`.
    pub fn version(&self, name: &str) -> u64 {
        self.by_version.get(name).copied().unwrap_or(0)
    }

    /// Requests without a response.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// Requests sent a second time (see [`HttpReport::retries`]).
    pub fn retried(&self) -> u64 {
        self.retries.values().sum()
    }

    fn merge(&mut self, other: HttpReport) {
        self.sent += other.sent;
        self.closed_idle += other.closed_idle;
        for (k, v) in other.retries {
            *self.retries.entry(k).or_default() += v;
        }
        for (k, v) in other.by_status {
            *self.by_status.entry(k).or_default() += v;
        }
        for (k, v) in other.by_version {
            *self.by_version.entry(k).or_default() += v;
        }
        for (k, v) in other.failures {
            *self.failures.entry(k).or_default() += v;
        }
    }
}

/// Sends `GET path` to `target` at `rps` requests per second for `duration`,
/// over `concurrency` keep-alive HTTP/1.1 connections (a failed connection is
/// replaced on its next request). Requests are scheduled open-loop; a worker
/// that falls more than 5 s behind gives up its remaining requests, so the
/// call returns within `duration` + 10 s.
///
/// Strict: every request that gets no response is a failure, so a test sees
/// each connection the datapath breaks. A pooled connection already known to be
/// closed when a request is due is replaced first (counted in
/// [`HttpReport::closed_idle`]). [`http_load_with_retries`] behaves like a
/// standard HTTP/1.1 client instead.
pub fn http_load(
    target: SocketAddr,
    path: &str,
    rps: u32,
    duration: Duration,
    concurrency: usize,
) -> Result<HttpReport> {
    load(target, path, rps, duration, concurrency, false, None)
}

/// [`http_load`] that also ends early, at a request boundary of every worker, once
/// `stop` is set: for scenarios that run traffic until something happens, with
/// `duration` as the bound.
pub fn http_load_until(
    target: SocketAddr,
    path: &str,
    rps: u32,
    duration: Duration,
    concurrency: usize,
    stop: &Arc<AtomicBool>,
) -> Result<HttpReport> {
    load(
        target,
        path,
        rps,
        duration,
        concurrency,
        false,
        Some(stop.clone()),
    )
}

/// [`http_load`] with each worker behaving like a standard HTTP/1.1 client with
/// a one-connection pool: a pooled connection the server closed while idle is
/// discarded and a new one opened, also when that shows only as the request
/// not being sent ([`HttpReport::closed_idle`]), and a request whose reused
/// connection closed before any byte of the response arrived is retried once on
/// a new connection (RFC 9112 §9.3.1; these are idempotent GETs), counted in
/// [`HttpReport::retries`]. A request on a fresh connection is never retried, so
/// a server that resets every request still shows as failures.
pub fn http_load_with_retries(
    target: SocketAddr,
    path: &str,
    rps: u32,
    duration: Duration,
    concurrency: usize,
) -> Result<HttpReport> {
    load(target, path, rps, duration, concurrency, true, None)
}

fn load(
    target: SocketAddr,
    path: &str,
    rps: u32,
    duration: Duration,
    concurrency: usize,
    retry: bool,
    stop: Option<Arc<AtomicBool>>,
) -> Result<HttpReport> {
    if rps == 0 || concurrency == 0 {
        bail!("http_load needs rps > 0 and concurrency > 0");
    }
    let total = (f64::from(rps) * duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(rps));
    runtime()?.block_on(async {
        let start = Instant::now();
        let plan = LoadPlan {
            target,
            path: Arc::from(path),
            start,
            period,
            total,
            stride: concurrency as u64,
            give_up: start + duration + HTTP_TIMEOUT,
            retry,
            stop,
        };
        let mut workers = JoinSet::new();
        for first in 0..concurrency as u64 {
            workers.spawn(load_worker(plan.clone(), first));
        }
        let mut report = HttpReport::default();
        let mut samples = Vec::new();
        while let Some(done) = workers.join_next().await {
            let (part, part_samples) = done?;
            report.merge(part);
            samples.extend(part_samples);
        }
        report.latency = Latency::from_samples(samples);
        Ok(report)
    })
}

#[derive(Clone)]
struct LoadPlan {
    target: SocketAddr,
    path: Arc<str>,
    start: Instant,
    period: Duration,
    total: u64,
    stride: u64,
    give_up: Instant,
    /// Behave like a standard client (see [`http_load_with_retries`]).
    retry: bool,
    /// Ends the load early (see [`http_load_until`]).
    stop: Option<Arc<AtomicBool>>,
}

async fn load_worker(plan: LoadPlan, first: u64) -> (HttpReport, Vec<Duration>) {
    let mut report = HttpReport::default();
    let mut samples = Vec::new();
    let mut conn: Option<HttpConn> = None;
    let mut slot = first;
    while slot < plan.total {
        if plan
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
        {
            break;
        }
        if Instant::now() >= plan.give_up {
            let left = (plan.total - slot).div_ceil(plan.stride);
            *report
                .failures
                .entry("not sent: client fell behind schedule".into())
                .or_default() += left;
            break;
        }
        sleep_until(plan.start + plan.period.mul_f64(slot as f64)).await;
        report.sent += 1;
        let began = Instant::now();
        let outcome = timeout(HTTP_TIMEOUT, pooled_request(&mut conn, &mut report, &plan))
            .await
            .unwrap_or_else(|_| Err("timeout".to_string()));
        match outcome {
            Ok(resp) => {
                samples.push(began.elapsed());
                *report.by_status.entry(resp.status).or_default() += 1;
                let version = resp.version.unwrap_or_else(|| "none".into());
                *report.by_version.entry(version).or_default() += 1;
            }
            Err(reason) => {
                conn = None;
                *report.failures.entry(reason).or_default() += 1;
            }
        }
        slot += plan.stride;
    }
    (report, samples)
}

/// How many times in a row a request may find its connection closed before it
/// was written (each time on a new connection) before it counts as failed.
const MAX_NOT_SENT: u32 = 3;

/// One request of [`load_worker`] through its one-connection pool (retried as
/// [`http_load_with_retries`] says when `plan.retry`).
async fn pooled_request(
    conn: &mut Option<HttpConn>,
    report: &mut HttpReport,
    plan: &LoadPlan,
) -> Result<HttpResponse, String> {
    let mut retried: Option<String> = None;
    let mut not_sent = 0;
    loop {
        if conn.as_ref().is_some_and(|c| c.sender.is_closed()) {
            *conn = None;
            report.closed_idle += 1;
        }
        let c = match conn {
            Some(c) => c,
            None => conn.insert(connect_http(plan.target).await?),
        };
        let reused = c.responses > 0;
        match send_http(c, plan.target, Method::GET, &plan.path, None).await {
            Ok(resp) => return Ok(resp),
            Err(e) => {
                *conn = None;
                match e {
                    SendError::NotSent(_) if plan.retry && not_sent < MAX_NOT_SENT => {
                        not_sent += 1;
                        report.closed_idle += 1;
                    }
                    SendError::NoResponse(reason) if plan.retry && reused && retried.is_none() => {
                        *report.retries.entry(reason.clone()).or_default() += 1;
                        retried = Some(reason);
                    }
                    e => {
                        let reason = e.to_string();
                        return Err(match retried {
                            Some(first) => format!("{reason} (on retry after: {first})"),
                            None => reason,
                        });
                    }
                }
            }
        }
    }
}

/// A complete HTTP response.
#[derive(Clone, Debug, Serialize)]
pub struct HttpResponse {
    pub status: u16,
    /// The `x-canary-version` header, if present.
    pub version: Option<String>,
    pub body: String,
}

/// One HTTP/1.1 request on a fresh connection (admin calls, spot checks);
/// a `body` is sent as JSON.
pub fn http_request(
    target: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<HttpResponse> {
    let method =
        Method::from_bytes(method.as_bytes()).with_context(|| format!("method {method:?}"))?;
    runtime()?.block_on(async {
        let exchange = async {
            let mut conn = connect_http(target).await?;
            send_http(&mut conn, target, method.clone(), path, body)
                .await
                .map_err(|e| e.to_string())
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| anyhow!("{method} {target}{path}: timed out after {timeout:?}"))?
            .map_err(|e| anyhow!("{method} {target}{path}: {e}"))
    })
}

/// An HTTP/1.1 client connection: its request sender, the bytes read on it so
/// far (to tell whether any byte of a response arrived) and how many responses
/// it has completed (whether it is being reused).
struct HttpConn {
    sender: SendRequest<Full<Bytes>>,
    read: Arc<AtomicU64>,
    responses: u64,
}

/// A TCP stream that counts the bytes read from it.
struct CountingStream {
    inner: TcpStream,
    read: Arc<AtomicU64>,
}

impl tokio::io::AsyncRead for CountingStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        polled
    }
}

impl tokio::io::AsyncWrite for CountingStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn connect_http(target: SocketAddr) -> Result<HttpConn, String> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    let read = Arc::new(AtomicU64::new(0));
    let counted = CountingStream {
        inner: stream,
        read: read.clone(),
    };
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(counted))
        .await
        .map_err(|e| format!("handshake: {}", error_chain(&e)))?;
    // Connection errors also fail the request in flight, which reports them.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(HttpConn {
        sender,
        read,
        responses: 0,
    })
}

/// Why a request got no response.
#[derive(Debug)]
enum SendError {
    /// The connection was closed before the request was written: it never left.
    NotSent(String),
    /// Written, but the connection closed (or was reset) before any byte of the
    /// response arrived.
    NoResponse(String),
    /// Anything else, e.g. a connection that closed in the middle of a response.
    Failed(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::NotSent(e) => write!(f, "not sent: {e}"),
            SendError::NoResponse(e) | SendError::Failed(e) => f.write_str(e),
        }
    }
}

async fn send_http(
    conn: &mut HttpConn,
    target: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> Result<HttpResponse, SendError> {
    conn.sender
        .ready()
        .await
        .map_err(|e| SendError::NotSent(error_chain(&e)))?;
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, target.to_string());
    if body.is_some() {
        req = req.header(CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .map_err(|e| SendError::Failed(format!("building request: {e}")))?;
    let read_before = conn.read.load(Ordering::Relaxed);
    let resp = match conn.sender.try_send_request(req).await {
        Ok(resp) => resp,
        Err(mut e) => {
            let reason = error_chain(e.error());
            return Err(if e.take_message().is_some() {
                SendError::NotSent(reason)
            } else if conn.read.load(Ordering::Relaxed) == read_before {
                SendError::NoResponse(reason)
            } else {
                SendError::Failed(reason)
            });
        }
    };
    let status = resp.status().as_u16();
    let version = resp
        .headers()
        .get(VERSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| SendError::Failed(format!("body: {}", error_chain(&e))))?
        .to_bytes();
    conn.responses += 1;
    Ok(HttpResponse {
        status,
        version,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// hyper's errors name only their kind; the io cause (e.g. "connection reset
/// by peer") is in the source chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// A runtime on the calling thread, so every socket is created in the
/// namespace that thread is in.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a tokio runtime")
}

async fn tcp_connect(target: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(target).await
}

/// The sources of the target's family, or the default source if none given.
fn matching_sources(target: SocketAddr, sources: &[IpAddr]) -> Result<Vec<Option<IpAddr>>> {
    if sources.is_empty() {
        return Ok(vec![None]);
    }
    let matching: Vec<_> = sources
        .iter()
        .filter(|s| s.is_ipv4() == target.is_ipv4())
        .map(|s| Some(*s))
        .collect();
    if matching.is_empty() {
        bail!("none of the sources {sources:?} has the address family of {target}");
    }
    Ok(matching)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
