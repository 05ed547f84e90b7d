//! What a fleet member accepts from etcd. Anyone who can write under the prefix is
//! a writer the agent does not have to trust with more than the fleet's own job:
//! weights up to 100 % for services this node has, the rollout verbs a follower
//! forwards, rollouts of this node's own policies, and controller clocks close to
//! this node's. Everything else is refused by name (the key and the reason), and
//! a refused key never stops the good ones from being applied.

use anyhow::{anyhow, bail, Context, Result};

use super::{DesiredWeight, NodeReport, StoredRollout};
use crate::{analysis::VersionCounters, api::Request};

/// How far ahead of this node's controller clock a stored rollout's clock may be, in
/// real time (multiplied by the clock's speed-up): clocks of nodes differ by their
/// skew, scaled clocks by their start times; a forged clock far in the future would
/// move this node's controller clock for good.
pub const MAX_CLOCK_LEAD_MS: u64 = 10 * 60 * 1000;

/// Most one node's counters may grow per second (each counter): well above what one
/// node's datapath carries, far below what would swamp a fleet's analysis.
pub const MAX_NODE_RATE: u64 = 20_000_000;

/// A forwarded command: only what `dispatch` forwards (set-weight and the rollout
/// verbs), never reload, uninstall, status or history.
pub fn forwarded(value: &[u8]) -> Result<Request> {
    let request: Request = serde_json::from_slice(value).context("not a control request")?;
    match &request {
        Request::SetWeight { weight_bp, .. } if *weight_bp > canary_common::WEIGHT_SCALE => {
            bail!("weight {weight_bp} bp is above 100 %")
        }
        Request::SetWeight { .. } | Request::Rollout { .. } => Ok(request),
        other => bail!(
            "{} is not a command the fleet forwards (only set-weight and rollout verbs)",
            serde_json::to_value(other)?["cmd"]
        ),
    }
}

/// A desired weight from `weights/SERVICE`.
pub fn weight(value: &[u8]) -> Result<DesiredWeight> {
    let desired: DesiredWeight = serde_json::from_slice(value).context("not a desired weight")?;
    if desired.weight_bp > canary_common::WEIGHT_SCALE {
        bail!("weight {} bp is above 100 %", desired.weight_bp);
    }
    if let Some((region, bp)) = desired
        .regions
        .iter()
        .find(|(_, bp)| **bp > canary_common::WEIGHT_SCALE)
    {
        bail!("weight {bp} bp of region {region:?} is above 100 %");
    }
    if !desired.released.is_empty() && desired.weight_bp != 0 {
        bail!("a release's weight must be 0, not {} bp", desired.weight_bp);
    }
    Ok(desired)
}

/// A stored rollout from `rollouts/SERVICE`: about that service, and with a clock at
/// most [`MAX_CLOCK_LEAD_MS`] (times `speed`) ahead of `now_ms`.
pub fn stored_rollout(
    service: &str,
    value: &[u8],
    now_ms: u64,
    speed: u32,
) -> Result<StoredRollout> {
    let stored: StoredRollout = serde_json::from_slice(value).context("not a stored rollout")?;
    if stored.rollout.service() != service {
        bail!(
            "holds the rollout of service {:?}, not {service:?}",
            stored.rollout.service()
        );
    }
    let lead = MAX_CLOCK_LEAD_MS.saturating_mul(u64::from(speed.max(1)));
    if stored.clock_ms > now_ms.saturating_add(lead) {
        bail!(
            "its controller clock {} ms is {} s ahead of this node's (at most {} s accepted)",
            stored.clock_ms,
            (stored.clock_ms - now_ms) / 1000,
            lead / 1000
        );
    }
    Ok(stored)
}

