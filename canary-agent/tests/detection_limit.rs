//! How close the change detector comes to the information limit for a fault that
//! starts late: detection delay against the false-alarm rate, for this detector and two
//! oracle CUSUMs that know what it cannot.
//!
//! `cargo test --release -p canary-agent --test detection_limit -- --ignored --nocapture`
//! (about 1 min on 2 cores). Traffic as in the seed scenario: 200 req/s, 10 % canary,
//! stable 1 % errors; the `error-rate` question (canary ≤ 1.05 × stable). Each statistic
//! is a CUSUM-type change statistic compared with a threshold `h` (nats):
//! - **detector**: [`Detector`]'s change statistic as the analysis uses it (mixture of
//!   bets, runs of at least 10 events); deployed at `h = ln(1/α) + CHANGE_PREMIUM`;
//! - **conditional oracle**: one CUSUM betting exactly the true effect, on the same
//!   per-second conditional likelihood — the best any test can do that assumes nothing
//!   about the stable rate (with the stable rate free, each second's total events carry
//!   no evidence: only the canary's share of them does);
//! - **absolute oracle**: one CUSUM that also knows the stable rate is exactly 1 % and
//!   tests canary requests against 1.05 % directly (Lorden/Moustakides: optimal for known
//!   pre- and post-change rates).
//!
//! For each `h`: the share of 30-minute A/A runs in which the statistic ever reached `h`
//! (false alarms), and the median delay after a fault that starts at 600 s.

mod common;

use canary_agent::analysis::check::{Question, Rate, Worse};
use canary_agent::analysis::detector::{Detector, CHANGE_PREMIUM};
use common::par_map;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Binomial, Distribution, Poisson};

const STABLE_ERRORS: f64 = 0.01;
const FACTOR: f64 = 1.05;
const CANARY_RATE: f64 = 20.0;
const STABLE_RATE: f64 = 180.0;
const AA_RUNS: usize = 4000;
const FAULT_RUNS: usize = 400;
const FAULT_AT: u64 = 600;
const AFTER: u64 = 400;

/// One second's counts: canary errors and requests, stable errors and requests.
type Second = (u64, u64, u64, u64);

#[derive(Clone, Copy)]
enum Statistic {
    Detector,
    ConditionalOracle { odds_ratio: f64 },
    AbsoluteOracle { bad: f64 },
}

impl Statistic {
    fn name(self) -> &'static str {
        match self {
            Statistic::Detector => "detector",
            Statistic::ConditionalOracle { .. } => "conditional oracle",
            Statistic::AbsoluteOracle { .. } => "absolute oracle",
        }
    }

    /// The statistic's path over `seconds`.
    fn path(self, seconds: &[Second]) -> Vec<f64> {
        let mut detector = Detector::new(Worse::Higher);
        let mut w = 0.0f64;
        seconds
            .iter()
            .map(|&(kc, nc, ks, ns)| match self {
                Statistic::Detector => {
                    detector.update(
                        1,
                        &Question::Ratio {
                            canary: Rate {
                                events: kc,
                                trials: nc,
                            },
                            stable: Rate {
                                events: ks,
                                trials: ns,
                            },
                            factor: FACTOR,
                            floor: None,
                        },
                    );
                    detector.evidence(10).ln_change
                }
                Statistic::ConditionalOracle { odds_ratio: m } => {
                    if nc > 0 && ns > 0 {
                        let p0 = FACTOR * nc as f64 / (FACTOR * nc as f64 + ns as f64);
                        w += kc as f64 * m.ln() - (kc + ks) as f64 * (1.0 - p0 + m * p0).ln();
                        w = w.max(0.0);
                    }
                    w
                }
                Statistic::AbsoluteOracle { bad } => {
                    let p0 = FACTOR * STABLE_ERRORS;
                    w += kc as f64 * (bad / p0).ln()
                        + (nc - kc) as f64 * ((1.0 - bad) / (1.0 - p0)).ln();
                    w = w.max(0.0);
                    w
                }
            })
            .collect()
    }
}

