//! TOML policy files. Value-level problems (bad duration, weight, action,
//! unknown key) are raised inside deserialization so the toml crate attaches
//! their position; whole-policy checks use the spans kept per table.
//!
//! Schema (every table optional, unknown keys rejected; weights are percent
//! with at most two decimals, durations 300 / "300s" / "5m" / "1h"):
//!
//! ```toml
//! [split]                       # static split; the single step if no [[step]]
//! canary = 5
//! stable = 95                   # optional; must make 100 with canary
//!
//! [[step]]                      # progression, offsets from rollout start
//! at = "5m"
//! weight = 5
//!
//! [[stage]]                     # replaces the four default stages
//! name = "beta-users"
//! weights = [1, 5]              # [min, max] percent
//! gate = { approval = true, webhook = "http://...", timeout = "30s" }
//!
//! [[metric]]
//! name = "error-rate"           # error-rate | latency-p99 | success-rate | custom
//! threshold = 1.05
//! window = "300s"
//! on_fail = "pause-and-alert"   # default immediate-rollback
//! events = "..."                # custom metrics only, both required:
//! trials = "..."                # PromQL with {version}
//!
//! [[rule]]
//! name = "error-spike"
//! when = "error-rate > baseline * 1.5"
//! action = "immediate-rollback" # or pause-and-alert
//!
//! [analysis]
//! error_floor = 0.01            # fraction in (0, 1); default 0.01
//! max_hold = "30m"              # alert after holding this long; 0 = never
//!
//! [rollback]
//! connections = "drain"         # or "keep"; default drain
//! waves = "all"                 # or "wave": what a rollback during waves resets
//!
//! [verify]                      # with [retire], the release finishes after 100 %
//! duration = "5m"               # rules still judge the canary this long at 100 %
//!
//! [retire]                      # the old version's open connections
//! connections = "drain"         # drain (default) | keep | close-after
//! timeout = "10m"               # default 10m
//!
//! [[wave]]                      # region by region, in order; nodes of regions
//! regions = ["eu-1"]            # not listed join the last wave
//! gate = { approval = true }    # optional, as a stage's gate, before the wave
//!
//! [routing.header]              # define-header-routing
//! header = "X-Canary"
//! values = ["true", "test", "qa"]
//! default = "stable"            # optional
//!
//! [[routing.cohort]]            # define-cohorts, in order; one of:
//! name = "beta-users"           #   header + values | header + suffix |
//! header = "X-User-Group"       #   cookie + values | client_cidr | default = true
//! values = ["beta"]
//!
//! [routing]
//! user_key = { header = "X-User-Id" }   # or { cookie = "uid" } or "client-ip"
//!
//! [routing.user_cohorts]        # define-user-cohorts: a version or a percent
//! beta-users = "canary"
//! regular-users = 10
//!
//! [routing.flags]               # define-feature-routing
//! header = "X-Features"
//! flags = { new-checkout = "canary", legacy-cart = "stable" }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::routing::{
    self, Assignment, Cohort, FlagRule, HeaderRule, Membership, Target, UserKey, Version,
};
use super::{
    check_error_floor, parse_condition, parse_duration, percent_float_to_bp, percent_int_to_bp,
    Action, CustomQuery, Draft, Gate, MetricName, MetricSpec, OnRollback, Policy, PolicyError,
    PolicyErrorKind, Retire, RetireConnections, RollbackRule, Site, Sourced, Stage, Step, Wave,
    WaveRollback, WeightBp, DEFAULT_RETIRE_TIMEOUT_S, FULL_BP,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    split: Option<Spanned<RawSplit>>,
    #[serde(default)]
    step: Vec<Spanned<RawStep>>,
    stage: Option<Vec<Spanned<RawStage>>>,
    #[serde(default)]
    metric: Vec<Spanned<RawMetric>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    analysis: Option<RawAnalysis>,
    rollback: Option<RawRollback>,
    routing: Option<RawRouting>,
    verify: Option<RawVerify>,
    retire: Option<RawRetire>,
    #[serde(default)]
    wave: Vec<Spanned<RawWave>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWave {
    regions: Vec<String>,
    gate: Option<RawGate>,
}

/// `all` or `wave`.
struct WaveRollbackName(WaveRollback);

impl<'de> Deserialize<'de> for WaveRollbackName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        WaveRollback::parse(&name)
            .map(WaveRollbackName)
            .map_err(de::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    header: Option<RawHeaderRule>,
    #[serde(default)]
    cohort: Vec<Spanned<RawCohort>>,
    user_key: Option<RawUserKey>,
    user_cohorts: Option<BTreeMap<String, RawTarget>>,
    flags: Option<RawFlags>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderRule {
    header: String,
    values: Vec<String>,
    default: Option<Version>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCohort {
    name: String,
    header: Option<String>,
    values: Option<Vec<String>>,
    suffix: Option<String>,
    cookie: Option<String>,
    client_cidr: Option<Vec<String>>,
    default: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawUserKey {
    Named(String),
    Table(RawUserKeyTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUserKeyTable {
    header: Option<String>,
    cookie: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlags {
    header: String,
    flags: BTreeMap<String, Version>,
}

/// A cohort's assignment: `"canary"` / `"stable"` or a percentage.
struct RawTarget(Target);

impl<'de> Deserialize<'de> for RawTarget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawTarget;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"canary\", \"stable\" or a percentage of the cohort's users")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawTarget, E> {
                Version::parse(v)
                    .map(|v| RawTarget(Target::Version(v)))
                    .map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawTarget, E> {
                percent_int_to_bp(v)
                    .map(|bp| RawTarget(Target::Percent(bp)))
                    .map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawTarget, E> {
                percent_float_to_bp(v)
                    .map(|bp| RawTarget(Target::Percent(bp)))
                    .map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnalysis {
    error_floor: Option<Fraction>,
    max_hold: Option<Seconds>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollback {
    connections: Option<OnRollback>,
    waves: Option<WaveRollbackName>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerify {
    duration: Seconds,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetire {
    connections: Option<RetireName>,
    timeout: Option<Seconds>,
}

/// `drain`, `keep` or `close-after`.
struct RetireName(RetireConnections);

impl<'de> Deserialize<'de> for RetireName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        RetireConnections::parse(&name)
            .map(RetireName)
            .map_err(de::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit {
    canary: Percent,
    stable: Option<Percent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    at: Seconds,
    weight: Percent,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    name: String,
    weights: [Percent; 2],
    gate: Option<RawGate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    #[serde(default)]
    approval: bool,
    webhook: Option<String>,
    timeout: Option<Seconds>,
}

/// A stage's or wave's gate: approval, a webhook or both.
fn checked_gate(gate: Option<RawGate>) -> Result<Option<Gate>, &'static str> {
    match gate {
        Some(g) if !g.approval && g.webhook.is_none() => {
            Err("gate needs approval = true or a webhook")
        }
        g => Ok(g.map(|g| Gate {
            approval: g.approval,
            webhook: g.webhook,
            timeout_s: g.timeout.map_or(0, |t| t.0),
        })),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetric {
    name: String,
    threshold: f64,
    window: Seconds,
    on_fail: Option<Action>,
    events: Option<String>,
    trials: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    when: Condition,
    action: Action,
}

/// A percentage (integer or float) converted exactly to basis points.
struct Percent(WeightBp);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Percent;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a percentage from 0 to 100, at most two decimals")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Percent, E> {
                percent_int_to_bp(v).map(Percent).map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Percent, E> {
                percent_float_to_bp(v).map(Percent).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A fraction strictly between 0 and 1 (an error floor).
struct Fraction(f64);

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Fraction;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a fraction between 0 and 1, e.g. 0.01")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Fraction, E> {
                check_error_floor(v as f64).map(Fraction).map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Fraction, E> {
                check_error_floor(v).map(Fraction).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Seconds given as an integer or a "300s" / "5m" / "1h" string.
struct Seconds(u64);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 300, \"300s\", \"5m\" or \"1h\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seconds, E> {
                u64::try_from(v)
                    .map(Seconds)
                    .map_err(|_| E::custom(format!("duration {v} is negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Seconds, E> {
                parse_duration(v).map(Seconds).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A rule's `when = "error-rate > baseline * 1.5"`.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct Condition(MetricName, super::Cmp, f64);

impl TryFrom<String> for Condition {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        parse_condition(&text).map(|(m, c, f)| Condition(m, c, f))
    }
}

/// Parses a TOML policy; `origin` names the file in errors.
pub fn parse_toml(text: &str, origin: &str) -> Result<Policy, PolicyError> {
    let raw: RawPolicy = ::toml::from_str(text).map_err(|e| {
        let at = char_floor(text, e.span().map_or(0, |s| s.start));
        PolicyError {
            kind: PolicyErrorKind::Invalid,
            origin: origin.to_string(),
            line: Some(line_of(text, at)),
            context: context_at(text, at),
            reason: syntax_reason(text, at, e.message()),
        }
    })?;
    let site = |span: Range<usize>, what: &str, n: usize| Site {
        line: Some(line_of(text, span.start)),
        context: format!("[[{what}]] #{n}"),
    };
    let mut draft = Draft::new(origin);
    if let Some(split) = raw.split {
        let split_site = Site {
            line: Some(line_of(text, split.span().start)),
            context: "[split]".into(),
        };
        let split = split.into_inner();
        if split
            .stable
            .is_some_and(|s| s.0 != FULL_BP - split.canary.0)
        {
            return Err(draft.error(&split_site, "canary and stable must add up to 100 %"));
        }
        draft.split = Some(split.canary.0);
    }
    if let Some(analysis) = raw.analysis {
        if let Some(floor) = analysis.error_floor {
            draft.analysis.error_floor = floor.0;
        }
        if let Some(hold) = analysis.max_hold {
            draft.analysis.max_hold_s = hold.0;
        }
    }
    if let Some(rollback) = raw.rollback {
        if let Some(connections) = rollback.connections {
            draft.on_rollback = connections;
        }
        if let Some(waves) = rollback.waves {
            draft.wave_rollback = waves.0;
        }
    }
    for (i, wave) in raw.wave.into_iter().enumerate() {
        let site = site(wave.span(), "wave", i + 1);
        let wave = wave.into_inner();
        let gate = checked_gate(wave.gate).map_err(|why| draft.error(&site, why))?;
        draft.waves.push(Sourced {
            item: Wave {
                regions: wave.regions,
                gate,
            },
            site,
        });
    }
    draft.verify_s = raw.verify.map(|v| v.duration.0);
    draft.retire = raw.retire.map(|r| Retire {
        connections: r.connections.map_or_else(Default::default, |c| c.0),
        timeout_s: r.timeout.map_or(DEFAULT_RETIRE_TIMEOUT_S, |t| t.0),
    });
    for (i, step) in raw.step.into_iter().enumerate() {
        let site = site(step.span(), "step", i + 1);
        let step = step.into_inner();
        draft.steps.push(Sourced {
            item: Step {
                at_s: step.at.0,
                weight_bp: step.weight.0,
            },
            site,
        });
    }
    if let Some(stages) = raw.stage {
        let mut out = Vec::new();
        for (i, stage) in stages.into_iter().enumerate() {
            let site = site(stage.span(), "stage", i + 1);
            let stage = stage.into_inner();
            let gate = checked_gate(stage.gate).map_err(|why| draft.error(&site, why))?;
            out.push(Sourced {
                item: Stage {
                    name: stage.name,
                    min_bp: stage.weights[0].0,
                    max_bp: stage.weights[1].0,
                    gate,
                },
                site,
            });
        }
        draft.stages = Some(out);
    }
    for (i, metric) in raw.metric.into_iter().enumerate() {
        let site = site(metric.span(), "metric", i + 1);
        let m = metric.into_inner();
        let query = match (m.events, m.trials) {
            (Some(events), Some(trials)) => Some(CustomQuery { events, trials }),
            (None, None) => None,
            _ => return Err(draft.error(&site, "give both events and trials, or neither")),
        };
        draft.metrics.push(Sourced {
            item: MetricSpec {
                name: MetricName::parse(&m.name),
                threshold: m.threshold,
                window_s: m.window.0,
                on_fail: m.on_fail.unwrap_or(Action::ImmediateRollback),
                query,
            },
            site,
        });
    }
    if let Some(r) = raw.routing {
        routing_from_toml(&mut draft, r, |span| line_of(text, span.start))?;
    }
    for (i, rule) in raw.rule.into_iter().enumerate() {
        let site = site(rule.span(), "rule", i + 1);
        let r = rule.into_inner();
        let Condition(metric, cmp, factor) = r.when;
        draft.rules.push(Sourced {
            item: RollbackRule {
                name: r.name,
                metric,
                cmp,
                factor,
                action: r.action,
            },
            site,
        });
    }
    draft.finish()
}

fn routing_from_toml(
    draft: &mut Draft,
    raw: RawRouting,
    line: impl Fn(Range<usize>) -> usize,
) -> Result<(), PolicyError> {
    // The routing tables are usually implicit (only sub-tables written), so they
    // have no position of their own; errors name the table instead.
    let fail = |draft: &Draft, context: &str, reason: String| {
        draft.error(
            &Site {
                line: None,
                context: context.into(),
            },
            reason,
        )
    };
    if let Some(h) = raw.header {
        let ctx = "[routing.header]";
        draft.routing.header = Some(HeaderRule {
            header: routing::check_name("header", &h.header).map_err(|r| fail(draft, ctx, r))?,
            values: routing::check_values(ctx, h.values).map_err(|r| fail(draft, ctx, r))?,
            default: h.default,
        });
    }
    if !raw.cohort.is_empty() {
        draft.routing_sites.0 = Some(Site {
            line: Some(line(raw.cohort[0].span())),
            context: "[[routing.cohort]]".into(),
        });
    }
    for (i, c) in raw.cohort.into_iter().enumerate() {
        let site = Site {
            line: Some(line(c.span())),
            context: format!("[[routing.cohort]] #{}", i + 1),
        };
        let c = c.into_inner();
        let bad = |reason: String| draft.error(&site, format!("{}: {reason}", c.name));
        let member = match (
            c.header,
            c.values,
            c.suffix,
            c.cookie,
            c.client_cidr,
            c.default,
        ) {
            (None, None, None, None, None, Some(true)) => Membership::Default,
            (None, None, None, None, Some(nets), None) => Membership::ClientCidr(
                routing::check_values("client_cidr", nets)
                    .and_then(|n| n.iter().map(|t| routing::parse_cidr(t)).collect())
                    .map_err(bad)?,
            ),
            (None, Some(values), None, Some(cookie), None, None) => Membership::Cookie {
                cookie: routing::check_name("cookie", &cookie).map_err(bad)?,
                values: routing::check_values("values", values).map_err(bad)?,
            },
            (Some(header), Some(values), None, None, None, None) => Membership::Header {
                header: routing::check_name("header", &header).map_err(bad)?,
                values: routing::check_values("values", values).map_err(bad)?,
            },
            (Some(header), None, Some(suffix), None, None, None) => Membership::Suffix {
                header: routing::check_name("header", &header).map_err(bad)?,
                suffix,
            },
            _ => {
                return Err(bad(
                    "give one of: header + values, header + suffix, cookie + values, \
                     client_cidr, or default = true"
                        .into(),
                ))
            }
        };
        draft.routing.cohorts.push(Cohort {
            name: c.name,
            member,
        });
    }
    if let Some(key) = raw.user_key {
        let ctx = "[routing] user_key";
        draft.routing.user_key = Some(match key {
            RawUserKey::Named(n) if n == "client-ip" => UserKey::ClientIp,
            RawUserKey::Table(RawUserKeyTable {
                header: Some(h),
                cookie: None,
            }) => {
                UserKey::Header(routing::check_name("header", &h).map_err(|r| fail(draft, ctx, r))?)
            }
            RawUserKey::Table(RawUserKeyTable {
                header: None,
                cookie: Some(c),
            }) => {
                UserKey::Cookie(routing::check_name("cookie", &c).map_err(|r| fail(draft, ctx, r))?)
            }
            _ => {
                return Err(fail(
                    draft,
                    ctx,
                    "expected { header = \"NAME\" }, { cookie = \"NAME\" } or \"client-ip\"".into(),
                ))
            }
        });
    }
    if let Some(assignments) = raw.user_cohorts {
        draft.routing_sites.1 = Some(Site {
            line: None,
            context: "[routing.user_cohorts]".into(),
        });
        draft.routing.assignments = assignments
            .into_iter()
            .map(|(cohort, t)| Assignment {
                cohort,
                target: t.0,
            })
            .collect();
    }
    if let Some(f) = raw.flags {
        let ctx = "[routing.flags]";
        draft.routing.flags = Some(FlagRule {
            header: routing::check_name("header", &f.header).map_err(|r| fail(draft, ctx, r))?,
            flags: routing::check_flags(f.flags.into_iter().collect())
                .map_err(|r| fail(draft, ctx, r))?,
        });
    }
    Ok(())
}

/// `offset` clamped to the text and moved back to a character boundary.
fn char_floor(text: &str, offset: usize) -> usize {
    let mut at = offset.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..char_floor(text, offset)].matches('\n').count() + 1
}

/// The parser's message on one line; some syntax errors come without one.
fn syntax_reason(text: &str, at: usize, message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if !lines.is_empty() {
        return lines.join("; ");
    }
    match text[at..].chars().next() {
        None => "unexpected end of file".to_string(),
        Some(c) => format!("unexpected character {c:?}"),
    }
}

/// "[[step]] #2 weight": the table (with its index) and key at `offset`; "top level"
/// when neither can be told. Control characters are escaped and long text cut short.
fn context_at(text: &str, offset: usize) -> String {
    let context = table_and_key_at(text, offset);
    let context = context.trim();
    if context.is_empty() {
        return "top level".to_string();
    }
    let mut short: String = context.chars().take(60).collect();
    if short.len() < context.len() {
        short.push('…');
    }
    if short.chars().any(char::is_control) {
        format!("{short:?}")
    } else {
        short
    }
}

fn table_and_key_at(text: &str, offset: usize) -> String {
    let offset = char_floor(text, offset);
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let upto = &text[..line_start + line.len()];
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.starts_with('['));
    let header = upto
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['));
    let table = header.map(|h| {
        let count = upto.lines().filter(|l| l.trim() == h).count();
        if h.starts_with("[[") {
            format!("{h} #{count}")
        } else {
            h.to_string()
        }
    });
    match (table, key) {
        (Some(t), Some(k)) => format!("{t} {k}"),
        (Some(t), None) => t,
        (None, Some(k)) => k.to_string(),
        (None, None) => line.trim().to_string(),
    }
}
