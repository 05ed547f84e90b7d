//! One configured service as the agent runs it: config, kernel id, live weight,
//! rollout and analysis. Plain Rust with no I/O: the agent reads the kernel counters,
//! hands them in, and carries out the returned [`Effect`]s — so the timing of holds,
//! verdict events and rule firings is unit-tested with a simulated clock.

use std::collections::BTreeMap;

use canary_common::ServiceKey;

use crate::analysis::{
    hold_reason, Action, Analyzer, Outcome, Verdict, VersionCounters, DEFAULT_ALPHA,
};
use crate::config::ServiceConfig;
use crate::controller::{
    Actor, AnalysisHold, Command, ControlError, Effect, Event, Rollout, RolloutState,
};
use crate::policy::Policy;

pub struct LiveService {
    pub cfg: ServiceConfig,
    pub id: u32,
    pub key: ServiceKey,
    pub weight_bp: u16,
    pub policy: Option<Policy>,
    pub rollout: Option<Rollout>,
    /// Present when the policy has metrics or rollback rules.
    pub analysis: Option<Analysis>,
    /// Latest (events, trials) of each PromQL metric, for stable and canary.
    pub custom: BTreeMap<String, [(u64, u64); 2]>,
    /// Canary connections are being closed at request boundaries after a rollback.
    pub draining: bool,
    /// Decided in the kernel by client address: how its map value is marked.
    pub kernel: Option<crate::datapath::KernelRouting>,
}

/// The analysis of a service whose policy has metrics or rules.
pub struct Analysis {
    analyzer: Analyzer,
    pub verdicts: Vec<Verdict>,
    /// The latest hold decision. Counters are read once per second but the rollout
    /// is ticked ten times as often: every tick must see the hold, or the schedule
    /// slips through between two observations.
    hold: AnalysisHold,
    last_observed_s: Option<u64>,
}

impl Analysis {
    pub fn new(policy: &Policy) -> Option<Self> {
        if policy.metrics.is_empty() && policy.rules.is_empty() {
            return None;
        }
        let analyzer = Analyzer::new(policy.metrics.clone(), policy.rules.clone(), DEFAULT_ALPHA)
            .with_error_floor(policy.analysis.error_floor);
        Some(Self {
            analyzer,
            verdicts: Vec::new(),
            hold: AnalysisHold::Hold("waiting for the first second of analysis".into()),
            last_observed_s: None,
        })
    }
}

impl LiveService {
    /// Whether the analysis wants this second's counters.
    pub fn wants_observation(&self, now_s: u64) -> bool {
        self.analysis
            .as_ref()
            .is_some_and(|a| a.last_observed_s.is_none_or(|last| now_s > last))
    }

    /// Feeds one second's cumulative counters to the analysis. Returns the effects to
    /// carry out: verdict changes as history events (only while a rollout is live), a
    /// fired rule's rollback or pause, and its alert.
    pub fn observe(
        &mut self,
        now_ms: u64,
        stable: &VersionCounters,
        canary: &VersionCounters,
    ) -> Result<Vec<Effect>, ControlError> {
        let live = self
            .rollout
            .as_ref()
            .is_some_and(|r| r.state().is_running());
        let name = self.cfg.name.clone();
        let Some(analysis) = self.analysis.as_mut() else {
            return Ok(Vec::new());
        };
        let now_s = now_ms / 1000;
        analysis.last_observed_s = Some(now_s);
        analysis.analyzer.observe(now_s, stable, canary);
        let eval = analysis.analyzer.evaluate(now_s);
        let label = |o: Outcome| format!("{o:?}").to_lowercase();
        let mut fx = Vec::new();
        if let (true, Some(r)) = (live, &self.rollout) {
            let status = r.status(now_ms);
            for v in &eval.verdicts {
                let before = analysis
                    .verdicts
                    .iter()
                    .find(|p| p.metric == v.metric)
                    .map(|p| p.verdict);
                if before == Some(v.verdict) {
                    continue;
                }
                fx.push(Effect::Transition(Event {
                    service: name.clone(),
                    at_ms: now_ms,
                    from: status.state,
                    to: status.state,
                    step: status.step,
                    stage: status.stage.clone(),
                    weight_bp: status.weight_bp,
                    actor: Actor::Analysis,
                    reason: format!(
                        "verdict {}: {} -> {}: {}",
                        v.metric,
                        before.map_or("none".into(), label),
                        label(v.verdict),
                        v.reason
                    ),
                }));
            }
        }
        analysis.verdicts = eval.verdicts.clone();
        analysis.hold = match hold_reason(&eval) {
            Some(reason) => AnalysisHold::Hold(reason),
            None => AnalysisHold::Clear,
        };
        let acting = self.rollout.as_ref().is_some_and(|r| {
            matches!(
                r.state(),
                RolloutState::Progressing | RolloutState::AwaitingApproval
            )
        });
        if let (true, Some(fired)) = (acting, eval.fired.first()) {
            let (command, kind) = match fired.action {
                Action::ImmediateRollback => (
                    Command::AnalysisRollback {
                        rule: fired.rule.clone(),
                        detail: fired.detail.clone(),
                    },
                    "immediate-rollback",
                ),
                Action::PauseAndAlert => (
                    Command::AnalysisPause {
                        reason: format!("{}: {}", fired.rule, fired.detail),
                    },
                    "pause-and-alert",
                ),
            };
            fx.push(Effect::Alert {
                kind: kind.into(),
                reason: format!("rule {} fired: {}", fired.rule, fired.detail),
            });
            let rollout = self.rollout.as_mut().expect("acting implies a rollout");
            fx.extend(rollout.apply(command, Actor::Rule(fired.rule.clone()), now_ms)?);
        }
        Ok(fx)
    }

