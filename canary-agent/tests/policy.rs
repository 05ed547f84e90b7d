use std::path::{Path, PathBuf};

use canary_agent::analysis::DEFAULT_ERROR_FLOOR;
use canary_agent::policy::routing::{Membership, Target, UserKey, Version};
use canary_agent::policy::{
    load_policy, parse_scheme, parse_toml, Action, AnalysisSettings, Cmp, CustomQuery, Gate,
    MetricName, OnRollback, Policy, PolicyError, PolicyErrorKind, Step, DEFAULT_MAX_HOLD_S,
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
    assert_eq!(
        scm.analysis,
        AnalysisSettings {
            error_floor: DEFAULT_ERROR_FLOOR,
            max_hold_s: DEFAULT_MAX_HOLD_S,
        }
    );
    assert_eq!((DEFAULT_ERROR_FLOOR, DEFAULT_MAX_HOLD_S), (0.01, 1800));
    assert_eq!(scm.on_rollback, OnRollback::Drain);
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
fn settings_scheme_and_toml_are_equal() {
    let scm = load("settings.scm");
    assert_eq!(scm, load("settings.toml"));
    assert_eq!(
        scm.analysis,
        AnalysisSettings {
            error_floor: 0.005,
            max_hold_s: 2700,
        }
    );
    assert_eq!(scm.on_rollback, OnRollback::Keep);
    let plan = scm.render_plan();
    for expected in [
        "Analysis: error floor 0.5% (error-rate passes below it while stable has too few errors to compare), alert when analysis holds a step for 45m\n",
        "On rollback: keep the canary's open connections until they close",
    ] {
        assert!(plan.contains(expected), "missing {expected:?} in\n{plan}");
    }
    assert_eq!(plan, load("settings.toml").render_plan());
}

#[test]
fn settings_forms_and_defaults() {
    // Each setting alone; the others keep their defaults. Durations as elsewhere.
    let toml = |extra: &str| parse_toml(&format!("{STEPS_TOML}{extra}"), "s.toml").unwrap();
    let scm = |extra: &str| parse_scheme(&format!("{STEPS_SCM}{extra}"), "s.scm").unwrap();
    let never = AnalysisSettings {
        max_hold_s: 0,
        ..AnalysisSettings::default()
    };
    for p in [
        toml("[analysis]\nmax_hold = 0\n"),
        toml("[analysis]\nmax_hold = \"0s\"\n"),
        scm("(define-analysis '((max-hold . 0)))"),
        scm("(define-analysis '((max-hold . \"0m\")))"),
    ] {
        assert_eq!(p.analysis, never);
        assert_eq!(p.on_rollback, OnRollback::Drain);
        assert!(p
            .render_plan()
            .contains("error floor 1% (error-rate passes below it while stable has too few errors to compare), never alert while analysis holds a step\n"));
    }
    let hour = AnalysisSettings {
        max_hold_s: 3600,
        ..AnalysisSettings::default()
    };
    assert_eq!(toml("[analysis]\nmax_hold = \"1h\"\n").analysis, hour);
    assert_eq!(
        scm("(define-analysis '((max-hold . \"1h\")))").analysis,
        hour
    );
    let floor = AnalysisSettings {
        error_floor: 0.02,
        ..AnalysisSettings::default()
    };
    assert_eq!(toml("[analysis]\nerror_floor = 0.02\n").analysis, floor);
    assert_eq!(
        scm("(define-analysis '((error-floor . 0.02)))").analysis,
        floor
    );
    // Empty tables and forms are allowed and change nothing.
    assert_eq!(toml("[analysis]\n[rollback]\n"), toml(""));
    assert_eq!(scm("(define-analysis '()) (define-rollback '())"), scm(""));
    assert_eq!(
        toml("[rollback]\nconnections = \"drain\"\n").on_rollback,
        OnRollback::Drain
    );
    assert_eq!(
        scm("(define-rollback '((connections . keep)))").on_rollback,
        OnRollback::Keep
    );
    assert!(toml("").render_plan().contains(
        "On rollback: drain the canary's open connections (closed at request boundaries)\n"
    ));
}

#[test]
fn policy_saved_without_settings_reads_with_defaults() {
    // A policy as an older agent saved it inside rollout state: no analysis or
    // on_rollback keys.
    let policy = load("seed.toml");
    let mut json = serde_json::to_value(&policy).unwrap();
    let object = json.as_object_mut().unwrap();
    assert!(object.remove("analysis").is_some());
    assert!(object.remove("on_rollback").is_some());
    let old: Policy = serde_json::from_value(json).unwrap();
    assert_eq!(old, policy);
    // And the new keys round-trip.
    let keep = load("settings.scm");
    let json = serde_json::to_string(&keep).unwrap();
    assert!(json.contains(r#""on_rollback":"keep""#), "{json}");
    assert!(
        json.contains(r#""analysis":{"error_floor":0.005,"max_hold_s":2700}"#),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), keep);
}

#[test]
fn plan_lists_steps_stages_metrics_and_rules() {
    let plan = load("gated.toml").render_plan();
    for expected in [
        "Progression (5 steps):",
        "+0s       0%  internal-testing\n",
        "+1m     0.5%  beta-users  [gate waits first: operator approval]",
        "+5m       5%  beta-users\n",
        // Shown without its path: a webhook URL may carry a token there.
        "+10m      25%  gradual-rollout  [gate waits first: webhook http://hooks.example, alert after 30s]",
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
        "Analysis: error floor 1% (error-rate passes below it while stable has too few errors to compare), alert when analysis holds a step for 30m\n",
        "On rollback: drain the canary's open connections (closed at request boundaries)\n",
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
fn routing_forms_scheme_and_toml_are_equal() {
    let scm = load("routing.scm");
    let toml = load("routing.toml");
    assert_eq!(scm, toml);
    let r = &scm.routing;
    let header = r.header.as_ref().unwrap();
    assert_eq!(header.header, "X-Canary");
    assert_eq!(header.values, ["true", "test", "qa"]);
    assert_eq!(header.default, Some(Version::Stable));
    let names: Vec<&str> = r.cohorts.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "beta-users",
            "internal-users",
            "premium-users",
            "staff",
            "regular-users"
        ]
    );
    assert!(matches!(
        &r.cohorts[1].member,
        Membership::ClientCidr(nets) if nets.len() == 2 && nets[1].to_string() == "fd00::/8"
    ));
    assert_eq!(
        r.cohorts[3].member,
        Membership::Suffix {
            header: "X-User-Email".into(),
            suffix: "@example.com".into()
        }
    );
    assert_eq!(r.cohorts[4].member, Membership::Default);
    assert_eq!(r.user_key, Some(UserKey::Header("X-User-Id".into())));
    assert_eq!(
        r.assignment("beta-users"),
        Some(Target::Version(Version::Canary))
    );
    assert_eq!(r.assignment("regular-users"), Some(Target::Percent(1_000)));
    assert_eq!(r.assignment("staff"), None);
    let flags = &r.flags.as_ref().unwrap().flags;
    assert_eq!(
        flags,
        &[
            ("legacy-cart".to_string(), Version::Stable),
            ("new-checkout".to_string(), Version::Canary)
        ]
    );
    let plan = scm.render_plan();
    for needle in [
        "Routing",
        "header X-Canary: \"true\" | \"test\" | \"qa\" -> canary",
        "new-checkout -> canary",
        "internal-users   client address in 10.0.0.0/8, fd00::/8 -> canary",
        "regular-users    everyone else (default) -> 10% of its users",
        "header rule default -> stable",
        "User key: header X-User-Id",
    ] {
        assert!(plan.contains(needle), "{needle:?} not in\n{plan}");
    }
    // The seed's header form alone is a complete routing policy.
    assert!(load("header-routing.scm").routing.header.is_some());
}

#[test]
fn routing_errors_name_the_form_and_reason() {
    let err = load_policy(&fixture("user-cohorts.scm")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("user-cohorts.scm:2: define-user-cohorts: unknown cohort `beta-users`"),
        "{text}"
    );
    let base = "(define-canary-split '((canary . 5)))\n";
    for (form, needle) in [
        (
            "(define-cohorts '((a (client-cidr . (\"10.0.0.1/8\")))))",
            "has host bits set",
        ),
        ("(define-cohorts '((a (default . #t)) (b (default . #t))))", "only one cohort"),
        ("(define-cohorts '((a (header . \"X-A\"))))", "missing (values"),
        ("(define-header-routing '((header . \"X A\") (values . (\"1\"))))", "not a valid name"),
        ("(define-header-routing '((header . \"X-A\") (values . ())))", "at least one value"),
        ("(define-user-key 'cookie)", "expected (header . NAME)"),
        (
            "(define-feature-routing '((header . \"X-F\") (flags . ((a . beta)))))",
            "unknown version `beta`",
        ),
        (
            "(define-cohorts '((a (default . #t))))\n(define-user-cohorts '((percentage . ((a . 101)))))",
            "above 100",
        ),
    ] {
        let err = parse_scheme(&format!("{base}{form}"), "r.scm").unwrap_err();
        assert!(err.to_string().contains(needle), "{form}: {err}");
    }
    let toml_base = "[split]\ncanary = 5\n";
    for (table, needle) in [
        (
            "[[routing.cohort]]\nname = \"a\"\nheader = \"X\"\ncookie = \"c\"\n",
            "give one of",
        ),
        (
            "[routing.user_cohorts]\nghost = \"canary\"\n",
            "unknown cohort `ghost`",
        ),
        ("[routing]\nuser_key = \"ip\"\n", "user_key"),
        (
            "[routing.header]\nheader = \"X\"\nvalues = [\"1\"]\nextra = 1\n",
            "unknown field",
        ),
    ] {
        let err = parse_toml(&format!("{toml_base}{table}"), "r.toml").unwrap_err();
        assert!(err.to_string().contains(needle), "{table}: {err}");
    }
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
    assert_error(
        bad(&format!(
            "{STEPS_TOML}[[metric]]\nname = \"success-rate\"\nthreshold = 1.0\nwindow = 60\n"
        )),
        8,
        &[
            "[[metric]] #1",
            "success-rate threshold 1 is a fraction and must be below 1",
        ],
    );
    // Syntax errors without a message of their own, and lines without a key.
    assert_error(
        bad("[split]\ncanary ="),
        2,
        &["bad.toml:2: [split] canary: unexpected end of file"],
    );
    assert_error(bad("=\n"), 1, &["bad.toml:1: top level: invalid key"]);
    assert_error(
        bad("x = {\n"),
        1,
        &["bad.toml:1: x: invalid inline table; expected `}`"],
    );
}

#[test]
fn toml_setting_errors_are_located() {
    let bad = |extra: &str| parse_toml(&format!("{STEPS_TOML}{extra}"), "bad.toml");
    for (value, reason) in [
        ("1.5", "error floor 1.5 must be a fraction between 0 and 1"),
        ("0", "error floor 0 must be a fraction between 0 and 1"),
        ("1", "error floor 1 must be a fraction between 0 and 1"),
        (
            "-0.01",
            "error floor -0.01 must be a fraction between 0 and 1",
        ),
        ("nan", "error floor NaN must be a fraction between 0 and 1"),
        ("\"1%\"", "expected a fraction between 0 and 1"),
    ] {
        assert_error(
            bad(&format!("[analysis]\nerror_floor = {value}\n")),
            9,
            &["bad.toml:9: [analysis] error_floor:", reason],
        );
    }
    assert_error(
        bad("[analysis]\nmax_hold = \"30 minutes\"\n"),
        9,
        &[
            "bad.toml:9: [analysis] max_hold:",
            "bad duration `30 minutes`",
        ],
    );
    assert_error(
        bad("[analysis]\nmax_hold = -5\n"),
        9,
        &["[analysis] max_hold", "duration -5 is negative"],
    );
    assert_error(
        bad("[analysis]\nerror_floor = 0.01\nerror-floor = 0.02\n"),
        10,
        &[
            "bad.toml:10: [analysis] error-floor:",
            "unknown field `error-floor`",
        ],
    );
    assert_error(
        bad("[rollback]\nconnections = \"reset\"\n"),
        9,
        &[
            "bad.toml:9: [rollback] connections:",
            "unknown variant `reset`, expected `drain` or `keep`",
        ],
    );
    assert_error(
        bad("[rollback]\nconnections = \"drain\"\nmode = \"keep\"\n"),
        10,
        &["[rollback] mode", "unknown field `mode`"],
    );
    assert_error(
        bad("[analysis]\nmax_hold = 60\n[analysis]\nerror_floor = 0.1\n"),
        10,
        &["bad.toml:10:", "[analysis]", "duplicate"],
    );
}

#[test]
fn scheme_setting_errors_are_located() {
    let bad = |extra: &str| parse_scheme(&format!("{STEPS_SCM}{extra}"), "bad.scm");
    assert_error(
        bad("(define-analysis\n  '((max-hold . 60)\n    (error-floor . 1.5)))\n"),
        4,
        &[
            "bad.scm:4: define-analysis error-floor:",
            "error floor 1.5 must be a fraction between 0 and 1",
        ],
    );
    assert_error(
        bad("(define-analysis '((error-floor . \"1%\")))\n"),
        2,
        &[
            "define-analysis error-floor",
            "expected a number, found \"1%\"",
        ],
    );
    assert_error(
        bad("(define-analysis\n  '((max-hold . \"30 minutes\")))\n"),
        3,
        &[
            "bad.scm:3: define-analysis max-hold:",
            "bad duration `30 minutes`",
        ],
    );
    assert_error(
        bad("(define-analysis\n  '((max-hold . -5)))\n"),
        3,
        &[
            "define-analysis max-hold",
            "duration -5 must be whole seconds",
        ],
    );
    assert_error(
        bad("(define-analysis\n  '((error_floor . 0.01)))\n"),
        3,
        &["bad.scm:3: define-analysis:", "unknown key `error_floor`"],
    );
    assert_error(
        bad("(define-rollback\n  '((connections . reset)))\n"),
        3,
        &[
            "bad.scm:3: define-rollback connections:",
            "unknown connections `reset` (expected drain or keep)",
        ],
    );
    assert_error(
        bad(
            "(define-rollback '((connections . drain)\n                   (connections . keep)))\n",
        ),
        3,
        &["define-rollback", "`connections` given twice"],
    );
    assert_error(
        bad("(define-rollback '((connections . drain)))\n(define-rollback '((connections . keep)))\n"),
        3,
        &["bad.scm:3: define-rollback:", "given twice"],
    );
    assert_error(
        bad("(define-rollback connections)\n"),
        2,
        &["define-rollback", "one quoted list"],
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
        &["bad.scm:3: define-user-cohorts:", "unknown cohort `beta-users`"],
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
fn scheme_errors_in_dotted_tails_are_located() {
    // lexpr gives the tail after a dot no position: the entry's line stands in.
    assert_error(
        parse_scheme(
            "(define-progression\n  '((0 . 1)\n    (300 1 . 5)))\n",
            "bad.scm",
        ),
        3,
        &[
            "bad.scm:3: define-progression (300 1 . 5):",
            "expected a percentage, found (1 . 5)",
        ],
    );
    // Messages quote long data cut short.
    let long = format!("(define-progression '((0 . ({}))))", "1 ".repeat(200));
    let err = parse_scheme(&long, "bad.scm").unwrap_err().to_string();
    assert!(err.contains("found (1 1 1"), "{err}");
    assert!(err.chars().count() < 200, "{err}");
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

#[test]
fn finish_forms_scheme_toml_and_stage_are_equal() {
    use canary_agent::policy::{Finish, Retire, RetireConnections};
    let toml = |extra: &str| parse_toml(&format!("{STEPS_TOML}{extra}"), "f.toml");
    let scm = |extra: &str| parse_scheme(&format!("{STEPS_SCM}{extra}"), "f.scm");
    let want = Some(Finish {
        verify_s: 300,
        retire: Retire {
            connections: RetireConnections::CloseAfter,
            timeout_s: 120,
        },
    });
    let from_toml = toml(
        "[verify]\nduration = \"5m\"\n[retire]\nconnections = \"close-after\"\ntimeout = \"2m\"\n",
    )
    .unwrap();
    assert_eq!(from_toml.finish, want);
    let forms = scm("(define-verification '((duration . 300)))\n\
         (define-retirement '((connections . close-after) (timeout . \"2m\")))")
    .unwrap();
    assert_eq!(forms.finish, want);
    let staged = parse_scheme(
        "(define-progression '((0 . 10) (60 . 100)))\n\
         (define-stages '((rollout (weights 0 50))\n\
           (full-deployment (weights 50 100)\n\
             (verification (duration . 300))\n\
             (retirement (connections . close-after) (timeout . 120)))))",
        "f.scm",
    )
    .unwrap();
    assert_eq!(staged.finish, want);
    // Either table alone turns finishing on, with the other's defaults.
    let verify_only = toml("[verify]\nduration = \"30s\"\n")
        .unwrap()
        .finish
        .unwrap();
    assert_eq!(verify_only.retire, Retire::default());
    assert_eq!(verify_only.retire.timeout_s, 600);
    let retire_only = scm("(define-retirement '((connections . keep)))").unwrap();
    assert_eq!(retire_only.finish.unwrap().verify_s, 0);
    // Without them a release ends at promoted.
    assert_eq!(toml("").unwrap().finish, None);
    let plan = from_toml.render_plan();
    assert!(plan.contains("Finish:"), "{plan}");
    assert_eq!(plan, forms.render_plan());
}

#[test]
fn finish_form_errors_are_located() {
    let toml = |extra: &str| parse_toml(&format!("{STEPS_TOML}{extra}"), "f.toml");
    let scm = |extra: &str| parse_scheme(&format!("{STEPS_SCM}{extra}"), "f.scm");
    let err = toml("[retire]\nconnections = \"linger\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("f.toml") && err.contains("linger"), "{err}");
    assert!(err.contains("drain, keep or close-after"), "{err}");
    let err = toml("[verify]\nlength = \"5m\"\n").unwrap_err().to_string();
    assert!(err.contains("length"), "{err}");
    let err = scm("(define-retirement '((connections . linger)))")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("define-retirement connections") && err.contains("linger"),
        "{err}"
    );
    let err =
        scm("(define-verification '((duration . 60)))\n(define-verification '((duration . 60)))")
            .unwrap_err()
            .to_string();
    assert!(err.contains("given twice"), "{err}");
    let err = scm("(define-verification '())").unwrap_err().to_string();
    assert!(err.contains("missing (duration . SECONDS)"), "{err}");
    let err = parse_scheme(
        "(define-progression '((0 . 10) (60 . 100)))\n\
         (define-stages '((rollout (weights 0 50) (verification (duration . 60)))\n\
           (full-deployment (weights 50 100))))",
        "f.scm",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("only the stage that reaches 100 %"), "{err}");
}

#[test]
fn wave_forms_scheme_and_toml_are_equal_and_checked() {
    use canary_agent::policy::{Wave, WaveRollback};
    let toml = |extra: &str| parse_toml(&format!("{STEPS_TOML}{extra}"), "w.toml");
    let scm = |extra: &str| parse_scheme(&format!("{STEPS_SCM}{extra}"), "w.scm");
    let from_toml = toml(
        "[rollback]\nwaves = \"wave\"\n[[wave]]\nregions = [\"eu-1\"]\n\
         [[wave]]\nregions = [\"us-1\", \"us-2\"]\ngate = { approval = true }\n",
    )
    .unwrap();
    let from_scm = scm("(define-rollback '((waves . wave)))\n\
         (define-waves '((\"eu-1\") (\"us-1\" \"us-2\" (gate (approval . #t)))))")
    .unwrap();
    let gate = Gate {
        approval: true,
        webhook: None,
        timeout_s: 0,
    };
    let want = vec![
        Wave {
            regions: vec!["eu-1".into()],
            gate: None,
        },
        Wave {
            regions: vec!["us-1".into(), "us-2".into()],
            gate: Some(gate),
        },
    ];
    assert_eq!(from_toml.waves, want);
    assert_eq!(from_scm.waves, want);
    assert_eq!(from_toml.wave_rollback, WaveRollback::Wave);
    assert_eq!(from_toml.render_plan(), from_scm.render_plan());
    assert!(from_toml
        .render_plan()
        .contains("Waves: 1. eu-1; 2. us-1, us-2 after approval"));
    // Nodes of unlisted regions (and without one) join the last wave.
    assert_eq!(from_toml.wave_of(Some("us-2")), Some(1));
    assert_eq!(from_toml.wave_of(Some("ap-1")), Some(1));
    assert_eq!(from_toml.wave_of(None), Some(1));
    assert_eq!(toml("").unwrap().wave_of(Some("eu-1")), None);
    assert_eq!(toml("").unwrap().wave_rollback, WaveRollback::All);
    // Errors name the file and the wave.
    let err = toml("[[wave]]\nregions = [\"a\"]\n[[wave]]\nregions = [\"b\", \"a\"]\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("w.toml") && err.contains("region \"a\" is already in wave 1"),
        "{err}"
    );
    let err = toml("[[wave]]\nregions = []\n").unwrap_err().to_string();
    assert!(err.contains("at least one region"), "{err}");
    let err = toml("[[wave]]\nregions = [\"a\"]\ngate = {}\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("gate needs approval"), "{err}");
    let err = toml("[rollback]\nwaves = \"some\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected all or wave"), "{err}");
    let err = scm("(define-waves '((\"a\" (hold . 1))))")
        .unwrap_err()
        .to_string();
    assert!(err.contains("define-waves wave 1"), "{err}");
    let err = scm("(define-waves '((\"a\" 5)))").unwrap_err().to_string();
    assert!(err.contains("define-waves wave 1"), "{err}");
}
