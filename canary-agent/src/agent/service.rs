//! One configured service as the agent runs it: config, kernel id, live weight,
//! rollout and analysis. Plain Rust with no I/O: the agent reads the kernel counters,
//! hands them in, and carries out the returned [`Effect`]s — so the timing of holds,
//! verdict events and rule firings is unit-tested with a simulated clock.

use std::collections::{BTreeMap, VecDeque};

use canary_common::ServiceKey;

use crate::analysis::{
    action_name, hold_reason, Action, Analyzer, Outcome, Verdict, VersionCounters, DEFAULT_ALPHA,
};
use crate::config::ServiceConfig;
use crate::controller::{
    Actor, AnalysisHold, Command, ControlError, Effect, Event, Rollout, RolloutState, RolloutStatus,
};
use crate::health::{self, ServiceHealth};
use crate::policy::{Policy, FULL_BP};

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
    /// While retiring: the old version's connections this node still holds.
    pub retiring: Option<u64>,
    /// With `[service.health]`: each backend's checks (kept in step with `cfg` by
    /// [`LiveService::sync_health`]).
    pub health: Option<ServiceHealth>,
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
    /// The running rollout's step the analyzer's pass data began with.
    step: Option<usize>,
    /// The wave whose nodes' counters this analysis has seen.
    wave: Option<usize>,
    baseline: Baseline,
}

/// Stable as it was before promotion, standing in for it while the release is verified
/// at 100 % (stable then carries nothing new to compare against): the readings of the
/// last `span_s` seconds below 100 %, and once verifying, stable's counters at
/// promotion growing at the rate those seconds had.
struct Baseline {
    span_s: u64,
    recent: VecDeque<(u64, VersionCounters)>,
    frozen: Option<Frozen>,
}

struct Frozen {
    at_s: u64,
    at_promotion: VersionCounters,
    /// What stable saw over `span_s` seconds before promotion.
    per_span: VersionCounters,
    span_s: u64,
}

impl Baseline {
    /// Spans the longest metric window (at least 10 s).
    fn new(policy: &Policy) -> Self {
        let longest = policy.metrics.iter().map(|m| m.window_s).max();
        Self {
            span_s: longest.unwrap_or(60).max(10),
            recent: VecDeque::new(),
            frozen: None,
        }
    }

    /// A reading below 100 %: kept, and any earlier verification's stand-in dropped.
    fn record(&mut self, now_s: u64, stable: &VersionCounters) {
        self.frozen = None;
        self.recent.push_back((now_s, stable.clone()));
        while self
            .recent
            .front()
            .is_some_and(|(at, _)| at + self.span_s < now_s)
        {
            self.recent.pop_front();
        }
    }

    /// Stable over the last `span_s` seconds seen below 100 %.
    fn snapshot(&self) -> Option<Frozen> {
        let ((first_s, first), (last_s, last)) = (self.recent.front()?, self.recent.back()?);
        let mut per_span = VersionCounters::zero();
        per_span.accumulate(first, last);
        Some(Frozen {
            at_s: *last_s,
            at_promotion: last.clone(),
            per_span,
            span_s: last_s.saturating_sub(*first_s).max(1),
        })
    }

    /// Stable's stand-in while verifying (the real reading when no second before
    /// promotion was seen, e.g. after a restart at 100 %).
    fn stand_in(&mut self, now_s: u64, stable: &VersionCounters) -> VersionCounters {
        if self.frozen.is_none() {
            self.frozen = self.snapshot();
        }
        let Some(f) = self.frozen.as_ref() else {
            return stable.clone();
        };
        let grown = f
            .per_span
            .scaled(now_s.saturating_sub(f.at_s) as f64 / f.span_s as f64);
        let mut counters = f.at_promotion.clone();
        counters.accumulate(&VersionCounters::zero(), &grown);
        counters
    }

    /// What `status` says the canary is judged against while verifying.
    /// Also between promotion and the first reading that uses the stand-in.
    fn describe(&self) -> Option<String> {
        let snapshot;
        let f = match &self.frozen {
            Some(f) => f,
            None => {
                snapshot = self.snapshot()?;
                &snapshot
            }
        };
        let rate = |n: u64| n as f64 / f.span_s as f64;
        let errors = f.per_span.responses[4];
        let requests = f.per_span.requests.max(1);
        Some(format!(
            "stable's baseline from the {}s before promotion: {:.1} requests/s, {:.2}% 5xx, \
             {:.1} new connections/s",
            f.span_s,
            rate(f.per_span.requests),
            100.0 * errors as f64 / requests as f64,
            rate(f.per_span.conn_new)
        ))
    }
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
            step: None,
            wave: None,
            baseline: Baseline::new(policy),
        })
    }
}

