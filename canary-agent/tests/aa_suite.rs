//! Held-out A/A suite: how often a healthy canary (the same as stable) is rolled back
//! when traffic departs from the idealised model the analysis was tuned in — rates
//! drifting, a shared incident, clustered errors, weight steps, an agent restart, a
//! leader failover, low traffic.
//!
//! Full table (BENCHMARKS.md):
//! `cargo test --release -p canary-agent --test aa_suite -- --ignored --nocapture`
//! (5 000 runs × 30 simulated minutes per scenario). The bounded subset (the first
//! [`SUBSET_RUNS`] seeds of every scenario) runs in the normal test suite.
//!
//! Seeds: scenario `i`, run `r` uses `SEED0 + i · SEED_STRIDE + r`, i.e. 7 000 000 –
//! 7 999 999: disjoint from the seeds any parameter was chosen on (the CUSUM premium
//! on 10 000–10 499) and from every other simulation (`analysis_simulation.rs`
//! 10 000–99 999, `detection_limit.rs` 0–3 999 and 1 000 000–1 000 399).
//!
//! Every run: 30 minutes, one reading and one evaluation per second, all seed metrics
//! and rules (`common::seed_analyzer`, every metric failure an immediate rollback).
//! Counted: a rollback (any immediate-rollback firing; the run stops there), any alarm
//! (also the pause-and-alert business rule) and a shared-outage hold. Rollout steps are
//! not simulated: a step's data only decide Passes (`Analyzer::begin_step`), never a
//! Fail, so they cannot change a false-rollback count.

mod common;

use canary_agent::analysis::{Action, Analyzer, VersionCounters};
use canary_agent::fleet::{FleetTotals, NodeReport};
use canary_common::histogram::latency_bucket;
use common::{par_map, seed_analyzer, BASE};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Binomial, Distribution, Geometric, Poisson, StandardNormal};
use statrs::distribution::{Beta, ContinuousCDF};

const END: u64 = 1800;
const SEED0: u64 = 7_000_000;
const SEED_STRIDE: u64 = 100_000;
/// Runs per scenario of the full table.
const FULL_RUNS: usize = 5000;
/// Runs per scenario in the normal test suite.
/// Fewer in a debug build (what `make test` runs), where a run costs ten times more.
const SUBSET_RUNS: usize = if cfg!(debug_assertions) { 8 } else { 20 };
/// The seed policy's traffic: 200 req/s, 10 % canary, 1 % errors.
const RATE: f64 = 200.0;
const SHARE: f64 = 0.1;
const ERRORS: f64 = 0.01;

/// How errors arrive.
#[derive(Debug, Clone, Copy)]
enum Errors {
    /// Each request fails independently.
    Independent,
    /// A failing request is retried at once until it succeeds: bursts of a geometric
    /// number of errors (mean `mean`) within one second, on one version.
    RetryBursts { mean: f64 },
    /// A failing client keeps failing: one error per second for a geometric number of
    /// seconds (mean `mean_s`), on one version.
    ClientStreaks { mean_s: f64 },
}

/// What happens to the analysis mid-run.
#[derive(Debug, Clone, Copy)]
enum Handover {
    None,
    /// The agent restarts at `at`: no readings for `gap` s, then a fresh analyzer over
    /// the pinned (continuing) kernel counters, as `agent/service.rs` starts one.
    AgentRestart {
        at: u64,
        gap: u64,
    },
    /// Three nodes report per-node counters (a report is a second late 10 % of the
    /// time); the leader sums them with [`FleetTotals`]. At `at` the leader dies: its
    /// lease runs out for `gap` s, then another node leads with a fresh analyzer and
    /// fresh totals (as after any restart, see ARCHITECTURE.md), while the old leader's
    /// node comes back with its pinned counters.
    LeaderFailover {
        at: u64,
        gap: u64,
    },
}

#[derive(Clone, Copy)]
struct Aa {
    name: &'static str,
    /// Total requests per second at second `t`.
    rate: fn(u64) -> f64,
    /// Canary share of the traffic at `t`.
    share: fn(u64) -> f64,
    /// Error probability of both versions at `t`.
    error: fn(u64) -> f64,
    errors: Errors,
    handover: Handover,
}

fn sine(t: u64) -> f64 {
    1.0 + 0.5 * (2.0 * std::f64::consts::PI * t as f64 / END as f64).sin()
}

