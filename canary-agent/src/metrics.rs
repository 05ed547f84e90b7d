//! Prometheus exposition of the agent's view: per service and version the kernel's
//! counters and latency histogram, the weight, the rollout state and the latest
//! analysis verdicts. Built from one consistent snapshot, at most once per
//! [`CACHE_FOR`] however many scrape.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, MetricType, TypedMetric},
    registry::Registry,
};

/// Upper bounds (seconds) of the exported latency buckets; the kernel's finer
/// log-linear buckets are folded into them.
pub const LATENCY_BOUNDS_S: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub service: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub service: String,
    pub version: String,
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub service: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoutingLabels {
    pub service: String,
    pub rule: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub service: String,
    pub version: String,
    pub backend: String,
    /// Where the address came from: itself as configured, or the name that answered it.
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub service: String,
    pub metric: String,
    pub verdict: String,
}

/// Sum in seconds, total count and cumulative `(upper bound, count)` pairs.
type HistogramSnapshot = (f64, u64, Vec<(f64, u64)>);

/// A histogram whose buckets are already counted (by the kernel).
#[derive(Debug, Default)]
pub struct CountedHistogram(Mutex<HistogramSnapshot>);

impl CountedHistogram {
    pub fn set(&self, sum_s: f64, count: u64, buckets: Vec<(f64, u64)>) {
        *self.0.lock().unwrap() = (sum_s, count, buckets);
    }
}

impl TypedMetric for CountedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for CountedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = &*self.0.lock().unwrap();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            *sum, *count, buckets, None,
        )
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The metric families; the agent fills them from a snapshot, then encodes.
#[derive(Default)]
pub struct Families {
    pub connections: Family<VersionLabels, Counter>,
    pub requests: Family<VersionLabels, Counter>,
    pub responses: Family<ClassLabels, Counter>,
    pub resets: Family<VersionLabels, Counter>,
    pub handshakes: Family<VersionLabels, Counter>,
    pub handshake_seconds: Family<VersionLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub latency: Family<VersionLabels, CountedHistogram>,
    pub weight: Family<ServiceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub state: Family<StateLabels, Gauge>,
    pub verdict: Family<VerdictLabels, Gauge>,
    pub routing: Family<RoutingLabels, Counter>,
    pub backend_up: Family<BackendLabels, Gauge>,
    pub health_failures: Family<BackendLabels, Counter>,
    pub ejections: Family<BackendLabels, Counter>,
}

impl Families {
    pub fn encode(self) -> Result<String> {
        let mut r = Registry::with_prefix("canary");
        r.register(
            "connections",
            "New connections placed, per version",
            self.connections,
        );
        r.register(
            "http_requests",
            "HTTP/1.x requests seen by the datapath",
            self.requests,
        );
        r.register(
            "http_responses",
            "HTTP/1.x responses by status class",
            self.responses,
        );
        r.register(
            "backend_resets",
            "Connections reset by the backend",
            self.resets,
        );
        r.register(
            "request_duration_seconds",
            "Request to response latency measured in the kernel",
            self.latency,
        );
        r.register("weight_percent", "Current canary weight", self.weight);
        r.register(
            "rollout_state",
            "1 for the rollout's current state",
            self.state,
        );
        r.register(
            "analysis_verdict",
            "1 for each metric's latest verdict",
            self.verdict,
        );
        r.register(
            "routing_decisions",
            "Connections of http services routed, by the rule that decided (header, flag, \
             cohort:NAME, split) and version",
            self.routing,
        );
        r.register(
            "backend_up",
            "1 while a health-checked backend is in the selection, 0 once its checks failed or \
             passive detection ejected it",
            self.backend_up,
        );
        r.register(
            "backend_ejections",
            "Ejections by passive detection ([service.outlier]) per backend",
            self.ejections,
        );
        r.register(
            "health_check_failures",
            "Failed health checks per backend",
            self.health_failures,
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r)?;
        Ok(out)
    }
}

/// Produces the exposition text (under the agent's lock).
pub type Render = Arc<dyn Fn() -> Result<String> + Send + Sync>;

/// Answers a probe: `Ok(text)` is healthy (200), `Err(why)` is not (503).
pub type Probe = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// What `/healthz` (liveness) and `/readyz` (readiness) check.
#[derive(Clone)]
pub struct Probes {
    /// Answered without the agent's lock (a heartbeat of the daemon loop).
    pub live: Probe,
    /// Read under the lock, and cached like `/metrics`.
    pub ready: Probe,
}

/// How old a scrape's or readiness answer may be: every scraper and prober shares
/// one read of the agent per interval.
pub const CACHE_FOR: Duration = Duration::from_secs(1);

/// Serves `GET /metrics`, `/healthz` and `/readyz` on `listen` until the runtime stops,
/// within the limits of [`crate::httpd`].
pub async fn serve(listen: std::net::SocketAddr, render: Render, probes: Probes) -> Result<()> {
    use http_body_util::Full;
    use hyper::{body::Bytes, service::service_fn, Response};
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "metrics endpoint listening");
    let text = Arc::new(crate::httpd::Cached::<(u16, String)>::new(CACHE_FOR));
    let ready = Arc::new(crate::httpd::Cached::<(u16, String)>::new(CACHE_FOR));
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (render, probes, text, ready) =
            (render.clone(), probes.clone(), text.clone(), ready.clone());
        async move {
            let probe = |p: &Probe| match p() {
                Ok(text) => (200, format!("{text}\n")),
                Err(why) => (503, format!("{why}\n")),
            };
            let (code, body) = match req.uri().path() {
                "/metrics" => (*text
                    .get(move || match render() {
                        Ok(text) => (200, text),
                        Err(e) => (500, format!("{e:#}\n")),
                    })
                    .await)
                    .clone(),
                "/healthz" => probe(&probes.live),
                "/readyz" => (*ready.get(move || probe(&probes.ready)).await).clone(),
                _ => (
                    404,
                    "not found: try /metrics, /healthz or /readyz\n".to_string(),
                ),
            };
            Response::builder()
                .status(code)
                .header("content-type", "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(body)))
        }
    });
    crate::httpd::serve(listener, service, "metrics", crate::httpd::MAX_CONNECTIONS).await;
    Ok(())
}
