//! Change-aware sequential fail test: an e-detector over per-second increments.
//!
//! # The per-second e-values
//! Every comparison is a binomial question (see [`super::check`]). Over one second the
//! analysis sees `k` "canary" outcomes and `j` "other" outcomes, each one canary with
//! probability `π` where, on the null boundary, `π = π0`:
//! - a rate ratio: `k` canary events, `j` stable events of that second, `π0 =
//!   f·n_c / (f·n_c + n_s)` from that second's trial counts (conditioning on the
//!   second's total events removes the unknown stable rate, as in [`super::check`]);
//! - an absolute bound: `k` canary events, `j` canary non-events, `π0 = p0`.
//!
//! A *bet* is an alternative whose odds are `m` times the null's, `π1 = m π0 / (1 − π0 +
//! m π0)` (for a ratio this is exactly "canary rate `m·f` × stable"; for "lower is worse"
//! the odds are divided by `m`). Its likelihood ratio for the second is
//! `e = (π1/π0)^k ((1−π1)/(1−π0))^j`, i.e. `ln e = k ln m − (k + j) ln(1 − π0 + m π0)`.
//! Given the past and the second's totals, `E[e] = 1` at `π = π0` and `E[e] ≤ 1` on the
//! whole null side (`e` is increasing in `π` for `m > 1`), so products of consecutive
//! seconds are test supermartingales. The bets form a fixed grid [`BETS`] of effect sizes
//! (1.5× to 30× the allowed odds), mixed with equal weights: the mixture is within
//! `ln K` nats (K = 6, 1.8 nats) of the best bet in hindsight, and each bet is the
//! log-optimal (Kelly) bet when the effect is that size — the grid adapts the bet to
//! the effect without a plug-in estimate.
//!
//! # Two statistics
//! - **From the start** (`S_k` = sum of the bet's log e-values since the first reading):
//!   `(1/K) Σ_k e^{S_k}` is a test supermartingale, so by Ville's inequality
//!   `P(ever ≥ 1/α) ≤ α` under the null, however long the canary runs and however often
//!   it is looked at. This is the exact anytime-valid guarantee, for faults present from
//!   the start.
//! - **Since the best start** (CUSUM, `W_k = max(0, W_{k} + ln e)`, i.e. the maximum
//!   over all start times of the bet's log e-value from that start on): a fault that
//!   begins after minutes of healthy traffic is judged on its own data, not diluted by a
//!   window of good history (the from-start sum has by then drifted far below 0, a window
//!   test dilutes; both slow a late fault down by the healthy time or the window). This
//!   is an e-detector (Shin, Ramdas & Rinaldo, 2023): `(1/K) Σ_k e^{W_k}` is at most the
//!   Shiryaev–Roberts sum `R_t = Σ_{s ≤ t} M_{s,t}` of the mixture e-processes started
//!   at every second `s`, and `R_t − t` is a martingale on the null boundary, so by Doob
//!   `P(alarm within T s) ≤ T · α · e^{−h}` for a threshold `ln(1/α) + h`. The price of
//!   not knowing when a fault starts is that premium `h` ([`CHANGE_PREMIUM`]). The
//!   bound is a worst case (the start times overlap almost completely, a healthy canary
//!   sits strictly inside the null, and discrete counts overshoot the boundary rarely);
//!   the A/A simulation in `tests/analysis_simulation.rs` measures the actual rate with
//!   all seed metrics and rules, and `h` is chosen there.
//!
//! A CUSUM run counts only once it holds [`super::engine`]'s minimum of 10 events of both
//! versions together (the same minimum as the windowed test): a handful of canary
//! errors in two seconds is the commonest chance burst, and ignoring short runs can only
//! lower the statistic, so the bounds stand. In the A/A simulation it cut the false
//! rollbacks at premium ln 4 from 21.8 % to a few percent.
//!
//! How far this is from the best possible is measured in `tests/detection_limit.rs`
//! (BENCHMARKS.md): at equal false-alarm rates a late 5× error fault at 200 req/s takes
//! this detector 16 s, an oracle betting the true effect on the same conditional
//! likelihood 15 s, and an oracle that also knows the stable rate 13 s.
//!
//! Either statistic reaching its threshold is a Fail; the windowed test of
//! [`super::check`] keeps its own Fail; Pass comes from the data since the rollout step
//! began (see [`super::Analyzer::begin_step`]).
//! Cost: `2 K` multiply-adds and `K` logarithms per test per second.

