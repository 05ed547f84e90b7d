//! Turning window counts into a sequential test and a three-way decision.
//!
//! Every comparison is reduced to one binomial question answered with
//! [`ln_mixture_lr`]:
//!
//! - **Rate ratio** (canary rate vs `factor` × stable rate, e.g. error rate): treat the
//!   events of each version as Poisson with mean `rate × trials`. Conditional on the total
//!   `E = e_c + e_s`, the canary's share is `e_c ~ Binomial(E, π)` with
//!   `π = ρ n_c / (ρ n_c + n_s)` where `ρ` is the true ratio of rates. "ρ ≤ factor" is
//!   "π ≤ π0" with `π0` at `ρ = factor`. The event order is a sequence of Bernoulli(π)
//!   draws, so the mixture ratio is a test martingale in `E`. Conditioning removes the
//!   unknown stable rate (no plug-in estimate), and when stable has no events at all,
//!   `π0 < 1` still lets a canary with many events fail. Binomial counts vary less than
//!   Poisson ones, so for frequent events the test is conservative.
//! - **Absolute** (canary rate vs a fixed `p0`, e.g. success-rate floor): `e_c ~
//!   Binomial(n_c, p)`, one-sample test of `p ≤ p0`.
//! - **Error floor** (a rate ratio whose stable side has too few events, see
//!   [`Question::Ratio::floor`]): a ratio needs events on both sides, and a healthy
//!   stable often has none — `0 / 0` can never be shown to be ≤ 1.05. The canary is then
//!   compared with an absolute rate instead, by the one-sample pass test (`p ≥ floor`
//!   rejected at the same α): a canary shown below the floor passes. The floor only ever
//!   yields a Pass; every Fail still comes from the ratio test, so a canary that is bad
//!   against a zero-error stable fails exactly as without a floor.
//!
//! The three outcomes:
//! - **Fail**: the e-value against "canary within the threshold" reaches `1/α`.
//! - **Pass**: positive evidence. Either the mirror test (against "canary beyond the
//!   threshold") reaches `1/α` — *strict pass* — or, when data are too few to resolve
//!   an effect as small as the threshold, the mirror test against the threshold widened
//!   by `pass_slack` (ratio `factor × slack`, or `p0 × slack`) reaches `1/α`: the canary
//!   is then shown, with the same confidence, to be no worse than `slack` times the
//!   allowed degradation. Thus a Pass always means "a canary at least `slack` × beyond the
//!   threshold would be rejected by these data with confidence 1 − α"; anything weaker
//!   is Inconclusive.
//! - **Inconclusive**: too few trials or, for ratios, too few events in both versions
//!   together (below fixed minimums), or neither test decisive. The event minimum (10)
//!   keeps start-up verdicts off a handful of events (where a few unlucky ones already
//!   look extreme and several tests at once add up their α). It
//!   does not shield a bad canary when stable has no errors: the canary's own events
//!   count, and 10 of them against none is decisive. With a floor, a canary shown below
//!   it passes even when the event minimum is not met. Inconclusive never causes a
//!   rollback and never lets progression continue.

use super::detector::{ChangeEvidence, CHANGE_PREMIUM};
pub use super::question::{Question, Rate, Worse};
use super::stats::{ln_mixture_lr, Tail};

/// Minimum trials per version and what they are called, for the data-sufficiency rule.
#[derive(Debug, Clone, Copy)]
pub struct Needs<'a> {
    pub min_canary: u64,
    pub min_stable: u64,
    /// Minimum events of both versions together for a ratio comparison.
    pub min_events: u64,
    /// Plural noun for a trial ("requests", "responses", ...).
    pub trials: &'a str,
    /// Plural noun for an event ("errors", "slow responses", ...).
    pub events: &'a str,
}

/// Outcome of one comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Inconclusive,
}

/// Which statistic decided a Fail, for the operator (status, report) and for the
/// shared-outage check, which looks at stable over the same span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "statistic")]
pub enum Statistic {
    /// The test over the metric's (or rule's) window of `span_s` seconds.
    Window { span_s: u64 },
    /// The detector's e-process from its first data, `age_s` seconds ago.
    FromStart { age_s: u64 },
    /// The detector's CUSUM: a change that began at `since_s`, `age_s` seconds ago.
    Change { since_s: u64, age_s: u64 },
}

/// A decision and the evidence behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    /// `1 − 1/e` of the deciding test (the fail test when inconclusive), in [0, 1].
    pub confidence: f64,
    /// Human-readable evidence summary.
    pub reason: String,
    /// For a Fail: the statistic that fired.
    pub statistic: Option<Statistic>,
}

