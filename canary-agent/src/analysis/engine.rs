//! The analyzer: metrics and rollback rules evaluated over sliding windows.

use serde::Serialize;

use super::check::{
    decide_with, Decision, Level, Needs, Outcome, Question, Rate, Statistic, Worse,
};
use super::detector::{ChangeEvidence, Detector};
use super::latency::{count_at_or_above, count_possibly_above, quantile_bucket, quantile_ns};
use super::spec::{Action, Cmp, MetricName, MetricSpec, RollbackRule};
use super::stats::{ln_mixture_lr, Tail};
use super::window::{History, Mark, VersionCounters, Window};
use canary_common::histogram::{bucket_upper_ns, LATENCY_BUCKETS};

/// Significance level used when the configured one is not in (0, 1).
pub const DEFAULT_ALPHA: f64 = 0.01;

/// Window of the rollback rules on kernel metrics (error rate, success rate, latency).
/// Rules exist to catch spikes fast, so they look at a short window: 30 s holds ~600
/// canary requests at 20 req/s — enough to resolve a 1.5× error ratio or a 2× p99 — and a
/// fault fills a large share of it within seconds. Measured at 200 req/s with 10 %
/// canary (tests/analysis_simulation.rs): a 100 % failing canary is rolled back in ≤ 2 s with
/// 30 s (a 60 s window dilutes the first seconds of a fault and took 3 s in a few runs
/// where the canary happened to get few requests), and shorter windows gain nothing
/// measurable while adding false alarms (every extra window length of history is
/// another nearly independent test).
pub const DEFAULT_RULE_WINDOW_S: u64 = 30;

/// Window of rollback rules on custom (business) metrics. Such events are sparse (a few
/// % of requests convert) and slow to move: a short window resolves only collapses and
/// multiplies false alarms — in the A/A simulation `conversion-rate < 0.9 × stable`
/// alerted in 13 % of 30-minute runs with a 10 s window, 4 % with 30 s, 0.6 % with 60 s.
pub const DEFAULT_CUSTOM_RULE_WINDOW_S: u64 = 300;

/// How much wider than the threshold the mirror test may be for a non-strict Pass (see
/// [`super::check`]): with 1.5, a Pass on `error-rate ≤ 1.05 × stable` means the canary
/// was shown to be below 1.575 × stable. At 20 canary req/s and 1 % errors a 300 s
/// window reaches that; a strict 1.05 would need days of data.
pub const DEFAULT_PASS_SLACK: f64 = 1.5;

/// Default absolute error rate that a canary passes `error-rate` against when stable has
/// too few errors for a ratio (see [`super::check`]; set per policy with
/// `[analysis] error_floor`).
///
/// Why 1 %: it is the error budget of a 99 % availability objective, the loosest that
/// services commonly promise, and five times stricter than the seed's `success-rate ≥
/// 0.95`. It is resolved quickly: with 0 errors the canary passes after
/// [`ERROR_FREE_REQUESTS_TO_PASS`] = 497 requests at the default α = 0.01 (the mixture
/// test needs a little more than the `ln(1/α)/floor ≈ 461` of a fixed-sample bound,
/// the price of looking every second) — 33 s at 15 canary req/s; a floor of 0.1 % would
/// need ten times as many. A canary that is worse than a zero-error stable still fails
/// through the ratio test, which never consults the floor: 10 canary errors against
/// none are decisive, whatever the floor.
pub const DEFAULT_ERROR_FLOOR: f64 = 0.01;

/// Error-free canary requests needed to show the canary below [`DEFAULT_ERROR_FLOOR`] at
/// [`DEFAULT_ALPHA`] (checked by a unit test): the smallest `n` with
/// `ln_mixture_lr(0, n, 0.01, Lower) ≥ ln 100`.
pub const ERROR_FREE_REQUESTS_TO_PASS: u64 = 497;

/// Minimum trials per version for rate comparisons: below this a "rate" is a handful of
/// requests and any verdict would be noise.
const MIN_TRIALS: u64 = 20;
/// Minimum canary responses for a p99 comparison: fewer than 100 samples do not even
/// contain one expected sample above the p99.
const MIN_CANARY_LATENCY: u64 = 100;
/// Minimum stable responses: the stable p99 is the cut-off, so it needs ≥ 10 expected
/// samples above it to be a usable estimate.
const MIN_STABLE_LATENCY: u64 = 1000;
/// Minimum events of both versions together for a ratio comparison (see [`super::check`]).
const MIN_EVENTS: u64 = 10;
const P99: f64 = 0.99;

/// Result of one metric over its window. `canary`/`stable` are the metric's values:
/// fractions for rates, milliseconds for `latency-p99`, NaN (`null` in JSON) when there is
/// no data. `reason` does not repeat the metric's name (it is in `metric`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub metric: String,
    pub verdict: Outcome,
    pub canary: f64,
    pub stable: f64,
    /// `1 − 1/e` of the deciding test's e-value (for Inconclusive: of the fail test).
    pub confidence: f64,
    pub reason: String,
    /// For a Fail: which statistic fired (window, from-start, change since t).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fired_by: Option<Statistic>,
}

/// A rule (or failing metric, named after the metric) whose action must be taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    pub rule: String,
    pub action: Action,
    /// The evidence, without the rule's name (callers print `"{rule}: {detail}"`); for a
    /// rule it names the metric the rule watches.
    pub detail: String,
}

/// Everything decided at one evaluation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Evaluation {
    /// One per configured metric, in configuration order.
    pub verdicts: Vec<Verdict>,
    /// Failing metrics first (configuration order), then fired rules.
    pub fired: Vec<Fired>,
    /// Absolute thresholds that stable misses too (see [`Analyzer::evaluate`]): held,
    /// not failed.
    pub outages: Vec<Outage>,
    /// Metrics whose shared outage ended at this evaluation.
    pub outages_cleared: Vec<String>,
}

