//! Analyzer behaviour on hand-built and simulated counters.

mod common;

use canary_agent::analysis::{
    hold_reason, Action, Analyzer, Cmp, MetricName, MetricSpec, Outcome, RollbackRule,
    VersionCounters,
};
use canary_common::histogram::latency_bucket;
use common::{seed_analyzer, Sim, BASE, SEED_TRAFFIC};

/// Cumulative counters for `secs` seconds of steady traffic: `rps` requests/s, one 5xx
/// every `err_every` requests (0 = never), all answered in `lat_ms`.
fn steady(secs: u64, rps: u64, err_every: u64, lat_ms: u64) -> VersionCounters {
    let mut c = VersionCounters::zero();
    let n = secs * rps;
    let errors = n.checked_div(err_every).unwrap_or(0);
    c.requests = n;
    c.responses[1] = n - errors;
    c.responses[4] = errors;
    c.latency[latency_bucket(lat_ms * 1_000_000) as usize] = n;
    c
}

fn metric(name: MetricName, threshold: f64, window_s: u64, on_fail: Action) -> MetricSpec {
    MetricSpec {
        name,
        threshold,
        window_s,
        on_fail,
        query: None,
    }
}

fn error_rate_only() -> Analyzer {
    let m = metric(MetricName::ErrorRate, 1.05, 300, Action::PauseAndAlert);
    Analyzer::new(vec![m], vec![], 0.01)
}

#[test]
fn start_is_inconclusive_and_holds() {
    let mut a = seed_analyzer();
    a.observe(1, &steady(0, 0, 0, 20), &steady(0, 0, 0, 20));
    a.observe(2, &steady(1, 180, 100, 20), &steady(1, 12, 100, 20));
    let eval = a.evaluate(2);
    assert!(eval.fired.is_empty());
    assert!(eval
        .verdicts
        .iter()
        .all(|v| v.verdict == Outcome::Inconclusive));
    assert!(
        eval.verdicts[0]
            .reason
            .ends_with("canary has 12 requests in 1 s window, need ≥ 20"),
        "{}",
        eval.verdicts[0].reason
    );
    let hold = hold_reason(&eval).unwrap();
    assert!(hold.starts_with("inconclusive: error-rate: "), "{hold}");
    assert!(hold.contains("latency-p99: "));
}

#[test]
fn verdict_serializes_lowercase_and_nan_as_null() {
    let mut a = seed_analyzer();
    let eval = a.evaluate(5);
    let json = serde_json::to_value(&eval.verdicts[0]).unwrap();
    assert_eq!(json["metric"], "error-rate");
    assert_eq!(json["verdict"], "inconclusive");
    assert!(json["canary"].is_null());
    assert_eq!(json["reason"], "no observations yet");
}

#[test]
fn healthy_canary_passes_and_nothing_holds() {
    let mut a = seed_analyzer();
    let mut sim = Sim::new(7);
    for t in 1..=700 {
        sim.step(SEED_TRAFFIC, BASE, BASE);
        a.observe(t, &sim.stable, &sim.canary);
    }
    let eval = a.evaluate(700);
    for v in &eval.verdicts {
        assert_eq!(v.verdict, Outcome::Pass, "{v:?}");
        assert!(v.confidence >= 0.99);
    }
    assert!(eval.fired.is_empty());
    assert_eq!(hold_reason(&eval), None);
    let p99 = &eval.verdicts[1];
    // Log-normal median 20 ms, σ 0.5: p99 ≈ 64 ms.
    assert!((p99.stable - 64.0).abs() < 6.0, "{p99:?}");
}