use super::question::{Question, Worse};

/// Effect sizes bet on, as multiples of the allowed odds.
pub const BETS: [f64; 6] = [1.5, 2.0, 3.0, 5.0, 10.0, 30.0];

/// Extra evidence (nats) the change statistic needs over `ln(1/α)` (threshold e-value
/// 100 · e⁶ ≈ 40 000 at α = 0.01), chosen by the A/A simulation with all seed metrics
/// and rules, 500 runs × 30 min at 200 req/s: premium ln 4 rolled back 21.8 % of runs
/// (without the run-length minimum below), 4.5 nats 1.2 %, 6 nats 0.6 %; a 5× error
/// increase after 10 healthy minutes was rolled back after a median 15 s at 4.5 and
/// 16–18 s at 6, depending on the seeded run set (BENCHMARKS.md's table: 16 s; the
/// windowed test alone: 20 s). The Doob bound of the module docs at
/// this premium is `T · 0.01 · e⁻⁶ = T / 40 000` per test, T in seconds with events.
pub const CHANGE_PREMIUM: f64 = 6.0;

/// State of one test.
#[derive(Debug, Clone)]
pub struct Detector {
    worse: Worse,
    /// `S_k`: log e-value of each bet since the start.
    total: [f64; BETS.len()],
    /// `W_k`: CUSUM of each bet.
    cusum: [f64; BETS.len()],
    /// Time of the last reset of each CUSUM (its run started after it).
    since: [u64; BETS.len()],
    /// Events (both kinds) in each CUSUM's current run.
    run_events: [u64; BETS.len()],
    /// Time of the latest reading with data.
    last_s: u64,
    /// Time of the first reading with data: where the from-start statistic begins.
    first_s: Option<u64>,
}

/// What the detector has found, for the decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChangeEvidence {
    /// ln of the from-start mixture e-value.
    pub ln_total: f64,
    /// ln of the change (CUSUM) mixture e-value.
    pub ln_change: f64,
    /// Start of the run of the bet that dominates the change statistic.
    pub since_s: u64,
    /// Seconds from that start to the latest reading: how long ago the change began.
    pub age_s: u64,
    /// Seconds from the detector's first data to the latest reading: the span of the
    /// from-start statistic.
    pub total_age_s: u64,
}

impl Detector {
    pub fn new(worse: Worse) -> Self {
        Self {
            worse,
            total: [0.0; BETS.len()],
            cusum: [0.0; BETS.len()],
            since: [0; BETS.len()],
            run_events: [0; BETS.len()],
            last_s: 0,
            first_s: None,
        }
    }

    /// Adds one second's increment, the question built from that second's counts.
    pub fn update(&mut self, t_s: u64, q: &Question) {
        let (k, j, p0) = match *q {
            Question::Ratio {
                canary,
                stable,
                factor,
                ..
            } => {
                if canary.trials == 0 || stable.trials == 0 {
                    return;
                }
                let w = factor * canary.trials as f64;
                (canary.events, stable.events, w / (w + stable.trials as f64))
            }
            Question::Absolute { canary, p0 } => (
                canary.events.min(canary.trials),
                canary.trials - canary.events.min(canary.trials),
                p0,
            ),
        };
        if k + j == 0 || !(p0 > 0.0 && p0 < 1.0) {
            return;
        }
        self.last_s = t_s;
        self.first_s.get_or_insert(t_s);
        let (kf, nf) = (k as f64, (k + j) as f64);
        for (i, &bet) in BETS.iter().enumerate() {
            let m = match self.worse {
                Worse::Higher => bet,
                Worse::Lower => 1.0 / bet,
            };
            let ln_e = kf * m.ln() - nf * (1.0 - p0 + m * p0).ln();
            self.total[i] += ln_e;
            self.cusum[i] += ln_e;
            self.run_events[i] += k + j;
            if self.cusum[i] <= 0.0 {
                self.cusum[i] = 0.0;
                self.since[i] = t_s;
                self.run_events[i] = 0;
            }
        }
    }