/// An absolute threshold missed by both versions over the same span.
#[derive(Debug, Clone, PartialEq)]
pub struct Outage {
    pub metric: String,
    /// The metric's own action, not taken.
    pub action: Action,
    pub detail: String,
    /// First evaluation of this outage (alert once).
    pub started: bool,
}

/// Why progression must hold, if it must: any metric still inconclusive. Rollbacks are
/// signalled separately by [`Evaluation::fired`].
pub fn hold_reason(eval: &Evaluation) -> Option<String> {
    let pending: Vec<String> = eval
        .verdicts
        .iter()
        .filter(|v| v.verdict == Outcome::Inconclusive)
        .map(|v| format!("{}: {}", v.metric, v.reason))
        .collect();
    (!pending.is_empty()).then(|| format!("inconclusive: {}", pending.join("; ")))
}

/// Kebab-case name of a metric, as used in policies and reports.
pub fn metric_name(name: &MetricName) -> &str {
    match name {
        MetricName::ErrorRate => "error-rate",
        MetricName::LatencyP99 => "latency-p99",
        MetricName::SuccessRate => "success-rate",
        MetricName::Custom(n) => n,
    }
}

/// What a comparison checks.
#[derive(Debug, Clone, Copy)]
enum Bound {
    /// Canary value against `factor` × stable value.
    Relative { factor: f64, worse: Worse },
    /// Canary success fraction at least this (absolute).
    SuccessFloor(f64),
}

/// A decision with the metric values and a description of the comparison.
struct Assessment {
    decision: Decision,
    canary: f64,
    stable: f64,
    /// "canary 0.043 (52/1200 requests) vs stable 0.010 (108/10800) over 60 s, must be
    /// ≤ 1.5 × stable"; empty when no comparison could be set up.
    evidence: String,
}

impl Assessment {
    fn reason(&self) -> String {
        if self.evidence.is_empty() {
            self.decision.reason.clone()
        } else {
            format!("{}: {}", self.evidence, self.decision.reason)
        }
    }
}

/// Compares a canary against stable for every configured metric and rule.
///
/// Feed it one reading per second with [`Analyzer::observe`] and call
/// [`Analyzer::evaluate`] as often as wanted; see [`crate::analysis`] for the method.
#[derive(Debug, Clone)]
pub struct Analyzer {
    metrics: Vec<MetricSpec>,
    rules: Vec<RollbackRule>,
    level: Level,
    rule_window_s: u64,
    custom_rule_window_s: u64,
    error_floor: f64,
    history: History,
    /// One change detector per metric, then one per rule (see [`super::detector`]).
    detectors: Vec<Detector>,
    /// Where the current rollout step began: a metric's Pass is decided on everything
    /// since then (see [`Analyzer::begin_step`]).
    step: Option<Mark>,
    /// Per metric: in a shared outage at the last evaluation.
    outage: Vec<bool>,
}

impl Analyzer {
    /// `alpha` is the per-test significance level (0.01 → 99 % confidence); values
    /// outside (0, 1) fall back to [`DEFAULT_ALPHA`].
    pub fn new(metrics: Vec<MetricSpec>, rules: Vec<RollbackRule>, alpha: f64) -> Self {
        let alpha = if alpha > 0.0 && alpha < 1.0 {
            alpha
        } else {
            DEFAULT_ALPHA
        };
        let mut a = Self {
            metrics,
            rules,
            level: Level {
                alpha,
                pass_slack: DEFAULT_PASS_SLACK,
            },
            rule_window_s: DEFAULT_RULE_WINDOW_S,
            custom_rule_window_s: DEFAULT_CUSTOM_RULE_WINDOW_S,
            error_floor: DEFAULT_ERROR_FLOOR,
            history: History::new(1),
            detectors: Vec::new(),
            step: None,
            outage: Vec::new(),
        };
        a.reset();
        a
    }

    /// Overrides [`DEFAULT_RULE_WINDOW_S`] and [`DEFAULT_CUSTOM_RULE_WINDOW_S`] (minimum
    /// 1 s). Discards collected history.
    pub fn with_rule_windows_s(mut self, kernel_s: u64, custom_s: u64) -> Self {
        self.rule_window_s = kernel_s.max(1);
        self.custom_rule_window_s = custom_s.max(1);
        self.reset();
        self
    }

    /// Overrides [`DEFAULT_PASS_SLACK`]; 1.0 allows only strict passes.
    pub fn with_pass_slack(mut self, slack: f64) -> Self {
        self.level.pass_slack = if slack >= 1.0 { slack } else { 1.0 };
        self
    }

    /// Overrides [`DEFAULT_ERROR_FLOOR`], the error rate an `error-rate` canary passes
    /// against while stable has too few errors for a ratio. Values outside (0, 1) fall
    /// back to the default.
    pub fn with_error_floor(mut self, floor: f64) -> Self {
        self.error_floor = if floor > 0.0 && floor < 1.0 {
            floor
        } else {
            DEFAULT_ERROR_FLOOR
        };
        self
    }

    /// A rollout step begins (at the newest reading): from now on a metric passes on
    /// the data since then, not on its window.
    ///
    /// Why: a window of 20 s at 10 canary req/s holds 200 requests, and some passes
    /// need more than that however long the step lasts (0 errors against the 1 % floor
    /// need [`ERROR_FREE_REQUESTS_TO_PASS`] = 497). The data since the step began only
    /// accumulate, so the pass test over them is an e-process and Ville's inequality
    /// bounds a false Pass by α per metric per step, however long the step holds.
    /// Fail keeps its window and detector (recency matters there).
    pub fn begin_step(&mut self) {
        self.step = Some(self.history.mark());
    }

