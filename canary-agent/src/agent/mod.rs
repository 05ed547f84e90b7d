//! The agent's core: owns the dataplane (through [`Dataplane`], so it runs on the aya
//! datapath or on a fake in unit tests) and the services, applies the configuration as
//! desired state (on start and on reload), carries out rollout effects, and answers
//! control requests. Roles live in submodules with narrow interfaces: [`desired`]
//! decides what the kernel and disk should hold, [`service`] runs one service's
//! rollout and analysis (plain Rust), [`state`] persists; `crate::daemon` wires the
//! control socket, dashboard, metrics and fleet to it.

pub mod desired;
mod discovery;
mod fleet;
mod health;
mod journal;
mod prometheus;
pub mod series;
pub mod service;
pub mod state;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    sync::Arc,
};

use anyhow::{anyhow, bail, Result};
use canary_common::MAX_GROUP_BACKENDS;

pub use self::health::{HealthTarget, HEALTH_RULE};
pub use self::state::last_clock_ms;
use self::{
    desired::Current,
    journal::{Applying, Journal},
    service::{Analysis, LiveService},
    state::{Applied, AppliedService, StateDir},
};
use crate::{
    analysis::MetricName,
    api::{BackendHealthStatus, BackendStatus, Request, RolloutAction, ServiceStatus, Status},
    config::Config,
    controller::{Actor, Clock, Command, Effect, RetireAction, Rollout, RolloutState},
    datapath::{
        self, encode_service, service_key_for, Dataplane, DrainGroup, DrainMode, KernelRouting,
    },
    policy::{load_policy, OnRollback, Policy},
    units::bp_to_percent,
};

/// A policy's PromQL metric, to be queried for both versions.
pub struct CustomQueryJob {
    pub service: String,
    pub metric: String,
    pub query: crate::analysis::CustomQuery,
}

/// A gate webhook the async side must call.
pub struct GateCall {
    pub service: String,
    pub url: String,
    pub payload: serde_json::Value,
}

pub struct Agent {
    datapath: Box<dyn Dataplane>,
    services: Vec<LiveService>,
    clock: Arc<dyn Clock>,
    /// The configuration in force (the last one applied).
    config: Config,
    state: StateDir,
    applied: Applied,
    /// Services whose gate webhook is being called (one call at a time each).
    webhooks_in_flight: HashSet<String>,
    /// Alerts waiting to be POSTed to `alert_webhook`.
    alerts: Vec<serde_json::Value>,
    /// Woken by an uninstall request: the daemon then detaches and exits.
    uninstall: Arc<tokio::sync::Notify>,
    /// Per-second series for the dashboard and reports.
    series: series::Series,
    /// Request routing of `http` services (none when the config has none).
    router: Option<crate::router::Router>,
    /// Set in a fleet (`[fleet]`): who leads, queued etcd writes, fleet-wide counters.
    fleet: Option<crate::fleet::Link>,
    /// Each backend name's latest answer, and the names whose last lookup failed.
    resolved: crate::config::Resolved,
    lookup_errors: BTreeMap<crate::config::BackendName, String>,
}

/// The agent behind the daemon's mutex; a panic while it was held is an error here.
pub(crate) fn lock(agent: &std::sync::Mutex<Agent>) -> Result<std::sync::MutexGuard<'_, Agent>> {
    agent.lock().map_err(|_| anyhow!("agent state poisoned"))
}

/// Everything in files that can be wrong, checked before the kernel is touched: each
/// service's policy, and that PromQL metrics have a Prometheus to ask.
fn load_policies(config: &Config) -> Result<Vec<Option<Policy>>> {
    config
        .services
        .iter()
        .map(|svc| {
            let Some(path) = &svc.policy else {
                return Ok(None);
            };
            let policy = load_policy(path).map_err(|e| {
                anyhow!(
                    "{}: service {:?}: policy: {e}",
                    config.path.display(),
                    svc.name
                )
            })?;
            crate::router::check_service(svc, &policy)
                .map_err(|e| anyhow!("{}: {e}", config.path.display()))?;
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
            Ok(Some(policy))
        })
        .collect()
}

/// Each service's request rules (none without a policy), in config order.
fn routings(policies: &[Option<Policy>]) -> Vec<crate::policy::Routing> {
    policies
        .iter()
        .map(|p| p.as_ref().map(|p| p.routing.clone()).unwrap_or_default())
        .collect()
}

/// Detaches the datapath and deletes its pins and the agent's state (`canary uninstall`).
/// Returns the interfaces detached.
pub fn uninstall(bpffs_dir: &Path, state_dir: &Path) -> Result<Vec<String>> {
    let detached = datapath::remove_all(bpffs_dir)?;
    StateDir::remove_all(state_dir)?;
    Ok(detached)
}

