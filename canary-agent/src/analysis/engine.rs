//! The analyzer: metrics and rollback rules evaluated over sliding windows.

use serde::Serialize;

use super::check::{decide, Decision, Level, Needs, Outcome, Question, Rate, Worse};
use super::latency::{count_at_or_above, count_possibly_above, quantile_bucket, quantile_ns};
use super::spec::{Action, Cmp, MetricName, MetricSpec, RollbackRule};
use super::window::{History, VersionCounters, Window};
use canary_common::histogram::{bucket_upper_ns, LATENCY_BUCKETS};

/// Significance level used when the configured one is not in (0, 1).
pub const DEFAULT_ALPHA: f64 = 0.01;

/// Window of the rollback rules on kernel metrics (error rate, success rate, latency).
/// Rules exist to catch spikes fast, so they look at a short window: 30 s holds ~600
/// canary requests at 20 req/s — enough to resolve a 1.5× error ratio or a 2× p99 — and a
/// fault fills a large share of it within seconds. Measured at 200 req/s with 10 %
/// canary (tests/simulation.rs): a 100 % failing canary is rolled back in ≤ 2 s with
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
/// no data.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub metric: String,
    pub verdict: Outcome,
    pub canary: f64,
    pub stable: f64,
    /// `1 − 1/e` of the deciding test's e-value (for Inconclusive: of the fail test).
    pub confidence: f64,
    pub reason: String,
}

/// A rule (or failing metric, named after the metric) whose action must be taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    pub rule: String,
    pub action: Action,
    pub detail: String,
}

/// Everything decided at one evaluation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Evaluation {
    /// One per configured metric, in configuration order.
    pub verdicts: Vec<Verdict>,
    /// Failing metrics first (configuration order), then fired rules.
    pub fired: Vec<Fired>,
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
    history: History,
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
            history: History::new(1),
        };
        a.history = History::new(a.longest_window());
        a
    }

    /// Overrides [`DEFAULT_RULE_WINDOW_S`] and [`DEFAULT_CUSTOM_RULE_WINDOW_S`] (minimum
    /// 1 s). Discards collected history.
    pub fn with_rule_windows_s(mut self, kernel_s: u64, custom_s: u64) -> Self {
        self.rule_window_s = kernel_s.max(1);
        self.custom_rule_window_s = custom_s.max(1);
        self.history = History::new(self.longest_window());
        self
    }

    /// Overrides [`DEFAULT_PASS_SLACK`]; 1.0 allows only strict passes.
    pub fn with_pass_slack(mut self, slack: f64) -> Self {
        self.level.pass_slack = if slack >= 1.0 { slack } else { 1.0 };
        self
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
    pub fn observe(&mut self, t_s: u64, stable: &VersionCounters, canary: &VersionCounters) {
        self.history.push(t_s, stable, canary);
    }

    /// Evaluates every metric over its own window and every rule over the rule window,
    /// all ending at the newest reading at or before `now_s`.
    pub fn evaluate(&self, now_s: u64) -> Evaluation {
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
        for m in &self.metrics {
            let bound = match m.name {
                MetricName::SuccessRate => Bound::SuccessFloor(m.threshold),
                MetricName::Custom(_) if m.threshold < 1.0 => Bound::Relative {
                    factor: m.threshold,
                    worse: Worse::Lower,
                },
                _ => Bound::Relative {
                    factor: m.threshold,
                    worse: Worse::Higher,
                },
            };
            let name = metric_name(&m.name);
            let a = self.assess(&m.name, bound, window_for(m.window_s).as_ref());
            if a.decision.outcome == Outcome::Fail {
                eval.fired.push(Fired {
                    rule: name.to_string(),
                    action: m.on_fail,
                    detail: fired_detail(name, &a),
                });
            }
            eval.verdicts.push(Verdict {
                metric: name.to_string(),
                verdict: a.decision.outcome,
                canary: a.canary,
                stable: a.stable,
                confidence: a.decision.confidence,
                reason: a.reason(),
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
            let a = self.assess(&r.metric, bound, window_for(window_s).as_ref());
            if a.decision.outcome == Outcome::Fail {
                eval.fired.push(Fired {
                    rule: r.name.clone(),
                    action: r.action,
                    detail: fired_detail(metric_name(&r.metric), &a),
                });
            }
        }
        eval
    }

    fn assess(&self, metric: &MetricName, bound: Bound, window: Option<&Window>) -> Assessment {
        let Some(w) = window else {
            return unavailable("no observations yet".to_string());
        };
        let limit = match bound {
            Bound::Relative { factor, .. } | Bound::SuccessFloor(factor)
                if !(factor.is_finite() && factor > 0.0) =>
            {
                return unavailable(format!("invalid threshold {factor}"));
            }
            Bound::SuccessFloor(t) if t > 1.0 => {
                return unavailable(format!("invalid success-rate threshold {t} (> 1)"));
            }
            Bound::Relative { factor, worse } => {
                let op = if worse == Worse::Higher { "≤" } else { "≥" };
                format!("must be {op} {factor} × stable")
            }
            Bound::SuccessFloor(t) => format!("must be ≥ {t}"),
        };
        let span = w.span_s;
        let (factor, worse) = match bound {
            Bound::SuccessFloor(t) => return self.success_floor(w, t, &limit),
            Bound::Relative { factor, worse } => (factor, worse),
        };
        match metric {
            MetricName::LatencyP99 => self.latency(w, factor, worse, &limit),
            MetricName::Custom(name) => {
                let (Some(&c), Some(&s)) = (w.canary.custom.get(name), w.stable.custom.get(name))
                else {
                    return unavailable(format!("no data for custom metric {name}"));
                };
                let needs = needs(MIN_TRIALS, MIN_TRIALS, "trials", "events");
                self.ratio(rate(c), rate(s), factor, worse, needs, span, &limit)
            }
            MetricName::ErrorRate => {
                let (c, s, needs) = errors(w);
                self.ratio(c, s, factor, worse, needs, span, &limit)
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
                self.ratio(ok(c), ok(s), factor, worse, needs, span, &limit)
            }
        }
    }

    /// Absolute floor on the canary success fraction, tested as a ceiling on its failure
    /// fraction (one-sample test).
    fn success_floor(&self, w: &Window, floor: f64, limit: &str) -> Assessment {
        let (c, s, needs) = errors(w);
        let q = Question::Absolute {
            canary: c,
            p0: 1.0 - floor,
        };
        Assessment {
            decision: decide(&q, Worse::Higher, self.level, needs, w.span_s),
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

    /// Two-sample rate comparison of canary against `factor` × stable.
    #[allow(clippy::too_many_arguments)]
    fn ratio(
        &self,
        c: Rate,
        s: Rate,
        factor: f64,
        worse: Worse,
        needs: Needs,
        span: u64,
        limit: &str,
    ) -> Assessment {
        let q = Question::Ratio {
            canary: c,
            stable: s,
            factor,
        };
        Assessment {
            decision: decide(&q, worse, self.level, needs, span),
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
    fn latency(&self, w: &Window, factor: f64, worse: Worse, limit: &str) -> Assessment {
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
            decision: decide(&q, worse, self.level, needs, w.span_s),
            canary: p99c,
            stable: p99s,
            evidence: why,
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
        },
        canary: f64::NAN,
        stable: f64::NAN,
        evidence: String::new(),
    }
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "n/a".to_string()
    } else {
        format!("{v:.4}")
    }
}

fn fired_detail(metric: &str, a: &Assessment) -> String {
    format!(
        "{metric}: {}; confidence {:.4}",
        a.reason(),
        a.decision.confidence
    )
}