    /// No step is running (no rollout, or it finished): passes are windowed again.
    pub fn end_step(&mut self) {
        self.step = None;
    }

    /// Empty history and fresh detectors.
    fn reset(&mut self) {
        self.history = History::new(self.longest_window());
        self.outage = vec![false; self.metrics.len()];
        self.detectors = self
            .tests()
            .iter()
            .map(|t| Detector::new(t.worse()))
            .collect();
    }

    /// Every test: the metrics in configuration order, then the rules.
    fn tests(&self) -> Vec<Test> {
        let metrics = self.metrics.iter().map(|m| Test {
            metric: m.name.clone(),
            bound: metric_bound(m),
            window_s: m.window_s.max(1),
        });
        let rules = self.rules.iter().map(|r| Test {
            metric: r.metric.clone(),
            bound: Bound::Relative {
                factor: r.factor,
                worse: match r.cmp {
                    Cmp::Gt => Worse::Higher,
                    Cmp::Lt => Worse::Lower,
                },
            },
            window_s: match r.metric {
                MetricName::Custom(_) => self.custom_rule_window_s,
                _ => self.rule_window_s,
            },
        });
        metrics.chain(rules).collect()
    }

    fn longest_window(&self) -> u64 {
        self.metrics
            .iter()
            .map(|m| m.window_s)
            .chain([self.rule_window_s, self.custom_rule_window_s])
            .max()
            .unwrap_or(1)
    }

    /// Records the cumulative counters of both versions read at `t_s` (seconds, any
    /// monotonic epoch). Counter resets are handled (see [`History`]).
    ///
    /// Also feeds what the reading added to every test's change detector. A latency test
    /// compares against the stable p99 of its window *before* this reading, so each
    /// second's e-value is built from a cut fixed in advance.
    pub fn observe(&mut self, t_s: u64, stable: &VersionCounters, canary: &VersionCounters) {
        let tests = self.tests();
        let cuts: Vec<Option<u64>> = tests
            .iter()
            .map(|t| {
                let newest = self.history.newest_s()?;
                (t.metric == MetricName::LatencyP99)
                    .then(|| stable_p99_cut(&self.history.window(newest, t.window_s)?))
                    .flatten()
            })
            .collect();
        let questions: Vec<Option<Question>> = {
            self.history.push(t_s, stable, canary);
            match self.history.take_step() {
                Some(step) => tests
                    .iter()
                    .zip(&cuts)
                    .map(|(t, &cut)| step_question(t, &step, cut))
                    .collect(),
                None => vec![None; tests.len()],
            }
        };
        for (d, q) in self.detectors.iter_mut().zip(&questions) {
            if let Some(q) = q {
                d.update(t_s, q);
            }
        }
    }

    /// Evaluates every metric over its own window and every rule over the rule window,
    /// all ending at the newest reading at or before `now_s`.
    ///
    /// Shared outage: an absolute threshold (`success-rate ≥ 0.95`) that fails while
    /// stable misses it too over the same span, and the canary is not shown worse than
    /// stable there, is not the canary's fault — rolling back would go to a version
    /// that is no better. The metric then holds (Inconclusive) and is reported in
    /// [`Evaluation::outages`] instead of failing; it stays an outage while the canary
    /// keeps failing the threshold and is not shown worse than stable. Its detector
    /// restarts each second of the outage (the outage's data say nothing about the
    /// canary), and when the outage ends the step's pass data restart from then.
    pub fn evaluate(&mut self, now_s: u64) -> Evaluation {
        let eval = self.assess_all(now_s);
        for (i, m) in self.metrics.iter().enumerate() {
            let name = metric_name(&m.name);
            if eval.outages.iter().any(|o| o.metric == name) {
                self.outage[i] = true;
                self.detectors[i] = Detector::new(Worse::Higher);
            } else {
                self.outage[i] = false;
            }
        }
        if !eval.outages_cleared.is_empty() && self.step.is_some() {
            self.step = Some(self.history.mark());
        }
        eval
    }

    fn assess_all(&self, now_s: u64) -> Evaluation {
        let mut windows: Vec<(u64, Option<Window>)> = Vec::new();
        let mut window_for = |w: u64| -> Option<Window> {
            let w = w.max(1);
            if let Some((_, win)) = windows.iter().find(|(len, _)| *len == w) {
                return win.clone();
            }
            let win = self.history.window(now_s, w);
            windows.push((w, win.clone()));
            win
        };
        let mut eval = Evaluation::default();
        let mut detectors = self.detectors.iter().map(|d| d.evidence(MIN_EVENTS));
        for (i, m) in self.metrics.iter().enumerate() {
            let bound = metric_bound(m);
            let change = detectors.next();
            let name = metric_name(&m.name);
            let floor = (m.name == MetricName::ErrorRate
                && matches!(
                    bound,
                    Bound::Relative {
                        worse: Worse::Higher,
                        ..
                    }
                ))
            .then_some(self.error_floor);
            let win = window_for(m.window_s);
            let mut a = self.assess(&m.name, bound, floor, None, win.as_ref(), change);
            let failing = a.decision.outcome == Outcome::Fail;
            let outage = match bound {
                Bound::SuccessFloor(t) if failing || self.outage[i] => {
                    let statistic = a.decision.statistic.unwrap_or(Statistic::Window {
                        span_s: m.window_s.max(1),
                    });
                    self.shared_outage(t, statistic, failing, self.outage[i], now_s)
                }
                _ => None,
            };
            if let Some(detail) = outage {
                a.decision = Decision {
                    outcome: Outcome::Inconclusive,
                    reason: format!("{detail}; holding instead of {}", action_name(m.on_fail)),
                    statistic: None,
                    ..a.decision
                };
                a.evidence = String::new();
                eval.outages.push(Outage {
                    metric: name.to_string(),
                    action: m.on_fail,
                    detail,
                    started: !self.outage[i],
                });
            } else if self.outage[i] {
                eval.outages_cleared.push(name.to_string());
            }
            if let (Some(mark), false, false) = (
                &self.step,
                a.decision.outcome == Outcome::Fail,
                self.outage[i],
            ) {
                a = self.step_pass(&m.name, bound, floor, mark, now_s, a);
            }
            if a.decision.outcome == Outcome::Fail {
                eval.fired.push(Fired {
                    rule: name.to_string(),
                    action: m.on_fail,
                    detail: fired_detail(&a),
                });
            }
            eval.verdicts.push(Verdict {
                metric: name.to_string(),
                verdict: a.decision.outcome,
                canary: a.canary,
                stable: a.stable,
                confidence: a.decision.confidence,
                reason: a.reason(),
                fired_by: a.decision.statistic,
            });
        }
        for r in &self.rules {
            let window_s = match r.metric {
                MetricName::Custom(_) => self.custom_rule_window_s,
                _ => self.rule_window_s,
            };
            let worse = match r.cmp {
                Cmp::Gt => Worse::Higher,
                Cmp::Lt => Worse::Lower,
            };
            let bound = Bound::Relative {
                factor: r.factor,
                worse,
            };
            let subject = Some(metric_name(&r.metric));
            let win = window_for(window_s);
            let change = detectors.next();
            let a = self.assess(&r.metric, bound, None, subject, win.as_ref(), change);
            if a.decision.outcome == Outcome::Fail {
                eval.fired.push(Fired {
                    rule: r.name.clone(),
                    action: r.action,
                    detail: fired_detail(&a),
                });
            }
        }
        eval
    }

