//! Seeded traffic simulations: false alarms (A/A) and detection times.
//!
//! The printed numbers are the ones reported in BENCHMARKS.md; reproduce with
//! `cargo test --release --test simulation -- --nocapture` (and `--ignored` for the
//! detection-time table).

mod common;

use std::collections::BTreeMap;

use canary_agent::analysis::{Analyzer, MetricName};
use common::{
    par_map, run, seed_analyzer, seed_metrics, seed_rules, Detection, Model, Scenario, Traffic,
    BASE, SEED_TRAFFIC,
};

/// Full-window warm-up before a fault is injected (the longest seed window is 600 s).
const FAULT_AT: u64 = 600;

#[test]
fn aa_false_rollbacks_at_most_one_percent() {
    const RUNS: usize = 500;
    const MINUTES: u64 = 30;
    let sc = Scenario {
        traffic: SEED_TRAFFIC,
        before: BASE,
        after: BASE,
        fault_at: u64::MAX,
        end: MINUTES * 60,
    };
    let logs = par_map(RUNS, |i| run(10_000 + i as u64, sc, seed_analyzer()));
    let mut by_rule: BTreeMap<String, usize> = BTreeMap::new();
    let rollbacks = logs.iter().filter(|l| l.rollback.is_some()).count();
    let alarms = logs.iter().filter(|l| l.alarm.is_some()).count();
    // The first alarm, and the rollback if it came later.
    let events = logs.iter().flat_map(|l| {
        let later = l
            .rollback
            .as_ref()
            .filter(|r| l.alarm.as_ref().map(|a| a.0) != Some(r.0));
        l.alarm.iter().chain(later)
    });
    for (t, fired) in events {
        for f in fired {
            *by_rule.entry(f.rule.clone()).or_default() += 1;
            println!("A/A alarm at {t} s: {} — {}", f.rule, f.detail);
        }
    }
    let rate = rollbacks as f64 / RUNS as f64;
    println!(
        "A/A: {RUNS} runs × {MINUTES} min at 200 req/s, 10 % canary, 1 % errors, all seed \
         metrics and rules every second: rollback in {rollbacks} runs ({:.2} %), any alarm \
         (incl. pause-and-alert) in {alarms} runs ({:.2} %); by rule {by_rule:?}",
        rate * 100.0,
        alarms as f64 / RUNS as f64 * 100.0
    );
    assert!(rate <= 0.01, "A/A rollback rate {rate}");
    // Identical latency distributions must never fail a latency check.
    assert!(
        !by_rule.keys().any(|r| r.starts_with("latency")),
        "{by_rule:?}"
    );
}

#[test]
fn five_fold_error_increase_detection_time() {
    let sc = Scenario {
        traffic: SEED_TRAFFIC,
        before: BASE,
        after: Model {
            error: 0.05,
            ..BASE
        },
        fault_at: FAULT_AT,
        end: FAULT_AT + 600,
    };
    let d = Detection::measure(200, 20_000, sc, seed_analyzer);
    println!(
        "5× errors (1 % → 5 %), 200 req/s, 10 % canary, 200 runs: {}",
        d.summary()
    );
    assert_eq!(d.missed, 0);
    assert!(d.quantile(0.9).unwrap() <= 120, "{}", d.summary());
}

#[test]
fn total_canary_failure_rolled_back_within_two_seconds() {
    let sc = Scenario {
        traffic: SEED_TRAFFIC,
        before: BASE,
        after: Model { error: 1.0, ..BASE },
        fault_at: FAULT_AT,
        end: FAULT_AT + 10,
    };
    const RUNS: usize = 200;
    let logs = par_map(RUNS, |i| run(30_000 + i as u64, sc, seed_analyzer()));
    let (mut worst, mut early) = (0, 0);
    for (i, log) in logs.iter().enumerate() {
        let (t, fired) = log
            .rollback
            .as_ref()
            .unwrap_or_else(|| panic!("run {i}: not rolled back"));
        if *t <= FAULT_AT {
            // An A/A false alarm in the healthy phase (see the A/A test for its rate):
            // the fault never happened in that run.
            println!("run {i}: false rollback at {t} s: {fired:?}");
            early += 1;
            continue;
        }
        worst = worst.max(t - FAULT_AT);
    }
    println!(
        "100 % canary failure, {RUNS} runs: rolled back within {worst} s of the fault in \
         every run that was still going ({early} false rollbacks before the fault)"
    );
    assert!(worst <= 2, "worst detection {worst} s");
    assert!(
        early * 50 <= RUNS,
        "{early} false rollbacks before the fault"
    );
}

