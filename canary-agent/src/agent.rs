//! The daemon: owns the datapath, reconciles the configured services with what the
//! pinned maps already hold, and answers control requests.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use canary_common::{ServiceKey, ServiceValue, MAX_GROUP_BACKENDS, MAX_SERVICES};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
};

use crate::{
    analysis::{
        hold_reason, Action, Analyzer, MetricName, Verdict, VersionCounters, DEFAULT_ALPHA,
    },
    api::{BackendStatus, Request, Response, RolloutAction, ServiceStatus, Status},
    config::{bp_to_percent, Config, ServiceConfig},
    controller::{Actor, AnalysisHold, Clock, Command, Effect, EventLog, Rollout, RolloutState},
    datapath::{encode_service, service_key, Datapath},
    policy::{load_policy, Policy},
};

/// How often the controller is ticked (real time; `--time-scale` speeds the clock).
const TICK: Duration = Duration::from_millis(100);
/// Pause between two calls of a gate webhook that did not approve.
const WEBHOOK_RETRY: Duration = Duration::from_secs(2);

/// A configured service as installed in the kernel.
pub struct LiveService {
    pub cfg: ServiceConfig,
    pub id: u32,
    pub key: ServiceKey,
    pub weight_bp: u16,
    pub policy: Option<Policy>,
    pub rollout: Option<Rollout>,
    events: EventLog,
    /// Present when the policy has metrics or rollback rules.
    analyzer: Option<Analyzer>,
    verdicts: Vec<Verdict>,
    last_observed_s: u64,
    /// Latest (events, trials) of each PromQL metric, for stable and canary.
    custom: BTreeMap<String, [(u64, u64); 2]>,
}

/// A policy's PromQL metric, to be queried for both versions.
pub struct CustomQueryJob {
    pub service: String,
    pub metric: String,
    pub query: crate::analysis::CustomQuery,
}

pub struct Agent {
    datapath: Datapath,
    services: Vec<LiveService>,
    clock: Arc<dyn Clock>,
    state_dir: PathBuf,
    /// Services whose gate webhook is being called (one call at a time each).
    webhooks_in_flight: HashSet<String>,
    alert_webhook: Option<String>,
    /// Alerts waiting to be POSTed to `alert_webhook`.
    alerts: Vec<serde_json::Value>,
}

/// A gate webhook the async side must call.
pub struct GateCall {
    pub service: String,
    pub url: String,
    pub payload: serde_json::Value,
}

/// How the configured services map onto kernel state left by a previous agent.
#[derive(Debug, PartialEq)]
pub struct Reconcile {
    /// Per configured service: (id, weight in bp, whether the id's counters must be reset).
    pub placed: Vec<(u32, u16, bool)>,
    /// Installed services that are no longer configured.
    pub stale: Vec<ServiceKey>,
}

/// Keeps the id and live weight of every service the maps already hold (an agent
/// restart must not move weights or orphan pinned flows); new services get free ids
/// and their configured weight.
pub fn reconcile(
    configured: &[ServiceConfig],
    installed: &[(ServiceKey, ServiceValue)],
) -> Reconcile {
    let keys: Vec<ServiceKey> = configured.iter().map(service_key).collect();
    let stale: Vec<ServiceKey> = installed
        .iter()
        .filter(|(k, _)| !keys.contains(k))
        .map(|(k, _)| *k)
        .collect();
    let kept: Vec<u32> = installed
        .iter()
        .filter(|(k, _)| keys.contains(k))
        .map(|(_, v)| v.id)
        .collect();
    let mut free = (0..MAX_SERVICES).filter(|id| !kept.contains(id));
    let placed = configured
        .iter()
        .zip(&keys)
        .map(
            |(svc, key)| match installed.iter().find(|(k, _)| k == key) {
                Some((_, v)) => (v.id, v.weight_bp, false),
                None => (
                    free.next().expect("config holds at most MAX_SERVICES"),
                    svc.weight_bp,
                    true,
                ),
            },
        )
        .collect();
    Reconcile { placed, stale }
}

