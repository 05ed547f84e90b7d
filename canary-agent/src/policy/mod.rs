//! Rollout policy: the progression of canary weights, the stages that group
//! them (with optional approval gates), the metrics the analysis watches and
//! the rollback rules, plus analysis settings (error floor, max hold) and what a
//! rollback does to open canary connections. Two file formats (TOML and Scheme s-expressions) parse
//! into the same [`Policy`]; both go through one validation pass (`Draft`)
//! so they cannot drift apart in meaning.

mod plan;
pub mod routing;
mod scheme;
mod toml;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use self::routing::Routing;
pub use self::scheme::parse_scheme;
pub use self::toml::parse_toml;
pub use crate::analysis::spec::{Action, Cmp, CustomQuery, MetricName, MetricSpec, RollbackRule};
pub use crate::units::{percent, WeightBp, FULL_BP};
pub(crate) use crate::units::{percent_float_to_bp, percent_int_to_bp};

/// A validated rollout policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Strictly increasing in time, the first at offset 0.
    pub steps: Vec<Step>,
    /// Ordered by weight; every step's weight falls in one of them.
    pub stages: Vec<Stage>,
    pub metrics: Vec<MetricSpec>,
    pub rules: Vec<RollbackRule>,
    /// The static split (`define-canary-split` / `[split]`). When the policy
    /// has no progression it becomes the single step at offset 0; otherwise
    /// the progression sets the weights and the split is informational.
    pub initial_split: Option<WeightBp>,
    /// `[analysis]` / `define-analysis`. Defaulted when absent, also when reading a
    /// policy saved (inside rollout state) by an agent that did not know it.
    #[serde(default)]
    pub analysis: AnalysisSettings,
    /// `[rollback] connections` / `define-rollback`; defaulted like `analysis`.
    #[serde(default)]
    pub on_rollback: OnRollback,
    /// Request routing rules (`[routing]` / `define-header-routing` and friends);
    /// empty for a weight-only policy.
    #[serde(default)]
    pub routing: Routing,
    /// How a release ends after 100 % (`[verify]`, `[retire]`; `define-verification`,
    /// `define-retirement` or those keys in the stage that reaches 100 %). `None`: the
    /// rollout ends at `promoted` and the old version keeps its connections.
    #[serde(default)]
    pub finish: Option<Finish>,
    /// Region by region (`[[wave]]` / `define-waves`): the progression runs in each
    /// wave's regions in turn; empty = every node at once.
    #[serde(default)]
    pub waves: Vec<Wave>,
    /// What a rollback during waves returns to 0 % (`[rollback] waves`).
    #[serde(default)]
    pub wave_rollback: WaveRollback,
}

/// One wave: the regions whose nodes run the progression together, and the gate
/// (approval or webhook, as a stage's) before the wave begins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    pub regions: Vec<String>,
    pub gate: Option<Gate>,
}

/// Which waves a rollback returns to 0 %.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WaveRollback {
    /// Every wave, the finished ones too: the fleet runs one version again.
    #[default]
    All,
    /// Only the wave running; the finished ones keep the new version.
    Wave,
}

impl WaveRollback {
    pub(crate) fn parse(name: &str) -> Result<Self, String> {
        match name {
            "all" => Ok(Self::All),
            "wave" => Ok(Self::Wave),
            other => Err(format!("unknown waves `{other}` (expected all or wave)")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Wave => "wave",
        }
    }
}

/// Finishing a release: verification at 100 %, then retirement of the old version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finish {
    /// Seconds at 100 % during which the rules still judge the canary (against
    /// stable's baseline from before promotion); 0 = retire at once.
    pub verify_s: u64,
    pub retire: Retire,
}

/// Default of [`Retire::timeout_s`]: 10 minutes, the seed's longest window.
pub const DEFAULT_RETIRE_TIMEOUT_S: u64 = 600;

/// What happens to the old version's open connections once the canary is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retire {
    pub connections: RetireConnections,
    /// `drain`: the rest are closed after it; `close-after`: they are closed after it;
    /// `keep`: an alert is raised after it (they stay until they close).
    pub timeout_s: u64,
}

