//! Plans decided in the kernel (head-free: `client-cidr` and default cohorts only):
//! the ingress program counts its decisions per cohort and version (CANARY_DECISIONS);
//! here they get the router's labels, so `status` and `/metrics` read the same.

use std::collections::BTreeMap;

use canary_common::DECISION_SPLIT;
use serde_json::json;

use super::decide::Rule;
use crate::policy::routing::Routing;

/// `(rule label, version, count)` for `canary_routing_decisions_total`, from the
/// counters per rule slot (cohort index, then the split) of `Datapath::decisions`.
pub fn decisions(routing: &Routing, counts: &[[u64; 2]]) -> Vec<(String, &'static str, u64)> {
    let mut out = Vec::new();
    for (slot, n) in counts.iter().enumerate() {
        let rule = if slot == DECISION_SPLIT as usize {
            Rule::Split
        } else {
            match routing.cohorts.get(slot) {
                Some(c) => Rule::Cohort(c.name.clone()),
                None => continue,
            }
        };
        for (version, n) in ["stable", "canary"].into_iter().zip(n) {
            if *n > 0 {
                out.push((rule.label(), version, *n));
            }
        }
    }
    out
}

/// The `"routing"` object of `status --json` for a service decided in the kernel:
/// every cohort by name (0 when none matched yet) and the split.
pub fn status(routing: &Routing, counts: &[[u64; 2]]) -> serde_json::Value {
    let mut cohort: BTreeMap<&str, u64> = routing
        .cohorts
        .iter()
        .map(|c| (c.name.as_str(), 0))
        .collect();
    let slot = |i: usize| counts.get(i).map_or(0, |n| n[0] + n[1]);
    for (i, c) in routing.cohorts.iter().enumerate() {
        *cohort.entry(c.name.as_str()).or_default() += slot(i);
    }
    json!({
        "decided_in": "kernel",
        "header": 0,
        "flag": 0,
        "cohort": cohort,
        "split": slot(DECISION_SPLIT as usize),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::routing::{Cohort, Membership};

    #[test]
    fn kernel_counts_get_the_router_labels() {
        let routing = Routing {
            cohorts: vec![
                Cohort {
                    name: "internal".into(),
                    member: Membership::ClientCidr(vec!["198.18.7.0/24".parse().unwrap()]),
                },
                Cohort {
                    name: "rest".into(),
                    member: Membership::Default,
                },
            ],
            ..Default::default()
        };
        let mut counts = vec![[0u64; 2]; canary_common::DECISION_RULES as usize];
        counts[0] = [1, 7];
        counts[DECISION_SPLIT as usize] = [5, 2];
        assert_eq!(
            decisions(&routing, &counts),
            [
                ("cohort:internal".to_string(), "stable", 1),
                ("cohort:internal".to_string(), "canary", 7),
                ("split".to_string(), "stable", 5),
                ("split".to_string(), "canary", 2),
            ]
        );
        assert_eq!(
            status(&routing, &counts),
            json!({"decided_in": "kernel", "header": 0, "flag": 0,
                   "cohort": {"internal": 8, "rest": 0}, "split": 7})
        );
    }
}
