//! The agent's narrow interface to `crate::fleet`: what the etcd task may ask of the
//! daemon (adopt or mirror rollouts, apply a desired weight, report counters, pause
//! and resume for etcd) and the follower rules (only the leader runs rollouts).

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};

use super::Agent;
use crate::{
    analysis::VersionCounters,
    api::Request,
    controller::{Actor, Command, Rollout, RolloutState},
    fleet::{Host, Link, NodeReport, ETCD_PAUSE},
};

impl Agent {
    pub fn join_fleet(&mut self, link: Link) {
        self.fleet = Some(link);
    }

    /// `/readyz`: the datapath is attached (the agent started), and in a fleet the node
    /// has applied the fleet's current weights once, so it splits as the others do.
    pub fn readiness(&self) -> Result<String, String> {
        match &self.fleet {
            None => Ok("ready".into()),
            Some(link) if link.synced() => Ok(format!(
                "ready: fleet weights applied ({})",
                if link.leading() { "leader" } else { "follower" }
            )),
            Some(_) => Err("waiting for the fleet's weights from etcd".into()),
        }
    }

    /// Whether this agent runs rollouts: always on its own, only as leader in a fleet.
    pub(super) fn fleet_leading(&self) -> bool {
        self.fleet.as_ref().is_none_or(Link::leading)
    }

    /// A follower acts on the fleet's rollout only through the leader
    /// (`fleet::dispatch` forwards such requests before they get here).
    pub(super) fn fleet_check(&self, request: &Request) -> Result<()> {
        if self.fleet_leading() {
            return Ok(());
        }
        if matches!(request, Request::SetWeight { .. } | Request::Rollout { .. }) {
            bail!(
                "this node follows the fleet's leader: rollout commands go through the control \
                 socket, which forwards them to the leader"
            );
        }
        Ok(())
    }

    /// The fleet-wide counters of service `i` for the leader's analysis: every node's
    /// kernel counters summed; PromQL metrics are fleet-wide already and come from
    /// this node's queries.
    pub(super) fn fleet_counters(&self, i: usize) -> Option<(VersionCounters, VersionCounters)> {
        let svc = &self.services[i];
        // While waves run, only the running wave's nodes count.
        let wave = svc
            .rollout
            .as_ref()
            .and_then(|r| r.wave().map(|w| (r.policy(), w)));
        let in_wave = |region: Option<&str>| wave.is_none_or(|(p, w)| p.wave_of(region) == Some(w));
        let [mut stable, mut canary] = self.fleet.as_ref()?.summed(&svc.cfg.name, in_wave)?;
        for (version, counters) in [&mut stable, &mut canary].into_iter().enumerate() {
            counters.custom = svc
                .custom
                .iter()
                .map(|(k, v)| (k.clone(), v[version]))
                .collect();
        }
        Some((stable, canary))
    }

    fn fleet_command(
        &mut self,
        which: impl Fn(RolloutState, &str) -> bool,
        command: impl Fn() -> Command,
    ) -> Vec<String> {
        let now = self.clock.now_ms();
        let names: Vec<String> = self
            .services
            .iter()
            .filter(|s| {
                s.rollout.as_ref().is_some_and(|r| {
                    let status = r.status(now);
                    which(status.state, &status.reason)
                })
            })
            .map(|s| s.cfg.name.clone())
            .collect();
        for name in &names {
            if let Err(e) = self.rollout_command(name, command(), Actor::Fleet) {
                tracing::error!(service = %name, error = %format!("{e:#}"), "fleet rollout command");
            }
        }
        names
    }
}

impl Host for Agent {
    fn fleet_link(&self) -> Option<Link> {
        self.fleet.clone()
    }

    /// Becoming leader: the rollouts stored in etcd replace this node's copies (same
    /// step, same dwell), a running rollout's weight is re-asserted, and every rollout
    /// is queued for etcd so the store holds them all.
    fn fleet_adopt(&mut self, mut stored: BTreeMap<String, Rollout>) {
        let names: Vec<String> = self.services.iter().map(|s| s.cfg.name.clone()).collect();
        for name in names {
            let Ok(svc) = self.service_mut(&name) else {
                continue;
            };
            if svc.policy.is_none() {
                continue;
            }
            if let Some(r) = stored.remove(&name) {
                svc.rollout = Some(r);
            }
            let Some(rollout) = svc.rollout.clone() else {
                continue;
            };
            if rollout.state().is_running() {
                if let Err(e) = self.set_weight(&name, rollout.weight_bp()) {
                    tracing::error!(service = %name, error = %format!("{e:#}"), "re-asserting the rollout's weight");
                }
            }
            // An error here only loses the local copy; etcd gets the state below.
            if let Err(e) = self.state.save_rollout(&name, &rollout) {
                tracing::warn!(service = %name, error = %format!("{e:#}"), "saving the adopted rollout");
            }
            if let Some(link) = &self.fleet {
                link.push(crate::fleet::Write::Rollout {
                    service: name,
                    rollout: Box::new(rollout),
                });
            }
        }
    }

