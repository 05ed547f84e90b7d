//! `[service.health]`: how each backend of a service is checked. Without the table
//! every backend is taken to be up (no checks), as before health checks existed.
//! `[service.outlier]`: passive detection from the handshakes the kernel sees.

use std::time::Duration;

use super::{
    raw::{RawHealth, RawOutlier},
    Protocol,
};

/// Defaults, as README documents them.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 2;
pub const DEFAULT_PATH: &str = "/";
pub const DEFAULT_STATUS: u16 = 200;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect that completes within the timeout.
    Tcp,
    /// `GET path` answered with `status` within the timeout.
    Http { path: String, status: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// Port checked on each backend's address; none: the backend's own port.
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes that bring a down backend back.
    pub rise: u32,
    /// Consecutive failures that take an up backend out of the selection.
    pub fall: u32,
}

/// Defaults of `[service.outlier]`, as README documents them.
pub const DEFAULT_OUTLIER_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
pub const DEFAULT_MIN_CONNECTIONS: u32 = 20;
pub const DEFAULT_FAILURE_RATIO: f64 = 0.5;
pub const DEFAULT_EJECTION: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);

/// Passive detection (Envoy's outlier detection, on what the kernel sees): a backend
/// whose new connections get no SYN-ACK (refused by a reset or unanswered), this many
/// in a row or this share of a window, is ejected from the selection for a while,
/// longer each time in a row.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierDetection {
    /// New connections in a row without a SYN-ACK that eject.
    pub consecutive_failures: u32,
    /// The span of new connections the share is judged over, at each second.
    pub window: Duration,
    /// Fewer new connections than this in the window: no judgement of the share.
    pub min_connections: u32,
    /// The share of the window's new connections without a SYN-ACK that ejects.
    pub failure_ratio: f64,
    /// The first ejection; each ejection in a row doubles it, up to `max_ejection`.
    pub ejection: Duration,
    pub max_ejection: Duration,
}

impl Default for OutlierDetection {
    /// An empty `[service.outlier]`.
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            window: DEFAULT_OUTLIER_WINDOW,
            min_connections: DEFAULT_MIN_CONNECTIONS,
            failure_ratio: DEFAULT_FAILURE_RATIO,
            ejection: DEFAULT_EJECTION,
            max_ejection: DEFAULT_MAX_EJECTION,
        }
    }
}

/// The checked `[service.outlier]`, or the field (under `outlier.`) and why it is
/// refused.
pub(super) fn parse_outlier(
    raw: RawOutlier,
    protocol: Protocol,
) -> Result<OutlierDetection, (String, String)> {
    let field = |f: &str| format!("outlier.{f}");
    if protocol != Protocol::Tcp {
        return Err((
            "outlier".into(),
            "passive detection reads TCP handshakes the kernel forwards: only for \
             protocol = \"tcp\" (use [service.health] for this service)"
                .into(),
        ));
    }
    let d = OutlierDetection::default();
    let duration = |name: &str, given: Option<String>, default: Duration, min: Duration| {
        bounded_duration(given.as_deref(), &field(name), default, min)
    };
    let second = Duration::from_secs(1);
    let window = duration("window", raw.window, d.window, second * 2)?;
    let ejection = duration("ejection", raw.ejection, d.ejection, second)?;
    let max_ejection = duration(
        "max_ejection",
        raw.max_ejection,
        d.max_ejection.max(ejection),
        second,
    )?;
    if max_ejection < ejection {
        return Err((
            field("max_ejection"),
            format!("{max_ejection:?} is shorter than the ejection {ejection:?}"),
        ));
    }
    let count = |name: &str, given: Option<u32>, default: u32| {
        bounded_count(&field(name), given, default, 1_000_000, "")
    };
    let consecutive_failures = count(
        "consecutive_failures",
        raw.consecutive_failures,
        d.consecutive_failures,
    )?;
    let min_connections = count("min_connections", raw.min_connections, d.min_connections)?;
    let failure_ratio = raw.failure_ratio.unwrap_or(d.failure_ratio);
    if !(failure_ratio > 0.0 && failure_ratio <= 1.0) {
        return Err((
            field("failure_ratio"),
            format!("{failure_ratio}: a share above 0 and at most 1"),
        ));
    }
    Ok(OutlierDetection {
        consecutive_failures,
        window,
        min_connections,
        failure_ratio,
        ejection,
        max_ejection,
    })
}