/// The part of a key after `prefix`, which must be UTF-8 and one name (no `/`).
pub fn key_name<'a>(key: &'a [u8], prefix: &str) -> Result<&'a str> {
    let key = std::str::from_utf8(key).map_err(|_| anyhow!("key is not UTF-8"))?;
    let name = key
        .strip_prefix(prefix)
        .ok_or_else(|| anyhow!("key is outside {prefix}"))?;
    if name.is_empty() || name.contains('/') || name.len() > 253 {
        bail!("{name:?} is not a name");
    }
    Ok(name)
}

/// A key for messages: as text where it is UTF-8, else escaped.
pub fn show_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key).escape_debug().to_string()
}

/// A node's report from `nodes/NAME`: on a lease (so it vanishes with its node) and,
/// after `previous` (accepted `elapsed_s` seconds ago), no counter growing faster than
/// [`MAX_NODE_RATE`]. A counter lower than before is a datapath installed anew on
/// that node, taken as it is.
pub fn node_report(
    value: &[u8],
    lease: i64,
    previous: Option<&NodeReport>,
    elapsed_s: f64,
) -> Result<NodeReport> {
    if lease == 0 {
        bail!("not on a lease: only a live node's own report counts");
    }
    let report: NodeReport = serde_json::from_slice(value).context("not a node report")?;
    let Some(previous) = previous else {
        return Ok(report);
    };
    let most = (MAX_NODE_RATE as f64 * elapsed_s.max(1.0)) as u64;
    for (service, now) in &report.counters {
        let Some(before) = previous.counters.get(service) else {
            continue;
        };
        for (version, (now, before)) in ["stable", "canary"].iter().zip(now.iter().zip(before)) {
            for (what, a, b) in totals(now)
                .into_iter()
                .zip(totals(before))
                .map(|((w, a), (_, b))| (w, a, b))
            {
                if a.saturating_sub(b) > most {
                    bail!(
                        "{service} {version} {what} grew by {} in {elapsed_s:.1} s (at most {MAX_NODE_RATE} a second)",
                        a - b
                    );
                }
            }
        }
    }
    Ok(report)
}

