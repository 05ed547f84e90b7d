//! The analysis reads its configuration from the policy module.
pub use crate::policy::{Action, Cmp, CustomQuery, MetricName, MetricSpec, RollbackRule, WeightBp};