const SCENARIOS: [Aa; 10] = [
    Aa {
        name: "stationary (seed model)",
        rate: |_| RATE,
        share: |_| SHARE,
        error: |_| ERRORS,
        errors: Errors::Independent,
        handover: Handover::None,
    },
    Aa {
        name: "errors ramp ×3 on both over 30 min",
        rate: |_| RATE,
        share: |_| SHARE,
        error: |t| ERRORS * (1.0 + 2.0 * t as f64 / END as f64),
        errors: Errors::Independent,
        handover: Handover::None,
    },
    Aa {
        name: "diurnal sine: traffic and errors ×(1 ± 0.5)",
        rate: |t| RATE * sine(t),
        share: |_| SHARE,
        error: |t| ERRORS * sine(t),
        errors: Errors::Independent,
        handover: Handover::None,
    },
    Aa {
        name: "shared incident: both 10× errors for 60 s",
        rate: |_| RATE,
        share: |_| SHARE,
        error: |t| {
            if (900..960).contains(&t) {
                10.0 * ERRORS
            } else {
                ERRORS
            }
        },
        errors: Errors::Independent,
        handover: Handover::None,
    },
    Aa {
        name: "retry bursts (mean 3 errors)",
        rate: |_| RATE,
        share: |_| SHARE,
        error: |_| ERRORS,
        errors: Errors::RetryBursts { mean: 3.0 },
        handover: Handover::None,
    },
    Aa {
        name: "client streaks (mean 4 s)",
        rate: |_| RATE,
        share: |_| SHARE,
        error: |_| ERRORS,
        errors: Errors::ClientStreaks { mean_s: 4.0 },
        handover: Handover::None,
    },
    Aa {
        name: "weight steps 1 → 5 → 20 → 50 %",
        rate: |_| RATE,
        share: |t| match t {
            0..=300 => 0.01,
            301..=600 => 0.05,
            601..=1200 => 0.20,
            _ => 0.50,
        },
        error: |_| ERRORS,
        errors: Errors::Independent,
        handover: Handover::None,
    },
    Aa {
        name: "agent restart at 15 min (2 s down)",
        rate: |_| RATE,
        share: |_| SHARE,
        error: |_| ERRORS,
        errors: Errors::Independent,
        handover: Handover::AgentRestart { at: 900, gap: 2 },
    },
    Aa {
        name: "leader failover at 15 min (3 nodes, 5 s lease)",
        rate: |_| RATE,
        share: |_| SHARE,
        error: |_| ERRORS,
        errors: Errors::Independent,
        handover: Handover::LeaderFailover { at: 900, gap: 5 },
    },
    Aa {
        name: "low traffic: 2 req/s",
        rate: |_| 2.0,
        share: |_| SHARE,
        error: |_| ERRORS,
        errors: Errors::Independent,
        handover: Handover::None,
    },
];

/// One version's traffic on one node: cumulative counters and open client streaks.
struct Version {
    counters: VersionCounters,
    /// Remaining seconds of each failing client's streak.
    streaks: Vec<u32>,
}

impl Version {
    fn new() -> Self {
        Self {
            counters: VersionCounters::zero(),
            streaks: Vec::new(),
        }
    }

    /// One second: `mean` requests on average, each failing with probability `p`.
    fn second(&mut self, rng: &mut StdRng, mean: f64, p: f64, errors: Errors) {
        let n = if mean > 0.0 {
            Poisson::new(mean).unwrap().sample(rng) as u64
        } else {
            0
        };
        let (requests, failed) = match errors {
            Errors::Independent => (n, Binomial::new(n, p).unwrap().sample(rng)),
            Errors::RetryBursts { mean } => {
                let bursts = Binomial::new(n, p / mean).unwrap().sample(rng);
                let size = Geometric::new(1.0 / mean).unwrap();
                let failed: u64 = (0..bursts).map(|_| 1 + size.sample(rng)).sum();
                // The retries are requests too; the last one succeeds.
                (n + failed, failed)
            }
            Errors::ClientStreaks { mean_s } => {
                let new = Binomial::new(n, p / mean_s).unwrap().sample(rng);
                let len = Geometric::new(1.0 / mean_s).unwrap();
                self.streaks
                    .extend((0..new).map(|_| 1 + len.sample(rng) as u32));
                let failed = self.streaks.len() as u64;
                self.streaks.iter_mut().for_each(|s| *s -= 1);
                self.streaks.retain(|&s| s > 0);
                (n + failed - new, failed)
            }
        };
        let c = &mut self.counters;
        c.requests += requests;
        c.responses[1] += requests - failed;
        c.responses[4] += failed;
        c.conn_new += Binomial::new(requests, 0.2).unwrap().sample(rng);
        let mu = (BASE.median_ms * 1e6).ln();
        for _ in 0..requests {
            let z: f64 = StandardNormal.sample(rng);
            c.latency[latency_bucket((mu + BASE.sigma * z).exp() as u64) as usize] += 1;
        }
        let conv = Binomial::new(requests, BASE.conversion)
            .unwrap()
            .sample(rng);
        let e = c.custom.entry("conversion-rate".into()).or_insert((0, 0));
        e.0 += conv;
        e.1 += requests;
    }
}