    /// Canary requests a healthy canary (the same as stable) needs in one step for
    /// metric `i` to pass, at canary share `weight` in (0, 1) with both versions at
    /// `error_rate`: the smallest count whose expected data pass (bisected to 1 %).
    /// For `latency-p99` both versions answer 1 % of requests ten times slower than
    /// the rest, the slowest tail under which the canary still meets any factor ≥ 1
    /// (a tail that thins out beyond the p99 passes sooner). `None` for custom metrics
    /// (their rates come from queries) or beyond 10⁹ requests.
    pub fn requests_to_pass(&self, i: usize, weight: f64, error_rate: f64) -> Option<u64> {
        let m = self.metrics.get(i)?;
        if matches!(m.name, MetricName::Custom(_)) || !(weight > 0.0 && weight < 1.0) {
            return None;
        }
        let bound = metric_bound(m);
        let floor = (m.name == MetricName::ErrorRate).then_some(self.error_floor);
        let version = |n: f64| {
            let mut c = VersionCounters::zero();
            let n = n.round() as u64;
            let errors = (n as f64 * error_rate).round() as u64;
            c.requests = n;
            c.conn_new = n;
            c.responses[1] = n - errors;
            c.responses[4] = errors;
            let slow = (n as f64 * 0.01).round() as u64;
            let fast_b = canary_common::histogram::latency_bucket(1_000_000) as usize;
            let slow_b = canary_common::histogram::latency_bucket(10_000_000) as usize;
            c.latency[fast_b] = n - slow;
            c.latency[slow_b] = slow;
            c
        };
        let passes = |canary: f64| {
            let w = Window {
                span_s: 1,
                canary: version(canary),
                stable: version(canary * (1.0 - weight) / weight),
            };
            let a = self.assess(&m.name, bound, floor, None, Some(&w), None);
            a.decision.outcome == Outcome::Pass
        };
        let mut hi = 16.0;
        while !passes(hi) {
            hi *= 2.0;
            if hi > 1e9 {
                return None;
            }
        }
        let mut lo = hi / 2.0;
        while hi / lo > 1.01 {
            let mid = (lo * hi).sqrt();
            if passes(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi.ceil() as u64)
    }

    /// Whether the absolute success threshold `t` is in a shared outage: the canary's
    /// errors are not shown above stable's over the span of `statistic` (the ratio test
    /// at factor 1), and stable misses `t` too there — or, while an outage is
    /// `ongoing`, the canary still fails (the window's fail test flickers at the
    /// edge of an outage). Returns the evidence naming both versions.
    fn shared_outage(
        &self,
        t: f64,
        statistic: Statistic,
        failing: bool,
        ongoing: bool,
        now_s: u64,
    ) -> Option<String> {
        let span_s = match statistic {
            Statistic::Window { span_s } => span_s,
            Statistic::FromStart { age_s } | Statistic::Change { age_s, .. } => age_s,
        };
        let w = self.history.window(now_s, span_s.max(1))?;
        let (c, s, needs) = errors(&w);
        if s.trials == 0 {
            return None;
        }
        let stable_misses = 1.0 - s.value() < t;
        let weighted = c.trials as f64;
        let p0 = weighted / (weighted + s.trials as f64);
        let worse = ln_mixture_lr(c.events, c.events + s.events, p0, Tail::Upper);
        if worse >= self.level.alpha.ln().abs() || !(stable_misses || (ongoing && failing)) {
            return None;
        }
        Some(format!(
            "shared outage: canary success {} ({} failed of {} {}) and stable {} ({} of {}) \
             over {} s, both must be ≥ {t}; the canary is not shown worse than stable \
             (e-value {:.3} < {:.0})",
            fmt_value(1.0 - c.value()),
            c.events,
            c.trials,
            needs.trials,
            fmt_value(1.0 - s.value()),
            s.events,
            s.trials,
            w.span_s,
            worse.exp(),
            1.0 / self.level.alpha
        ))
    }

    /// The Pass side of a metric over the data since the step began (`windowed` is the
    /// window's assessment, which did not fail): a Pass there, or Inconclusive with the
    /// step's evidence and how much more traffic a Pass needs at the current rates.
    fn step_pass(
        &self,
        metric: &MetricName,
        bound: Bound,
        floor: Option<f64>,
        mark: &Mark,
        now_s: u64,
        windowed: Assessment,
    ) -> Assessment {
        let Some(w) = self.history.since(mark, now_s) else {
            return windowed;
        };
        let mut a = self.assess(metric, bound, floor, None, Some(&w), None);
        a.evidence = match a.evidence.is_empty() {
            true => "since the step began".to_string(),
            false => format!("since the step began: {}", a.evidence),
        };
        match a.decision.outcome {
            Outcome::Pass => a,
            outcome => {
                if outcome == Outcome::Fail {
                    // Fails come from the window and the detector only.
                    a.decision.reason =
                        "not shown within the bound (the step's data lean beyond it; the window has not failed)"
                            .to_string();
                }
                a.decision.outcome = Outcome::Inconclusive;
                a.decision.confidence = windowed.decision.confidence;
                a.decision.reason = format!(
                    "{}; {}",
                    a.decision.reason,
                    self.more_needed(metric, bound, floor, &w)
                );
                a
            }
        }
    }

    /// How much more traffic the pass test over `w` needs if the rates seen in `w`
    /// continue: the smallest multiple of `w`'s counts that passes (bisected to 2 %),
    /// in canary requests (or connections, trials) and seconds at `w`'s canary rate.
    fn more_needed(
        &self,
        metric: &MetricName,
        bound: Bound,
        floor: Option<f64>,
        w: &Window,
    ) -> String {
        let (trials, noun) = canary_trials(metric, w);
        if trials == 0 || w.span_s == 0 {
            return format!("no canary {noun} in this step yet");
        }
        let passes = |f: f64| {
            let a = self.assess(metric, bound, floor, None, Some(&w.scaled(f)), None);
            a.decision.outcome == Outcome::Pass
        };
        const MAX_FACTOR: f64 = 4096.0;
        let mut hi = 2.0;
        while !passes(hi) {
            if hi >= MAX_FACTOR {
                return format!(
                    "at the rates seen so far a pass is out of reach (not even with {MAX_FACTOR:.0}× \
                     the {trials} canary {noun} so far)"
                );
            }
            hi *= 2.0;
        }
        let mut lo = hi / 2.0;
        while hi / lo > 1.02 {
            let mid = (lo * hi).sqrt();
            if passes(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        let more = (trials as f64 * (hi - 1.0)).ceil();
        let rate = trials as f64 / w.span_s as f64;
        format!(
            "a pass needs ≈ {more:.0} more canary {noun}: ≈ {:.0} s at {} canary {noun}/s",
            more / rate,
            fmt_rate(rate)
        )
    }

    /// `floor`: see [`Question::Ratio`]; `subject` names the metric in the limit text
    /// (for rules, whose name is not the metric's).
    fn assess(
        &self,
        metric: &MetricName,
        bound: Bound,
        floor: Option<f64>,
        subject: Option<&str>,
        window: Option<&Window>,
        change: Option<ChangeEvidence>,
    ) -> Assessment {
        let Some(w) = window else {
            return unavailable("no observations yet".to_string());
        };
        let subject = subject.map_or(String::new(), |s| format!("{s} "));
        let limit = match bound {
            Bound::Relative { factor, .. } | Bound::SuccessFloor(factor)
                if !(factor.is_finite() && factor > 0.0) =>
            {
                return unavailable(format!("invalid threshold {factor}"));
            }
            Bound::SuccessFloor(t) if t > 1.0 => {
                return unavailable(format!(
                    "invalid threshold {t}: a success fraction is at most 1"
                ));
            }
            Bound::Relative { factor, worse } => {
                let op = if worse == Worse::Higher { "≤" } else { "≥" };
                format!("{subject}must be {op} {factor} × stable")
            }
            Bound::SuccessFloor(t) => format!("{subject}must be ≥ {t}"),
        };
        let span = w.span_s;
        let (factor, worse) = match bound {
            Bound::SuccessFloor(t) => return self.success_floor(w, t, &limit, change),
            Bound::Relative { factor, worse } => (factor, worse),
        };
        match metric {
            MetricName::LatencyP99 => self.latency(w, factor, worse, &limit, change),
            MetricName::Custom(name) => {
                let (Some(&c), Some(&s)) = (w.canary.custom.get(name), w.stable.custom.get(name))
                else {
                    return unavailable("no data from the metric's queries yet".to_string());
                };
                let needs = needs(MIN_TRIALS, MIN_TRIALS, "trials", "events");
                let q = Question::Ratio {
                    canary: rate(c),
                    stable: rate(s),
                    factor,
                    floor: None,
                };
                self.ratio(q, worse, needs, span, &limit, change)
            }
            MetricName::ErrorRate => {
                let (canary, stable, needs) = errors(w);
                let q = Question::Ratio {
                    canary,
                    stable,
                    factor,
                    floor,
                };
                self.ratio(q, worse, needs, span, &limit, change)
            }
            MetricName::SuccessRate => {
                let (c, s, needs) = errors(w);
                let ok = |r: Rate| Rate {
                    events: r.trials - r.events,
                    trials: r.trials,
                };
                let needs = Needs {
                    events: "successes",
                    ..needs
                };
                let q = Question::Ratio {
                    canary: ok(c),
                    stable: ok(s),
                    factor,
                    floor: None,
                };
                self.ratio(q, worse, needs, span, &limit, change)
            }
        }
    }

    /// Absolute floor on the canary success fraction, tested as a ceiling on its failure
    /// fraction (one-sample test).
    fn success_floor(
        &self,
        w: &Window,
        floor: f64,
        limit: &str,
        change: Option<ChangeEvidence>,
    ) -> Assessment {
        let (c, s, needs) = errors(w);
        let q = Question::Absolute {
            canary: c,
            p0: 1.0 - floor,
        };
        Assessment {
            decision: decide_with(&q, Worse::Higher, self.level, needs, w.span_s, change),
            canary: 1.0 - c.value(),
            stable: 1.0 - s.value(),
            evidence: format!(
                "canary success {} ({} failed of {} {}) vs stable {} over {} s, {limit}",
                fmt_value(1.0 - c.value()),
                c.events,
                c.trials,
                needs.trials,
                fmt_value(1.0 - s.value()),
                w.span_s,
            ),
        }
    }

    /// Two-sample rate comparison of canary against `factor` × stable (`q` is a
    /// [`Question::Ratio`]).
    fn ratio(
        &self,
        q: Question,
        worse: Worse,
        needs: Needs,
        span: u64,
        limit: &str,
        change: Option<ChangeEvidence>,
    ) -> Assessment {
        let (c, s) = match q {
            Question::Ratio { canary, stable, .. } => (canary, stable),
            Question::Absolute { canary, .. } => (canary, Rate::default()),
        };
        Assessment {
            decision: decide_with(&q, worse, self.level, needs, span, change),
            canary: c.value(),
            stable: s.value(),
            evidence: format!(
                "canary {} ({}/{} {}) vs stable {} ({}/{}) over {span} s, {limit}",
                fmt_value(c.value()),
                c.events,
                c.trials,
                needs.trials,
                fmt_value(s.value()),
                s.events,
                s.trials
            ),
        }
    }

    /// p99 comparison through tail fractions.
    ///
    /// "canary p99 ≤ factor × stable p99" is, for the stable p99 `q`, "the fraction of
    /// canary responses slower than `factor·q` is ≤ the fraction of stable responses
    /// slower than `q`" (both 1 % at the boundary). With `q` taken as the upper edge of
    /// the stable p99 bucket, the two tail counts are compared with the rate-ratio test
    /// at ratio 1. This uses every response in the tail (not just two noisy quantile
    /// estimates), catches a fattening tail even when the median is unchanged, and a
    /// single outlier is one event among dozens, so it cannot fail a canary.
    fn latency(
        &self,
        w: &Window,
        factor: f64,
        worse: Worse,
        limit: &str,
        change: Option<ChangeEvidence>,
    ) -> Assessment {
        let (hc, hs) = (&w.canary.latency, &w.stable.latency);
        let (nc, ns): (u64, u64) = (hc.iter().sum(), hs.iter().sum());
        let ms = |v: Option<f64>| v.map_or(f64::NAN, |ns| ns / 1e6);
        let (p99c, p99s) = (ms(quantile_ns(hc, P99)), ms(quantile_ns(hs, P99)));
        let needs = needs(
            MIN_CANARY_LATENCY,
            MIN_STABLE_LATENCY,
            "responses",
            "slow responses",
        );
        let Some(b) = quantile_bucket(hs, P99).filter(|&b| b + 1 < LATENCY_BUCKETS) else {
            return Assessment {
                canary: p99c,
                stable: p99s,
                ..unavailable(format!(
                    "stable p99 unknown or beyond the histogram ({ns} responses in {} s)",
                    w.span_s
                ))
            };
        };
        let cut = bucket_upper_ns(b as u32);
        let canary_cut = (cut as f64 * factor).ceil().min(u64::MAX as f64) as u64;
        let slow_c = match worse {
            Worse::Higher => count_at_or_above(hc, canary_cut),
            Worse::Lower => count_possibly_above(hc, canary_cut),
        };
        let slow_s = count_at_or_above(hs, cut);
        let q = Question::Ratio {
            canary: Rate {
                events: slow_c,
                trials: nc,
            },
            stable: Rate {
                events: slow_s,
                trials: ns,
            },
            factor: 1.0,
            floor: None,
        };
        let why = format!(
            "canary p99 {} ms vs stable {} ms over {} s, {limit}; {slow_c}/{nc} canary responses ≥ {:.3} ms vs {slow_s}/{ns} stable ≥ {:.3} ms",
            fmt_value(p99c),
            fmt_value(p99s),
            w.span_s,
            canary_cut as f64 / 1e6,
            cut as f64 / 1e6,
        );
        Assessment {
            decision: decide_with(&q, worse, self.level, needs, w.span_s, change),
            canary: p99c,
            stable: p99s,
            evidence: why,
        }
    }
}

/// One metric or rule: what it compares and over which window.
struct Test {
    metric: MetricName,
    bound: Bound,
    window_s: u64,
}

impl Test {
    fn worse(&self) -> Worse {
        match self.bound {
            Bound::Relative { worse, .. } => worse,
            Bound::SuccessFloor(_) => Worse::Higher,
        }
    }
}

fn metric_bound(m: &MetricSpec) -> Bound {
    match m.name {
        MetricName::SuccessRate => Bound::SuccessFloor(m.threshold),
        MetricName::Custom(_) if m.threshold < 1.0 => Bound::Relative {
            factor: m.threshold,
            worse: Worse::Lower,
        },
        _ => Bound::Relative {
            factor: m.threshold,
            worse: Worse::Higher,
        },
    }
}

/// Upper edge (ns) of the bucket holding the stable p99 of `w`, when `w` has enough
/// stable responses and the p99 is inside the histogram.
fn stable_p99_cut(w: &Window) -> Option<u64> {
    let hs = &w.stable.latency;
    if hs.iter().sum::<u64>() < MIN_STABLE_LATENCY {
        return None;
    }
    let b = quantile_bucket(hs, P99).filter(|&b| b + 1 < LATENCY_BUCKETS)?;
    Some(bucket_upper_ns(b as u32))
}

/// The binomial question of `test` over one step's counts (the detector's increment);
/// `None` when the test is invalid or has nothing to compare in this step. Mirrors
/// [`Analyzer::assess`].
fn step_question(test: &Test, step: &Window, latency_cut: Option<u64>) -> Option<Question> {
    let factor = match test.bound {
        Bound::Relative { factor, .. } => factor,
        Bound::SuccessFloor(t) => {
            if !(t.is_finite() && t > 0.0 && t <= 1.0) {
                return None;
            }
            let (c, _, _) = errors(step);
            return Some(Question::Absolute {
                canary: c,
                p0: 1.0 - t,
            });
        }
    };
    if !(factor.is_finite() && factor > 0.0) {
        return None;
    }
    let ratio = |canary, stable, factor| {
        Some(Question::Ratio {
            canary,
            stable,
            factor,
            floor: None,
        })
    };
    match &test.metric {
        MetricName::ErrorRate => {
            let (c, s, _) = errors(step);
            ratio(c, s, factor)
        }
        MetricName::SuccessRate => {
            let (c, s, _) = errors(step);
            let ok = |r: Rate| Rate {
                events: r.trials - r.events,
                trials: r.trials,
            };
            ratio(ok(c), ok(s), factor)
        }
        MetricName::Custom(name) => {
            let (Some(&c), Some(&s)) = (step.canary.custom.get(name), step.stable.custom.get(name))
            else {
                return None;
            };
            ratio(rate(c), rate(s), factor)
        }
        MetricName::LatencyP99 => {
            let cut = latency_cut?;
            let (hc, hs) = (&step.canary.latency, &step.stable.latency);
            let canary_cut = (cut as f64 * factor).ceil().min(u64::MAX as f64) as u64;
            let slow_c = match test.worse() {
                Worse::Higher => count_at_or_above(hc, canary_cut),
                Worse::Lower => count_possibly_above(hc, canary_cut),
            };
            ratio(
                Rate {
                    events: slow_c,
                    trials: hc.iter().sum(),
                },
                Rate {
                    events: count_at_or_above(hs, cut),
                    trials: hs.iter().sum(),
                },
                1.0,
            )
        }
    }
}

fn needs(
    min_canary: u64,
    min_stable: u64,
    trials: &'static str,
    events: &'static str,
) -> Needs<'static> {
    Needs {
        min_canary,
        min_stable,
        min_events: MIN_EVENTS,
        trials,
        events,
    }
}

fn rate((events, trials): (u64, u64)) -> Rate {
    Rate {
        events: events.min(trials),
        trials,
    }
}

/// Error counts of both versions, and what a trial is.
///
/// With HTTP traffic (either version saw requests in the window) an error is a 5xx
/// response or a connection attempt that never got a SYN-ACK; the latter counts as a
/// failed trial too, so a canary that stops accepting connections altogether (and thus
/// sees no requests) shows as 100 % errors instead of "no data". Resets are not counted
/// for HTTP: clients routinely close keep-alive connections with RST. Without HTTP
/// (`requests` stays 0) an error is a reset or failed connection over new connections
/// (assumed to count attempts, so failures are among them).
fn errors(w: &Window) -> (Rate, Rate, Needs<'static>) {
    let http = w.stable.requests + w.canary.requests > 0;
    let of = |v: &VersionCounters| {
        if http {
            let answered: u64 = v.responses.iter().sum();
            Rate {
                events: v.responses[4] + v.conn_failed,
                trials: v.requests.max(answered) + v.conn_failed,
            }
        } else {
            let events = v.conn_reset + v.conn_failed;
            Rate {
                events,
                trials: v.conn_new.max(events),
            }
        }
    };
    let trials = if http { "requests" } else { "connections" };
    (
        of(&w.canary),
        of(&w.stable),
        needs(MIN_TRIALS, MIN_TRIALS, trials, "errors"),
    )
}

fn unavailable(reason: String) -> Assessment {
    Assessment {
        decision: Decision {
            outcome: Outcome::Inconclusive,
            confidence: 0.0,
            reason,
            statistic: None,
        },
        canary: f64::NAN,
        stable: f64::NAN,
        evidence: String::new(),
    }
}

/// Policy spelling of an action.
pub fn action_name(action: Action) -> &'static str {
    match action {
        Action::ImmediateRollback => "immediate-rollback",
        Action::PauseAndAlert => "pause-and-alert",
    }
}

/// The canary's trials of `metric` in `w` and their noun, for traffic projections.
fn canary_trials(metric: &MetricName, w: &Window) -> (u64, &'static str) {
    match metric {
        MetricName::LatencyP99 => (w.canary.latency.iter().sum(), "responses"),
        MetricName::Custom(name) => (w.canary.custom.get(name).map_or(0, |c| c.1), "trials"),
        MetricName::ErrorRate | MetricName::SuccessRate => {
            let (c, _, needs) = errors(w);
            (c.trials, needs.trials)
        }
    }
}

/// 12.3456 → "12", 0.4 → "0.4".
fn fmt_rate(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "n/a".to_string()
    } else {
        format!("{v:.4}")
    }
}