/// Defaults of `[agent] dns_min_ttl` and `dns_max_ttl`.
pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(300);

/// A bound on how soon backend names are resolved again: 100ms to 1h.
pub(super) fn ttl_bound(
    text: Option<&str>,
    field: &str,
    default: Duration,
) -> Result<Duration, (String, String)> {
    bounded_duration(text, field, default, Duration::from_millis(100))
}

/// A duration field from `min` to 1h, or `default` when it is not given.
fn bounded_duration(
    text: Option<&str>,
    field: &str,
    default: Duration,
    min: Duration,
) -> Result<Duration, (String, String)> {
    let Some(text) = text else { return Ok(default) };
    let d = parse_interval(text).map_err(|r| (field.to_string(), r))?;
    if !(min..=Duration::from_secs(3600)).contains(&d) {
        return Err((field.to_string(), format!("{text:?}: use {min:?} to 1h")));
    }
    Ok(d)
}

/// A count field from 1 to `max` (`unit` names what is counted in the error), or
/// `default` when it is not given.
fn bounded_count(
    field: &str,
    given: Option<u32>,
    default: u32,
    max: u32,
    unit: &str,
) -> Result<u32, (String, String)> {
    let n = given.unwrap_or(default);
    if (1..=max).contains(&n) {
        Ok(n)
    } else {
        Err((field.to_string(), format!("{n}: use 1 to {max}{unit}")))
    }
}

/// "500ms", "2s", "1m", or a bare number of seconds.
fn parse_interval(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let bad = || format!("bad duration {text:?} (use e.g. 500ms, 2s or 1m)");
    let at = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(at);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        _ => None,
    };
    ms.map(Duration::from_millis).ok_or_else(bad)
}