impl Agent {
    /// Loads the datapath, installs the configured services and attaches to the
    /// configured interfaces.
    pub fn start(config: &Config, clock: Arc<dyn Clock>) -> Result<Self> {
        // Everything that can be wrong in files is checked before the kernel is touched.
        let mut policies = Vec::new();
        for svc in &config.services {
            policies.push(match &svc.policy {
                Some(path) => {
                    let policy = load_policy(path).map_err(|e| {
                        anyhow!(
                            "{}: service {:?}: policy: {e}",
                            config.path.display(),
                            svc.name
                        )
                    })?;
                    let custom = policy.metrics.iter().find_map(|m| match &m.name {
                        MetricName::Custom(name) => Some(name.clone()),
                        _ => None,
                    });
                    if let (Some(name), None) = (custom, &config.agent.prometheus_url) {
                        bail!(
                            "{}: metric {name:?} is a PromQL metric: set [agent] prometheus_url in {}",
                            path.display(),
                            config.path.display()
                        );
                    }
                    Some(policy)
                }
                None => None,
            });
        }
        let state_dir = config.agent.state_dir.clone();
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating state_dir {}", state_dir.display()))?;
        let mut rollouts = Vec::new();
        for svc in &config.services {
            rollouts.push(load_rollout(&state_dir, &svc.name)?);
        }
        let mut datapath = Datapath::load(&config.agent.bpffs_dir)?;
        let installed = datapath.installed()?;
        let plan = reconcile(&config.services, &installed);
        let mut services = Vec::new();
        let per_service = config
            .services
            .iter()
            .zip(plan.placed)
            .zip(policies)
            .zip(rollouts);
        for (((svc, (id, weight_bp, fresh)), policy), rollout) in per_service {
            if fresh {
                datapath.clear_stats(id)?;
            }
            // A rollout in progress owns the weight; the pinned map already holds it.
            let weight_bp = match &rollout {
                Some(r) if !r.state().is_terminal() && r.state() != RolloutState::Pending => {
                    r.weight_bp()
                }
                _ => weight_bp,
            };
            let key = service_key(svc);
            datapath.install(&key, &encode_service(svc, id, weight_bp))?;
            tracing::info!(service = %svc.name, id, weight_bp, restored = !fresh, "service installed");
            if let Some(r) = &rollout {
                tracing::info!(service = %svc.name, state = %r.state(), "rollout restored");
            }
            // A service with a policy always shows its rollout, pending until started.
            let rollout = rollout.or_else(|| policy.clone().map(|p| Rollout::new(&svc.name, p)));
            let analyzer = policy
                .as_ref()
                .filter(|p| !p.metrics.is_empty() || !p.rules.is_empty())
                .map(|p| Analyzer::new(p.metrics.clone(), p.rules.clone(), DEFAULT_ALPHA));
            services.push(LiveService {
                cfg: svc.clone(),
                id,
                key,
                weight_bp,
                policy,
                rollout,
                events: EventLog::new(state_dir.join(format!("{}.events.jsonl", svc.name))),
                analyzer,
                verdicts: Vec::new(),
                last_observed_s: 0,
                custom: BTreeMap::new(),
            });
        }
        for key in plan.stale {
            datapath.uninstall(&key)?;
            tracing::info!(?key, "removed service no longer in the config");
        }
        for iface in &config.agent.interfaces {
            datapath.attach(iface)?;
            tracing::info!(%iface, "datapath attached");
        }
        Ok(Self {
            datapath,
            services,
            clock,
            state_dir,
            webhooks_in_flight: HashSet::new(),
            alert_webhook: config.agent.alert_webhook.clone(),
            alerts: Vec::new(),
        })
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut LiveService> {
        self.services
            .iter_mut()
            .find(|s| s.cfg.name == name)
            .ok_or_else(|| anyhow!("no service named {name:?}"))
    }

    /// Operator weight change: an override of a running rollout (which pauses it), or a
    /// plain weight change when no rollout is running.
    pub fn operator_set_weight(&mut self, name: &str, weight_bp: u16, by: &str) -> Result<()> {
        if self.rollout_running(name)? {
            return self.rollout_command(
                name,
                Command::SetWeight { bp: weight_bp },
                Actor::Operator(by.into()),
            );
        }
        self.set_weight(name, weight_bp)
    }

    fn rollout_running(&mut self, name: &str) -> Result<bool> {
        Ok(self
            .service_mut(name)?
            .rollout
            .as_ref()
            .is_some_and(|r| !r.state().is_terminal() && r.state() != RolloutState::Pending))
    }

    /// Changes a service's canary weight with one map write.
    pub fn set_weight(&mut self, name: &str, weight_bp: u16) -> Result<()> {
        if weight_bp > canary_common::WEIGHT_SCALE {
            bail!("weight {weight_bp} bp is above 100 %");
        }
        let svc = self.service_mut(name)?;
        if weight_bp > 0 && svc.cfg.canary.is_empty() {
            bail!("service {name:?} has no canary backends");
        }
        let (key, value) = (svc.key, encode_service(&svc.cfg, svc.id, weight_bp));
        self.datapath.install(&key, &value)?;
        let svc = self.service_mut(name)?;
        tracing::info!(
            service = name,
            from = svc.weight_bp,
            to = weight_bp,
            "weight changed"
        );
        svc.weight_bp = weight_bp;
        Ok(())
    }

    pub fn status(&self, name: Option<&str>) -> Result<Status> {
        if let Some(n) = name {
            if !self.services.iter().any(|s| s.cfg.name == n) {
                bail!("no service named {n:?}");
            }
        }
        let mut services = Vec::new();
        for svc in self
            .services
            .iter()
            .filter(|s| name.is_none_or(|n| s.cfg.name == n))
        {
            let stats = self.datapath.stats(svc.id)?;
            let groups = [
                ("stable", 0, &svc.cfg.stable),
                ("canary", MAX_GROUP_BACKENDS, &svc.cfg.canary),
            ];
            let backends = groups
                .into_iter()
                .flat_map(|(group, base, list)| {
                    list.iter()
                        .enumerate()
                        .map(move |(i, addr)| (group, addr, base + i))
                })
                .map(|(group, addr, slot)| {
                    let s = &stats[slot];
                    BackendStatus {
                        group: group.into(),
                        address: addr.to_string(),
                        connections: s.connections,
                        packets_in: s.packets_in,
                        packets_out: s.packets_out,
                        bytes_in: s.bytes_in,
                        bytes_out: s.bytes_out,
                        flow_misses: s.flow_misses,
                    }
                })
                .collect();
            services.push(ServiceStatus {
                name: svc.cfg.name.clone(),
                listen: svc.cfg.listen.to_string(),
                protocol: serde_json::to_value(svc.cfg.protocol)?
                    .as_str()
                    .unwrap_or("")
                    .into(),
                weight: bp_to_percent(svc.weight_bp),
                weight_bp: svc.weight_bp,
                mode: svc.cfg.mode.to_string(),
                sticky: serde_json::to_value(svc.cfg.sticky)?
                    .as_str()
                    .unwrap_or("")
                    .into(),
                backends,
                rollout: svc.rollout.as_ref().map(|r| r.status(self.clock.now_ms())),
                analysis: svc
                    .verdicts
                    .iter()
                    .map(serde_json::to_value)
                    .collect::<Result<_, _>>()?,
            });
        }
        Ok(Status { services })
    }

    pub fn handle(&mut self, request: Request) -> Result<serde_json::Value> {
        match request {
            Request::Status { service } => {
                Ok(serde_json::to_value(self.status(service.as_deref())?)?)
            }
            Request::SetWeight {
                service,
                weight_bp,
                by,
            } => {
                self.operator_set_weight(&service, weight_bp, &by)?;
                Ok(serde_json::to_value(self.status(Some(&service))?)?)
            }
            Request::Rollout {
                service,
                action,
                by,
            } => {
                let actor = Actor::Operator(by.clone());
                let command = match action {
                    RolloutAction::Start => Command::Start,
                    RolloutAction::Pause { reason } => Command::Pause { reason },
                    RolloutAction::Resume { reason } => Command::Resume { reason },
                    RolloutAction::Approve => Command::Approve { by },
                    RolloutAction::Promote { full } => Command::Promote { full },
                    RolloutAction::Rollback { reason } => {
                        if !self.rollout_running(&service)? {
                            // Emergency rollback works with or without a rollout.
                            self.set_weight(&service, 0)?;
                            tracing::warn!(%service, %reason, "emergency rollback to stable");
                            return Ok(serde_json::to_value(self.status(Some(&service))?)?);
                        }
                        Command::Rollback { reason }
                    }
                };
                self.rollout_command(&service, command, actor)?;
                Ok(serde_json::to_value(self.status(Some(&service))?)?)
            }
            Request::History { service } => {
                let svc = self.service_mut(&service)?;
                Ok(serde_json::to_value(svc.events.read()?)?)
            }
        }
    }

    /// Applies an operator or automatic command to a service's rollout.
    pub fn rollout_command(&mut self, name: &str, command: Command, actor: Actor) -> Result<()> {
        let now = self.clock.now_ms();
        let svc = self.service_mut(name)?;
        let Some(policy) = &svc.policy else {
            bail!("service {name:?} has no rollout policy (set `policy = \"FILE\"` in its config)");
        };
        let starting = command == Command::Start
            && svc.rollout.as_ref().is_none_or(|r| r.state().is_terminal());
        if starting {
            svc.rollout = Some(Rollout::new(name, policy.clone()));
        }
        let rollout = svc.rollout.as_mut().ok_or_else(|| {
            anyhow!("service {name:?} has no rollout yet: `canary rollout start {name}` begins one")
        })?;
        let effects = rollout.apply(command, actor, now)?;
        self.apply_effects(name, effects)
    }

    fn apply_effects(&mut self, name: &str, effects: Vec<Effect>) -> Result<()> {
        for effect in effects {
            match effect {
                Effect::SetWeight(bp) => self.set_weight(name, bp)?,
                Effect::Transition(event) => {
                    tracing::info!(
                        service = name, from = %event.from, to = %event.to,
                        weight_bp = event.weight_bp, reason = %event.reason, "rollout"
                    );
                    self.service_mut(name)?.events.append(&event)?;
                }
                Effect::GateWaiting { stage, webhook } => {
                    tracing::info!(service = name, %stage, ?webhook, "gate waiting for approval");
                }
                Effect::Alert { reason } => {
                    tracing::warn!(service = name, %reason, "rollout alert");
                    self.alert(name, "gate-timeout", &reason);
                }
            }
        }
        let state_dir = self.state_dir.clone();
        if let Some(r) = &self.service_mut(name)?.rollout {
            save_rollout(&state_dir, name, r)?;
        }
        Ok(())
    }

    /// The PromQL metrics of every service's policy.
    pub fn custom_queries(&self) -> Vec<CustomQueryJob> {
        let mut jobs = Vec::new();
        for svc in &self.services {
            for m in svc.policy.iter().flat_map(|p| &p.metrics) {
                if let (MetricName::Custom(name), Some(query)) = (&m.name, &m.query) {
                    jobs.push(CustomQueryJob {
                        service: svc.cfg.name.clone(),
                        metric: name.clone(),
                        query: query.clone(),
                    });
                }
            }
        }
        jobs
    }

    /// Records the latest (events, trials) of a PromQL metric for stable and canary.
    pub fn set_custom(&mut self, service: &str, metric: &str, values: [(u64, u64); 2]) {
        if let Ok(svc) = self.service_mut(service) {
            svc.custom.insert(metric.to_string(), values);
        }
    }

    /// Queues a JSON alert for the configured alert webhook (if any).
    fn alert(&mut self, service: &str, kind: &str, reason: &str) {
        if self.alert_webhook.is_some() {
            self.alerts.push(serde_json::json!({
                "event": "alert",
                "kind": kind,
                "service": service,
                "at_ms": self.clock.now_ms(),
                "reason": reason,
            }));
        }
    }

    /// Alerts to send now, with the webhook to send them to.
    pub fn take_alerts(&mut self) -> Option<(String, Vec<serde_json::Value>)> {
        let url = self.alert_webhook.clone()?;
        (!self.alerts.is_empty()).then(|| (url, std::mem::take(&mut self.alerts)))
    }

    /// Advances every rollout on the clock and returns the gate webhooks to call.
    pub fn tick(&mut self) -> Vec<GateCall> {
        let now = self.clock.now_ms();
        if let Err(e) = std::fs::write(clock_path(&self.state_dir), now.to_string()) {
            tracing::warn!(error = %e, "recording the controller clock");
        }
        let mut calls = Vec::new();
        let names: Vec<String> = self.services.iter().map(|s| s.cfg.name.clone()).collect();
        for name in names {
            let hold = match self.analyse(&name, now / 1000) {
                Ok(hold) => hold,
                Err(e) => {
                    tracing::error!(service = %name, error = %format!("{e:#}"), "analysis");
                    AnalysisHold::Clear
                }
            };
            let Ok(svc) = self.service_mut(&name) else {
                continue;
            };
            let Some(rollout) = svc.rollout.as_mut() else {
                continue;
            };
            let effects = rollout.tick(now, hold);
            let status = rollout.status(now);
            if !effects.is_empty() {
                if let Err(e) = self.apply_effects(&name, effects) {
                    tracing::error!(service = %name, error = %format!("{e:#}"), "applying rollout step");
                }
            }
            let Some(gate) = status.waiting_gate else {
                continue;
            };
            let Some(url) = gate
                .webhook
                .filter(|_| status.state == RolloutState::AwaitingApproval)
            else {
                continue;
            };
            if self.webhooks_in_flight.insert(name.clone()) {
                calls.push(GateCall {
                    service: name.clone(),
                    payload: serde_json::json!({
                        "event": "confirm-stage",
                        "service": name,
                        "stage": gate.stage,
                        "step": gate.step,
                        "weight_bp": status.weight_bp,
                        "waiting_s": gate.waiting_s,
                    }),
                    url,
                });
            }
        }
        calls
    }
}

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
            for (v, version) in ["stable", "canary"].into_iter().enumerate() {
                let labels = VersionLabels {
                    service: service.clone(),
                    version: version.into(),
                };
                f.connections
                    .get_or_create(&labels)
                    .inc_by(signals[v].connections);
                let t = &signals[v].counters;
                f.requests.get_or_create(&labels).inc_by(t.requests);
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
                    f.responses.get_or_create(&class).inc_by(*n);
                }
                // Fold the kernel's log-linear buckets into the exported bounds; a kernel
                // bucket counts under the first bound at or above its upper edge.
                let mut cumulative = vec![0u64; LATENCY_BOUNDS_S.len()];
                let (mut sum_s, mut count) = (0.0, 0u64);
                for (b, n) in signals[v]
                    .latency
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n > 0)
                {
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
            for v in &svc.verdicts {
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

    /// Feeds this second's kernel counters to the service's analyzer and acts on its
    /// verdicts: a fired rule rolls back or pauses a live rollout; inconclusive data
    /// holds progression.
    fn analyse(&mut self, name: &str, now_s: u64) -> Result<AnalysisHold> {
        let svc = self.service_mut(name)?;
        if svc.analyzer.is_none() || now_s <= svc.last_observed_s {
            return Ok(AnalysisHold::Clear);
        }
        let (id, tcp) = (svc.id, svc.cfg.protocol == crate::config::Protocol::Tcp);
        let custom = svc.custom.clone();
        let signals = self.datapath.signals(id)?;
        let counters = |version: usize| {
            let conn_new = signals[version].connections;
            let t = &signals[version].counters;
            VersionCounters {
                requests: t.requests,
                responses: t.responses,
                conn_new,
                conn_reset: t.resets,
                // A TCP connection placed but never answered by a SYN-ACK.
                conn_failed: if tcp {
                    conn_new.saturating_sub(t.handshakes)
                } else {
                    0
                },
                latency: signals[version].latency.clone(),
                custom: custom
                    .iter()
                    .map(|(k, v)| (k.clone(), v[version]))
                    .collect(),
            }
        };
        let (stable, canary) = (counters(0), counters(1));
        let now_ms = self.clock.now_ms();
        let svc = self.service_mut(name)?;
        svc.last_observed_s = now_s;
        let Some(analyzer) = svc.analyzer.as_mut() else {
            return Ok(AnalysisHold::Clear);
        };
        analyzer.observe(now_s, &stable, &canary);
        let eval = analyzer.evaluate(now_s);
        let name_of = |o: crate::analysis::Outcome| format!("{o:?}").to_lowercase();
        let changed: Vec<String> = eval
            .verdicts
            .iter()
            .filter_map(|v| {
                let before = svc
                    .verdicts
                    .iter()
                    .find(|p| p.metric == v.metric)
                    .map(|p| p.verdict);
                (before != Some(v.verdict)).then(|| {
                    let before = before.map_or("none".into(), name_of);
                    format!(
                        "verdict {}: {before} -> {}: {}",
                        v.metric,
                        name_of(v.verdict),
                        v.reason
                    )
                })
            })
            .collect();
        svc.verdicts = eval.verdicts.clone();
        // Verdict changes go to the rollout's history as same-state events.
        if let Some(r) = &svc.rollout {
            let status = r.status(now_ms);
            for reason in changed {
                let event = crate::controller::Event {
                    service: name.to_string(),
                    at_ms: now_ms,
                    from: status.state,
                    to: status.state,
                    step: status.step,
                    stage: status.stage.clone(),
                    weight_bp: status.weight_bp,
                    actor: Actor::Analysis,
                    reason,
                };
                svc.events.append(&event)?;
            }
        }
        let live = svc.rollout.as_ref().is_some_and(|r| {
            matches!(
                r.state(),
                RolloutState::Progressing | RolloutState::AwaitingApproval
            )
        });
        if let (true, Some(fired)) = (live, eval.fired.first()) {
            let command = match fired.action {
                Action::ImmediateRollback => Command::AnalysisRollback {
                    rule: fired.rule.clone(),
                    detail: fired.detail.clone(),
                },
                Action::PauseAndAlert => Command::AnalysisPause {
                    reason: format!("{}: {}", fired.rule, fired.detail),
                },
            };
            tracing::warn!(service = name, rule = %fired.rule, detail = %fired.detail, "analysis fired");
            let kind = match fired.action {
                Action::ImmediateRollback => "immediate-rollback",
                Action::PauseAndAlert => "pause-and-alert",
            };
            self.alert(
                name,
                kind,
                &format!("rule {} fired: {}", fired.rule, fired.detail),
            );
            self.rollout_command(name, command, Actor::Rule(fired.rule.clone()))?;
        }
        Ok(match hold_reason(&eval) {
            Some(reason) => AnalysisHold::Hold(reason),
            None => AnalysisHold::Clear,
        })
    }
}

fn rollout_path(state_dir: &Path, service: &str) -> PathBuf {
    state_dir.join(format!("{service}.rollout.json"))
}

fn load_rollout(state_dir: &Path, service: &str) -> Result<Option<Rollout>> {
    let path = rollout_path(state_dir, service);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes the rollout atomically (temp file + rename), so a crash leaves either the
/// old or the new state.
fn save_rollout(state_dir: &Path, service: &str, rollout: &Rollout) -> Result<()> {
    let path = rollout_path(state_dir, service);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(rollout)?)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn clock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("clock_ms")
}

/// The controller clock's last recorded time, so a time-scaled clock (which runs
/// ahead of the wall clock) resumes where the previous agent left it.
pub fn last_clock_ms(state_dir: &Path) -> Option<u64> {
    std::fs::read_to_string(clock_path(state_dir))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Runs the agent until SIGTERM or SIGINT, then detaches and removes the socket.
pub async fn run(config: Config, clock: Arc<dyn Clock>) -> Result<()> {
    let agent = Arc::new(Mutex::new(Agent::start(&config, clock)?));
    let socket = config.agent.control_socket.clone();
    let listener = bind_control_socket(&socket)?;
    if let Some(url) = config.agent.prometheus_url.clone() {
        tokio::spawn(query_prometheus(url, agent.clone()));
    }
    if let Some(listen) = config.agent.metrics_listen {
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listen, agent).await {
                tracing::error!(error = %format!("{e:#}"), "metrics endpoint stopped");
            }
        });
    }
    tracing::info!(socket = %socket.display(), "control API listening");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // SIGUSR2: restart hand-over. The programs stay attached (links pinned in bpffs)
    // and the next agent takes them over, so there is no gap without a datapath.
    let mut hand_over = signal(SignalKind::user_defined2())?;
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hand_over.recv() => {
                agent.lock().map_err(|_| anyhow!("agent state poisoned"))?.datapath.hand_over()?;
                tracing::info!("handed over: programs stay attached for the next agent");
                break;
            }
            _ = tick.tick() => {
                let (calls, alerts) = {
                    let mut a = agent.lock().map_err(|_| anyhow!("agent state poisoned"))?;
                    (a.tick(), a.take_alerts())
                };
                for call in calls {
                    tokio::spawn(call_gate(call, agent.clone()));
                }
                if let Some((url, alerts)) = alerts {
                    tokio::spawn(send_alerts(url, alerts));
                }
            }
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_client(stream, agent).await {
                        tracing::warn!(error = %e, "control client failed");
                    }
                });
            }
        }
    }
    tracing::info!("stopping: releasing the datapath (maps and flows stay pinned)");
    drop(agent);
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Calls a gate webhook once: a 2xx approves; anything else keeps the gate waiting
/// and the call is retried after a pause.
async fn call_gate(call: GateCall, agent: Arc<Mutex<Agent>>) {
    let result = crate::webhook::post_json(&call.url, &call.payload, Duration::from_secs(5)).await;
    let approved = matches!(result, Ok(code) if (200..300).contains(&code));
    if !approved {
        tracing::info!(service = %call.service, url = %call.url, result = ?result.as_ref().map_err(|e| e.to_string()), "gate webhook did not approve");
        tokio::time::sleep(WEBHOOK_RETRY).await;
    }
    let Ok(mut agent) = agent.lock() else { return };
    agent.webhooks_in_flight.remove(&call.service);
    if approved {
        let command = Command::Approve {
            by: call.url.clone(),
        };
        if let Err(e) = agent.rollout_command(&call.service, command, Actor::Webhook(call.url)) {
            tracing::warn!(service = %call.service, error = %e, "webhook approval not applied");
        }
    }
}

