//! The agent's Prometheus exposition: kernel counters and latency per version, weight,
//! rollout state and analysis verdicts, from one snapshot per scrape.

use anyhow::Result;

use super::Agent;
use crate::units::bp_to_percent;

impl Agent {
    /// Prometheus text for every service: kernel counters and latency per version,
    /// weight, rollout state and analysis verdicts.
    pub fn metrics(&self) -> Result<String> {
        use crate::metrics::*;
        use canary_common::histogram::{bucket_lower_ns, bucket_upper_ns};
        let f = Families::default();
        for svc in &self.services {
            let service = svc.cfg.name.clone();
            let signals = self.datapath.signals(svc.id)?;
            let routed = self.router.as_ref().and_then(|r| r.signals(svc.id));
            for (v, version) in ["stable", "canary"].into_iter().enumerate() {
                let labels = VersionLabels {
                    service: service.clone(),
                    version: version.into(),
                };
                // Routed requests: counted by the proxy, with its backend connections.
                let r = routed.as_ref().map(|r| r[v].clone()).unwrap_or_default();
                f.connections
                    .get_or_create(&labels)
                    .inc_by(signals[v].connections + r.connections);
                let t = &signals[v].counters;
                f.requests
                    .get_or_create(&labels)
                    .inc_by(t.requests + r.requests);
                f.resets.get_or_create(&labels).inc_by(t.resets);
                f.handshakes.get_or_create(&labels).inc_by(t.handshakes);
                f.handshake_seconds
                    .get_or_create(&labels)
                    .inc_by(t.handshake_ns as f64 / 1e9);
                for (i, n) in t.responses.iter().enumerate() {
                    let class = ClassLabels {
                        service: service.clone(),
                        version: version.into(),
                        class: format!("{}xx", i + 1),
                    };
                    f.responses
                        .get_or_create(&class)
                        .inc_by(*n + r.responses[i]);
                }
                // Fold the kernel's log-linear buckets into the exported bounds; a kernel
                // bucket counts under the first bound at or above its upper edge.
                let mut cumulative = vec![0u64; LATENCY_BOUNDS_S.len()];
                let (mut sum_s, mut count) = (0.0, 0u64);
                let latency: Vec<u64> = signals[v]
                    .latency
                    .iter()
                    .enumerate()
                    .map(|(b, n)| n + r.latency.get(b).copied().unwrap_or(0))
                    .collect();
                for (b, n) in latency.iter().enumerate().filter(|(_, n)| **n > 0) {
                    let (lo, hi) = (bucket_lower_ns(b as u32), bucket_upper_ns(b as u32));
                    // The open-ended last bucket is taken as one octave wide.
                    let hi = if hi == u64::MAX {
                        lo.saturating_mul(2)
                    } else {
                        hi
                    };
                    let hi_s = hi as f64 / 1e9;
                    sum_s += *n as f64 * (lo as f64 / 1e9 + hi_s) / 2.0;
                    count += n;
                    for (c, bound) in cumulative.iter_mut().zip(LATENCY_BOUNDS_S) {
                        if hi_s <= bound {
                            *c += n;
                        }
                    }
                }
                let buckets = LATENCY_BOUNDS_S
                    .iter()
                    .copied()
                    .zip(cumulative)
                    .chain([(f64::INFINITY, count)])
                    .collect();
                f.latency.get_or_create(&labels).set(sum_s, count, buckets);
            }
            let service_labels = ServiceLabels {
                service: service.clone(),
            };
            f.weight
                .get_or_create(&service_labels)
                .set(bp_to_percent(svc.weight_bp));
            if let Some(r) = &svc.rollout {
                let state = StateLabels {
                    service: service.clone(),
                    state: r.state().to_string(),
                };
                f.state.get_or_create(&state).set(1);
            }
            let decisions = match (&svc.kernel, &svc.policy, &self.router) {
                (Some(_), Some(p), _) => {
                    crate::router::kernel::decisions(&p.routing, &self.datapath.decisions(svc.id)?)
                }
                (_, _, Some(router)) => router.decisions(svc.id),
                _ => Vec::new(),
            };
            for (rule, version, n) in decisions {
                f.routing
                    .get_or_create(&RoutingLabels {
                        service: service.clone(),
                        rule,
                        version: version.into(),
                    })
                    .inc_by(n);
            }
            for (group, backends) in svc.health.iter().flat_map(|h| h.groups.iter().enumerate()) {
                for b in backends {
                    let labels = BackendLabels {
                        service: service.clone(),
                        version: ["stable", "canary"][group].into(),
                        backend: b.addr.to_string(),
                        source: self.backend_source(&svc.cfg, group, b.addr),
                    };
                    f.backend_up.get_or_create(&labels).set(!b.down() as i64);
                    f.health_failures.get_or_create(&labels).inc_by(b.failures);
                    f.ejections.get_or_create(&labels).inc_by(b.ejected_total);
                }
            }
            for v in svc.verdicts() {
                let verdict = serde_json::to_value(v.verdict)?;
                f.verdict
                    .get_or_create(&VerdictLabels {
                        service: service.clone(),
                        metric: v.metric.clone(),
                        verdict: verdict.as_str().unwrap_or("").into(),
                    })
                    .set(1);
            }
        }
        f.encode()
    }
}
