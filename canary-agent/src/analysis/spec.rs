//! What the analysis is asked to judge: the metrics a policy names, their bounds and
//! the rules and actions that follow a verdict. The policy parses into these types; the
//! analysis needs nothing else of it.

use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::units::WeightBp;

/// A metric the analysis compares between canary and stable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSpec {
    pub name: MetricName,
    /// error-rate / latency-p99: maximum canary/stable ratio.
    /// success-rate: minimum canary success fraction.
    /// custom: minimum canary/stable ratio of events/trials.
    pub threshold: f64,
    pub window_s: u64,
    pub on_fail: Action,
    /// Required for (and only allowed on) custom metrics.
    pub query: Option<CustomQuery>,
}

/// PromQL for a custom rate metric; `{version}` is substituted with
/// `stable` or `canary`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomQuery {
    pub events: String,
    pub trials: String,
}

/// Built-in metrics have known queries; anything else needs a [`CustomQuery`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum MetricName {
    ErrorRate,
    LatencyP99,
    SuccessRate,
    Custom(String),
}

impl MetricName {
    /// `p99-latency` is accepted as an alias because the seed's rules use it.
    pub fn parse(name: &str) -> Self {
        match name {
            "error-rate" => Self::ErrorRate,
            "latency-p99" | "p99-latency" => Self::LatencyP99,
            "success-rate" => Self::SuccessRate,
            other => Self::Custom(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::ErrorRate => "error-rate",
            Self::LatencyP99 => "latency-p99",
            Self::SuccessRate => "success-rate",
            Self::Custom(name) => name,
        }
    }
}

impl From<String> for MetricName {
    fn from(name: String) -> Self {
        Self::parse(&name)
    }
}

impl From<MetricName> for String {
    fn from(name: MetricName) -> Self {
        name.as_str().to_string()
    }
}

impl fmt::Display for MetricName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `metric cmp baseline * factor`, where baseline is stable's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackRule {
    pub name: String,
    pub metric: MetricName,
    pub cmp: Cmp,
    pub factor: f64,
    pub action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cmp {
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = "<")]
    Lt,
}

impl Cmp {
    pub(crate) fn parse(op: &str) -> Option<Self> {
        match op {
            ">" => Some(Self::Gt),
            "<" => Some(Self::Lt),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gt => ">",
            Self::Lt => "<",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    ImmediateRollback,
    PauseAndAlert,
}

impl Action {
    pub(crate) fn parse(name: &str) -> Result<Self, String> {
        match name {
            "immediate-rollback" => Ok(Self::ImmediateRollback),
            "pause-and-alert" => Ok(Self::PauseAndAlert),
            other => Err(format!(
                "unknown action `{other}` (expected immediate-rollback or pause-and-alert)"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ImmediateRollback => "immediate-rollback",
            Self::PauseAndAlert => "pause-and-alert",
        }
    }
}