    /// How much faster than real time the controller clock runs.
    fn clock_speed(&self) -> u32 {
        self.clock.speed()
    }

    /// A rollout read from etcd is taken only for a service this node has, under the
    /// very policy this node's config gives it (a writer to etcd cannot bring in
    /// other steps, gates or webhooks), at a weight of at most 100 %. etcd holds the
    /// policy without webhook secrets: the rollout returned has the local one.
    fn fleet_check_rollout(&self, service: &str, rollout: Rollout) -> Result<Rollout> {
        let svc = self
            .services
            .iter()
            .find(|s| s.cfg.name == service)
            .ok_or_else(|| anyhow!("no service named {service:?} on this node"))?;
        let Some(policy) = &svc.policy else {
            bail!("service {service:?} has no rollout policy on this node");
        };
        if *rollout.policy() != policy.redacted() {
            bail!("the rollout's policy is not the one this node's config gives {service:?}");
        }
        if rollout.weight_bp() > canary_common::WEIGHT_SCALE {
            bail!("weight {} bp is above 100 %", rollout.weight_bp());
        }
        Ok(rollout.with_policy(policy.clone()))
    }

    /// A follower keeps the leader's rollout (status shows it; a restart finds it).
    fn fleet_mirror(&mut self, service: &str, rollout: Rollout) -> Result<()> {
        let Ok(svc) = self.service_mut(service) else {
            return Ok(());
        };
        if svc.policy.is_none() || svc.rollout.as_ref() == Some(&rollout) {
            return Ok(());
        }
        svc.rollout = Some(rollout);
        let r = svc.rollout.clone().expect("just set");
        self.state.save_rollout(service, &r)
    }

    /// Applies the leader's desired weight to this node's map. A drop to 0 is a
    /// rollback: canary connections drain as the policy says.
    /// A release names the backends that took the stable role: a node whose canary
    /// they are hands over too (weight 0 on the released config).
    fn fleet_apply_weight(
        &mut self,
        service: &str,
        weight_bp: u16,
        released: &[String],
    ) -> Result<()> {
        let svc = self
            .service_mut(service)
            .map_err(|_| anyhow!("no service named {service:?} on this node"))?;
        let canary: Vec<String> = svc.cfg.canary.iter().map(|a| a.to_string()).collect();
        if !released.is_empty() && canary == released {
            return self.release(service);
        }
        let before = svc.weight_bp;
        if before == weight_bp {
            return Ok(());
        }
        self.write_weight(service, weight_bp)?;
        if weight_bp == 0 && before > 0 {
            self.start_drain(service)?;
        }
        Ok(())
    }

    /// This node's applied weights and cumulative kernel counters (without PromQL
    /// metrics, which the leader queries itself).
    fn fleet_report(&self) -> NodeReport {
        let mut report = NodeReport {
            region: self.config.agent.region.clone(),
            zone: self.config.agent.zone.clone(),
            ..NodeReport::default()
        };
        for (i, svc) in self.services.iter().enumerate() {
            report.weights.insert(svc.cfg.name.clone(), svc.weight_bp);
            if let Some(remaining) = svc.retiring {
                report.retiring.insert(svc.cfg.name.clone(), remaining);
            }
            match self.read_counters(i) {
                Ok((mut stable, mut canary)) => {
                    stable.custom.clear();
                    canary.custom.clear();
                    report
                        .counters
                        .insert(svc.cfg.name.clone(), [stable, canary]);
                }
                Err(e) => {
                    tracing::warn!(service = %svc.cfg.name, error = %format!("{e:#}"), "reading counters for the fleet")
                }
            }
        }
        report
    }

    /// etcd is unreachable: the leader pauses every rollout that would move, so no
    /// decision is taken that the other nodes cannot hear. Returns the services paused.
    fn fleet_pause(&mut self, reason: &str) -> Vec<String> {
        self.fleet_command(
            |state, _| {
                matches!(
                    state,
                    RolloutState::Progressing | RolloutState::AwaitingApproval
                )
            },
            || Command::Pause {
                reason: reason.to_string(),
            },
        )
    }

    /// etcd answers again: resumes the rollouts [`Host::fleet_pause`] paused.
    fn fleet_resume(&mut self) -> Vec<String> {
        self.fleet_command(
            |state, reason| state == RolloutState::Paused && reason.starts_with(ETCD_PAUSE),
            || Command::Resume {
                reason: "etcd is reachable again".into(),
            },
        )
    }

    fn now_ms(&self) -> u64 {
        Agent::now_ms(self)
    }

    fn handle(&mut self, request: Request) -> Result<serde_json::Value> {
        Agent::handle(self, request)
    }
}
