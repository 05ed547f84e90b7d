//! The agent's side of health checks: what the daemon's prober must check, and what a
//! result changes (one map write of the service's value when a backend leaves or
//! returns; a rollback when no canary backend is left).

use std::net::SocketAddr;

use anyhow::Result;

use super::Agent;
use crate::{
    config::HealthCheck,
    controller::{Actor, Command, RolloutState},
    health::State,
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
            for backend in h.addrs() {
                out.push(HealthTarget {
                    service: svc.cfg.name.clone(),
                    backend,
                    target: h.target(backend),
                    check: h.spec.clone(),
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
        if changes.is_empty() {
            return Ok(());
        }
        let after = health.selection();
        let weight_bp = svc.weight_bp;
        let state = svc.rollout.as_ref().map(|r| r.state());
        let canary: Vec<String> = health.groups[1]
            .iter()
            .map(|b| format!("{} ({})", b.addr, b.reason))
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
            let reason = "every stable backend failed its health checks: they stay in the \
                          selection (stable fails open; its traffic never goes to canary)";
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
            let detail = format!(
                "no canary backend passes its health checks: {}",
                canary.join(", ")
            );
            let command = Command::AnalysisRollback {
                rule: HEALTH_RULE.into(),
                detail,
            };
            self.rollout_command(service, command, Actor::Rule(HEALTH_RULE.into()))?;
        }
        Ok(())
    }
}