#[test]
fn failing_metric_fires_with_its_action_and_names_the_numbers() {
    let mut a = error_rate_only();
    // Stable 1 % errors, canary 10 %.
    for t in 0..=100 {
        a.observe(t, &steady(t, 180, 100, 20), &steady(t, 20, 10, 20));
    }
    let eval = a.evaluate(100);
    assert_eq!(eval.verdicts[0].verdict, Outcome::Fail);
    assert_eq!(eval.fired.len(), 1);
    let f = &eval.fired[0];
    assert_eq!(
        (f.rule.as_str(), &f.action),
        ("error-rate", &Action::PauseAndAlert)
    );
    assert!(
        f.detail.contains("canary 0.1000 (200/2000 requests)"),
        "{}",
        f.detail
    );
    assert!(f.detail.contains("confidence 1.0000"), "{}", f.detail);
    // The agent prints "{rule}: {detail}": the name must not come twice.
    assert!(f.detail.starts_with("canary 0.1000"), "{}", f.detail);
    assert!(!f.detail.contains("error-rate"), "{}", f.detail);
    assert!(!eval.verdicts[0].reason.contains("error-rate"));
}

#[test]
fn stable_without_errors_does_not_shield_a_failing_canary() {
    let mut a = error_rate_only();
    for t in 0..=60 {
        a.observe(t, &steady(t, 180, 0, 20), &steady(t, 20, 50, 20));
    }
    let eval = a.evaluate(60);
    assert_eq!(
        eval.verdicts[0].verdict,
        Outcome::Fail,
        "{:?}",
        eval.verdicts[0]
    );
    // No errors on either side: the ratio cannot be decided, so the canary is compared
    // with the 1 % error floor — inconclusive with the reason spelled out while its
    // requests are too few to show it below the floor (400 in 20 s)...
    let mut a = error_rate_only();
    for t in 0..=20 {
        a.observe(t, &steady(t, 180, 0, 20), &steady(t, 20, 0, 20));
    }
    let v = &a.evaluate(20).verdicts[0];
    assert_eq!(v.verdict, Outcome::Inconclusive);
    assert!(
        v.reason.contains(
            "no stable errors to compare against and canary has 0 errors in 20 s window; \
             canary error rate not yet shown below the 1% floor"
        ),
        "{}",
        v.reason
    );
    // ... and a Pass once they are (1200 in 60 s).
    for t in 21..=60 {
        a.observe(t, &steady(t, 180, 0, 20), &steady(t, 20, 0, 20));
    }
    let v = &a.evaluate(60).verdicts[0];
    assert_eq!(v.verdict, Outcome::Pass, "{v:?}");
    assert!(
        v.reason
            .contains("0 errors in 1200 requests: canary error rate shown below the 1% floor"),
        "{}",
        v.reason
    );
}

#[test]
fn rule_detail_names_its_metric_once() {
    let spike = RollbackRule {
        name: "error-spike".into(),
        metric: MetricName::ErrorRate,
        cmp: Cmp::Gt,
        factor: 1.5,
        action: Action::ImmediateRollback,
    };
    let mut a = Analyzer::new(vec![], vec![spike], 0.01);
    for t in 0..=30 {
        a.observe(t, &steady(t, 180, 100, 20), &steady(t, 20, 5, 20));
    }
    let fired = a.evaluate(30).fired;
    assert_eq!(fired.len(), 1, "{fired:?}");
    let line = format!("{}: {}", fired[0].rule, fired[0].detail);
    assert!(
        line.starts_with("error-spike: canary 0.2000 (120/600 requests) vs stable 0.0100 (54/5400) over 30 s, error-rate must be ≤ 1.5 × stable: canary shown beyond the bound"),
        "{line}"
    );
    assert_eq!(line.matches("error-rate").count(), 1, "{line}");
}

#[test]
fn one_latency_outlier_does_not_fail() {
    let p99 = metric(MetricName::LatencyP99, 1.2, 300, Action::ImmediateRollback);
    let rule = RollbackRule {
        name: "latency-degradation".into(),
        metric: MetricName::LatencyP99,
        cmp: Cmp::Gt,
        factor: 2.0,
        action: Action::ImmediateRollback,
    };
    let mut a = Analyzer::new(vec![p99], vec![rule], 0.01);
    let mut sim = Sim::new(11);
    for t in 1..=300 {
        sim.step(SEED_TRAFFIC, BASE, BASE);
        if t == 150 {
            // A single 30 s request on the canary.
            sim.canary.latency[latency_bucket(30_000_000_000) as usize] += 1;
        }
        a.observe(t, &sim.stable, &sim.canary);
        assert!(a.evaluate(t).fired.is_empty(), "t = {t}");
    }
}