/// What happened in one run.
#[derive(Debug, Default, Clone)]
struct Outcome {
    /// First immediate rollback: time and firing rules.
    rollback: Option<(u64, Vec<String>)>,
    /// Anything fired (also pause-and-alert).
    alarm: bool,
    /// A shared outage held the rollout.
    outage: bool,
}

impl Outcome {
    /// Feeds one evaluation; true when the run is over (rolled back).
    fn record(&mut self, t: u64, a: &mut Analyzer) -> bool {
        let eval = a.evaluate(t);
        self.outage |= !eval.outages.is_empty();
        self.alarm |= !eval.fired.is_empty();
        if eval
            .fired
            .iter()
            .any(|f| f.action == Action::ImmediateRollback)
        {
            let rules = eval.fired.iter().map(|f| f.rule.clone()).collect();
            self.rollback = Some((t, rules));
            return true;
        }
        false
    }
}

fn run(sc: &Aa, seed: u64) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Outcome::default();
    let nodes = match sc.handover {
        Handover::LeaderFailover { .. } => 3,
        _ => 1,
    };
    let mut versions: Vec<[Version; 2]> = (0..nodes)
        .map(|_| [Version::new(), Version::new()])
        .collect();
    let mut analyzer = seed_analyzer();
    let mut totals = FleetTotals::default();
    let mut reports: Vec<NodeReport> = vec![NodeReport::default(); nodes];
    for t in 1..=END {
        let (rate, share, p) = ((sc.rate)(t), (sc.share)(t), (sc.error)(t));
        for [stable, canary] in &mut versions {
            let per_node = rate / nodes as f64;
            stable.second(&mut rng, per_node * (1.0 - share), p, sc.errors);
            canary.second(&mut rng, per_node * share, p, sc.errors);
        }
        let (stable, canary) = match sc.handover {
            Handover::None => (&versions[0][0].counters, &versions[0][1].counters),
            Handover::AgentRestart { at, gap } => {
                if (at + 1..=at + gap).contains(&t) {
                    continue;
                }
                if t == at + gap + 1 {
                    analyzer = seed_analyzer();
                }
                (&versions[0][0].counters, &versions[0][1].counters)
            }
            Handover::LeaderFailover { at, gap } => {
                // Reports are on time 90 % of the time, else the previous second's.
                for (node, [s, c]) in versions.iter().enumerate() {
                    if rng.gen_bool(0.9) {
                        reports[node].counters =
                            [("svc".to_string(), [s.counters.clone(), c.counters.clone()])].into();
                    }
                }
                if (at + 1..=at + gap).contains(&t) {
                    continue;
                }
                if t == at + gap + 1 {
                    analyzer = seed_analyzer();
                    totals = FleetTotals::default();
                }
                // The old leader's node (0) restarts with the leader: missing while the
                // lease runs out and for the new leader's first 2 s.
                let present = |node: usize| node != 0 || !(at + 1..=at + gap + 2).contains(&t);
                totals.update(
                    reports
                        .iter()
                        .enumerate()
                        .filter(|(n, _)| present(*n))
                        .map(|(n, r)| (["a", "b", "c"][n], r)),
                );
                let sums = totals.sums();
                let Some([s, c]) = sums.get("svc").and_then(|r| r.get(&None)) else {
                    continue;
                };
                analyzer.observe(t, s, c);
                if out.record(t, &mut analyzer) {
                    break;
                }
                continue;
            }
        };
        analyzer.observe(t, stable, canary);
        if out.record(t, &mut analyzer) {
            break;
        }
    }
    out
}

/// Clopper–Pearson 95 % interval of `x` successes in `n` trials.
fn clopper_pearson(x: usize, n: usize) -> (f64, f64) {
    let (x, n) = (x as f64, n as f64);
    let lo = if x == 0.0 {
        0.0
    } else {
        Beta::new(x, n - x + 1.0).unwrap().inverse_cdf(0.025)
    };
    let hi = if x == n {
        1.0
    } else {
        Beta::new(x + 1.0, n - x).unwrap().inverse_cdf(0.975)
    };
    (lo, hi)
}