    /// Advances the rollout on the clock, held back by the latest analysis verdicts.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let hold = self
            .analysis
            .as_ref()
            .map_or(AnalysisHold::Clear, |a| a.hold.clone());
        match self.rollout.as_mut() {
            Some(r) => r.tick(now_ms, hold),
            None => Vec::new(),
        }
    }

    pub fn verdicts(&self) -> &[Verdict] {
        self.analysis.as_ref().map_or(&[], |a| &a.verdicts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::datapath::service_key;
    use std::path::Path;

    fn service(policy: &str) -> LiveService {
        let text = "[agent]\ninterface = \"x\"\n[[service]]\nname = \"web\"\nlisten = \"198.19.0.10:80\"\nstable = [\"198.18.2.2:80\"]\ncanary = [\"198.18.3.2:80\"]\n";
        let cfg = Config::parse(text, Path::new("t.toml")).unwrap().services[0].clone();
        let policy = crate::policy::parse_toml(policy, "p.toml").unwrap();
        LiveService {
            key: service_key(&cfg),
            cfg,
            id: 0,
            weight_bp: 0,
            rollout: Some(Rollout::new("web", policy.clone())),
            analysis: Analysis::new(&policy),
            policy: Some(policy),
            custom: BTreeMap::new(),
            draining: false,
            kernel: None,
        }
    }

    const STEPS: &str = "step = [{ at = 0, weight = 1 }, { at = \"10s\", weight = 5 }, { at = \"20s\", weight = 100 }]\n";

    fn counters(requests: u64, errors: u64) -> VersionCounters {
        VersionCounters {
            requests,
            responses: [0, requests - errors, 0, 0, errors],
            conn_new: requests,
            ..Default::default()
        }
    }

    /// Drives the service like the agent: a tick every 100 ms, counters each second.
    fn run(svc: &mut LiveService, from_ms: u64, to_ms: u64, traffic: impl Fn(u64) -> (u64, u64)) {
        let mut now = from_ms;
        while now < to_ms {
            if svc.wants_observation(now / 1000) {
                let (s, c) = traffic(now / 1000);
                svc.observe(now, &counters(s, 0), &counters(c, 0)).unwrap();
            }
            svc.tick(now);
            now += 100;
        }
    }

    fn start(svc: &mut LiveService, now_ms: u64) {
        let r = svc.rollout.as_mut().unwrap();
        r.apply(Command::Start, Actor::Operator("t".into()), now_ms)
            .unwrap();
    }

    #[test]
    fn inconclusive_analysis_holds_on_every_tick() {
        // No traffic at all: error-rate can never be decided, so the rollout must stay
        // at its first step however many ticks pass (the earlier agent advanced on the
        // nine ticks per second that did not observe).
        let mut svc = service(&format!(
            "{STEPS}[[metric]]\nname = \"error-rate\"\nthreshold = 1.05\nwindow = \"30s\"\n"
        ));
        start(&mut svc, 0);
        run(&mut svc, 0, 120_000, |_| (0, 0));
        let status = svc.rollout.as_ref().unwrap().status(120_000);
        assert_eq!(status.step, Some(0), "{status:?}");
        assert_eq!(status.state, RolloutState::Progressing);
        let holding = status.holding.expect("status says why it holds");
        assert!(holding.contains("error-rate"), "{holding}");
    }

    #[test]
    fn a_long_hold_raises_one_max_hold_alert_and_keeps_holding() {
        let mut svc = service(&format!(
            "{STEPS}[analysis]\nmax_hold = \"30s\"\n[[metric]]\nname = \"error-rate\"\nthreshold = 1.05\nwindow = \"30s\"\n"
        ));
        start(&mut svc, 0);
        let mut alerts = Vec::new();
        let mut now = 0;
        while now < 120_000 {
            if svc.wants_observation(now / 1000) {
                svc.observe(now, &counters(0, 0), &counters(0, 0)).unwrap();
            }
            for fx in svc.tick(now) {
                if let Effect::Alert { kind, reason } = fx {
                    alerts.push((now, kind, reason));
                }
            }
            now += 100;
        }
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        let (at, kind, reason) = &alerts[0];
        assert_eq!(kind, "max-hold");
        // The step was due at 10 s; max-hold is 30 s past that.
        assert!((40_000..=41_000).contains(at), "alert at {at} ms");
        assert!(reason.contains("max-hold 30s"), "{reason}");
        assert_eq!(svc.rollout.as_ref().unwrap().status(now).step, Some(0));
    }

    #[test]
    fn verdict_events_are_recorded_only_while_the_rollout_is_live() {
        let mut svc = service(&format!(
            "{STEPS}[[metric]]\nname = \"error-rate\"\nthreshold = 1.05\nwindow = \"30s\"\n"
        ));
        // Pending: analysis runs (status shows verdicts) but history stays quiet.
        let fx = svc
            .observe(1_000, &counters(0, 0), &counters(0, 0))
            .unwrap();
        assert!(fx.is_empty(), "{fx:?}");
        assert_eq!(svc.verdicts().len(), 1);
        start(&mut svc, 1_500);
        // Live now, but the verdict did not change: still no event.
        let fx = svc
            .observe(2_000, &counters(0, 0), &counters(0, 0))
            .unwrap();
        assert!(fx.is_empty(), "{fx:?}");
    }
}