    /// The evidence; a CUSUM run with fewer than `min_events` events counts as no
    /// evidence (its e-value is replaced by 1, which only lowers the statistic).
    pub fn evidence(&self, min_events: u64) -> ChangeEvidence {
        let ln_mix = |v: &[f64]| {
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            max + (v.iter().map(|x| (x - max).exp()).sum::<f64>() / v.len() as f64).ln()
        };
        let mut change = self.cusum;
        for (w, &n) in change.iter_mut().zip(&self.run_events) {
            if n < min_events {
                *w = 0.0;
            }
        }
        let best = (0..BETS.len())
            .max_by(|&a, &b| change[a].total_cmp(&change[b]))
            .unwrap_or(0);
        ChangeEvidence {
            ln_total: ln_mix(&self.total),
            ln_change: ln_mix(&change),
            since_s: self.since[best],
            age_s: self.last_s.saturating_sub(self.since[best]),
            total_age_s: self.first_s.map_or(0, |f| self.last_s.saturating_sub(f)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::question::Rate;

    fn ratio(ec: u64, nc: u64, es: u64, ns: u64) -> Question {
        Question::Ratio {
            canary: Rate {
                events: ec,
                trials: nc,
            },
            stable: Rate {
                events: es,
                trials: ns,
            },
            factor: 1.05,
            floor: None,
        }
    }

    #[test]
    fn per_second_e_value_has_mean_one_on_the_boundary() {
        // One second with n events, each canary with probability π0: E[e] = 1 exactly.
        let (nc, ns, n) = (20u64, 180u64, 6u64);
        let p0: f64 = 1.05 * 20.0 / (1.05 * 20.0 + 180.0);
        for &bet in &BETS {
            let mut mean = 0.0;
            for k in 0..=n {
                let mut d = Detector::new(Worse::Higher);
                d.update(1, &ratio(k, nc, n - k, ns));
                let ln_e = d.total[BETS.iter().position(|&b| b == bet).unwrap()];
                let choose = (0..k).fold(1.0, |c, i| c * (n - i) as f64 / (i + 1) as f64);
                mean += choose * p0.powi(k as i32) * (1.0 - p0).powi((n - k) as i32) * ln_e.exp();
            }
            assert!((mean - 1.0).abs() < 1e-12, "bet {bet}: {mean}");
        }
    }

    #[test]
    fn cusum_forgets_healthy_history_and_total_does_not() {
        let mut d = Detector::new(Worse::Higher);
        // 600 s healthy: canary 0.2 errors/s of 2 per second overall; use 1 canary error
        // every 5 s against 9 stable errors per 5 s.
        for t in 1..=600 {
            let (ec, es) = if t % 5 == 0 { (1, 9) } else { (0, 0) };
            d.update(t, &ratio(ec, 20, es, 180));
        }
        let healthy = d.evidence(10);
        assert!(healthy.ln_total < -10.0, "{healthy:?}");
        assert!(healthy.ln_change < 1.0, "{healthy:?}");
        // Then 5× errors: 1 canary error and ~2 stable errors every second.
        for t in 601..=630 {
            d.update(t, &ratio(1, 20, 2, 180));
        }
        let e = d.evidence(10);
        assert!(e.ln_change > 100f64.ln() + CHANGE_PREMIUM, "{e:?}");
        assert!(e.ln_total < 0.0, "{e:?}");
        assert!((600..=601).contains(&e.since_s), "{e:?}");
    }

    #[test]
    fn lower_is_worse_bets_the_other_way() {
        let mut d = Detector::new(Worse::Lower);
        for t in 1..=30 {
            // Canary converts nothing, stable converts 9 per second.
            d.update(t, &ratio(0, 20, 9, 180));
        }
        assert!(d.evidence(10).ln_change > 10.0);
        let mut d = Detector::new(Worse::Higher);
        for t in 1..=30 {
            d.update(t, &ratio(0, 20, 9, 180));
        }
        assert_eq!(d.evidence(10).ln_change, (1.0f64).ln());
    }
}
