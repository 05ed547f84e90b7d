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
//! Caveat: over a *sliding* window, data also leave, so the windowed e-value is not an
//! e-process and Ville's bound does not strictly apply. Until a window is full it *is*
//! one (the data only grow from the first reading); afterwards every window length of
//! new data is roughly a fresh test, so false alarms grow with run length divided by
//! window length. What bounds the practical rate is the A/A simulation in
//! `tests/analysis_simulation.rs` (all seed metrics and rules, every second, 500 runs of
//! 30 minutes at 200 req/s): 0.2 % of runs rolled back, all within the first minute, i.e.
//! inside the e-process regime — and it is why rules on sparse business metrics get a
//! longer window ([`DEFAULT_CUSTOM_RULE_WINDOW_S`]) than spike rules.
//!
//! Change-aware Fail: besides the windowed test, every metric and rule runs an
//! e-detector over per-second increments ([`detector`]): a from-start mixture of bets
//! (exact Ville guarantee at ln(1/α)) and a CUSUM of the same bets (maximum over start
//! times, Shiryaev–Roberts/Doob bound `T·α·e^−h`, premium `h` = 6 nats chosen by the
//! A/A simulation: 0.6 % false rollbacks in 500 runs of 30 min). A fault that starts
//! after minutes of healthy traffic is judged on its own data instead of being diluted
//! by the window. The detector only adds Fails; Pass and Inconclusive stay windowed.
//!
//! Pass / Fail / Inconclusive and the data-sufficiency rules are defined in [`check`].

pub mod check;
pub mod detector;
pub mod engine;
pub mod latency;
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