struct Row {
    name: &'static str,
    runs: usize,
    rollbacks: usize,
    alarms: usize,
    outages: usize,
    by_rule: std::collections::BTreeMap<String, usize>,
}

impl Row {
    fn measure(i: usize, sc: &Aa, runs: usize) -> Self {
        let seed = SEED0 + i as u64 * SEED_STRIDE;
        let outs = par_map(runs, |r| run(sc, seed + r as u64));
        let mut by_rule = std::collections::BTreeMap::new();
        for (_, rules) in outs.iter().filter_map(|o| o.rollback.as_ref()) {
            for r in rules {
                *by_rule.entry(r.clone()).or_insert(0) += 1;
            }
        }
        Row {
            name: sc.name,
            runs,
            rollbacks: outs.iter().filter(|o| o.rollback.is_some()).count(),
            alarms: outs.iter().filter(|o| o.alarm).count(),
            outages: outs.iter().filter(|o| o.outage).count(),
            by_rule,
        }
    }

    fn print(&self) {
        let (lo, hi) = clopper_pearson(self.rollbacks, self.runs);
        let pct = |x: usize| x as f64 * 100.0 / self.runs as f64;
        println!(
            "| {} | {} | {} ({:.2} %) | {:.2}–{:.2} % | {:.2} % | {:.2} % | {:?} |",
            self.name,
            self.runs,
            self.rollbacks,
            pct(self.rollbacks),
            lo * 100.0,
            hi * 100.0,
            pct(self.alarms),
            pct(self.outages),
            self.by_rule
        );
    }
}

fn header() {
    println!("| scenario | runs | false rollbacks | 95 % interval (Clopper–Pearson) | any alarm | shared-outage hold | rollbacks by rule |");
    println!("|---|---:|---:|---:|---:|---:|---|");
}

/// The scenarios with clustered errors, which the per-second binomial statistics
/// treat as independent events and so miss the 1 % goal (see BENCHMARKS.md).
fn clustered(name: &str) -> bool {
    name.starts_with("retry bursts") || name.starts_with("client streaks")
}

/// The bounded subset: every scenario's first seeds. A rate as high as 1 % would make
/// these counts unlikely: the pooled rollbacks must not show a rate above 1 % (their
/// 95 % interval must reach below it), and no scenario may roll back more than 2 of its
/// runs (at 1 % that happens with probability 0.1 %) — except the clustered-error
/// scenarios, printed only.
#[test]
fn aa_suite_subset_at_most_one_percent() {
    header();
    let rows: Vec<Row> = SCENARIOS
        .iter()
        .enumerate()
        .map(|(i, sc)| Row::measure(i, sc, SUBSET_RUNS))
        .collect();
    rows.iter().for_each(Row::print);
    // Clustered errors are known to miss the goal (BENCHMARKS.md): printed, not held to it.
    let held: Vec<&Row> = rows.iter().filter(|r| !clustered(r.name)).collect();
    let (x, n) = held
        .iter()
        .fold((0, 0), |(x, n), r| (x + r.rollbacks, n + r.runs));
    assert!(clopper_pearson(x, n).0 <= 0.01, "{x} of {n} rolled back");
    for r in held {
        assert!(
            r.rollbacks <= 2,
            "{}: {} of {}",
            r.name,
            r.rollbacks,
            r.runs
        );
    }
    // A shared incident holds: its runs must see the outage.
    let incident = &rows[3];
    assert!(
        incident.outages * 2 >= incident.runs,
        "{}",
        incident.outages
    );
}

#[test]
#[ignore = "full table for BENCHMARKS.md: several minutes per scenario in --release"]
fn aa_suite_table() {
    // AA_SCENARIO=text picks scenarios by name, AA_RUNS=n changes the run count.
    let only = std::env::var("AA_SCENARIO").ok();
    let runs = std::env::var("AA_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(FULL_RUNS);
    header();
    for (i, sc) in SCENARIOS.iter().enumerate() {
        if only.as_deref().is_some_and(|o| !sc.name.contains(o)) {
            continue;
        }
        let start = std::time::Instant::now();
        Row::measure(i, sc, runs).print();
        eprintln!("{}: {:.0} s", sc.name, start.elapsed().as_secs_f64());
    }
}
