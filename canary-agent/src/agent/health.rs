//! The agent's side of health checks: what the daemon's prober must check, the
//! kernel's per-backend handshake counters for passive detection, and what a change
//! does (one map write of the service's value when a backend leaves or returns; a
//! rollback when no canary backend is left).

use std::net::SocketAddr;

use anyhow::Result;

use super::Agent;
use crate::{
    config::HealthCheck,
    controller::{Actor, Command, RolloutState},
    health::{Change, Selection, State, PASSIVE_PERIOD},
};

/// One backend the prober checks, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthTarget {
    pub service: String,
    /// The backend as configured (results are reported for it).
    pub backend: SocketAddr,
    /// Where the check connects (the check's port, if it names one).
    pub target: SocketAddr,
    pub check: HealthCheck,
}

/// The rule a canary without a healthy backend fires (status and history name it).
pub const HEALTH_RULE: &str = "health-check";

impl Agent {
    /// Every backend of every service that has `[service.health]`.
    pub fn health_targets(&self) -> Vec<HealthTarget> {
        let mut out = Vec::new();
        for svc in &self.services {
            let Some(h) = &svc.health else { continue };
            let Some(check) = &h.spec else { continue };
            for backend in h.addrs() {
                out.push(HealthTarget {
                    service: svc.cfg.name.clone(),
                    backend,
                    target: h.target(backend),
                    check: check.clone(),
                });
            }
        }
        out
    }

    /// Counts one check of `backend`. A backend that changed state changes the map
    /// value (new connections only: the flows it holds are left alone); a canary left
    /// with no backend up rolls a rollout in progress back.
    pub fn record_health(
        &mut self,
        service: &str,
        backend: SocketAddr,
        outcome: Result<(), String>,
    ) -> Result<()> {
        let now = self.clock.now_ms();
        let svc = self.service_mut(service)?;
        svc.sync_health();
        let Some(health) = svc.health.as_mut() else {
            return Ok(());
        };
        let before = health.selection();
        let changes = health.record(backend, outcome, now);
        self.health_changed(service, before, changes)
    }

    /// Passive detection, every [`PASSIVE_PERIOD`] for a service with
    /// `[service.outlier]`: the per-backend counters from the kernel.
    pub(super) fn observe_backends(&mut self, i: usize, now_ms: u64) -> Result<()> {
        let svc = &mut self.services[i];
        let period = PASSIVE_PERIOD.as_millis() as u64;
        let due = svc.health.as_ref().is_some_and(|h| {
            h.outlier.is_some() && h.observed_ms.is_none_or(|at| now_ms >= at + period)
        });
        if !due {
            return Ok(());
        }
        let stats = self.datapath.stats(svc.id)?;
        let service = svc.cfg.name.clone();
        svc.sync_health();
        let Some(health) = svc.health.as_mut() else {
            return Ok(());
        };
        health.observed_ms = Some(now_ms);
        let before = health.selection();
        let changes = health.observe(&stats, now_ms);
        self.health_changed(&service, before, changes)
    }

    /// Logs and alerts each backend that left or returned, writes the new selection,
    /// and rolls a rollout in progress back when no canary backend is left.
    fn health_changed(
        &mut self,
        service: &str,
        before: Selection,
        changes: Vec<Change>,
    ) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let svc = self.service_mut(service)?;
        let Some(health) = svc.health.as_ref() else {
            return Ok(());
        };
        let after = health.selection();
        let weight_bp = svc.weight_bp;
        let state = svc.rollout.as_ref().map(|r| r.state());
        let canary: Vec<String> = health.groups[1]
            .iter()
            .map(|b| format!("{} ({})", b.addr, b.why()))
            .collect();
        for c in &changes {
            let group = ["stable", "canary"][c.group];
            match c.state {
                State::Down => {
                    tracing::warn!(service, %group, backend = %c.addr, reason = %c.reason, "backend down: out of the selection")
                }
                State::Up => {
                    tracing::info!(service, %group, backend = %c.addr, reason = %c.reason, "backend up: back in the selection")
                }
            }
            let kind = format!("backend-{}", c.state.as_str());
            self.alert(service, &kind, &format!("{group} {}: {}", c.addr, c.reason));
        }
        if after.down != before.down {
            self.write_weight(service, weight_bp)?;
        }
        if after.stable_fails_open && !before.stable_fails_open {
            let reason = "every stable backend failed its health checks or was ejected: they \
                          stay in the selection (stable fails open; its traffic never goes to \
                          canary)";
            tracing::error!(service, reason);
            self.alert(service, "stable-unhealthy", reason);
        }
        let in_progress = matches!(
            state,
            Some(
                RolloutState::Progressing
                    | RolloutState::AwaitingApproval
                    | RolloutState::Paused
                    | RolloutState::Verifying
            )
        );
        if after.canary_down && !before.canary_down && in_progress && self.fleet_leading() {
            let detail = format!("no canary backend is healthy: {}", canary.join(", "));
            let command = Command::AnalysisRollback {
                rule: HEALTH_RULE.into(),
                detail,
            };
            self.rollout_command(service, command, Actor::Rule(HEALTH_RULE.into()))?;
        }
        Ok(())
    }
}