/// Tuning shared by all comparisons.
#[derive(Debug, Clone, Copy)]
pub struct Level {
    /// Significance level: reject when the e-value reaches `1/alpha`.
    pub alpha: f64,
    /// Widening of the bound for a non-strict Pass (≥ 1).
    pub pass_slack: f64,
}

fn confidence(ln_e: f64) -> f64 {
    (1.0 - (-ln_e).exp()).clamp(0.0, 1.0)
}

/// Runs the fail test and the mirror (pass) tests for `q`.
pub fn decide(q: &Question, worse: Worse, level: Level, needs: Needs, span_s: u64) -> Decision {
    decide_with(q, worse, level, needs, span_s, None)
}

/// [`decide`] with the evidence of the change detector ([`super::detector`]) as a
/// second way to Fail, once the window has the data the windowed test needs.
pub fn decide_with(
    q: &Question,
    worse: Worse,
    level: Level,
    needs: Needs,
    span_s: u64,
    change: Option<ChangeEvidence>,
) -> Decision {
    let inconclusive = |reason: String| Decision {
        outcome: Outcome::Inconclusive,
        confidence: 0.0,
        reason,
        statistic: None,
    };
    let (canary, stable, floor) = match *q {
        Question::Ratio {
            canary,
            stable,
            floor,
            ..
        } => (
            canary,
            Some(stable),
            floor.filter(|f| worse == Worse::Higher && *f > 0.0 && *f < 1.0),
        ),
        Question::Absolute { canary, .. } => (canary, None, None),
    };
    let canary_trials = canary.trials;
    if canary_trials < needs.min_canary {
        return inconclusive(format!(
            "canary has {canary_trials} {} in {span_s} s window, need ≥ {}",
            needs.trials, needs.min_canary
        ));
    }
    // When stable has too few events for the ratio, a canary shown below the floor
    // passes; otherwise `undecided` stands, with the floor's progress appended.
    let against_floor = |undecided: Decision| match floor {
        Some(floor) => {
            floor_pass(canary, floor, level, needs).unwrap_or_else(|progress| Decision {
                reason: format!("{}; {progress}", undecided.reason),
                ..undecided
            })
        }
        None => undecided,
    };
    let mut sparse_stable = false;
    if let Some(stable) = stable {
        if stable.trials < needs.min_stable {
            return inconclusive(format!(
                "stable has {} {} in {span_s} s window, need ≥ {}",
                stable.trials, needs.trials, needs.min_stable
            ));
        }
        if stable.events == 0 && canary.events == 0 {
            return against_floor(inconclusive(format!(
                "no stable {ev} to compare against and canary has 0 {ev} in {span_s} s window",
                ev = needs.events
            )));
        }
        let total = stable.events + canary.events;
        if total < needs.min_events {
            return against_floor(inconclusive(format!(
                "only {total} {} in {span_s} s window across both versions, need ≥ {}",
                needs.events, needs.min_events
            )));
        }
        sparse_stable = stable.events < needs.min_events;
    }
    let threshold = level.alpha.ln().abs();
    let boundary = q.boundary();
    let (k, n, p0) = q.binomial(boundary);
    let ln_fail = ln_mixture_lr(k, n, p0, worse.fail_tail());
    if ln_fail >= threshold {
        return Decision {
            outcome: Outcome::Fail,
            confidence: confidence(ln_fail),
            reason: format!(
                "canary shown beyond the bound (e-value {:.3e} ≥ {:.0})",
                ln_fail.exp(),
                1.0 / level.alpha
            ),
            statistic: Some(Statistic::Window { span_s }),
        };
    }
    if let Some(c) = change {
        let (ln_e, over, what, statistic) = if c.ln_total >= threshold {
            let what = "since the start".to_string();
            let statistic = Statistic::FromStart {
                age_s: c.total_age_s,
            };
            (c.ln_total, c.ln_total, what, statistic)
        } else {
            let over = c.ln_change - CHANGE_PREMIUM;
            let what = format!("over the last {} s", c.age_s);
            let change = Statistic::Change {
                since_s: c.since_s,
                age_s: c.age_s,
            };
            (c.ln_change, over, what, change)
        };
        if over >= threshold {
            return Decision {
                outcome: Outcome::Fail,
                confidence: confidence(over),
                reason: format!(
                    "change detected: canary beyond the bound {what} (e-detector {:.3e} ≥ {:.0})",
                    ln_e.exp(),
                    (threshold + ln_e - over).exp()
                ),
                statistic: Some(statistic),
            };
        }
    }
    let ln_strict = ln_mixture_lr(k, n, p0, worse.pass_tail());
    if ln_strict >= threshold {
        return Decision {
            outcome: Outcome::Pass,
            confidence: confidence(ln_strict),
            reason: format!(
                "canary shown within the bound (e-value {:.3e})",
                ln_strict.exp()
            ),
            statistic: None,
        };
    }
    let wide = worse.widen(boundary, level.pass_slack);
    let slack_possible = level.pass_slack > 1.0
        && match q {
            Question::Ratio { .. } => wide.is_finite() && wide > 0.0,
            Question::Absolute { .. } => wide > 0.0 && wide < 1.0,
        };
    if slack_possible {
        let (k, n, p0) = q.binomial(wide);
        let ln_slack = ln_mixture_lr(k, n, p0, worse.pass_tail());
        if ln_slack >= threshold {
            return Decision {
                outcome: Outcome::Pass,
                confidence: confidence(ln_slack),
                reason: format!(
                    "canary shown within {} × the bound (e-value {:.3e}); too few data to resolve the bound itself",
                    level.pass_slack,
                    ln_slack.exp()
                ),
                statistic: None,
            };
        }
    }
    let undecided = Decision {
        outcome: Outcome::Inconclusive,
        confidence: confidence(ln_fail),
        reason: format!(
            "not enough evidence either way yet (fail e-value {:.3}, pass e-value {:.3}, need {:.0})",
            ln_fail.exp(),
            ln_strict.exp(),
            1.0 / level.alpha
        ),
        statistic: None,
    };
    if sparse_stable {
        against_floor(undecided)
    } else {
        undecided
    }
}