impl Default for Retire {
    fn default() -> Self {
        Self {
            connections: RetireConnections::Drain,
            timeout_s: DEFAULT_RETIRE_TIMEOUT_S,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetireConnections {
    /// Closed at request boundaries (as a rolled-back canary's), the rest at the timeout.
    #[default]
    Drain,
    /// Left until they close on their own.
    Keep,
    /// Left until the timeout, then closed.
    CloseAfter,
}

impl RetireConnections {
    pub(crate) fn parse(name: &str) -> Result<Self, String> {
        match name {
            "drain" => Ok(Self::Drain),
            "keep" => Ok(Self::Keep),
            "close-after" => Ok(Self::CloseAfter),
            other => Err(format!(
                "unknown connections `{other}` (expected drain, keep or close-after)"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drain => "drain",
            Self::Keep => "keep",
            Self::CloseAfter => "close-after",
        }
    }
}

impl Policy {
    /// This policy with its gate webhook URLs reduced to scheme, host and port (what
    /// may be shown or stored outside the config).
    pub fn redacted(&self) -> Policy {
        let mut p = self.clone();
        let stage_gates = p.stages.iter_mut().filter_map(|s| s.gate.as_mut());
        let wave_gates = p.waves.iter_mut().filter_map(|w| w.gate.as_mut());
        for gate in stage_gates.chain(wave_gates) {
            gate.webhook = gate.webhook.as_deref().map(crate::webhook::redact_url);
        }
        p
    }

    /// The wave a node of `region` belongs to: the one listing it, else the last
    /// (a node without a region too); `None` without waves.
    pub fn wave_of(&self, region: Option<&str>) -> Option<usize> {
        let last = self.waves.len().checked_sub(1)?;
        let listed = region.and_then(|r| {
            self.waves
                .iter()
                .position(|w| w.regions.iter().any(|x| x == r))
        });
        Some(listed.unwrap_or(last))
    }
}

/// Default of [`AnalysisSettings::max_hold_s`]: 30 minutes, longer than any
/// seed window (10 min) with room for a slow ramp of traffic, short enough
/// that a rollout stuck on inconclusive analysis is noticed within a shift.
pub const DEFAULT_MAX_HOLD_S: u64 = 1_800;

/// Analysis settings of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AnalysisSettings {
    /// Absolute error rate, a fraction in (0, 1), below which a canary passes
    /// `error-rate` while stable has too few errors to compare against (see
    /// [`crate::analysis::DEFAULT_ERROR_FLOOR`]).
    pub error_floor: f64,
    /// seconds; 0 = never alert. How long inconclusive analysis may hold a
    /// due step before an alert is raised (the hold goes on).
    pub max_hold_s: u64,
}

impl Default for AnalysisSettings {
    fn default() -> Self {
        Self {
            error_floor: crate::analysis::DEFAULT_ERROR_FLOOR,
            max_hold_s: DEFAULT_MAX_HOLD_S,
        }
    }
}

/// What a rollback does to the canary connections already open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRollback {
    /// Close them at request boundaries, so their next request goes to stable.
    #[default]
    Drain,
    /// Leave them on the canary until they close; only new connections go to
    /// stable.
    Keep,
}

impl OnRollback {
    fn parse(name: &str) -> Result<Self, String> {
        match name {
            "drain" => Ok(Self::Drain),
            "keep" => Ok(Self::Keep),
            other => Err(format!(
                "unknown connections `{other}` (expected drain or keep)"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drain => "drain",
            Self::Keep => "keep",
        }
    }
}

/// An error floor must be a fraction strictly between 0 and 1.
pub(crate) fn check_error_floor(value: f64) -> Result<f64, String> {
    if value > 0.0 && value < 1.0 {
        Ok(value)
    } else {
        Err(format!(
            "error floor {value} must be a fraction between 0 and 1 (exclusive), e.g. 0.01 for 1 %"
        ))
    }
}

/// One point of the progression; `at_s` is the offset from rollout start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub at_s: u64,
    pub weight_bp: WeightBp,
}

/// A named band of weights; a step belongs to the first stage listed whose
/// `[min_bp, max_bp]` contains its weight (bands may touch at one point).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    pub min_bp: WeightBp,
    pub max_bp: WeightBp,
    pub gate: Option<Gate>,
}

/// Entry gate of a stage: the rollout waits before its first step in the
/// stage until an operator (`approval`) or the webhook approves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    pub approval: bool,
    pub webhook: Option<String>,
    /// Seconds of waiting after which the controller raises an alert (the
    /// gate keeps waiting); 0 = never.
    pub timeout_s: u64,
}

impl Policy {
    /// Index of the stage a weight belongs to (first match in order).
    pub fn stage_index(&self, weight_bp: WeightBp) -> Option<usize> {
        self.stages
            .iter()
            .position(|s| (s.min_bp..=s.max_bp).contains(&weight_bp))
    }

    /// Stage of step `step`; validation guarantees one exists.
    pub fn stage_of_step(&self, step: usize) -> Option<&Stage> {
        let weight = self.steps.get(step)?.weight_bp;
        self.stage_index(weight).map(|i| &self.stages[i])
    }

    /// The gate that must be passed before entering `step`: only when the
    /// step starts a new stage (step 0 always does).
    pub fn gate_before(&self, step: usize) -> Option<(&Stage, &Gate)> {
        let stage = self.stage_of_step(step)?;
        let same_as_previous = step
            .checked_sub(1)
            .and_then(|prev| self.stage_of_step(prev))
            .is_some_and(|prev| prev.name == stage.name);
        if same_as_previous {
            return None;
        }
        stage.gate.as_ref().map(|gate| (stage, gate))
    }

    /// The seed's stages, used when a policy gives none.
    pub fn default_stages() -> Vec<Stage> {
        [
            ("internal-testing", 0, 0),
            ("beta-users", 100, 500),
            ("gradual-rollout", 500, 5_000),
            ("full-deployment", 5_000, FULL_BP),
        ]
        .into_iter()
        .map(|(name, min_bp, max_bp)| Stage {
            name: name.to_string(),
            min_bp,
            max_bp,
            gate: None,
        })
        .collect()
    }
}

/// What went wrong with a policy file, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {context}: {reason}", self.location())]
pub struct PolicyError {
    pub kind: PolicyErrorKind,
    /// File path or other origin label given to the parser.
    pub origin: String,
    /// 1-based line, when the format can tell.
    pub line: Option<usize>,
    /// The form, table or field at fault.
    pub context: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyErrorKind {
    Io,
    /// Unreadable syntax or a value the policy does not allow.
    Invalid,
}

impl PolicyError {
    fn location(&self) -> String {
        match self.line {
            Some(line) => format!("{}:{line}", self.origin),
            None => self.origin.clone(),
        }
    }
}

/// Reads a policy file, choosing the format by extension.
pub fn load_policy(path: &Path) -> Result<Policy, PolicyError> {
    let origin = path.display().to_string();
    let fail = |kind, reason: String| PolicyError {
        kind,
        origin: origin.clone(),
        line: None,
        context: "policy file".into(),
        reason,
    };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !matches!(ext, "toml" | "scm") {
        return Err(fail(
            PolicyErrorKind::Invalid,
            format!("unsupported extension `{ext}` (expected .toml or .scm)"),
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail(PolicyErrorKind::Io, format!("cannot read: {e}")))?;
    if ext == "toml" {
        parse_toml(&text, &origin)
    } else {
        parse_scheme(&text, &origin)
    }
}

/// Where an item was written, so whole-policy checks can point at it.
#[derive(Debug, Clone)]
pub(crate) struct Site {
    pub line: Option<usize>,
    pub context: String,
}

#[derive(Debug)]
pub(crate) struct Sourced<T> {
    pub item: T,
    pub site: Site,
}

/// A policy as read by one format, before the checks both formats share.
#[derive(Debug)]
pub(crate) struct Draft {
    pub origin: String,
    pub split: Option<WeightBp>,
    pub steps: Vec<Sourced<Step>>,
    pub stages: Option<Vec<Sourced<Stage>>>,
    pub metrics: Vec<Sourced<MetricSpec>>,
    pub rules: Vec<Sourced<RollbackRule>>,
    pub analysis: AnalysisSettings,
    pub on_rollback: OnRollback,
    pub routing: Routing,
    /// `[verify]` / `define-verification` (seconds), `[retire]` / `define-retirement`;
    /// either one makes the policy finish its releases.
    pub verify_s: Option<u64>,
    pub retire: Option<Retire>,
    pub waves: Vec<Sourced<Wave>>,
    pub wave_rollback: WaveRollback,
    /// Where the cohorts and the cohort assignments were written.
    pub routing_sites: (Option<Site>, Option<Site>),
}

impl Draft {
    pub fn new(origin: &str) -> Self {
        Self {
            origin: origin.to_string(),
            split: None,
            steps: Vec::new(),
            stages: None,
            metrics: Vec::new(),
            rules: Vec::new(),
            analysis: AnalysisSettings::default(),
            on_rollback: OnRollback::default(),
            routing: Routing::default(),
            verify_s: None,
            retire: None,
            waves: Vec::new(),
            wave_rollback: WaveRollback::default(),
            routing_sites: (None, None),
        }
    }

    pub fn error(&self, site: &Site, reason: impl Into<String>) -> PolicyError {
        PolicyError {
            kind: PolicyErrorKind::Invalid,
            origin: self.origin.clone(),
            line: site.line,
            context: site.context.clone(),
            reason: reason.into(),
        }
    }

    /// Applies the checks and defaults common to both formats.
    pub fn finish(mut self) -> Result<Policy, PolicyError> {
        if let Err((assignments, reason)) = self.routing.check() {
            let site = if assignments {
                &self.routing_sites.1
            } else {
                &self.routing_sites.0
            };
            let site = site.clone().unwrap_or(Site {
                line: None,
                context: "routing".into(),
            });
            return Err(self.error(&site, reason));
        }
        let steps = self.checked_steps()?;
        let stages = self.checked_stages()?;
        let policy = Policy {
            steps,
            stages,
            metrics: self.metrics.iter().map(|m| m.item.clone()).collect(),
            rules: self.rules.iter().map(|r| r.item.clone()).collect(),
            initial_split: self.split,
            analysis: self.analysis,
            on_rollback: self.on_rollback,
            routing: self.routing.clone(),
            finish: (self.verify_s.is_some() || self.retire.is_some()).then(|| Finish {
                verify_s: self.verify_s.unwrap_or(0),
                retire: self.retire.unwrap_or_default(),
            }),
            waves: self.checked_waves()?,
            wave_rollback: self.wave_rollback,
        };
        for (i, step) in self.steps.iter().enumerate() {
            if policy.stage_index(step.item.weight_bp).is_none() {
                let bands: Vec<String> = policy
                    .stages
                    .iter()
                    .map(|s| format!("{} {}", s.name, plan::band(s)))
                    .collect();
                return Err(self.error(
                    &step.site,
                    format!(
                        "step {} ({}, {}) falls in no stage; stages: {}",
                        i + 1,
                        plan::offset(step.item.at_s),
                        percent(step.item.weight_bp),
                        bands.join(", ")
                    ),
                ));
            }
        }
        self.check_metrics()?;
        self.check_rules()?;
        Ok(policy)
    }

    /// Every wave names at least one region, and no region is in two waves.
    fn checked_waves(&self) -> Result<Vec<Wave>, PolicyError> {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, wave) in self.waves.iter().enumerate() {
            if wave.item.regions.is_empty() {
                return Err(self.error(&wave.site, "a wave needs at least one region"));
            }
            for region in &wave.item.regions {
                if region.trim().is_empty() {
                    return Err(self.error(&wave.site, "a region name cannot be empty"));
                }
                if let Some(first) = seen.insert(region, i) {
                    return Err(self.error(
                        &wave.site,
                        format!("region {region:?} is already in wave {}", first + 1),
                    ));
                }
            }
        }
        Ok(self.waves.iter().map(|w| w.item.clone()).collect())
    }

    fn checked_steps(&self) -> Result<Vec<Step>, PolicyError> {
        if self.steps.is_empty() {
            // Routing forms alone: the weight stays the service's, no rollout runs.
            if self.split.is_none() && !self.routing.is_empty() {
                return Ok(Vec::new());
            }
            let Some(weight_bp) = self.split else {
                return Err(PolicyError {
                    kind: PolicyErrorKind::Invalid,
                    origin: self.origin.clone(),
                    line: None,
                    context: "policy".into(),
                    reason: "needs a progression (define-progression / [[step]]), \
                             a split (define-canary-split / [split]) or routing rules"
                        .into(),
                });
            };
            return Ok(vec![Step { at_s: 0, weight_bp }]);
        }
        if self.steps[0].item.at_s != 0 {
            return Err(self.error(
                &self.steps[0].site,
                format!(
                    "the first step must be at offset 0, not {}",
                    plan::offset(self.steps[0].item.at_s)
                ),
            ));
        }
        for pair in self.steps.windows(2) {
            let (prev, next) = (&pair[0].item, &pair[1].item);
            if next.at_s <= prev.at_s {
                return Err(self.error(
                    &pair[1].site,
                    format!(
                        "steps must be strictly increasing in time: {} is not after {}",
                        plan::offset(next.at_s),
                        plan::offset(prev.at_s)
                    ),
                ));
            }
        }
        Ok(self.steps.iter().map(|s| s.item).collect())
    }

    fn checked_stages(&self) -> Result<Vec<Stage>, PolicyError> {
        let Some(stages) = &self.stages else {
            return Ok(Policy::default_stages());
        };
        for (i, stage) in stages.iter().enumerate() {
            let s = &stage.item;
            if s.min_bp > s.max_bp {
                return Err(self.error(
                    &stage.site,
                    format!("weights {} are reversed", plan::band(s)),
                ));
            }
            if stages[..i].iter().any(|p| p.item.name == s.name) {
                return Err(self.error(&stage.site, format!("duplicate stage `{}`", s.name)));
            }
            if let Some(prev) = i.checked_sub(1).map(|p| &stages[p].item) {
                if s.min_bp < prev.max_bp {
                    return Err(self.error(
                        &stage.site,
                        format!(
                            "weights {} overlap stage {} {}; list stages in increasing \
                             weight order, touching at most at one point",
                            plan::band(s),
                            prev.name,
                            plan::band(prev)
                        ),
                    ));
                }
            }
        }
        Ok(stages.iter().map(|s| s.item.clone()).collect())
    }

    fn check_metrics(&self) -> Result<(), PolicyError> {
        for (i, metric) in self.metrics.iter().enumerate() {
            let m = &metric.item;
            let fail = |reason: String| Err(self.error(&metric.site, reason));
            if self.metrics[..i].iter().any(|p| p.item.name == m.name) {
                return fail(format!("duplicate metric `{}`", m.name));
            }
            match (&m.name, &m.query) {
                (MetricName::Custom(name), None) => {
                    return fail(format!(
                        "custom metric `{name}` needs a query: give events and trials PromQL"
                    ))
                }
                (MetricName::Custom(_), Some(_)) => {}
                (builtin, Some(_)) => {
                    return fail(format!(
                        "`{builtin}` is built in; events/trials queries are only for custom metrics"
                    ))
                }
                (_, None) => {}
            }
            if !(m.threshold.is_finite() && m.threshold > 0.0) {
                return fail(format!(
                    "threshold {} must be a positive number",
                    m.threshold
                ));
            }
            if m.name == MetricName::SuccessRate && m.threshold >= 1.0 {
                return fail(format!(
                    "success-rate threshold {} is a fraction and must be below 1 (no finite \
                     number of requests shows a success rate of 1, so the rollout would hold \
                     forever)",
                    m.threshold
                ));
            }
            if m.window_s == 0 {
                return fail("window must be longer than 0s".into());
            }
        }
        Ok(())
    }

    fn check_rules(&self) -> Result<(), PolicyError> {
        for (i, rule) in self.rules.iter().enumerate() {
            let r = &rule.item;
            if self.rules[..i].iter().any(|p| p.item.name == r.name) {
                return Err(self.error(&rule.site, format!("duplicate rule `{}`", r.name)));
            }
            if !(r.factor.is_finite() && r.factor > 0.0) {
                return Err(self.error(
                    &rule.site,
                    format!("baseline factor {} must be a positive number", r.factor),
                ));
            }
            let has_query = self
                .metrics
                .iter()
                .any(|m| m.item.name == r.metric && m.item.query.is_some());
            if matches!(r.metric, MetricName::Custom(_)) && !has_query {
                return Err(self.error(
                    &rule.site,
                    format!(
                        "rule uses custom metric `{}`, which has no query: add it to the \
                         metrics with events and trials PromQL",
                        r.metric
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// "300", "300s", "5m", "1h" to seconds.
pub(crate) fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        _ => {
            return Err(format!(
                "bad duration `{text}` (use e.g. 300, 300s, 5m or 1h)"
            ))
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("bad duration `{text}` (use e.g. 300, 300s, 5m or 1h)"))
}

/// "error-rate > baseline * 1.5" (the factor may also come first).
pub(crate) fn parse_condition(text: &str) -> Result<(MetricName, Cmp, f64), String> {
    let spaced = text
        .replace('>', " > ")
        .replace('<', " < ")
        .replace('*', " * ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let bad =
        || format!("cannot read condition `{text}` (expected e.g. `error-rate > baseline * 1.5`)");
    let [metric, op, a, "*", b] = tokens[..] else {
        return Err(bad());
    };
    let cmp = Cmp::parse(op).ok_or_else(bad)?;
    let factor = match (a, b) {
        ("baseline", f) | (f, "baseline") => f.parse::<f64>().map_err(|_| bad())?,
        _ => return Err(bad()),
    };
    Ok((MetricName::parse(metric), cmp, factor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300"), Ok(300));
        assert_eq!(parse_duration("300s"), Ok(300));
        assert_eq!(parse_duration("5m"), Ok(300));
        assert_eq!(parse_duration("1h"), Ok(3600));
        for bad in ["", "5 minutes", "m", "1.5h", "-3s", "5d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn conditions() {
        assert_eq!(
            parse_condition("error-rate > baseline * 1.5"),
            Ok((MetricName::ErrorRate, Cmp::Gt, 1.5))
        );
        assert_eq!(
            parse_condition("p99-latency>2*baseline"),
            Ok((MetricName::LatencyP99, Cmp::Gt, 2.0))
        );
        assert!(parse_condition("error-rate >= baseline * 1.5").is_err());
        assert!(parse_condition("error-rate > 1.5").is_err());
    }
}