#[test]
fn counter_reset_mid_run_is_harmless() {
    let mut a = seed_analyzer();
    let mut sim = Sim::new(3);
    for t in 1..=400 {
        sim.step(SEED_TRAFFIC, BASE, BASE);
        if t == 200 {
            // The datapath's maps were recreated: both versions restart from zero.
            sim.stable = VersionCounters::zero();
            sim.canary = VersionCounters::zero();
        }
        a.observe(t, &sim.stable, &sim.canary);
        let eval = a.evaluate(t);
        assert!(eval.fired.is_empty(), "t = {t}: {:?}", eval.fired);
        for v in eval.verdicts.iter().filter(|v| v.metric == "error-rate") {
            assert!(
                v.canary.is_nan() || (0.0..=1.0).contains(&v.canary),
                "{v:?}"
            );
        }
    }
}

#[test]
fn tcp_only_service_uses_connection_errors() {
    let conn = |secs: u64, per_s: u64, failed_every: u64| {
        let mut c = VersionCounters::zero();
        c.conn_new = secs * per_s;
        c.conn_failed = c.conn_new / failed_every;
        c
    };
    let mut a = error_rate_only();
    for t in 0..=120 {
        a.observe(t, &conn(t, 90, 100), &conn(t, 10, 4));
    }
    let v = &a.evaluate(120).verdicts[0];
    assert_eq!(v.verdict, Outcome::Fail, "{v:?}");
    assert!(v.reason.contains("(300/1200 connections)"), "{}", v.reason);
}

#[test]
fn canary_refusing_connections_is_all_errors() {
    // The canary never answers a SYN, so it sees no HTTP requests at all.
    let mut a = error_rate_only();
    for t in 0..=30 {
        let mut canary = VersionCounters::zero();
        canary.conn_new = t * 5;
        canary.conn_failed = t * 5;
        a.observe(t, &steady(t, 180, 100, 20), &canary);
    }
    let v = &a.evaluate(30).verdicts[0];
    assert_eq!(v.verdict, Outcome::Fail, "{v:?}");
    assert_eq!(v.canary, 1.0);
}

#[test]
fn custom_metric_below_one_is_a_floor() {
    let m = metric(
        MetricName::Custom("conversion-rate".into()),
        0.9,
        300,
        Action::PauseAndAlert,
    );
    let conv = |t: u64, per_mille: u64, rps: u64| {
        let mut c = steady(t, rps, 0, 20);
        c.custom.insert(
            "conversion-rate".into(),
            (t * rps * per_mille / 1000, t * rps),
        );
        c
    };
    let run = |canary_per_mille| {
        let mut a = Analyzer::new(vec![m.clone()], vec![], 0.01);
        for t in 0..=300 {
            a.observe(t, &conv(t, 50, 180), &conv(t, canary_per_mille, 20));
        }
        a.evaluate(300).verdicts.remove(0)
    };
    assert_eq!(run(25).verdict, Outcome::Fail);
    assert_eq!(run(50).verdict, Outcome::Pass);
    assert!(run(50).reason.contains("must be ≥ 0.9 × stable"));
}

#[test]
fn invalid_threshold_is_inconclusive_not_a_panic() {
    let m = metric(MetricName::SuccessRate, 1.5, 60, Action::PauseAndAlert);
    let mut a = Analyzer::new(vec![m], vec![], f64::NAN);
    a.observe(0, &steady(0, 10, 0, 1), &steady(0, 10, 0, 1));
    a.observe(60, &steady(60, 10, 0, 1), &steady(60, 10, 0, 1));
    let v = &a.evaluate(60).verdicts[0];
    assert_eq!(v.verdict, Outcome::Inconclusive);
    assert_eq!(
        v.reason,
        "invalid threshold 1.5: a success fraction is at most 1"
    );
}