/// The one-sample pass test of the canary's event rate against `floor`: a Pass when the
/// canary is shown below it, else (as `Err`) a note of how far the test has got.
fn floor_pass(canary: Rate, floor: f64, level: Level, needs: Needs) -> Result<Decision, String> {
    let ln_e = ln_mixture_lr(canary.events, canary.trials, floor, Tail::Lower);
    let floor_text = fraction_as_percent(floor);
    if ln_e >= level.alpha.ln().abs() {
        Ok(Decision {
            outcome: Outcome::Pass,
            confidence: confidence(ln_e),
            reason: format!(
                "{} {} in {} {}: canary error rate shown below the {floor_text} floor \
                 (e-value {:.3e}; stable has too few {} for a ratio)",
                canary.events,
                needs.events,
                canary.trials,
                needs.trials,
                ln_e.exp(),
                needs.events
            ),
            statistic: None,
        })
    } else {
        Err(format!(
            "canary error rate not yet shown below the {floor_text} floor (e-value {:.3}, need {:.0})",
            ln_e.exp(),
            1.0 / level.alpha
        ))
    }
}

/// 0.01 → "1%", 0.0025 → "0.25%".
pub fn fraction_as_percent(fraction: f64) -> String {
    let text = format!("{:.4}", fraction * 100.0);
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}%")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEVEL: Level = Level {
        alpha: 0.01,
        pass_slack: 1.5,
    };
    const NEEDS: Needs = Needs {
        min_canary: 20,
        min_stable: 20,
        min_events: 10,
        trials: "requests",
        events: "errors",
    };

    fn ratio(ec: u64, nc: u64, es: u64, ns: u64, factor: f64) -> Question {
        Question::Ratio {
            canary: Rate {
                events: ec,
                trials: nc,
            },
            stable: Rate {
                events: es,
                trials: ns,
            },
            factor,
            floor: None,
        }
    }

    /// [`ratio`] with the default 1 % error floor.
    fn floored(ec: u64, nc: u64, es: u64, ns: u64, factor: f64) -> Question {
        match ratio(ec, nc, es, ns, factor) {
            Question::Ratio {
                canary,
                stable,
                factor,
                ..
            } => Question::Ratio {
                canary,
                stable,
                factor,
                floor: Some(0.01),
            },
            q => q,
        }
    }

    #[test]
    fn too_few_requests_is_inconclusive() {
        let d = decide(
            &ratio(12, 12, 0, 1000, 1.05),
            Worse::Higher,
            LEVEL,
            NEEDS,
            300,
        );
        assert_eq!(d.outcome, Outcome::Inconclusive);
        assert_eq!(
            d.reason,
            "canary has 12 requests in 300 s window, need ≥ 20"
        );
    }

    #[test]
    fn no_events_anywhere_is_inconclusive() {
        let d = decide(
            &ratio(0, 600, 0, 5400, 1.05),
            Worse::Higher,
            LEVEL,
            NEEDS,
            300,
        );
        assert_eq!(d.outcome, Outcome::Inconclusive);
        assert!(d.reason.starts_with("no stable errors to compare against"));
    }

    #[test]
    fn stable_without_errors_still_fails_a_bad_canary() {
        // Stable: 0 errors in 5400; canary 10 % of traffic with 30 errors in 600.
        let d = decide(
            &ratio(30, 600, 0, 5400, 1.05),
            Worse::Higher,
            LEVEL,
            NEEDS,
            300,
        );
        assert_eq!(d.outcome, Outcome::Fail, "{d:?}");
        assert!(d.confidence > 0.99);
        // ... but two canary errors are not enough evidence.
        let d = decide(
            &ratio(2, 600, 0, 5400, 1.05),
            Worse::Higher,
            LEVEL,
            NEEDS,
            300,
        );
        assert_eq!(d.outcome, Outcome::Inconclusive);
        assert!(d.reason.starts_with("only 2 errors"), "{}", d.reason);
        // Ten canary errors against none.
        let d = decide(
            &ratio(10, 600, 0, 5400, 1.05),
            Worse::Higher,
            LEVEL,
            NEEDS,
            300,
        );
        assert_eq!(d.outcome, Outcome::Fail, "{d:?}");
    }

    #[test]
    fn equal_rates_pass_with_slack_not_strictly() {
        // 60 vs 540 errors: equal rates. Ratio 1.0 is too close to 1.05 for a strict
        // pass, but 1.5 × 1.05 is excluded.
        let d = decide(
            &ratio(60, 6000, 540, 54000, 1.05),
            Worse::Higher,
            LEVEL,
            NEEDS,
            300,
        );
        assert_eq!(d.outcome, Outcome::Pass, "{d:?}");
        assert!(d.reason.contains("within 1.5 × the bound"));
        let strict = Level {
            pass_slack: 1.0,
            ..LEVEL
        };
        let d = decide(
            &ratio(60, 6000, 540, 54000, 1.05),
            Worse::Higher,
            strict,
            NEEDS,
            300,
        );
        assert_eq!(d.outcome, Outcome::Inconclusive);
        // A clearly better canary passes strictly.
        let d = decide(
            &ratio(5, 6000, 540, 54000, 1.05),
            Worse::Higher,
            LEVEL,
            NEEDS,
            300,
        );
        assert_eq!(d.outcome, Outcome::Pass);
        assert!(d.reason.contains("within the bound"));
    }

    #[test]
    fn lower_is_worse_direction() {
        // Conversions: canary 3 % vs stable 5 % with a 0.9 floor.
        let q = ratio(180, 6000, 2700, 54000, 0.9);
        assert_eq!(
            decide(&q, Worse::Lower, LEVEL, NEEDS, 60).outcome,
            Outcome::Fail
        );
        let q = ratio(300, 6000, 2700, 54000, 0.9);
        assert_ne!(
            decide(&q, Worse::Lower, LEVEL, NEEDS, 60).outcome,
            Outcome::Fail
        );
    }

    #[test]
    fn absolute_floor() {
        let q = |errors| Question::Absolute {
            canary: Rate {
                events: errors,
                trials: 1000,
            },
            p0: 0.05,
        };
        assert_eq!(
            decide(&q(10), Worse::Higher, LEVEL, NEEDS, 600).outcome,
            Outcome::Pass
        );
        assert_eq!(
            decide(&q(120), Worse::Higher, LEVEL, NEEDS, 600).outcome,
            Outcome::Fail
        );
        assert_eq!(
            decide(&q(50), Worse::Higher, LEVEL, NEEDS, 600).outcome,
            Outcome::Inconclusive
        );
    }

    #[test]
    fn zero_errors_pass_against_the_floor() {
        use crate::analysis::{DEFAULT_ALPHA, DEFAULT_ERROR_FLOOR, ERROR_FREE_REQUESTS_TO_PASS};
        let level = Level {
            alpha: DEFAULT_ALPHA,
            ..LEVEL
        };
        let floor = |nc| Question::Ratio {
            canary: Rate {
                events: 0,
                trials: nc,
            },
            stable: Rate {
                events: 0,
                trials: 9 * nc,
            },
            factor: 1.05,
            floor: Some(DEFAULT_ERROR_FLOOR),
        };
        let first_pass = (20..10_000)
            .find(|&n| decide(&floor(n), Worse::Higher, level, NEEDS, 300).outcome == Outcome::Pass)
            .unwrap();
        assert_eq!(first_pass, ERROR_FREE_REQUESTS_TO_PASS);
        // The search agrees with the e-value directly.
        let ln_e = |n| ln_mixture_lr(0, n, DEFAULT_ERROR_FLOOR, Tail::Lower);
        assert!(ln_e(first_pass) >= 100f64.ln() && ln_e(first_pass - 1) < 100f64.ln());
        let d = decide(&floor(first_pass - 1), Worse::Higher, level, NEEDS, 300);
        assert_eq!(d.outcome, Outcome::Inconclusive);
        assert!(
            d.reason.starts_with("no stable errors to compare against")
                && d.reason
                    .contains("canary error rate not yet shown below the 1% floor"),
            "{}",
            d.reason
        );
        let d = decide(&floor(612), Worse::Higher, level, NEEDS, 300);
        assert_eq!(d.outcome, Outcome::Pass);
        assert!(d.confidence >= 0.99);
        assert!(
            d.reason.starts_with(
                "0 errors in 612 requests: canary error rate shown below the 1% floor (e-value "
            ),
            "{}",
            d.reason
        );
    }

    #[test]
    fn floor_never_fails_and_never_shields_a_bad_canary() {
        // 9 % canary errors against a clean stable, below the event minimum: the floor
        // test is one-sided, so this holds rather than passing or failing.
        let d = decide(
            &floored(9, 100, 0, 5400, 1.05),
            Worse::Higher,
            LEVEL,
            NEEDS,
            300,
        );
        assert_eq!(d.outcome, Outcome::Inconclusive, "{d:?}");
        assert!(d.reason.starts_with("only 9 errors"), "{}", d.reason);
        // Exactly as without a floor: 10 or 30 canary errors against none fail.
        for errors in [10, 30] {
            let d = decide(
                &floored(errors, 600, 0, 5400, 1.05),
                Worse::Higher,
                LEVEL,
                NEEDS,
                300,
            );
            assert_eq!(d.outcome, Outcome::Fail, "{d:?}");
        }
        // 2 errors in 600 (0.33 %): too few requests to show it below 1 % yet.
        let d = decide(
            &floored(2, 600, 0, 5400, 1.05),
            Worse::Higher,
            LEVEL,
            NEEDS,
            300,
        );
        assert_eq!(d.outcome, Outcome::Inconclusive, "{d:?}");
        // A canary above the floor never passes against it, however many requests.
        let d = decide(
            &floored(9, 600, 0, 540_000, 1.05),
            Worse::Higher,
            LEVEL,
            NEEDS,
            300,
        );
        assert_eq!(d.outcome, Outcome::Inconclusive, "{d:?}");
    }

    #[test]
    fn floor_applies_when_stable_errors_are_too_few_for_the_ratio() {
        // 8 stable + 2 canary errors: the ratio test can decide neither way, and stable's
        // 8 errors are below the minimum: 2 errors in 6000 is shown below 1 %.
        let d = decide(
            &floored(2, 6000, 8, 54_000, 1.05),
            Worse::Higher,
            LEVEL,
            NEEDS,
            300,
        );
        assert_eq!(d.outcome, Outcome::Pass, "{d:?}");
        assert!(d
            .reason
            .starts_with("2 errors in 6000 requests: canary error rate shown below the 1% floor"));
        let unfloored = decide(
            &ratio(2, 6000, 8, 54_000, 1.05),
            Worse::Higher,
            LEVEL,
            NEEDS,
            300,
        );
        assert_eq!(unfloored.outcome, Outcome::Inconclusive);
        // With enough stable errors the ratio must decide; the floor is not consulted.
        let d = decide(
            &floored(3, 6000, 20, 54_000, 1.05),
            Worse::Higher,
            LEVEL,
            NEEDS,
            300,
        );
        assert_eq!(d.outcome, Outcome::Inconclusive, "{d:?}");
        assert!(d.reason.starts_with("not enough evidence"), "{}", d.reason);
        assert!(!d.reason.contains("floor"), "{}", d.reason);
        // Nor when lower is worse (a floor on an error ratio makes no sense there).
        let d = decide(
            &floored(0, 6000, 0, 54_000, 1.05),
            Worse::Lower,
            LEVEL,
            NEEDS,
            300,
        );
        assert_eq!(d.outcome, Outcome::Inconclusive, "{d:?}");
        assert!(!d.reason.contains("floor"), "{}", d.reason);
    }

    #[test]
    fn percent_text() {
        assert_eq!(fraction_as_percent(0.01), "1%");
        assert_eq!(fraction_as_percent(0.0025), "0.25%");
        assert_eq!(fraction_as_percent(0.07), "7%");
        assert_eq!(fraction_as_percent(0.5), "50%");
    }
}
