//! Canary-versus-stable analysis.
//!
//! # Data
//! The agent reads the per-version cumulative counters ([`VersionCounters`]) once per
//! second and hands them to [`Analyzer::observe`]; a [`History`] ring turns them into
//! reset-safe window deltas, canary and stable always over the same interval.
//!
//! # Method
//! Each metric (and each rollback rule) is reduced to a binomial question and answered
//! with a *mixture sequential probability ratio test*: the e-value
//! `∫ L(π)/L(π0) dG(π)` with a uniform prior on the alternative side (see [`stats`]). A
//! ratio of rates (canary vs `t` × stable) is made binomial by conditioning on the total
//! number of events; a p99 comparison is turned into a ratio of tail fractions; an
//! absolute floor is a one-sample test (see [`check`]). When stable has too few errors
//! for an error-rate ratio (a healthy stable often has none), the canary passes once it
//! is shown below the policy's absolute error floor ([`DEFAULT_ERROR_FLOOR`]) instead of
//! holding forever; failing still takes the ratio test.
//!
//! Why anytime-valid: the test is looked at every second, forever. A fixed-horizon test
//! repeated at each look would eventually raise a false alarm with certainty; an e-value
//! obeys Ville's inequality, `P(ever ≥ 1/α) ≤ α` under the null, however often it is
//! looked at — for data that only accumulate.
//!
//! # What is guaranteed, over what horizon
//! Each statistic's false-alarm bound, under the null (canary within the threshold),
//! per metric or rule:
//! - **Pass, from the step's data** ([`Analyzer::begin_step`]): a Pass (progression)
//!   is decided on everything since the rollout step began, data that only
//!   accumulate, so the mixture ratio is an e-process and Ville's inequality bounds a
//!   false Pass by α = 1 % per metric per step, however long the step holds. A
//!   rollout of `k` steps spends at most `k · α` per metric on false passes; hours of
//!   holding spend nothing more. Without a running step (no rollout) passes are
//!   windowed as below.
//! - **Fail, windowed test**: until a window is full it is an e-process (the data only
//!   grow from the first reading) and Ville's bound α holds; afterwards data also
//!   leave, the windowed e-value is not an e-process, and every window length of new
//!   data is roughly a fresh test: no bound beyond the first window, false alarms grow
//!   with run length divided by window length. Only the A/A simulations bound it.
//! - **Fail, from-start detector** ([`detector`]): an e-process from the first data,
//!   Ville's bound `α` over the whole run, any length.
//! - **Fail, change detector (CUSUM)**: a Shiryaev–Roberts/Doob bound `T · α · e^−h`
//!   for `T` seconds with events and premium `h` = 6 nats: `T / 40 000` at α = 0.01,
//!   i.e. ≈ 4.5 % per test over 30 minutes, 9 % over an hour, 36 % over 4 hours — a
//!   horizon-dependent worst case, not an anytime guarantee. The measured rate is far
//!   lower (a healthy canary sits strictly inside the null and the start times
//!   overlap): 0.6 % of 500 A/A runs of 30 min with all seed metrics and rules, on the
//!   seeds the premium was chosen on (in-sample; see `tests/analysis_simulation.rs`);
//!   on held-out seeds and under drift, a shared incident, weight steps, restarts and
//!   low traffic, see `tests/aa_suite.rs` and BENCHMARKS.md.
//! - **Restarts and failovers**: an agent restart or a new fleet leader starts a fresh
//!   analyzer (windows refill from the cumulative counters; both detector statistics
//!   start again). Each restart is a new test: another α for the from-start statistic
//!   and for the windowed test's first window, and a new CUSUM horizon.
//! - **What every bound assumes**: given a second's trial counts, events are
//!   independent (binomial). Errors that come in clusters on one version — a request
//!   retried until it succeeds, a failing client that keeps failing — carry less
//!   evidence than their count, and the statistics here overstate it: the held-out
//!   suite rolls back nearly every healthy canary under such clusters within 30
//!   minutes (BENCHMARKS.md). None of the bounds above holds for such traffic.
//! - **Shared outage** (see [`Analyzer::evaluate`]): an absolute threshold that stable
//!   misses too holds and alerts instead of acting. This adds no false rollback; a
//!   restart of the detector during the outage makes it a fresh test (another α).
//!
//! Pass / Fail / Inconclusive and the data-sufficiency rules are defined in [`check`].

pub mod check;
pub mod detector;
pub mod engine;
pub mod latency;
pub mod question;
pub mod spec;
pub mod stats;
pub mod window;

pub use check::{Outcome, Statistic};
pub use engine::{
    action_name, hold_reason, metric_name, Analyzer, Evaluation, Fired, Outage, Verdict,
    DEFAULT_ALPHA, DEFAULT_CUSTOM_RULE_WINDOW_S, DEFAULT_ERROR_FLOOR, DEFAULT_PASS_SLACK,
    DEFAULT_RULE_WINDOW_S, ERROR_FREE_REQUESTS_TO_PASS,
};
pub use spec::{Action, Cmp, CustomQuery, MetricName, MetricSpec, RollbackRule, WeightBp};
pub use window::{History, VersionCounters, Window};