/// Every second, runs each PromQL metric's events and trials queries for both
/// versions (`{version}` substituted) and hands the counts to the analysis.
async fn query_prometheus(url: String, agent: Arc<Mutex<Agent>>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        let Ok(jobs) = agent.lock().map(|a| a.custom_queries()) else {
            return;
        };
        for job in jobs {
            let mut values = [(0u64, 0u64); 2];
            let mut complete = true;
            for (v, version) in ["stable", "canary"].into_iter().enumerate() {
                for (slot, query) in [&job.query.events, &job.query.trials]
                    .into_iter()
                    .enumerate()
                {
                    let query = query.replace("{version}", version);
                    match crate::webhook::prometheus_scalar(&url, &query, Duration::from_secs(2))
                        .await
                    {
                        Ok(Some(x)) if x.is_finite() && x >= 0.0 => {
                            let n = x.round() as u64;
                            if slot == 0 {
                                values[v].0 = n
                            } else {
                                values[v].1 = n
                            }
                        }
                        Ok(_) => complete = false,
                        Err(e) => {
                            tracing::warn!(service = %job.service, metric = %job.metric, error = %format!("{e:#}"), "PromQL query");
                            complete = false;
                        }
                    }
                }
            }
            if complete {
                if let Ok(mut a) = agent.lock() {
                    a.set_custom(&job.service, &job.metric, values);
                }
            }
        }
    }
}

