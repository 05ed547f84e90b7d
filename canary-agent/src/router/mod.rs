//! Per-request routing for `protocol = "http"` services: a reverse proxy in the agent
//! (hyper, HTTP/1.x and h2c) that decides every request by the policy's rules
//! (`decide`) and sends it to a backend of that version over pooled keep-alive
//! connections; upgraded connections (WebSocket) are spliced in the kernel after 101.

mod counts;
pub mod decide;
mod forward;
pub mod handover;
pub mod kernel;
mod pool;
mod proxy;
mod splice;
mod state;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;

pub use state::{HeadLimits, RoutedService};

use crate::config::{Protocol, ServiceConfig};
use crate::datapath::Splicer;
use crate::policy::Policy;

/// How long a hand-over waits for requests in flight to finish (a stop waits
/// `[agent] shutdown_grace`).
pub const DRAIN_PATIENCE: Duration = Duration::from_secs(10);

/// The running proxy: one listener per `http` service, one task per client connection.
pub struct Router {
    shared: Arc<state::Shared>,
}

/// What the proxy adds to a version's signals: everything of its requests (the
/// kernel sees only the bytes of upgraded connections).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouterSignals {
    pub requests: u64,
    /// Responses by class, 1xx … 5xx; a 502 of the proxy (backend refused or timed
    /// out) and a gRPC response with a non-zero `grpc-status` are 5xx.
    pub responses: [u64; 5],
    /// Request → response head, in the kernel's latency buckets.
    pub latency: Vec<u64>,
    /// Backend connections the proxy opened or tried to open for the version.
    pub connections: u64,
    /// Of those, the ones that connected.
    pub connected: u64,
    /// Requests answered 502 because the backend refused or timed out.
    pub failed: u64,
}

impl Router {
    /// Binds the listeners (or takes those of a hand-over `inherited`, with its
    /// connections) and starts serving; call inside the tokio runtime.
    pub fn start(
        splicer: Splicer,
        services: Vec<RoutedService>,
        inherited: Option<handover::Record>,
    ) -> Result<Self> {
        Ok(Self {
            shared: proxy::start(splicer, services, inherited)?,
        })
    }

    /// Applies a reloaded config's rules and head limits to new requests. The set
    /// of routed services and their addresses is fixed for this agent's life (each has
    /// a listener and a `local` route): a change there is refused, and nothing applied,
    /// before anything else of the reload is.
    pub fn check_reload(&self, services: &[&ServiceConfig]) -> Result<(), String> {
        let set = |it: &mut dyn Iterator<Item = (String, std::net::SocketAddr)>| {
            let mut v: Vec<_> = it.collect();
            v.sort();
            v
        };
        let running = set(&mut self
            .shared
            .services
            .iter()
            .map(|s| (s.cfg.name.clone(), s.cfg.listen)));
        let wanted = set(&mut services.iter().map(|s| (s.name.clone(), s.listen)));
        if running != wanted {
            return Err(format!(
                "the routed (protocol = \"http\") services change from {running:?} to \
                 {wanted:?}: that takes a hand-over (SIGUSR2), not a reload"
            ));
        }
        Ok(())
    }

    /// Takes the rules of services checked by [`Router::check_reload`].
    pub fn reload(&self, services: Vec<RoutedService>) {
        for routed in services {
            if let Some(svc) = self
                .shared
                .services
                .iter()
                .find(|s| s.cfg.name == routed.cfg.name)
            {
                svc.set_rules(routed.routing, routed.limits);
            }
        }
    }

    /// Stops accepting and gives the listeners to the next agent image; requests in
    /// flight finish (their responses say `Connection: close`, h2 gets GOAWAY), idle
    /// HTTP/1 connections are handed over between two requests, upgraded pairs stay in
    /// the kernel's splice, and the (pinned) sk_lookup link keeps the service addresses
    /// reaching the listeners across the exec.
    pub async fn hand_over(&self) -> Result<handover::Record> {
        proxy::stop(&self.shared, true, DRAIN_PATIENCE).await
    }

    /// Stops accepting and lets requests in flight finish (at most `grace`); idle
    /// connections are closed at a request boundary.
    pub async fn drain(&self, grace: Duration) -> Result<()> {
        proxy::stop(&self.shared, false, grace).await.map(drop)
    }

    /// A rolled-back canary gets no routed requests, whatever the rules say
    /// (header, flag and cohort decisions for canary go to stable instead).
    pub fn set_rolled_back(&self, id: u32, rolled_back: bool) {
        if let Some(svc) = self.service(id) {
            svc.rolled_back.store(rolled_back, Ordering::Relaxed);
        }
    }