fn fired_detail(a: &Assessment) -> String {
    format!("{}; confidence {:.4}", a.reason(), a.decision.confidence)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: MetricName, threshold: f64, window_s: u64) -> MetricSpec {
        MetricSpec {
            name,
            threshold,
            window_s,
            on_fail: Action::PauseAndAlert,
            query: None,
        }
    }

    /// `secs` seconds at `rps` requests/s, one 5xx every `err_every` (0 = none), and
    /// `conversions` per mille of requests converting.
    fn counters(secs: u64, rps: u64, err_every: u64, conversions: u64) -> VersionCounters {
        let mut c = VersionCounters::zero();
        let n = secs * rps;
        let errors = n.checked_div(err_every).unwrap_or(0);
        c.requests = n;
        c.responses[1] = n - errors;
        c.responses[4] = errors;
        c.custom
            .insert("conversion-rate".into(), (n * conversions / 1000, n));
        c
    }

    /// Feeds `secs` seconds (stable 180 req/s, canary 20 req/s) and evaluates.
    fn run(a: &mut Analyzer, secs: u64, err_every: (u64, u64), conv: (u64, u64)) -> Evaluation {
        for t in 0..=secs {
            a.observe(
                t,
                &counters(t, 180, err_every.0, conv.0),
                &counters(t, 20, err_every.1, conv.1),
            );
        }
        a.evaluate(secs)
    }

    #[test]
    fn error_rate_passes_against_the_floor_without_errors() {
        let error_rate =
            || Analyzer::new(vec![spec(MetricName::ErrorRate, 1.05, 300)], vec![], 0.01);
        // 30 s at 20 canary req/s: 600 error-free requests ≥ ERROR_FREE_REQUESTS_TO_PASS.
        let v = run(&mut error_rate(), 30, (0, 0), (50, 50))
            .verdicts
            .remove(0);
        assert_eq!(v.verdict, Outcome::Pass, "{v:?}");
        assert!(
            v.reason
                .contains("0 errors in 600 requests: canary error rate shown below the 1% floor"),
            "{}",
            v.reason
        );
        // 20 s = 400 requests: not yet.
        let v = run(&mut error_rate(), 20, (0, 0), (50, 50))
            .verdicts
            .remove(0);
        assert_eq!(v.verdict, Outcome::Inconclusive, "{v:?}");
        // A stricter floor needs more requests; out-of-range floors use the default.
        let v = run(
            &mut error_rate().with_error_floor(0.001),
            30,
            (0, 0),
            (50, 50),
        )
        .verdicts
        .remove(0);
        assert_eq!(v.verdict, Outcome::Inconclusive, "{v:?}");
        assert!(
            v.reason.contains("not yet shown below the 0.1% floor"),
            "{}",
            v.reason
        );
        for bad in [0.0, 1.0, -0.5, f64::NAN, f64::INFINITY] {
            let v = run(
                &mut error_rate().with_error_floor(bad),
                30,
                (0, 0),
                (50, 50),
            )
            .verdicts
            .remove(0);
            assert_eq!(v.verdict, Outcome::Pass, "floor {bad}: {v:?}");
        }
        // 5 % canary errors against a clean stable still fail (50/1000 in 50 s).
        let eval = run(&mut error_rate(), 50, (0, 20), (50, 50));
        assert_eq!(
            eval.verdicts[0].verdict,
            Outcome::Fail,
            "{:?}",
            eval.verdicts
        );
        assert_eq!(eval.fired.len(), 1);
    }

    #[test]
    fn success_rate_does_not_stall_without_errors() {
        let mut a = Analyzer::new(vec![spec(MetricName::SuccessRate, 0.95, 600)], vec![], 0.01);
        let v = run(&mut a, 30, (0, 0), (50, 50)).verdicts.remove(0);
        assert_eq!(v.verdict, Outcome::Pass, "{v:?}");
    }

    #[test]
    fn reasons_and_details_do_not_repeat_the_name() {
        let conversion = MetricName::Custom("conversion-rate".into());
        let rule = RollbackRule {
            name: "business-impact".into(),
            metric: conversion.clone(),
            cmp: Cmp::Lt,
            factor: 0.9,
            action: Action::PauseAndAlert,
        };
        let mut a = Analyzer::new(vec![spec(conversion, 0.9, 300)], vec![rule], 0.01)
            .with_rule_windows_s(30, 300);
        // Canary converts 2.5 %, stable 5 %.
        let eval = run(&mut a, 300, (100, 100), (50, 25));
        assert_eq!(eval.verdicts[0].verdict, Outcome::Fail);
        let v = &eval.verdicts[0];
        assert!(!v.reason.contains("conversion-rate"), "{}", v.reason);
        assert!(
            v.reason.starts_with("canary 0.0250 (150/6000 trials)"),
            "{}",
            v.reason
        );
        let [metric, rule] = &eval.fired[..] else {
            panic!("{:?}", eval.fired)
        };
        assert_eq!(metric.rule, "conversion-rate");
        assert!(
            metric.detail.starts_with("canary 0.0250"),
            "{}",
            metric.detail
        );
        assert!(
            !metric.detail.contains("conversion-rate"),
            "{}",
            metric.detail
        );
        // A rule's name is not its metric's: the detail names the metric, not first.
        assert_eq!(rule.rule, "business-impact");
        assert!(rule.detail.starts_with("canary 0.0250"), "{}", rule.detail);
        assert!(
            rule.detail
                .contains("conversion-rate must be ≥ 0.9 × stable"),
            "{}",
            rule.detail
        );
        // What the agent prints.
        let line = format!("{}: {}", metric.rule, metric.detail);
        assert_eq!(line.matches("conversion-rate").count(), 1, "{line}");

        // Hold reasons: "inconclusive: NAME: reason" with the name once.
        let mut a = Analyzer::new(
            vec![
                spec(MetricName::ErrorRate, 1.05, 300),
                spec(MetricName::Custom("signups".into()), 0.9, 300),
            ],
            vec![],
            0.01,
        );
        let eval = run(&mut a, 10, (0, 0), (50, 50));
        let hold = hold_reason(&eval).unwrap();
        assert_eq!(
            hold,
            "inconclusive: error-rate: canary 0.0000 (0/200 requests) vs stable 0.0000 (0/1800) \
             over 10 s, must be ≤ 1.05 × stable: no stable errors to compare against and canary \
             has 0 errors in 10 s window; canary error rate not yet shown below the 1% floor \
             (e-value 5.977, need 100); signups: no data from the metric's queries yet"
        );
    }
}