impl Agent {
    /// Checks `config`'s files, loads the dataplane with `load` (the daemon's reuses
    /// what an earlier agent pinned), applies `config` as the desired state and
    /// attaches to its interfaces. Returns the agent and the signal an uninstall
    /// request raises.
    pub fn start(
        config: Config,
        clock: Arc<dyn Clock>,
        load: impl FnOnce(&Config) -> Result<Box<dyn Dataplane>>,
    ) -> Result<(Self, Arc<tokio::sync::Notify>)> {
        let policies = load_policies(&config)?;
        let state = StateDir::open(&config.agent.state_dir)?;
        let applied = state.load_applied()?;
        let mut rollouts = BTreeMap::new();
        for svc in &config.services {
            if let Some(r) = state.load_rollout(&svc.name)? {
                rollouts.insert(svc.name.clone(), r);
            }
        }
        let datapath = load(&config)?;
        let uninstall = Arc::new(tokio::sync::Notify::new());
        let series = series::Series::new(&config.agent.state_dir);
        let mut agent = Self {
            series,
            datapath,
            services: Vec::new(),
            clock,
            config: config.clone(),
            state,
            applied,
            webhooks_in_flight: HashSet::new(),
            alerts: Vec::new(),
            uninstall: uninstall.clone(),
            router: None,
            fleet: None,
            resolved: Default::default(),
            lookup_errors: BTreeMap::new(),
        };
        let routings = routings(&policies);
        agent.apply(config, policies, rollouts)?;
        agent.start_router(routings)?;
        // A drain interrupted by the restart goes on (it stops at once if no canary
        // connection is left).
        let rolled_back: Vec<String> = agent
            .services
            .iter()
            .filter(|s| {
                s.rollout
                    .as_ref()
                    .is_some_and(|r| r.state() == RolloutState::RolledBack)
            })
            .map(|s| s.cfg.name.clone())
            .collect();
        for name in rolled_back {
            agent.start_drain(&name)?;
        }
        Ok((agent, uninstall))
    }

    /// Re-reads the config file and applies it without a restart: weights, services,
    /// backends, policies and interfaces. A config that fails validation, or that
    /// changes what only a restart can (sockets, directories), is refused whole and
    /// the running one stays. Returns what changed.
    pub fn reload(&mut self) -> Result<Vec<String>> {
        let config = Config::load(&self.config.path)?.with_resolved(&self.resolved);
        self.reload_config(config)
    }

    /// [`Agent::reload`] of an already loaded config.
    fn reload_config(&mut self, config: Config) -> Result<Vec<String>> {
        let (old, new) = (&self.config.agent, &config.agent);
        let fixed = [
            (
                "[agent] control_socket",
                old.control_socket != new.control_socket,
            ),
            ("[agent] bpffs_dir", old.bpffs_dir != new.bpffs_dir),
            ("[agent] state_dir", old.state_dir != new.state_dir),
            (
                "[agent] metrics_listen",
                old.metrics_listen != new.metrics_listen,
            ),
            ("[agent] ui_listen", old.ui_listen != new.ui_listen),
            ("[agent] ui_hosts", old.ui_hosts != new.ui_hosts),
            ("[agent] node_name", old.node_name != new.node_name),
            ("[agent] region", old.region != new.region),
            ("[agent] zone", old.zone != new.zone),
            (
                "[agent] dns",
                (&old.dns, old.dns_min_ttl, old.dns_max_ttl)
                    != (&new.dns, new.dns_min_ttl, new.dns_max_ttl),
            ),
            ("[fleet]", self.config.fleet != config.fleet),
        ];
        if let Some((field, _)) = fixed.iter().find(|(_, changed)| *changed) {
            bail!(
                "{}: {field} changed: that takes an agent restart (the datapath \
                 stays attached across it); nothing was applied",
                config.path.display()
            );
        }
        let policies = load_policies(&config)?;
        // The router's listeners are fixed until a restart: a service cannot move
        // between the router and the kernel's client-address decision on a reload.
        let routed = |cfg: &crate::config::ServiceConfig, policy: Option<&Policy>| {
            cfg.protocol == crate::config::Protocol::Http
                && !policy.is_none_or(|p| p.routing.head_free())
        };
        for (cfg, policy) in config.services.iter().zip(&policies) {
            let Some(old) = self.services.iter().find(|s| s.cfg.name == cfg.name) else {
                continue;
            };
            if routed(&old.cfg, old.policy.as_ref()) != routed(cfg, policy.as_ref()) {
                bail!(
                    "{}: service {:?}: its requests would move between the router (rules \
                     that read the request head) and the kernel (client-cidr and default \
                     cohorts only): that takes a hand-over (SIGUSR2); nothing was applied",
                    config.path.display(),
                    cfg.name
                );
            }
        }
        let http: Vec<&crate::config::ServiceConfig> = config
            .services
            .iter()
            .zip(&policies)
            .filter(|(cfg, policy)| routed(cfg, policy.as_ref()))
            .map(|(cfg, _)| cfg)
            .collect();
        match &self.router {
            Some(router) => router
                .check_reload(&http)
                .map_err(|e| anyhow!("{}: {e}; nothing was applied", config.path.display()))?,
            None if !http.is_empty() => bail!(
                "{}: service {:?} is protocol = \"http\" and this agent routes no service: \
                 that takes a hand-over (SIGUSR2), not a reload; nothing was applied",
                config.path.display(),
                http[0].name
            ),
            None => {}
        }
        let routings = routings(&policies);
        let rollouts = self
            .services
            .iter()
            .filter_map(|s| Some((s.cfg.name.clone(), s.rollout.clone()?)))
            .collect();
        let changes = self.apply(config, policies, rollouts)?;
        if let Some(router) = &self.router {
            router.reload(self.routed_services(routings));
        }
        Ok(changes)
    }