impl LiveService {
    /// Brings the health state in step with the config (after a release swapped the
    /// groups, or a reload changed them) and returns which backends are out.
    pub fn sync_health(&mut self) -> [Vec<bool>; 2] {
        self.health = health::for_config(&self.cfg, self.health.as_ref());
        self.health
            .as_ref()
            .map_or_else(Default::default, |h| h.selection().down)
    }

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
        // The next wave's nodes: its analysis starts over on their counters.
        let wave = self.rollout.as_ref().and_then(Rollout::wave);
        if self.analysis.as_ref().is_some_and(|a| a.wave != wave) {
            self.analysis = self.policy.as_ref().and_then(Analysis::new);
            if let Some(a) = self.analysis.as_mut() {
                a.wave = wave;
            }
        }
        let Some(analysis) = self.analysis.as_mut() else {
            return Ok(Vec::new());
        };
        let now_s = now_ms / 1000;
        analysis.last_observed_s = Some(now_s);
        // A new step's pass starts from the reading before its first one (the step
        // began between the two).
        let step = self
            .rollout
            .as_ref()
            .filter(|r| r.state().is_running())
            .and_then(|r| r.status(now_ms).step);
        if step != analysis.step {
            analysis.step = step;
            match step {
                Some(_) => analysis.analyzer.begin_step(),
                None => analysis.analyzer.end_step(),
            }
        }
        // At 100 % there is no stable traffic to compare with: while verifying, stable's
        // baseline from before promotion stands in for it.
        let verifying = self
            .rollout
            .as_ref()
            .is_some_and(|r| r.state() == RolloutState::Verifying);
        let full = self
            .rollout
            .as_ref()
            .is_some_and(|r| r.weight_bp() == FULL_BP);
        let stable = if verifying {
            &analysis.baseline.stand_in(now_s, stable)
        } else {
            if !full {
                analysis.baseline.record(now_s, stable);
            }
            stable
        };
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
                fx.push(analysis_event(
                    &name,
                    now_ms,
                    &status,
                    format!(
                        "verdict {}: {} -> {}: {}",
                        v.metric,
                        before.map_or("none".into(), label),
                        label(v.verdict),
                        v.reason
                    ),
                ));
            }
        }
        // A shared outage holds the step (its verdict is Inconclusive) and alerts once;
        // history records when it begins and ends.
        let status = self.rollout.as_ref().map(|r| r.status(now_ms));
        let mut note = |reason: String| {
            if let (true, Some(status)) = (live, &status) {
                fx.push(analysis_event(&name, now_ms, status, reason));
            }
        };
        for o in eval.outages.iter().filter(|o| o.started) {
            note(format!("{}: {}", o.metric, o.detail));
        }
        for metric in &eval.outages_cleared {
            note(format!(
                "{metric}: shared outage over, the step's pass data restart"
            ));
        }
        for o in eval.outages.iter().filter(|o| o.started && live) {
            fx.push(Effect::Alert {
                kind: "shared-outage".into(),
                reason: format!(
                    "{name}: {}: {}; not the canary's fault, holding instead of {}",
                    o.metric,
                    o.detail,
                    action_name(o.action)
                ),
            });
        }
        analysis.verdicts = eval.verdicts.clone();
        analysis.hold = match hold_reason(&eval) {
            Some(reason) => AnalysisHold::Hold(reason),
            None => AnalysisHold::Clear,
        };
        let acting = self.rollout.as_ref().is_some_and(|r| {
            matches!(
                r.state(),
                RolloutState::Progressing
                    | RolloutState::AwaitingApproval
                    | RolloutState::Verifying
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

    /// The desired weight in a fleet: the weight of nodes in no listed region, and
    /// each listed region's while the rollout runs in waves (`weight_bp` otherwise).
    pub fn wave_weights(&self, weight_bp: u16) -> (u16, BTreeMap<String, u16>) {
        let Some(r) = self.rollout.as_ref().filter(|r| {
            r.wave().is_some() && r.weight_bp() == weight_bp && r.state() != RolloutState::Finished
        }) else {
            return (weight_bp, BTreeMap::new());
        };
        let waves = &r.policy().waves;
        let regions = waves
            .iter()
            .enumerate()
            .flat_map(|(i, w)| {
                w.regions
                    .iter()
                    .map(move |region| (region.clone(), r.wave_weight(i)))
            })
            .collect();
        (r.wave_weight(waves.len() - 1), regions)
    }

    /// While verifying: what the canary is judged against, in words.
    pub fn baseline(&self) -> Option<String> {
        let verifying = self
            .rollout
            .as_ref()
            .is_some_and(|r| r.state() == RolloutState::Verifying);
        self.analysis
            .as_ref()
            .filter(|_| verifying)
            .and_then(|a| a.baseline.describe())
    }
}

/// A history event of the analysis that leaves the rollout where it is (a verdict
/// change, a shared outage beginning or ending).
fn analysis_event(service: &str, at_ms: u64, status: &RolloutStatus, reason: String) -> Effect {
    Effect::Transition(Event {
        service: service.to_string(),
        at_ms,
        from: status.state,
        to: status.state,
        step: status.step,
        stage: status.stage.clone(),
        weight_bp: status.weight_bp,
        actor: Actor::Analysis,
        reason,
    })
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
            retiring: None,
            health: None,
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

    /// Cumulative counters of `n` requests so far with latencies 1 ms + Exp(2 ms)
    /// drawn by `rng`, `errors` of them 5xx.
    struct Traffic {
        rng: rand_chacha::ChaCha8Rng,
        counters: [VersionCounters; 2],
    }

    impl Traffic {
        fn new(seed: u64) -> Self {
            use rand::SeedableRng;
            Self {
                rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
                counters: [VersionCounters::zero(), VersionCounters::zero()],
            }
        }

        /// One second: `rps` requests split by `weight_bp`, each a 5xx with
        /// probability `error_rate` on either version.
        fn second(&mut self, rps: u64, weight_bp: u16, error_rate: f64) {
            self.second_split(rps, weight_bp, error_rate, error_rate);
        }

        /// [`Traffic::second`] with each version's own error probability.
        fn second_split(&mut self, rps: u64, weight_bp: u16, stable: f64, canary: f64) {
            use rand::Rng;
            use rand_distr::{Distribution, Exp};
            let exp = Exp::new(0.5).unwrap();
            let canary_errors = canary;
            for _ in 0..rps {
                let canary = self.rng.gen_bool(f64::from(weight_bp) / 10_000.0);
                let c = &mut self.counters[usize::from(canary)];
                let ms = 1.0 + exp.sample(&mut self.rng);
                let bucket = canary_common::histogram::latency_bucket((ms * 1e6) as u64);
                c.latency[bucket as usize] += 1;
                c.requests += 1;
                c.conn_new += 1;
                let error_rate = if canary { canary_errors } else { stable };
                let class = if self.rng.gen_bool(error_rate) { 4 } else { 1 };
                c.responses[class] += 1;
            }
        }
    }

    /// The seed's three kernel metrics with 20 s windows and 30 s steps; 100 req/s.
    const FAST_AA: &str = "step = [{ at = 0, weight = 10 }, { at = \"30s\", weight = 20 }, \
        { at = \"60s\", weight = 50 }, { at = \"90s\", weight = 100 }]\n\
        [[metric]]\nname = \"error-rate\"\nthreshold = 1.05\nwindow = \"20s\"\n\
        [[metric]]\nname = \"success-rate\"\nthreshold = 0.95\nwindow = \"20s\"\n\
        [[metric]]\nname = \"latency-p99\"\nthreshold = 1.2\nwindow = \"20s\"\n";

    /// Runs an A/A rollout at 100 req/s until it is promoted or `limit_s` passes;
    /// returns the promotion time and the holds seen at the last hold.
    fn aa_rollout(seed: u64, error_rate: f64, limit_s: u64) -> (Option<u64>, Option<String>) {
        let mut svc = service(FAST_AA);
        start(&mut svc, 0);
        let mut traffic = Traffic::new(seed);
        let mut last_hold = None;
        for t in 1..=limit_s {
            let weight = svc.rollout.as_ref().unwrap().status(t * 1000).weight_bp;
            traffic.second(100, weight, error_rate);
            let [s, c] = &traffic.counters;
            svc.observe(t * 1000, s, c).unwrap();
            for tick in 0..10 {
                svc.tick(t * 1000 + tick * 100);
            }
            let status = svc.rollout.as_ref().unwrap().status(t * 1000 + 900);
            if status.holding.is_some() {
                last_hold = status.holding;
            }
            if status.state == RolloutState::Promoted {
                return (Some(t), last_hold);
            }
        }
        (None, last_hold)
    }

    #[test]
    fn a_healthy_canary_is_promoted_on_the_steps_data() {
        // Schedule 90 s; 10 % of 100 req/s is 10 canary req/s, and a 20 s window holds
        // 200 canary requests: too few for a pass against the 1 % floor (497), so a
        // windowed pass would hold at the first step forever.
        for seed in 1..=5 {
            let (promoted, hold) = aa_rollout(seed, 0.0, 270);
            let at = promoted.unwrap_or_else(|| panic!("seed {seed}: not promoted: {hold:?}"));
            assert!(at <= 270, "seed {seed}: promoted at {at} s");
        }
    }

    #[test]
    fn a_hold_says_how_much_more_traffic_it_needs() {
        let mut svc = service(FAST_AA);
        start(&mut svc, 0);
        let mut traffic = Traffic::new(7);
        for t in 1..=35 {
            traffic.second(100, 1000, 0.0);
            let [s, c] = &traffic.counters;
            svc.observe(t * 1000, s, c).unwrap();
            svc.tick(t * 1000);
        }
        let status = svc.rollout.as_ref().unwrap().status(35_000);
        assert_eq!(status.step, Some(0));
        let hold = status
            .holding
            .expect("35 s at 10 canary req/s is short of 497 requests");
        assert!(hold.contains("error-rate: since the step began"), "{hold}");
        // ≈ 497 − 350 more error-free requests at ≈ 10 req/s.
        let more: f64 = hold
            .split("a pass needs ≈ ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{hold}"));
        let canary = svc.verdicts()[0].reason.clone();
        assert!((100.0..=200.0).contains(&more), "{more}: {canary}");
        assert!(hold.contains("canary requests/s"), "{hold}");
    }

    #[test]
    fn a_shared_outage_holds_and_alerts_instead_of_rolling_back() {
        // Every backend at 25 % errors from 40 s to 60 s: success-rate ≥ 0.95 fails for
        // the canary, but stable misses it too and the canary is no worse.
        let policy = format!(
            "{FAST_AA}[[rule]]\nname = \"error-spike\"\nwhen = \"error-rate > baseline * 1.5\"\n\
             action = \"immediate-rollback\"\n"
        );
        for seed in 1..=3 {
            let mut svc = service(&policy);
            start(&mut svc, 0);
            let mut traffic = Traffic::new(100 + seed);
            let (mut alerts, mut held_in_outage, mut promoted) = (Vec::new(), false, None);
            for t in 1..=400u64 {
                let status = svc.rollout.as_ref().unwrap().status(t * 1000);
                let errors = if (40..60).contains(&t) { 0.25 } else { 0.0 };
                traffic.second(100, status.weight_bp, errors);
                let [s, c] = &traffic.counters;
                let mut fx = svc.observe(t * 1000, s, c).unwrap();
                for tick in 0..10 {
                    fx.extend(svc.tick(t * 1000 + tick * 100));
                }
                for f in fx {
                    if let Effect::Alert { kind, reason } = f {
                        alerts.push((t, kind, reason));
                    }
                }
                let status = svc.rollout.as_ref().unwrap().status(t * 1000 + 900);
                assert!(
                    !matches!(
                        status.state,
                        RolloutState::RolledBack | RolloutState::Paused
                    ),
                    "seed {seed} t {t}: {status:?} {alerts:?}"
                );
                held_in_outage |= status
                    .holding
                    .as_deref()
                    .is_some_and(|h| h.contains("shared outage"));
                if status.state == RolloutState::Promoted {
                    promoted = Some(t);
                    break;
                }
            }
            let outage: Vec<_> = alerts.iter().filter(|a| a.1 == "shared-outage").collect();
            assert_eq!(outage.len(), 1, "seed {seed}: {alerts:?}");
            let (at, _, reason) = outage[0];
            assert!((40..=60).contains(at), "seed {seed}: alert at {at}");
            assert!(
                reason.contains("success-rate: shared outage: canary success")
                    && reason.contains("and stable")
                    && reason.contains("holding instead of immediate-rollback"),
                "{reason}"
            );
            assert!(held_in_outage, "seed {seed}");
            // Resumed after the incident: promoted within 3× the 90 s schedule after it.
            let at = promoted.unwrap_or_else(|| panic!("seed {seed}: not promoted {alerts:?}"));
            assert!(at <= 60 + 270, "seed {seed}: promoted at {at}");
        }
    }

    #[test]
    fn a_canary_worse_than_stable_in_an_outage_still_fails() {
        // Stable at 25 % errors, canary at 60 %: the canary is worse, so the rule's own
        // action (rollback) applies.
        let mut svc = service(FAST_AA);
        start(&mut svc, 0);
        let mut traffic = Traffic::new(9);
        let mut rolled_back = false;
        for t in 1..=60u64 {
            let status = svc.rollout.as_ref().unwrap().status(t * 1000);
            let canary_errors = if t > 10 { 0.6 } else { 0.0 };
            let stable_errors = if t > 10 { 0.25 } else { 0.0 };
            traffic.second_split(100, status.weight_bp, stable_errors, canary_errors);
            let [s, c] = &traffic.counters;
            svc.observe(t * 1000, s, c).unwrap();
            svc.tick(t * 1000);
            if svc.rollout.as_ref().unwrap().state() == RolloutState::RolledBack {
                rolled_back = true;
                break;
            }
        }
        assert!(rolled_back);
    }

    /// FAST_AA verified for 60 s with the seed's error-spike rule; 100 req/s, the canary
    /// at `bad` 5xx from second `from` on (stable never errs). Returns the final state
    /// and when it was reached.
    fn verify_run(seed: u64, bad: f64, from: u64) -> (RolloutState, u64, Option<String>) {
        let policy = format!(
            "{FAST_AA}[verify]\nduration = \"60s\"\n[[rule]]\nname = \"error-spike\"\n\
             when = \"error-rate > baseline * 1.5\"\naction = \"immediate-rollback\"\n"
        );
        let mut svc = service(&policy);
        start(&mut svc, 0);
        let mut traffic = Traffic::new(seed);
        let mut baseline = None;
        for t in 1..=600u64 {
            let status = svc.rollout.as_ref().unwrap().status(t * 1000);
            let canary_errors = if t >= from { bad } else { 0.0 };
            traffic.second_split(100, status.weight_bp, 0.0, canary_errors);
            let [s, c] = &traffic.counters;
            svc.observe(t * 1000, s, c).unwrap();
            for tick in 0..10 {
                svc.tick(t * 1000 + tick * 100);
            }
            baseline = baseline.or(svc.baseline());
            let state = svc.rollout.as_ref().unwrap().state();
            if matches!(state, RolloutState::RolledBack | RolloutState::Retiring) {
                return (state, t, baseline);
            }
        }
        (svc.rollout.as_ref().unwrap().state(), 600, baseline)
    }

    #[test]
    fn verification_judges_the_canary_against_stables_baseline() {
        for seed in 1..=3 {
            // Healthy: verified, then retiring.
            let (state, at, baseline) = verify_run(seed, 0.0, u64::MAX);
            assert_eq!(state, RolloutState::Retiring, "seed {seed} at {at}");
            let baseline = baseline.expect("status says what stands in for stable");
            assert!(
                baseline.contains("stable's baseline from the 20s before promotion"),
                "{baseline}"
            );
            // Turns bad at 100 % (stable gets no request any more): rolled back before
            // the verification ends.
            let (_, promoted_at, _) = verify_run(seed, 0.0, u64::MAX);
            let promoted_at = promoted_at - 60;
            let (state, at, _) = verify_run(seed, 0.2, promoted_at + 5);
            assert_eq!(state, RolloutState::RolledBack, "seed {seed}");
            assert!(
                at < promoted_at + 60,
                "seed {seed}: rolled back at {at}, promoted at {promoted_at}"
            );
        }
    }
}
