use std::path::{Path, PathBuf};

use canary_agent::policy::{
    load_policy, parse_scheme, parse_toml, Action, Cmp, CustomQuery, Gate, MetricName, Policy,
    PolicyError, PolicyErrorKind, Step,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn load(name: &str) -> Policy {
    load_policy(&fixture(name)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn seed_scheme_and_toml_are_equal() {
    let scm = load("seed.scm");
    let toml = load("seed.toml");
    assert_eq!(scm, toml);

    let at_weights: Vec<(u64, u16)> = scm.steps.iter().map(|s| (s.at_s, s.weight_bp)).collect();
    assert_eq!(
        at_weights,
        [
            (0, 100),
            (300, 500),
            (600, 2_000),
            (1_800, 5_000),
            (3_600, 10_000)
        ]
    );
    assert_eq!(scm.initial_split, Some(500));
    assert_eq!(scm.stages, Policy::default_stages());
    let names: Vec<&str> = scm.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "internal-testing",
            "beta-users",
            "gradual-rollout",
            "full-deployment"
        ]
    );

    assert_eq!(scm.metrics.len(), 4);
    assert_eq!(scm.metrics[1].name, MetricName::LatencyP99);
    assert_eq!(scm.metrics[1].threshold, 1.20);
    assert_eq!(scm.metrics[2].window_s, 600);
    assert_eq!(scm.metrics[0].on_fail, Action::ImmediateRollback);
    let conversion = &scm.metrics[3];
    assert_eq!(
        conversion.name,
        MetricName::Custom("conversion-rate".into())
    );
    assert_eq!(conversion.on_fail, Action::PauseAndAlert);
    assert_eq!(
        conversion.query,
        Some(CustomQuery {
            events: r#"sum(rate(checkout_completed_total{version="{version}"}[10m]))"#.into(),
            trials: r#"sum(rate(checkout_started_total{version="{version}"}[10m]))"#.into(),
        })
    );

    let rules: Vec<(&str, &MetricName, Cmp, f64, Action)> = scm
        .rules
        .iter()
        .map(|r| (r.name.as_str(), &r.metric, r.cmp, r.factor, r.action))
        .collect();
    assert_eq!(
        rules,
        [
            (
                "error-spike",
                &MetricName::ErrorRate,
                Cmp::Gt,
                1.5,
                Action::ImmediateRollback
            ),
            (
                "latency-degradation",
                &MetricName::LatencyP99,
                Cmp::Gt,
                2.0,
                Action::ImmediateRollback
            ),
            (
                "business-impact",
                &MetricName::Custom("conversion-rate".into()),
                Cmp::Lt,
                0.9,
                Action::PauseAndAlert
            ),
        ]
    );
}

#[test]
fn gated_scheme_and_toml_are_equal() {
    let scm = load("gated.scm");
    assert_eq!(scm, load("gated.toml"));
    assert_eq!(
        scm.steps[1],
        Step {
            at_s: 60,
            weight_bp: 50
        }
    );
    assert_eq!(scm.stages[1].min_bp, 1);
    assert_eq!(
        scm.stages[2].gate,
        Some(Gate {
            approval: false,
            webhook: Some("http://hooks.example/approve".into()),
            timeout_s: 30,
        })
    );
    // Step 1 (0%) has no gate, step 2 opens beta-users, step 3 (5%) stays in
    // beta-users (first listed match), step 4 opens gradual-rollout.
    let gated: Vec<bool> = (0..scm.steps.len())
        .map(|i| scm.gate_before(i).is_some())
        .collect();
    assert_eq!(gated, [false, true, false, true, true]);
}

#[test]
fn policy_round_trips_through_json() {
    let policy = load("seed.scm");
    let json = serde_json::to_string(&policy).unwrap();
    assert!(json.contains(r#""name":"conversion-rate""#), "{json}");
    assert!(json.contains(r#""on_fail":"pause-and-alert""#), "{json}");
    assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), policy);
}

#[test]
fn plan_lists_steps_stages_metrics_and_rules() {
    let plan = load("gated.toml").render_plan();
    for expected in [
        "Progression (5 steps):",
        "+0s       0%  internal-testing\n",
        "+1m     0.5%  beta-users  [gate waits first: operator approval]",
        "+5m       5%  beta-users\n",
        "+10m      25%  gradual-rollout  [gate waits first: webhook http://hooks.example/approve, alert after 30s]",
        "+1h     100%  full-deployment  [gate waits first: operator approval or webhook",
        "Reaching the last step promotes the canary.",
        "beta-users         0.01%–5%     gate: operator approval",
    ] {
        assert!(plan.contains(expected), "missing {expected:?} in\n{plan}");
    }
    let plan = load("seed.scm").render_plan();
    for expected in [
        "+30m      50%  gradual-rollout\n",
        "Split: 5% canary / 95% stable (the progression sets the weights)",
        "error-rate         canary/stable <= 1.05 over 5m, on fail: immediate-rollback",
        "success-rate       canary >= 0.95 over 10m",
        "events: sum(rate(checkout_completed_total",
        "business-impact        conversion-rate < baseline * 0.9 -> pause-and-alert",
        "latency-degradation    latency-p99 > baseline * 2 -> immediate-rollback",
    ] {
        assert!(plan.contains(expected), "missing {expected:?} in\n{plan}");
    }
}

#[test]
fn split_alone_is_a_single_step() {
    let scm = parse_scheme("(define-canary-split '((canary . 12.5)))", "s.scm").unwrap();
    let toml = parse_toml("[split]\ncanary = 12.5\nstable = 87.5\n", "s.toml").unwrap();
    assert_eq!(scm, toml);
    assert_eq!(
        scm.steps,
        [Step {
            at_s: 0,
            weight_bp: 1_250
        }]
    );
    assert!(scm.render_plan().contains("promote by hand"));
}

#[test]
fn unbuilt_forms_are_refused_with_their_location() {
    let err = load_policy(&fixture("header-routing.scm")).unwrap_err();
    assert_eq!(err.kind, PolicyErrorKind::NotBuilt);
    assert_eq!(err.line, Some(4));
    let text = err.to_string();
    assert!(
        text.contains("header-routing.scm:4: define-header-routing:"),
        "{text}"
    );
    assert!(text.contains("not built yet"), "{text}");

    let err = load_policy(&fixture("user-cohorts.scm")).unwrap_err();
    assert_eq!(err.kind, PolicyErrorKind::NotBuilt);
    let text = err.to_string();
    assert!(
        text.contains("user-cohorts.scm:2: define-user-cohorts:"),
        "{text}"
    );
    assert!(text.contains("not built yet"), "{text}");
}

#[test]
fn load_policy_checks_extension_and_file() {
    let err = load_policy(Path::new("policy.yaml")).unwrap_err();
    assert!(
        err.to_string().contains("unsupported extension `yaml`"),
        "{err}"
    );
    let err = load_policy(&fixture("missing.toml")).unwrap_err();
    assert_eq!(err.kind, PolicyErrorKind::Io);
    assert!(
        err.to_string()
            .contains("missing.toml: policy file: cannot read"),
        "{err}"
    );
}

const STEPS_TOML: &str = "[[step]]\nat = 0\nweight = 1\n\n[[step]]\nat = \"5m\"\nweight = 100\n";
const STEPS_SCM: &str = "(define-progression '((0 . 1) (300 . 100)))\n";

/// Asserts a located error: origin, line, and fragments of the message.
fn assert_error(result: Result<Policy, PolicyError>, line: usize, fragments: &[&str]) {
    let err = result.expect_err("policy should be rejected");
    let text = err.to_string();
    assert_eq!(err.line, Some(line), "{text}");
    for fragment in fragments {
        assert!(text.contains(fragment), "missing {fragment:?} in {text:?}");
    }
}

#[test]
fn toml_errors_are_located() {
    let bad = |text: &str| parse_toml(text, "bad.toml");
    assert_error(
        bad("[[step]]\nat = \"5 minutes\"\nweight = 1\n"),
        2,
        &["bad.toml:2: [[step]] #1 at:", "bad duration `5 minutes`"],
    );
    assert_error(
        bad(&format!(
            "{STEPS_TOML}\n[[step]]\nat = \"1h\"\nweight = 101\n"
        )),
        11,
        &["bad.toml:11: [[step]] #3 weight:", "101 % is above 100 %"],
    );
    assert_error(
        bad("[[step]]\nat = 0\nweight = 12.345\n"),
        3,
        &["[[step]] #1 weight", "12.345 % has more than two decimals"],
    );
    assert_error(
        bad(&format!(
            "{STEPS_TOML}[[stage]]\nname = \"a\"\nweights = [0, 100]\ncolour = \"red\"\n"
        )),
        11,
        &["[[stage]] #1 colour", "unknown field `colour`"],
    );
    assert_error(
        bad(&format!(
            "{STEPS_TOML}[[rule]]\nname = \"r\"\nwhen = \"error-rate > baseline * 2\"\naction = \"panic\"\n"
        )),
        11,
        &["[[rule]] #1 action", "unknown variant `panic`"],
    );
    assert_error(
        bad("[[step]]\nat = 0\nweight = 1\n\n[[step]]\nat = \"10m\"\nweight = 5\n\n[[step]]\nat = \"5m\"\nweight = 20\n"),
        9,
        &["bad.toml:9: [[step]] #3:", "strictly increasing", "+5m is not after +10m"],
    );
    assert_error(
        bad(&format!("{STEPS_TOML}\n[[metric]]\nname = \"conversion-rate\"\nthreshold = 0.9\nwindow = \"10m\"\n")),
        9,
        &["[[metric]] #1", "custom metric `conversion-rate` needs a query"],
    );
    assert_error(
        bad("[[step]]\nat = 0\nweight = 0.5\n"),
        1,
        &[
            "[[step]] #1",
            "step 1 (+0s, 0.5%) falls in no stage",
            "beta-users 1%–5%",
        ],
    );
    assert_error(
        bad("[[step]]\nat = 60\nweight = 1\n"),
        1,
        &["first step must be at offset 0"],
    );
    assert_error(
        bad(&format!("{STEPS_TOML}[[rule]]\nname = \"r\"\nwhen = \"error-rate >= 2\"\naction = \"pause-and-alert\"\n")),
        10,
        &["[[rule]] #1 when", "cannot read condition"],
    );
    assert_error(
        bad(&format!("{STEPS_TOML}[[stage]]\nname = \"all\"\nweights = [0, 100]\ngate = {{ timeout = \"30s\" }}\n")),
        8,
        &["[[stage]] #1", "gate needs approval = true or a webhook"],
    );
    assert_error(
        bad("[split]\ncanary = 5\nstable = 90\n"),
        1,
        &["[split]", "add up to 100 %"],
    );
}

#[test]
fn scheme_errors_are_located() {
    let bad = |text: &str| parse_scheme(text, "bad.scm");
    assert_error(
        bad(&format!("{STEPS_SCM}(define-canary-metrics\n  '((error-rate (threshold . 1.1) (window . \"5 min\"))))\n")),
        3,
        &["bad.scm:3: define-canary-metrics error-rate:", "bad duration `5 min`"],
    );
    assert_error(
        bad("(define-progression\n  '((0 . 1)\n    (300 . 101)))\n"),
        3,
        &["define-progression (300 . 101)", "101 % is above 100 %"],
    );
    assert_error(
        bad("(define-progression\n  '((0 . 12.345)))\n"),
        2,
        &["define-progression (0 . 12.345)", "more than two decimals"],
    );
    assert_error(
        bad(&format!("{STEPS_SCM}(define-canary-metrics\n  '((error-rate\n     (threshold . 1.1)\n     (window . 300)\n     (colour . red))))\n")),
        6,
        &["define-canary-metrics error-rate", "unknown key `colour`"],
    );
    assert_error(
        bad(&format!("{STEPS_SCM}(define-rollback-rules\n  '((r (condition . (> error-rate (* baseline 2)))\n       (action . panic))))\n")),
        4,
        &["define-rollback-rules r", "unknown action `panic`"],
    );
    assert_error(
        bad("(define-progression\n  '((0 . 1)\n    (600 . 5)\n    (300 . 20)))\n"),
        4,
        &[
            "bad.scm:4: define-progression (300 . 20):",
            "+5m is not after +10m",
        ],
    );
    assert_error(
        bad(&format!("{STEPS_SCM}(define-canary-metrics\n  '((conversion-rate (threshold . 0.9) (window . 600))))\n")),
        3,
        &["define-canary-metrics conversion-rate", "needs a query"],
    );
    assert_error(
        bad(&format!("{STEPS_SCM}(define-stages '((all (weights 0 100))))\n(define-user-cohorts '((beta-users . canary)))\n")),
        3,
        &["bad.scm:3: define-user-cohorts:", "user-cohort routing is not built yet"],
    );
    assert_error(
        bad(&format!("{STEPS_SCM}\n(define-canary-routes '())\n")),
        3,
        &["define-canary-routes", "unknown form"],
    );
    assert_error(
        bad(&format!("{STEPS_SCM}{STEPS_SCM}")),
        2,
        &["define-progression", "given twice"],
    );
    assert_error(
        bad("(define-progression ((0 . 1)))\n"),
        1,
        &["define-progression", "one quoted list"],
    );
    assert_error(
        bad("(define-progression\n  '((0 . 1)\n    (300 . 5))\n"),
        4,
        &["bad.scm:4: s-expression:", "EOF while parsing a list"],
    );
    assert_error(
        bad(&format!("{STEPS_SCM}(define-rollback-rules\n  '((r (condition . (> error-rate 2))\n       (action . pause-and-alert))))\n")),
        3,
        &["define-rollback-rules r condition", "expected (> METRIC (* baseline FACTOR))"],
    );
    assert_error(
        bad(&format!(
            "{STEPS_SCM}(define-stages\n  '((low (weights 0 5))\n    (high (weights 4 100))))\n"
        )),
        4,
        &["define-stages high", "overlap stage low"],
    );
}

#[test]
fn the_verbatim_seed_rule_needs_its_custom_query() {
    let text = std::fs::read_to_string(fixture("seed.scm")).unwrap();
    let start = text.find("    (conversion-rate").unwrap();
    let end = text.find("(define-rollback-rules").unwrap();
    let verbatim = format!("{}))\n\n{}", &text[..start].trim_end(), &text[end..]);
    let err = parse_scheme(&verbatim, "seed.scm").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("define-rollback-rules business-impact"),
        "{text}"
    );
    assert!(
        text.contains("custom metric `conversion-rate`, which has no query"),
        "{text}"
    );
}