/// POSTs alerts one by one; a failed delivery is logged (the event log has them too).
async fn send_alerts(url: String, alerts: Vec<serde_json::Value>) {
    for alert in alerts {
        match crate::webhook::post_json(&url, &alert, Duration::from_secs(5)).await {
            Ok(code) if (200..300).contains(&code) => {}
            other => {
                tracing::warn!(%url, result = ?other.map_err(|e| e.to_string()), "alert not delivered")
            }
        }
    }
}

fn bind_control_socket(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another agent is already serving {}", path.display());
        }
        std::fs::remove_file(path)?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn serve_client(stream: UnixStream, agent: Arc<Mutex<Agent>>) -> Result<()> {
    // The socket mode already limits access to root; the credential check also covers
    // a socket directory with looser permissions.
    let uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let response = if uid != 0 {
        Response::Error(format!("permission denied: uid {uid} is not root"))
    } else {
        match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Error(format!("bad request: {e}")),
            Ok(req) => {
                let result = agent
                    .lock()
                    .map_err(|_| anyhow!("agent state poisoned"))?
                    .handle(req);
                match result {
                    Ok(v) => Response::Ok(v),
                    Err(e) => Response::Error(format!("{e:#}")),
                }
            }
        }
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn services(n: usize) -> Vec<ServiceConfig> {
        let mut text = String::from("[agent]\ninterface = \"x\"\n");
        for i in 0..n {
            text += &format!(
                "[[service]]\nname = \"s{i}\"\nlisten = \"198.19.0.{i}:80\"\nstable = [\"198.18.2.2:80\"]\ncanary = [\"198.18.3.2:80\"]\nweight = 10\n"
            );
        }
        Config::parse(&text, Path::new("t.toml")).unwrap().services
    }

    #[test]
    fn fresh_services_get_config_weights_and_ids() {
        let cfg = services(3);
        let r = reconcile(&cfg, &[]);
        assert_eq!(
            r.placed,
            vec![(0, 1000, true), (1, 1000, true), (2, 1000, true)]
        );
        assert!(r.stale.is_empty());
    }

    #[test]
    fn restart_keeps_ids_and_live_weights_and_drops_stale() {
        let cfg = services(3);
        let installed = vec![
            (service_key(&cfg[1]), encode_service(&cfg[1], 0, 5000)),
            (
                service_key(&services(5)[4]),
                encode_service(&services(5)[4], 1, 100),
            ),
        ];
        let r = reconcile(&cfg, &installed);
        // s1 keeps id 0 and its live 50 %; the others take ids not kept (1 was stale).
        assert_eq!(
            r.placed,
            vec![(1, 1000, true), (0, 5000, false), (2, 1000, true)]
        );
        assert_eq!(r.stale, vec![service_key(&services(5)[4])]);
    }
}