    /// Makes the kernel, the disk and `self.services` match `config`.
    fn apply(
        &mut self,
        config: Config,
        policies: Vec<Option<Policy>>,
        rollouts: BTreeMap<String, Rollout>,
    ) -> Result<Vec<String>> {
        let now_ms = self.clock.now_ms();
        // The services of the config applied last: those this one lacks are removed,
        // and their rollout state must not come back if they are configured again.
        let previous: Vec<String> = self.applied.services.keys().cloned().collect();
        let installed = self.datapath.installed()?;
        let values: Vec<_> = installed.iter().map(|(k, e)| (*k, e.value)).collect();
        let current = Current {
            installed: &values,
            applied: &self.applied,
            rollouts: &rollouts,
        };
        let plan = desired::plan(&config.services, &policies, &current, now_ms);
        let mut changes = Vec::new();
        // The kernel first, every write journaled: if one fails, the ones before it are
        // undone and `self` and the disk still describe the running services.
        let mut journal = Journal::new(&installed);
        let applied = match self.write_kernel(&config, plan, policies, &mut journal, &mut changes) {
            Ok(applied) => applied,
            Err(e) => {
                journal.undo(self.datapath.as_mut());
                let redirect = self
                    .config
                    .services
                    .iter()
                    .any(|s| s.forward == crate::config::Forward::Redirect);
                let _ = self.datapath.set_replies_at_ingress(redirect);
                return Err(e);
            }
        };
        self.datapath.finish_upgrade()?;
        for (svc, decided, _, _) in &applied {
            if decided.rollout_changed {
                match &decided.rollout {
                    Some(r) => self.state.save_rollout(&svc.name, r)?,
                    None => self.state.remove_rollout(&svc.name)?,
                }
            }
        }
        for name in &previous {
            if !config.services.iter().any(|s| &s.name == name) {
                self.state.remove_rollout(name)?;
                self.state.archive_events(name, now_ms)?;
                changes.push(format!("{name}: removed"));
            }
        }
        self.applied = Applied {
            services: config
                .services
                .iter()
                .map(|s| {
                    let record = AppliedService {
                        config_weight_bp: s.weight_bp,
                    };
                    (s.name.clone(), record)
                })
                .collect(),
        };
        self.state.save_applied(&self.applied)?;
        let mut old: BTreeMap<String, LiveService> = std::mem::take(&mut self.services)
            .into_iter()
            .map(|s| (s.cfg.name.clone(), s))
            .collect();
        for (cfg, decided, policy, key) in applied {
            // The analysis keeps its windows when the policy did not change, and a
            // drain in progress goes on.
            let before = old.remove(&cfg.name).filter(|b| b.id == decided.id);
            let draining = before.as_ref().is_some_and(|b| b.draining);
            let health =
                crate::health::for_config(&cfg, before.as_ref().and_then(|b| b.health.as_ref()));
            let analysis = match before {
                Some(b) if b.policy == policy => b.analysis,
                _ => policy.as_ref().and_then(Analysis::new),
            };
            self.services.push(LiveService {
                health,
                kernel: decided.kernel,
                retiring: None,
                cfg,
                id: decided.id,
                key,
                weight_bp: decided.weight_bp,
                policy,
                rollout: decided.rollout,
                analysis,
                custom: BTreeMap::new(),
                draining,
            });
        }
        self.config = config;
        Ok(changes)
    }