fn traffic(seed: u64, seconds: u64, canary_errors: impl Fn(u64) -> f64) -> Vec<Second> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut draw = |mean: f64| Poisson::new(mean).unwrap().sample(&mut rng) as u64;
    let counts: Vec<(u64, u64)> = (0..seconds)
        .map(|_| (draw(CANARY_RATE), draw(STABLE_RATE)))
        .collect();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    counts
        .into_iter()
        .enumerate()
        .map(|(t, (nc, ns))| {
            let kc = Binomial::new(nc, canary_errors(t as u64))
                .unwrap()
                .sample(&mut rng);
            let ks = Binomial::new(ns, STABLE_ERRORS).unwrap().sample(&mut rng);
            (kc, nc, ks, ns)
        })
        .collect()
}

fn median(mut v: Vec<u64>) -> String {
    v.sort_unstable();
    v.get(v.len() / 2)
        .filter(|&&d| d <= AFTER)
        .map_or(format!("> {AFTER} s"), |d| format!("{d} s"))
}

#[test]
#[ignore = "measurement for BENCHMARKS.md (about 1 min in --release)"]
fn late_fault_delay_against_false_alarms() {
    let deployed = (1.0f64 / 0.01).ln() + CHANGE_PREMIUM;
    let thresholds = [8.0, 9.0, 9.5, 10.0, deployed, 11.5];
    println!("| canary errors | statistic | h (nats) | A/A false alarms in 30 min | median delay after a fault at 600 s |");
    println!("|---|---|---:|---:|---:|");
    for bad in [0.05, 0.02] {
        let pi0 = FACTOR * CANARY_RATE / (FACTOR * CANARY_RATE + STABLE_RATE);
        let pi = CANARY_RATE * bad / (CANARY_RATE * bad + STABLE_RATE * STABLE_ERRORS);
        let odds_ratio = (pi / (1.0 - pi)) / (pi0 / (1.0 - pi0));
        for stat in [
            Statistic::Detector,
            Statistic::ConditionalOracle { odds_ratio },
            Statistic::AbsoluteOracle { bad },
        ] {
            let aa_max: Vec<f64> = par_map(AA_RUNS, |i| {
                let seconds = traffic(i as u64, 1800, |_| STABLE_ERRORS);
                stat.path(&seconds).into_iter().fold(0.0, f64::max)
            });
            let faults: Vec<(f64, Vec<f64>)> = par_map(FAULT_RUNS, |i| {
                let seconds = traffic(1_000_000 + i as u64, FAULT_AT + AFTER, |t| {
                    if t < FAULT_AT {
                        STABLE_ERRORS
                    } else {
                        bad
                    }
                });
                let path = stat.path(&seconds);
                let before = path[..FAULT_AT as usize]
                    .iter()
                    .copied()
                    .fold(0.0, f64::max);
                (before, path[FAULT_AT as usize..].to_vec())
            });
            for h in thresholds {
                let false_alarms = aa_max.iter().filter(|&&m| m >= h).count();
                let delays: Vec<u64> = faults
                    .iter()
                    .filter(|(before, _)| *before < h)
                    .map(|(_, after)| {
                        after
                            .iter()
                            .position(|&v| v >= h)
                            .map_or(u64::MAX, |i| i as u64 + 1)
                    })
                    .collect();
                println!(
                    "| {}× | {}{} | {h:.1} | {:.2} % | {} |",
                    bad / STABLE_ERRORS,
                    stat.name(),
                    if matches!(stat, Statistic::Detector) && h == deployed {
                        " (deployed)"
                    } else {
                        ""
                    },
                    false_alarms as f64 * 100.0 / AA_RUNS as f64,
                    median(delays)
                );
            }
        }
    }
}