#[test]
fn tripled_latency_detected() {
    let sc = Scenario {
        traffic: SEED_TRAFFIC,
        before: BASE,
        after: Model {
            median_ms: BASE.median_ms * 3.0,
            ..BASE
        },
        fault_at: FAULT_AT,
        end: FAULT_AT + 300,
    };
    let d = Detection::measure(100, 40_000, sc, seed_analyzer);
    println!(
        "latency × 3, 200 req/s, 10 % canary, 100 runs: {}",
        d.summary()
    );
    assert_eq!((d.missed, d.early), (0, 0), "{}", d.summary());
    assert!(*d.delays.last().unwrap() <= 30, "{}", d.summary());
}

/// Only the latency checks, so that error noise cannot mask what is being tested.
fn latency_only() -> Analyzer {
    let metrics = seed_metrics()
        .into_iter()
        .filter(|m| m.name == MetricName::LatencyP99)
        .collect();
    let rules = seed_rules()
        .into_iter()
        .filter(|r| r.metric == MetricName::LatencyP99)
        .collect();
    Analyzer::new(metrics, rules, 0.01)
}

#[test]
fn wider_latency_tail_detected() {
    // Same median, σ 0.5 → 0.7: p99 64 ms → 101 ms (1.6×), over the 1.2× threshold but
    // under the 2× rule.
    let sc = Scenario {
        traffic: SEED_TRAFFIC,
        before: BASE,
        after: Model { sigma: 0.7, ..BASE },
        fault_at: FAULT_AT,
        end: FAULT_AT + 600,
    };
    let d = Detection::measure(50, 50_000, sc, latency_only);
    println!(
        "latency tail σ 0.5 → 0.7 (p99 × 1.6), 50 runs: {}",
        d.summary()
    );
    assert_eq!((d.missed, d.early), (0, 0), "{}", d.summary());
}

#[test]
fn same_p99_with_other_shape_never_fails() {
    // Canary: σ 0.3 with the median raised so that its p99 equals stable's (≈ 64 ms):
    // slower typical requests, same p99 — within the policy.
    let p99 = BASE.median_ms * (2.326 * BASE.sigma).exp();
    let canary = Model {
        sigma: 0.3,
        median_ms: p99 / (2.326f64 * 0.3).exp(),
        ..BASE
    };
    let sc = Scenario {
        traffic: SEED_TRAFFIC,
        before: canary,
        after: canary,
        fault_at: u64::MAX,
        end: 1800,
    };
    let logs = par_map(40, |i| run(60_000 + i as u64, sc, latency_only()));
    let bad: Vec<_> = logs.iter().filter_map(|l| l.alarm.as_ref()).collect();
    assert!(bad.is_empty(), "{bad:?}");
}

/// Detection-time table against traffic rate and effect size (slow: ~1 min).
/// `cargo test --release --test simulation -- --ignored --nocapture detection_table`
#[test]
#[ignore = "slow sweep; run explicitly for BENCHMARKS.md"]
fn detection_table() {
    const RUNS: usize = 100;
    println!(
        "| req/s | canary errors 1 % → | rolled back after fault | missed (900 s) | false rollback before fault | median | p90 | max |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for rate in [50.0, 200.0, 1000.0] {
        for (label, error) in [("2 %", 0.02), ("5 %", 0.05), ("100 %", 1.0)] {
            let sc = Scenario {
                traffic: Traffic {
                    rate,
                    canary_share: 0.1,
                },
                before: BASE,
                after: Model { error, ..BASE },
                fault_at: FAULT_AT,
                end: FAULT_AT + 900,
            };
            let d = Detection::measure(RUNS, 70_000, sc, seed_analyzer);
            let q = |v: Option<u64>| v.map_or("-".to_string(), |s| format!("{s} s"));
            println!(
                "| {rate} | {label} | {}/{RUNS} | {} | {} | {} | {} | {} |",
                d.delays.len(),
                d.missed,
                d.early,
                q(d.quantile(0.5)),
                q(d.quantile(0.9)),
                q(d.delays.last().copied()),
            );
        }
    }
}