    /// The kernel's part of [`Agent::apply`]: services installed, stale ones removed,
    /// interfaces attached, then removed interfaces detached and old client-address
    /// tables dropped (the last two only once nothing can fail any more, as they are not
    /// undone).
    fn write_kernel(
        &mut self,
        config: &Config,
        plan: desired::Plan,
        policies: Vec<Option<Policy>>,
        journal: &mut Journal,
        changes: &mut Vec<String>,
    ) -> Result<Vec<Applying>> {
        let mut applied = Vec::new();
        let mut cidr_tables = std::collections::BTreeSet::new();
        self.datapath.set_replies_at_ingress(
            config
                .services
                .iter()
                .any(|s| s.forward == crate::config::Forward::Redirect),
        )?;
        for ((svc, decided), policy) in config.services.iter().zip(plan.services).zip(policies) {
            let svc = &if decided.released {
                svc.released()
            } else {
                svc.clone()
            };
            if decided.fresh {
                self.datapath.clear_stats(decided.id)?;
            }
            let routing = policy.as_ref().map(|p| &p.routing);
            let key = service_key_for(svc, routing.unwrap_or(&Default::default()));
            // A reload keeps what the checks found: a down backend stays out.
            let known = self.services.iter().find(|s| s.cfg.name == svc.name);
            let down = crate::health::for_config(svc, known.and_then(|s| s.health.as_ref()))
                .map_or_else(Default::default, |h| h.selection().down);
            let mut entry = encode_service(svc, decided.id, decided.weight_bp).with_down(down);
            let value = &mut entry.value;
            let table = routing.and_then(|r| r.kernel_table());
            if let (Some(kernel), Some(table)) = (&decided.kernel, &table) {
                // The new table under the other generation first; the value below
                // switches to it.
                self.datapath
                    .write_cidr(decided.id, kernel.gen, table)
                    .map_err(|e| anyhow!("service {:?}: {e:#}", svc.name))?;
                kernel.apply(value);
                cidr_tables.insert((decided.id, kernel.gen));
            }
            journal.install(self.datapath.as_mut(), &key, &entry)?;
            for note in &decided.notes {
                changes.push(format!("{}: {note}", svc.name));
            }
            tracing::info!(
                service = %svc.name, id = decided.id, weight_bp = decided.weight_bp,
                rollout = ?decided.rollout.as_ref().map(|r| r.state()), notes = ?decided.notes,
                "service applied"
            );
            applied.push((svc.clone(), decided, policy, key));
        }
        for key in plan.stale {
            journal.uninstall(self.datapath.as_mut(), &key)?;
            tracing::info!(?key, "removed a service no longer in the config");
        }
        let pinned = self.datapath.attached()?;
        for iface in &config.agent.interfaces {
            self.datapath.attach(iface, config.agent.ingress_hook)?;
            if !pinned.contains(iface) {
                changes.push(format!("interface {iface}: attached"));
            }
        }
        for iface in pinned
            .iter()
            .filter(|i| !config.agent.interfaces.contains(i))
        {
            self.datapath.detach(iface)?;
            changes.push(format!("interface {iface}: detached"));
        }
        // Old generations, and the tables of services removed or no longer decided in
        // the kernel.
        self.datapath.retain_cidr(&cidr_tables)?;
        Ok(applied)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The router, taken by the daemon to hand it over or drain it as it exits.
    pub fn take_router(&mut self) -> Option<crate::router::Router> {
        self.router.take()
    }

    /// A service's gate webhook call has ended: the next one may start.
    pub fn gate_call_done(&mut self, service: &str) {
        self.webhooks_in_flight.remove(service);
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
            .is_some_and(|r| r.state().is_running()))
    }

    /// Changes a service's canary weight with one map write. In a fleet the weight
    /// goes to etcd instead, and every node (this one too) writes its map when the
    /// watch brings it: no node changes a weight that etcd has not recorded.
    ///
    /// While a rollout runs in waves each region has its weight: this node writes its
    /// own region's, and etcd gets every region's.
    pub fn set_weight(&mut self, name: &str, weight_bp: u16) -> Result<()> {
        let svc = self.services.iter().find(|s| s.cfg.name == name);
        let svc = svc.ok_or_else(|| anyhow!("no service named {name:?}"))?;
        let (others, regions) = svc.wave_weights(weight_bp);
        let Some(link) = &self.fleet else {
            let region = self.config.agent.region.as_deref();
            let own = crate::fleet::region_weight(&regions, others, region);
            return self.write_weight(name, own);
        };
        if weight_bp > canary_common::WEIGHT_SCALE {
            bail!("weight {weight_bp} bp is above 100 %");
        }
        if weight_bp > 0 && svc.cfg.canary.is_empty() {
            bail!("service {name:?} has no canary backends");
        }
        link.push(crate::fleet::Write::Weight {
            service: name.into(),
            weight_bp: others,
            regions,
            released: Vec::new(),
        });
        Ok(())
    }

    /// The map write of [`Agent::set_weight`], on this node only.
    fn write_weight(&mut self, name: &str, weight_bp: u16) -> Result<()> {
        if weight_bp > canary_common::WEIGHT_SCALE {
            bail!("weight {weight_bp} bp is above 100 %");
        }
        let svc = self.service_mut(name)?;
        if weight_bp > 0 && svc.cfg.canary.is_empty() {
            bail!("service {name:?} has no canary backends");
        }
        let down = svc.sync_health();
        let mut entry = encode_service(&svc.cfg, svc.id, weight_bp).with_down(down);
        let value = &mut entry.value;
        // A rollback's weight and the cohorts' closing on canary: one write.
        let rolled_back = svc
            .rollout
            .as_ref()
            .is_some_and(|r| r.state() == RolloutState::RolledBack);
        let kernel = svc.kernel.map(|k| KernelRouting { rolled_back, ..k });
        if let Some(k) = &kernel {
            k.apply(value);
        }
        // The proxy reads the flag per request: the rollback takes its next request.
        value.rolled_back = rolled_back as u8;
        let key = svc.key;
        self.datapath.install(&key, &entry)?;
        let svc = self.service_mut(name)?;
        svc.kernel = kernel;
        tracing::info!(
            service = name,
            from = svc.weight_bp,
            to = weight_bp,
            "weight changed"
        );
        if weight_bp > 0 {
            svc.draining = false;
        }
        svc.weight_bp = weight_bp;
        Ok(())
    }