/// The cumulative totals checked for each version.
fn totals(c: &VersionCounters) -> [(&'static str, u64); 5] {
    let sum = |v: &mut dyn Iterator<Item = u64>| v.fold(0u64, u64::saturating_add);
    [
        ("requests", c.requests),
        ("responses", sum(&mut c.responses.iter().copied())),
        ("latency samples", sum(&mut c.latency.iter().copied())),
        ("connections", c.conn_new),
        (
            "resets and failures",
            c.conn_reset.saturating_add(c.conn_failed),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RolloutAction;

    #[test]
    fn only_the_forwarded_verbs_are_accepted() {
        let ok = |r: &Request| forwarded(&serde_json::to_vec(r).unwrap());
        let set = Request::SetWeight {
            service: "web".into(),
            weight_bp: 500,
            by: "alice".into(),
            reason: String::new(),
        };
        assert_eq!(ok(&set).unwrap(), set);
        let pause = Request::Rollout {
            service: "web".into(),
            action: RolloutAction::Pause { reason: "x".into() },
            by: "alice".into(),
        };
        assert_eq!(ok(&pause).unwrap(), pause);
        for refused in [
            Request::Uninstall,
            Request::Reload,
            Request::Status { service: None },
            Request::History {
                service: "web".into(),
            },
        ] {
            let e = ok(&refused).unwrap_err().to_string();
            assert!(e.contains("not a command the fleet forwards"), "{e}");
        }
        let e = forwarded(br#"{"cmd":"set-weight","service":"web","weight_bp":10001,"by":"x"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("above 100 %"), "{e}");
        assert!(forwarded(b"\xff").is_err());
    }

    #[test]
    fn weights_above_100_percent_are_refused() {
        assert_eq!(
            weight(br#"{"weight_bp":10000,"at_ms":1}"#)
                .unwrap()
                .weight_bp,
            10_000
        );
        let e = weight(br#"{"weight_bp":10001,"at_ms":1}"#).unwrap_err();
        assert!(e.to_string().contains("above 100 %"), "{e}");
        assert!(weight(br#"{"weight_bp":-1,"at_ms":1}"#).is_err());
        // Per region, and a release, as waves and finished releases write them.
        let w = weight(br#"{"weight_bp":0,"at_ms":1,"regions":{"a":10000,"b":0}}"#).unwrap();
        assert_eq!(
            (
                w.for_region(Some("a")),
                w.for_region(Some("c")),
                w.for_region(None)
            ),
            (10_000, 0, 0)
        );
        let e = weight(br#"{"weight_bp":0,"at_ms":1,"regions":{"a":10001}}"#).unwrap_err();
        assert!(e.to_string().contains("region \"a\" is above 100 %"), "{e}");
        let e =
            weight(br#"{"weight_bp":500,"at_ms":1,"released":["198.18.3.2:8080"]}"#).unwrap_err();
        assert!(
            e.to_string().contains("a release's weight must be 0"),
            "{e}"
        );
    }

    fn stored(service: &str, clock_ms: u64) -> Vec<u8> {
        let policy = crate::policy::parse_toml("step = [ { at = 0, weight = 10 } ]\n", "test")
            .expect("policy");
        serde_json::to_vec(&StoredRollout {
            clock_ms,
            rollout: crate::controller::Rollout::new(service, policy),
        })
        .unwrap()
    }

    #[test]
    fn a_stored_clock_far_ahead_or_another_services_rollout_is_refused() {
        let now = 1_000_000_000;
        assert!(stored_rollout("web", &stored("web", now + 60_000), now, 1).is_ok());
        let e =
            stored_rollout("web", &stored("web", now + MAX_CLOCK_LEAD_MS + 1), now, 1).unwrap_err();
        assert!(e.to_string().contains("ahead of this node's"), "{e}");
        // A clock ten times faster may lead by ten times as much.
        assert!(
            stored_rollout("web", &stored("web", now + 2 * MAX_CLOCK_LEAD_MS), now, 10).is_ok()
        );
        let e = stored_rollout("web", &stored("api", now), now, 1).unwrap_err();
        assert!(e.to_string().contains("not \"web\""), "{e}");
    }

    #[test]
    fn key_names_are_utf8_single_names() {
        assert_eq!(key_name(b"/c/weights/web", "/c/weights/").unwrap(), "web");
        assert!(key_name(b"/c/weights/\xff", "/c/weights/").is_err());
        assert!(key_name(b"/c/weights/a/b", "/c/weights/").is_err());
        assert!(key_name(b"/c/weights/", "/c/weights/").is_err());
        assert_eq!(show_key(b"/c/\xff"), "/c/\u{fffd}");
    }

    fn report(requests: u64) -> Vec<u8> {
        let mut r = NodeReport::default();
        r.counters.insert(
            "web".into(),
            [
                VersionCounters {
                    requests,
                    ..Default::default()
                },
                VersionCounters::default(),
            ],
        );
        serde_json::to_vec(&r).unwrap()
    }

    #[test]
    fn node_reports_need_a_lease_and_a_plausible_increase() {
        let e = node_report(&report(5), 0, None, 1.0).unwrap_err();
        assert!(e.to_string().contains("not on a lease"), "{e}");
        let first = node_report(&report(5), 7, None, 1.0).unwrap();
        assert!(node_report(&report(5 + MAX_NODE_RATE), 7, Some(&first), 1.0).is_ok());
        let e = node_report(&report(6 + MAX_NODE_RATE), 7, Some(&first), 1.0).unwrap_err();
        assert!(e.to_string().contains("web stable requests grew by"), "{e}");
        assert!(node_report(&report(5 + 3 * MAX_NODE_RATE), 7, Some(&first), 3.0).is_ok());
        // A node whose counters started over.
        assert!(node_report(&report(4), 7, Some(&first), 1.0).is_ok());
        let huge = node_report(&report(u64::MAX), 7, None, 1.0).unwrap();
        assert_eq!(huge.counters["web"][0].requests, u64::MAX);
    }
}