    fn service(&self, id: u32) -> Option<&state::Service> {
        self.shared
            .services
            .iter()
            .find(|s| s.id == id)
            .map(|s| &**s)
    }

    /// Stable and canary signals for service `id`; none if it is not routed.
    pub fn signals(&self, id: u32) -> Option<[RouterSignals; 2]> {
        let svc = self.service(id)?;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Some(std::array::from_fn(|v| {
            let c = &svc.counts.versions[v];
            RouterSignals {
                requests: n(&c.requests),
                responses: std::array::from_fn(|i| n(&c.responses[i])),
                latency: c.latency.iter().map(n).collect(),
                connections: n(&c.connections),
                connected: n(&c.connected),
                failed: n(&c.failed),
            }
        }))
    }

    /// Requests the proxy sent to each backend slot of service `id`.
    pub fn backend_requests(&self, id: u32) -> Option<Vec<u64>> {
        let svc = self.service(id)?;
        Some(
            svc.counts
                .backends
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .collect(),
        )
    }

    /// `(rule label, version, count)` for `canary_routing_decisions_total`.
    pub fn decisions(&self, id: u32) -> Vec<(String, &'static str, u64)> {
        let Some(svc) = self.service(id) else {
            return Vec::new();
        };
        const VERSIONS: [&str; 2] = ["stable", "canary"];
        let d = &svc.counts.decisions;
        let mut out = Vec::new();
        for (rule, counts) in ["header", "flag", "split"].iter().zip(&d.fixed) {
            for (v, n) in counts.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    out.push((rule.to_string(), VERSIONS[v], n));
                }
            }
        }
        let cohorts: BTreeMap<_, _> = d
            .cohorts
            .lock()
            .map(|c| c.clone().into_iter().collect())
            .unwrap_or_default();
        for ((name, v), n) in cohorts {
            out.push((decide::Rule::Cohort(name).label(), VERSIONS[v], n));
        }
        out
    }

    /// The `"routing"` object of `status --json`: decisions by rule (`header`, `flag`,
    /// `cohort` by name, `split`), bytes of upgraded connections copied by the agent vs
    /// carried by the kernel, bad heads, refused connections, and the splice maps' sizes.
    pub fn status(&self, id: u32) -> Option<serde_json::Value> {
        let svc = self.service(id)?;
        let (mut header, mut flag, mut split) = (0u64, 0u64, 0u64);
        let mut cohort: BTreeMap<String, u64> = BTreeMap::new();
        for (rule, _, n) in self.decisions(id) {
            match rule.as_str() {
                "header" => header += n,
                "flag" => flag += n,
                "split" => split += n,
                other => {
                    let name = other.trim_start_matches("cohort:").to_string();
                    *cohort.entry(name).or_default() += n;
                }
            }
        }
        let c = &svc.counts;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let splicer = self.shared.splicer().ok()?;
        let (socks, peers, state) = splicer.entries();
        Some(json!({
            "decided_in": "proxy",
            "header": header,
            "flag": flag,
            "cohort": cohort,
            "split": split,
            "upgrades": n(&c.upgrades),
            "userspace_bytes": n(&c.userspace_bytes),
            "kernel_bytes": splicer.bytes(id),
            "bad_requests": n(&c.bad_requests),
            "too_large": n(&c.too_large),
            "head_timeouts": n(&c.timeouts),
            "refused_connections": n(&c.refused),
            "open_connections": n(&c.open),
            "splice_entries": {"sockets": socks, "peers": peers, "state": state},
        }))
    }
}

/// Request rules need the request head, so they are only for `http` services. A plan
/// that needs no head (`client-cidr` and default cohorts only) is decided in the
/// kernel at the first packet, so it suits `tcp` and `udp` services too.
pub fn check_service(svc: &ServiceConfig, policy: &Policy) -> Result<(), String> {
    if policy.routing.head_free() || svc.protocol == Protocol::Http {
        return Ok(());
    }
    let protocol = match svc.protocol {
        Protocol::Tcp => "tcp",
        _ => "udp",
    };
    Err(format!(
        "service {:?} is protocol = \"{protocol}\" but its policy {} has request routing rules: \
         set protocol = \"http\" (HTTP/1.x) on the service or remove the rules",
        svc.name,
        svc.policy
            .as_ref()
            .map_or("-".into(), |p| p.display().to_string())
    ))
}