    /// Starts closing the canary's open connections at request boundaries, unless the
    /// policy keeps them.
    fn start_drain(&mut self, name: &str) -> Result<()> {
        let svc = self.service_mut(name)?;
        let keep = svc
            .policy
            .as_ref()
            .is_some_and(|p| p.on_rollback == OnRollback::Keep);
        if !keep && svc.weight_bp == 0 {
            svc.draining = true;
            tracing::info!(
                service = name,
                "draining canary connections at request boundaries"
            );
        }
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
            // Requests of a routed service are sent by the proxy, not placed by the
            // kernel: a backend's count is its connections plus the proxy's requests.
            let routed = self
                .router
                .as_ref()
                .and_then(|r| r.backend_requests(svc.id));
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
                    let source =
                        self.backend_source(&svc.cfg, (slot >= MAX_GROUP_BACKENDS) as usize, *addr);
                    let health = svc.health.as_ref().and_then(|h| {
                        let b = h.groups[(slot >= MAX_GROUP_BACKENDS) as usize]
                            .get(slot % MAX_GROUP_BACKENDS)?;
                        let state = if b.down() { "down" } else { "up" };
                        Some(BackendHealthStatus {
                            state: state.into(),
                            reason: b.why().into(),
                            since_ms: b.since_ms,
                            checks: b.checks,
                            failures: b.failures,
                            ejected_until_ms: b.ejected_until_ms,
                            ejections: b.ejected_total,
                        })
                    });
                    BackendStatus {
                        health,
                        group: group.into(),
                        address: addr.to_string(),
                        source,
                        connections: s.connections + routed.as_ref().map_or(0, |r| r[slot]),
                        handshakes: s.handshakes,
                        refused: s.refused,
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
                draining: svc.draining,
                baseline: svc.baseline(),
                health_check: svc.health.as_ref().map(|h| h.describe()),
                names: self.discovery_status(&svc.cfg),
                stray_segments: self.datapath.stray(svc.id)?,
                routing: match (&svc.kernel, &svc.policy) {
                    (Some(_), Some(p)) => Some(crate::router::kernel::status(
                        &p.routing,
                        &self.datapath.decisions(svc.id)?,
                    )),
                    _ => self.router.as_ref().and_then(|r| r.status(svc.id)),
                },
                analysis: svc
                    .verdicts()
                    .iter()
                    .map(serde_json::to_value)
                    .collect::<Result<_, _>>()?,
            });
        }
        Ok(Status {
            services,
            fleet: None,
        })
    }

    pub fn handle(&mut self, request: Request) -> Result<serde_json::Value> {
        self.fleet_check(&request)?;
        let status = |agent: &Self, service: &str| -> Result<serde_json::Value> {
            Ok(serde_json::to_value(agent.status(Some(service))?)?)
        };
        match request {
            Request::Status { service } => {
                Ok(serde_json::to_value(self.status(service.as_deref())?)?)
            }
            Request::SetWeight {
                service,
                weight_bp,
                by,
                reason,
            } => {
                if self.rollout_running(&service)? {
                    let command = Command::SetWeight { bp: weight_bp };
                    self.noted_command(&service, command, Actor::Operator(by), &reason)?;
                } else {
                    self.operator_set_weight(&service, weight_bp, &by)?;
                }
                status(self, &service)
            }
            Request::Rollout {
                service,
                action,
                by,
            } => {
                let actor = Actor::Operator(by.clone());
                let mut note = String::new();
                let command = match action {
                    RolloutAction::Start => Command::Start,
                    RolloutAction::Pause { reason } => Command::Pause { reason },
                    RolloutAction::Resume { reason } => Command::Resume { reason },
                    RolloutAction::Approve { reason } => {
                        note = reason;
                        Command::Approve { by }
                    }
                    RolloutAction::Promote { full, reason } => {
                        note = reason;
                        Command::Promote { full }
                    }
                    RolloutAction::Rollback { reason } => {
                        if !self.rollout_running(&service)? {
                            // Emergency rollback works with or without a rollout.
                            self.set_weight(&service, 0)?;
                            self.start_drain(&service)?;
                            tracing::warn!(%service, %reason, "emergency rollback to stable");
                            return status(self, &service);
                        }
                        Command::Rollback { reason }
                    }
                };
                self.noted_command(&service, command, actor, &note)?;
                status(self, &service)
            }
            Request::History { service } => {
                self.service_mut(&service)?;
                Ok(serde_json::to_value(self.state.events(&service).read()?)?)
            }
            Request::Reload => {
                let changes = self.reload()?;
                Ok(serde_json::json!({ "changes": changes }))
            }
            Request::Uninstall => {
                let interfaces = self.datapath.attached()?;
                self.uninstall.notify_one();
                Ok(serde_json::json!({ "uninstalling": true, "interfaces": interfaces }))
            }
        }
    }

    /// Applies an operator or automatic command to a service's rollout.
    pub fn rollout_command(&mut self, name: &str, command: Command, actor: Actor) -> Result<()> {
        self.noted_command(name, command, actor, "")
    }

    /// [`Agent::rollout_command`], adding the operator's `note` (a reason the
    /// controller's own wording lacks) to the events it records.
    fn noted_command(
        &mut self,
        name: &str,
        command: Command,
        actor: Actor,
        note: &str,
    ) -> Result<()> {
        let now = self.clock.now_ms();
        let svc = self.service_mut(name)?;
        let Some(policy) = &svc.policy else {
            bail!("service {name:?} has no rollout policy (set `policy = \"FILE\"` in its config)");
        };
        let starting = command == Command::Start
            && svc.rollout.as_ref().is_none_or(|r| r.state().is_terminal());
        if starting && policy.steps.is_empty() {
            bail!(
                "service {name:?}'s policy has routing rules only: its canary weight is the \
                 service's (`canary set-weight`); a rollout needs a progression"
            );
        }
        if let Some(release) = svc.rollout.as_ref().and_then(|r| r.released()) {
            if starting {
                bail!(
                    "service {name:?}'s release finished: {} holds the stable role. Name it \
                     `stable` and the next version `canary` in the config and reload; a new \
                     rollout then starts from there",
                    release.backends.join(", ")
                );
            }
        }
        if starting {
            svc.rollout = Some(Rollout::new(name, policy.clone()));
        }
        let rollout = svc.rollout.as_mut().ok_or_else(|| {
            anyhow!("service {name:?} has no rollout yet: `canary rollout start {name}` begins one")
        })?;
        let mut effects = rollout.apply(command, actor, now)?;
        let note = note.trim();
        for effect in effects.iter_mut() {
            if let Effect::Transition(event) = effect {
                if !note.is_empty() && !event.reason.contains(note) {
                    event.reason = format!("{} (reason: {note})", event.reason);
                }
            }
        }
        self.apply_effects(name, effects)
    }

    fn apply_effects(&mut self, name: &str, effects: Vec<Effect>) -> Result<()> {
        let mut rolled_back = false;
        let mut released = false;
        for effect in effects {
            match effect {
                Effect::SetWeight(bp) => self.set_weight(name, bp)?,
                Effect::Transition(event) => {
                    tracing::info!(
                        service = name, from = %event.from, to = %event.to,
                        weight_bp = event.weight_bp, reason = %event.reason, "rollout"
                    );
                    rolled_back |= event.to == RolloutState::RolledBack
                        && event.from != RolloutState::RolledBack;
                    self.state.events(name).append(&event)?;
                    if let Some(link) = &self.fleet {
                        link.push(crate::fleet::Write::Event(Box::new(event)));
                    }
                }
                Effect::GateWaiting { stage, webhook } => {
                    let webhook = webhook.as_deref().map(crate::webhook::redact_url);
                    tracing::info!(service = name, %stage, ?webhook, "gate waiting for approval");
                }
                Effect::Alert { kind, reason } => {
                    tracing::warn!(service = name, %kind, %reason, "rollout alert");
                    self.alert(name, &kind, &reason);
                }
                Effect::Released => released = true,
            }
        }
        if rolled_back {
            self.start_drain(name)?;
        }
        if released {
            self.release(name)?;
        }
        let svc = self.services.iter().find(|s| s.cfg.name == name);
        if let Some(r) = svc.and_then(|s| s.rollout.as_ref()) {
            self.state.save_rollout(name, r)?;
            if let Some(link) = &self.fleet {
                link.push(crate::fleet::Write::Rollout {
                    service: name.into(),
                    rollout: Box::new(r.clone()),
                });
            }
        }
        Ok(())
    }

    /// The old version holds nothing any more: the canary backends take the stable role
    /// in one map write (canary group empty, weight 0), the rollout records them, and
    /// the pipeline hears `released` on the alert webhook. A follower does the same when
    /// the leader's rollout it mirrors has finished; doing it twice changes nothing.
    fn release(&mut self, name: &str) -> Result<()> {
        let svc = self.service_mut(name)?;
        if svc.cfg.canary.is_empty() {
            return Ok(());
        }
        let retired: Vec<String> = svc.cfg.stable.iter().map(|a| a.to_string()).collect();
        let backends: Vec<String> = svc.cfg.canary.iter().map(|a| a.to_string()).collect();
        if let Some(r) = svc.rollout.as_mut() {
            r.record_release(backends.clone());
        }
        let released = svc.cfg.released();
        let before = std::mem::replace(&mut svc.cfg, released);
        if let Err(e) = self.write_weight(name, 0) {
            self.service_mut(name)?.cfg = before;
            return Err(e.context("handing the stable role to the released version"));
        }
        tracing::info!(service = name, stable = ?backends, retired = ?retired, "release finished: the old version may be deleted");
        // The other nodes hand over in the same way when they read this weight.
        if let Some(link) = self.fleet.as_ref().filter(|l| l.leading()) {
            link.push(crate::fleet::Write::Weight {
                service: name.into(),
                weight_bp: 0,
                regions: Default::default(),
                released: backends.clone(),
            });
        }
        if self.fleet_leading() && self.config.agent.alert_webhook.is_some() {
            let summary = self.release_summary(name)?;
            self.alerts.push(serde_json::json!({
                "event": "released",
                "service": name,
                "at_ms": self.clock.now_ms(),
                "stable": backends,
                "retired": retired,
                "summary": summary,
            }));
        }
        Ok(())
    }

    /// The finished rollout in brief, for the `released` webhook: when it started, was
    /// promoted and finished, its steps, and the analysis' last verdicts.
    fn release_summary(&self, name: &str) -> Result<serde_json::Value> {
        let events = self.state.events(name).read()?;
        let started = events
            .iter()
            .rposition(|e| e.reason.starts_with("rollout started"))
            .unwrap_or(0);
        let run = &events[started..];
        let at = |state: RolloutState| run.iter().find(|e| e.to == state).map(|e| e.at_ms);
        let svc = self.services.iter().find(|s| s.cfg.name == name);
        Ok(serde_json::json!({
            "started_at_ms": run.first().map(|e| e.at_ms),
            "promoted_at_ms": at(RolloutState::Promoted),
            "retiring_at_ms": at(RolloutState::Retiring),
            "finished_at_ms": at(RolloutState::Finished),
            "events": run.len(),
            "steps": svc.and_then(|s| s.policy.as_ref()).map_or(0, |p| p.steps.len()),
            "verdicts": svc.map_or(&[][..], |s| s.verdicts()),
        }))
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
        if self.config.agent.alert_webhook.is_some() {
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
        let url = self.config.agent.alert_webhook.clone()?;
        (!self.alerts.is_empty()).then(|| (url, std::mem::take(&mut self.alerts)))
    }

    /// Advances every rollout on the clock (analysis first, once per second) and
    /// returns the gate webhooks to call.
    pub fn tick(&mut self) -> Vec<GateCall> {
        let now = self.clock.now_ms();
        if let Err(e) = self.state.record_clock(now) {
            tracing::warn!(error = %format!("{e:#}"), "recording the controller clock");
        }
        let mut calls = Vec::new();
        for i in 0..self.services.len() {
            let name = self.services[i].cfg.name.clone();
            if let Err(e) = self.tick_service(i, now) {
                tracing::error!(service = %name, error = %format!("{e:#}"), "tick");
            }
            let svc = &self.services[i];
            let rolled_back = svc
                .rollout
                .as_ref()
                .is_some_and(|r| r.state() == RolloutState::RolledBack);
            if let Some(router) = &self.router {
                router.set_rolled_back(svc.id, rolled_back);
            }
            // A rollout state that changed without a weight write (a fleet follower
            // given the leader's rollout): the kernel's cohorts follow it.
            if svc.kernel.is_some_and(|k| k.rolled_back != rolled_back) {
                let weight_bp = svc.weight_bp;
                if let Err(e) = self.write_weight(&name, weight_bp) {
                    tracing::error!(service = %name, error = %format!("{e:#}"), "marking the rollback in the kernel");
                }
            }
            let svc = &self.services[i];
            if !self.fleet_leading() {
                continue;
            }
            let Some(status) = svc.rollout.as_ref().map(|r| r.status(now)) else {
                continue;
            };
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

    fn tick_service(&mut self, i: usize, now: u64) -> Result<()> {
        let name = self.services[i].cfg.name.clone();
        let mut read = None;
        // In a fleet only the leader runs rollouts, on counters summed over all nodes.
        let leading = self.fleet_leading();
        if leading && self.services[i].wants_observation(now / 1000) {
            let counters = match self.fleet {
                Some(_) => self.fleet_counters(i),
                None => Some(self.read_counters(i)?),
            };
            if let Some((stable, canary)) = counters {
                let effects = self.services[i].observe(now, &stable, &canary)?;
                self.apply_effects(&name, effects)?;
                if self.fleet.is_none() {
                    read = Some((stable, canary));
                }
            }
        }
        if self.series.due(&name, now / 1000) {
            let (stable, canary) = match read {
                Some(counters) => counters,
                None => self.read_counters(i)?,
            };
            // The series are for people: a failure to store them must not stop a rollout.
            if let Err(e) = self.series.record(&self.services[i], now, &stable, &canary) {
                tracing::warn!(service = %name, error = %format!("{e:#}"), "recording the series");
            }
        }
        let effects = if leading {
            self.skip_empty_waves(i, now)?;
            self.services[i].tick(now)
        } else {
            Vec::new()
        };
        if !effects.is_empty() {
            self.apply_effects(&name, effects)?;
        }
        self.retire(i, now, leading)?;
        self.observe_backends(i, now)?;
        if self.services[i].draining {
            let id = self.services[i].id;
            let now = std::time::Instant::now();
            let scan = self
                .datapath
                .drain(id, DrainGroup::Canary, DrainMode::AtBoundaries, now);
            let progress = match scan {
                Ok(progress) => progress,
                Err(e) => {
                    // Said once, not every tick: the canary keeps its open connections.
                    self.services[i].draining = false;
                    return Err(e.context("draining canary connections (stopped)"));
                }
            };
            if progress.closed > 0 {
                tracing::info!(service = %name, closed = progress.closed, remaining = progress.remaining, "closed idle canary connections");
            }
            if progress.remaining == 0 {
                self.services[i].draining = false;
                tracing::info!(service = %name, "canary drained: no connection left on it");
            }
        }
        Ok(())
    }

    /// Skips the waves ahead of service `i`'s rollout that no node is in (the fleet's
    /// reporting nodes, or this node alone); nothing before the fleet's first reports.
    fn skip_empty_waves(&mut self, i: usize, now: u64) -> Result<()> {
        let Some(rollout) = self.services[i]
            .rollout
            .as_ref()
            .filter(|r| r.wave().is_some())
        else {
            return Ok(());
        };
        let policy = rollout.policy().clone();
        let regions: Vec<Option<String>> = match &self.fleet {
            Some(link) => link.regions().into_values().collect(),
            None => vec![self.config.agent.region.clone()],
        };
        if regions.is_empty() {
            return Ok(());
        }
        let has_nodes = |wave: usize| {
            regions
                .iter()
                .any(|r| policy.wave_of(r.as_deref()) == Some(wave))
        };
        let effects = match self.services[i].rollout.as_mut() {
            Some(r) => r.skip_empty_waves(now, has_nodes),
            None => Vec::new(),
        };
        let name = self.services[i].cfg.name.clone();
        self.apply_effects(&name, effects)
    }

    /// While service `i` retires its old version: one scan of the old stable's
    /// connections (closed or counted as the rollout says), and on the leader the
    /// count handed to the rollout, which finishes the release when none remain.
    fn retire(&mut self, i: usize, now: u64, leading: bool) -> Result<()> {
        let Some(action) = self.services[i]
            .rollout
            .as_ref()
            .and_then(|r| r.retire_action())
        else {
            self.services[i].retiring = None;
            return Ok(());
        };
        let mode = match action {
            RetireAction::AtBoundaries => DrainMode::AtBoundaries,
            RetireAction::CloseNow => DrainMode::Now,
            RetireAction::Wait => DrainMode::Count,
        };
        let (id, name) = (self.services[i].id, self.services[i].cfg.name.clone());
        let progress = self
            .datapath
            .drain(id, DrainGroup::Stable, mode, std::time::Instant::now())
            .map_err(|e| e.context("retiring the old version's connections"))?;
        if progress.closed > 0 {
            tracing::info!(service = %name, closed = progress.closed, remaining = progress.remaining, ?mode, "closed connections of the old version");
        }
        self.services[i].retiring = Some(progress.remaining as u64);
        if !leading {
            return Ok(());
        }
        // In a fleet the others' count too; one that has not begun retiring holds
        // the release back.
        let elsewhere = match &self.fleet {
            Some(link) => link.retiring_elsewhere(&name).unwrap_or(1),
            None => 0,
        };
        let remaining = (progress.remaining as u64).saturating_add(elsewhere);
        let effects = match self.services[i].rollout.as_mut() {
            Some(r) => r.observe_retiring(now, remaining),
            None => Vec::new(),
        };
        self.apply_effects(&name, effects)
    }

    /// This second's cumulative counters of stable and canary, for the analysis.
    fn read_counters(
        &self,
        i: usize,
    ) -> Result<(
        crate::analysis::VersionCounters,
        crate::analysis::VersionCounters,
    )> {
        let svc = &self.services[i];
        let tcp = svc.cfg.protocol != crate::config::Protocol::Udp;
        let signals = self.datapath.signals(svc.id)?;
        let routed = self.router.as_ref().and_then(|r| r.signals(svc.id));
        let counters = |version: usize| {
            let conn_new = signals[version].connections;
            let t = &signals[version].counters;
            crate::analysis::VersionCounters {
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
                custom: svc
                    .custom
                    .iter()
                    .map(|(k, v)| (k.clone(), v[version]))
                    .collect(),
            }
        };
        // Requests of a routed service go through the proxy, which counts them (the
        // kernel counts only upgraded connections' bytes): its requests, classes and
        // latency add to the kernel's; its backend connections are the version's.
        let with_router = |version: usize| {
            let mut c = counters(version);
            if let Some(r) = routed.as_ref().map(|r| &r[version]) {
                c.requests += r.requests;
                for (a, b) in c.responses.iter_mut().zip(r.responses) {
                    *a += b;
                }
                for (a, b) in c.latency.iter_mut().zip(&r.latency) {
                    *a += b;
                }
                c.conn_new = r.connections;
                c.conn_failed = r.connections.saturating_sub(r.connected);
            }
            c
        };
        Ok((with_router(0), with_router(1)))
    }

    /// Starts the router when the config has `http` services whose rules read the head
    /// (the set is fixed until a hand-over; rules change on reload, weights and
    /// backends are read live from the services map).
    fn start_router(&mut self, routings: Vec<crate::policy::Routing>) -> Result<()> {
        let routed = self.routed_services(routings);
        // Sockets a previous agent image handed over (SIGUSR2), if this is one.
        let inherited = crate::router::handover::Record::inherited()?;
        if routed.is_empty() {
            if let Some(r) = inherited {
                r.close();
            }
            return self.datapath.unroute();
        }
        let addrs: Vec<_> = routed.iter().map(|r| r.cfg.listen.ip()).collect();
        let splicer = self.datapath.route(&addrs)?;
        self.router = Some(crate::router::Router::start(splicer, routed, inherited)?);
        Ok(())
    }

    /// The config's `http` services with their rules and ids (after `apply`).
    fn routed_services(
        &self,
        routings: Vec<crate::policy::Routing>,
    ) -> Vec<crate::router::RoutedService> {
        self.config
            .services
            .iter()
            .zip(routings)
            // A head-free plan is decided in the kernel: no listener, no head read.
            .filter(|(cfg, routing)| {
                cfg.protocol == crate::config::Protocol::Http && !routing.head_free()
            })
            .filter_map(|(cfg, routing)| {
                let live = self.services.iter().find(|s| s.cfg.name == cfg.name)?;
                Some(crate::router::RoutedService {
                    id: live.id,
                    cfg: cfg.clone(),
                    routing,
                    limits: crate::router::HeadLimits {
                        max_bytes: cfg.head_limit,
                        timeout: std::time::Duration::from_secs(cfg.head_timeout_s),
                    },
                })
            })
            .collect()
    }
}