/// The checked table, or the field (under `health.`) and why it is refused.
pub(super) fn parse(raw: RawHealth, protocol: Protocol) -> Result<HealthCheck, (String, String)> {
    let field = |f: &str| format!("health.{f}");
    let kind = match raw.check.as_deref().unwrap_or("tcp") {
        "tcp" => {
            for (name, given) in [
                ("path", raw.path.is_some()),
                ("status", raw.status.is_some()),
            ] {
                if given {
                    return Err((field(name), "only for check = \"http\"".into()));
                }
            }
            CheckKind::Tcp
        }
        "http" => {
            let path = raw.path.unwrap_or_else(|| DEFAULT_PATH.into());
            if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err((
                    field("path"),
                    format!("{path:?}: an absolute path without spaces or control characters"),
                ));
            }
            let status = raw.status.unwrap_or(DEFAULT_STATUS);
            if !(100..=599).contains(&status) {
                return Err((
                    field("status"),
                    format!("{status}: an HTTP status 100 to 599"),
                ));
            }
            CheckKind::Http { path, status }
        }
        other => {
            return Err((
                field("check"),
                format!("{other:?}: use \"tcp\" or \"http\""),
            ))
        }
    };
    if protocol == Protocol::Udp && raw.port.is_none() {
        return Err((
            field("port"),
            "a UDP service's backends are checked over TCP: name the port to check".into(),
        ));
    }
    if raw.port == Some(0) {
        return Err((field("port"), "port 0".into()));
    }
    let duration = |name: &str, given: Option<String>, default: Duration| {
        bounded_duration(
            given.as_deref(),
            &field(name),
            default,
            Duration::from_millis(10),
        )
    };
    let interval = duration("interval", raw.interval, DEFAULT_INTERVAL)?;
    let timeout = duration("timeout", raw.timeout, DEFAULT_TIMEOUT.min(interval))?;
    if timeout > interval {
        return Err((
            field("timeout"),
            format!("{timeout:?} is longer than the interval {interval:?}"),
        ));
    }
    let count = |name: &str, given: Option<u32>, default: u32| {
        bounded_count(&field(name), given, default, 100, " checks")
    };
    Ok(HealthCheck {
        kind,
        port: raw.port,
        interval,
        timeout,
        rise: count("rise", raw.rise, DEFAULT_RISE)?,
        fall: count("fall", raw.fall, DEFAULT_FALL)?,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn service(health: &str) -> Result<Option<HealthCheck>, String> {
        let text = format!(
            "[agent]\ninterface = \"cli0\"\n[[service]]\nname = \"web\"\n\
             listen = \"198.19.0.10:80\"\nstable = [\"198.18.2.2:8080\"]\n\
             [service.health]\n{health}"
        );
        Config::parse(&text, Path::new("/etc/canary/agent.toml"))
            .map(|c| c.services[0].health.clone())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_a_tcp_connect_every_second() {
        assert_eq!(
            service("").unwrap(),
            Some(HealthCheck {
                kind: CheckKind::Tcp,
                port: None,
                interval: DEFAULT_INTERVAL,
                timeout: DEFAULT_TIMEOUT,
                rise: 2,
                fall: 2,
            })
        );
        let h = service("check = \"http\"\npath = \"/healthz\"\ninterval = \"200ms\"\nrise = 3\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            h.kind,
            CheckKind::Http {
                path: "/healthz".into(),
                status: 200
            }
        );
        assert_eq!(h.interval, Duration::from_millis(200));
        // The default timeout is never longer than the interval.
        assert_eq!(h.timeout, Duration::from_millis(200));
        assert_eq!(h.rise, 3);
    }

    fn outlier(table: &str, protocol: &str) -> Result<Option<OutlierDetection>, String> {
        let text = format!(
            "[agent]\ninterface = \"cli0\"\n[[service]]\nname = \"web\"\n\
             listen = \"198.19.0.10:80\"\nprotocol = \"{protocol}\"\n\
             stable = [\"198.18.2.2:8080\"]\n[service.outlier]\n{table}"
        );
        Config::parse(&text, Path::new("/etc/canary/agent.toml"))
            .map(|c| c.services[0].outlier.clone())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn outlier_detection_has_documented_defaults_and_located_errors() {
        let o = outlier("", "tcp").unwrap().unwrap();
        assert_eq!(o, OutlierDetection::default());
        // The defaults README documents.
        assert_eq!(
            (
                o.consecutive_failures,
                o.window,
                o.min_connections,
                o.failure_ratio
            ),
            (5, Duration::from_secs(10), 20, 0.5)
        );
        assert_eq!(
            (o.ejection, o.max_ejection),
            (Duration::from_secs(30), Duration::from_secs(300))
        );
        let o = outlier("ejection = \"10m\"", "tcp").unwrap().unwrap();
        assert_eq!(
            o.max_ejection,
            Duration::from_secs(600),
            "never below ejection"
        );
        for (table, protocol, field, reason) in [
            ("", "http", "outlier", "only for protocol = \"tcp\""),
            ("", "udp", "outlier", "only for protocol = \"tcp\""),
            ("window = \"1s\"", "tcp", "outlier.window", "2s to 1h"),
            (
                "failure_ratio = 0.0",
                "tcp",
                "outlier.failure_ratio",
                "above 0",
            ),
            (
                "failure_ratio = 1.5",
                "tcp",
                "outlier.failure_ratio",
                "at most 1",
            ),
            (
                "min_connections = 0",
                "tcp",
                "outlier.min_connections",
                "1 to",
            ),
            (
                "consecutive_failures = 0",
                "tcp",
                "outlier.consecutive_failures",
                "1 to",
            ),
            (
                "ejection = \"1m\"\nmax_ejection = \"30s\"",
                "tcp",
                "outlier.max_ejection",
                "shorter than",
            ),
            (
                "consecutive = 5",
                "tcp",
                "line 9",
                "unknown field `consecutive`",
            ),
        ] {
            let e = outlier(table, protocol).expect_err(table);
            assert!(e.contains(field) && e.contains(reason), "{table}: {e}");
        }
    }

    #[test]
    fn bad_health_fields_are_located_errors() {
        for (table, field, reason) in [
            (
                "check = \"icmp\"",
                "health.check",
                "use \"tcp\" or \"http\"",
            ),
            ("path = \"/x\"", "health.path", "only for check = \"http\""),
            (
                "check = \"http\"\npath = \"x\"",
                "health.path",
                "absolute path",
            ),
            (
                "check = \"http\"\nstatus = 99",
                "health.status",
                "100 to 599",
            ),
            ("interval = \"1d\"", "health.interval", "bad duration"),
            ("interval = \"5ms\"", "health.interval", "10ms to 1h"),
            (
                "interval = \"1s\"\ntimeout = \"2s\"",
                "health.timeout",
                "longer than",
            ),
            ("fall = 0", "health.fall", "1 to 100"),
            ("port = 0", "health.port", "port 0"),
            ("every = \"1s\"", "line 8", "unknown field `every`"),
        ] {
            let e = service(table).expect_err(table);
            assert!(e.contains(field) && e.contains(reason), "{table}: {e}");
        }
    }
}
