//! What the lab knows about `lab-backend`: its ports, its fault settings and
//! how to start and steer it.

use crate::client::http_request;
use crate::netns::{ChildGuard, NetNs};
use crate::topology::Version;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// HTTP/1.1 service port (`/` and `/checkout`).
pub const HTTP_PORT: u16 = 8080;
/// HTTP/2 with prior knowledge (h2c): the version header on every answer, and gRPC
/// calls (`content-type: application/grpc`) answered with `grpc-status` in trailers
/// (14, UNAVAILABLE, at the fault `error_rate`).
pub const H2C_PORT: u16 = 8081;
/// HTTP/1.1 upgrades: `101 Switching Protocols`, then every byte echoed back.
pub const UPGRADE_PORT: u16 = 8082;
/// TCP banner port: the backend writes its name and closes.
pub const BANNER_PORT: u16 = 7000;
/// TCP echo port: the backend greets with its name, then echoes lines.
pub const ECHO_PORT: u16 = 7001;
/// UDP port: the backend answers each datagram with its name.
pub const UDP_PORT: u16 = 7002;
/// Admin HTTP port: `GET /metrics`, `GET`/`POST /faults`.
pub const ADMIN_PORT: u16 = 9100;
/// Response header naming the backend that served an HTTP request.
pub const VERSION_HEADER: &str = "x-canary-version";
/// Response header of `/checkout`: "true" if the attempt converted.
pub const CONVERTED_HEADER: &str = "x-canary-converted";
/// The line `lab-backend` prints on stdout once every socket is bound.
pub const READY_LINE: &str = "lab-backend ready";

/// How long [`start`] waits for the backend to bind its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout for admin requests.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Fault injection on the backend's HTTP port, changeable at run time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Share of requests answered with 503.
    pub error_rate: f64,
    /// Delay added before every response (also before resets and 503s).
    pub extra_latency_ms: u64,
    /// The mean of a further, exponentially distributed delay per response (capped at
    /// 20× the mean), so that latencies have a tail as a real service's do.
    #[serde(default)]
    pub latency_jitter_ms: u64,
    /// Share of requests whose connection is reset (SO_LINGER 0 close).
    pub reset_rate: f64,
    /// Share of successful `/checkout` requests that count a conversion.
    pub conversion_rate: f64,
}

impl Faults {
    /// Rejects rates outside 0..=1 and delays over a minute.
    pub fn validate(&self) -> Result<()> {
        for (field, rate) in [
            ("error_rate", self.error_rate),
            ("reset_rate", self.reset_rate),
            ("conversion_rate", self.conversion_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                bail!("{field} must be within 0..=1, got {rate}");
            }
        }
        for (field, ms) in [
            ("extra_latency_ms", self.extra_latency_ms),
            ("latency_jitter_ms", self.latency_jitter_ms),
        ] {
            if ms > 60_000 {
                bail!("{field} must be at most 60000, got {ms}");
            }
        }
        Ok(())
    }
}

/// The two running backends of a [`Topology`](crate::Topology).
#[derive(Debug)]
pub struct Backends {
    pub stable: ChildGuard,
    pub canary: ChildGuard,
}

impl Backends {
    /// The backend process of `version`.
    pub fn get(&self, version: Version) -> &ChildGuard {
        match version {
            Version::Stable => &self.stable,
            Version::Canary => &self.canary,
        }
    }
}

/// Starts `lab-backend` in `ns` for `version`, on the version's real IPv4 and
/// IPv6 addresses and the standard ports, and waits until it is listening.
pub fn start(ns: &NetNs, bin: &Path, version: Version) -> Result<ChildGuard> {
    let mut args = vec!["--name".to_string(), version.name().to_string()];
    for (flag, port) in [
        ("--http", HTTP_PORT),
        ("--h2c", H2C_PORT),
        ("--upgrade", UPGRADE_PORT),
        ("--banner", BANNER_PORT),
        ("--echo", ECHO_PORT),
        ("--udp", UDP_PORT),
        ("--admin", ADMIN_PORT),
    ] {
        for ip in [version.v4().into(), version.v6().into()] {
            args.push(flag.to_string());
            args.push(SocketAddr::new(ip, port).to_string());
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = ns.spawn(bin, &args)?;
    child.wait_for_log(READY_LINE, START_TIMEOUT)?;
    Ok(child)
}

/// Replaces the backend's faults through its admin port and returns what it
/// now applies. Blocking; call it inside a namespace that reaches `admin`.
pub fn set_faults(admin: SocketAddr, faults: &Faults) -> Result<Faults> {
    let body = serde_json::to_string(faults)?;
    let resp = http_request(admin, "POST", "/faults", Some(&body), ADMIN_TIMEOUT)?;
    if resp.status != 200 {
        bail!("POST {admin}/faults: {} {}", resp.status, resp.body);
    }
    serde_json::from_str(&resp.body).context("parsing the backend's faults")
}

/// Fetches the backend's Prometheus text. Blocking; call it inside a
/// namespace that reaches `admin`.
pub fn scrape_metrics(admin: SocketAddr) -> Result<String> {
    let resp = http_request(admin, "GET", "/metrics", None, ADMIN_TIMEOUT)?;
    if resp.status != 200 {
        bail!("GET {admin}/metrics: {} {}", resp.status, resp.body);
    }
    Ok(resp.body)
}

/// The value of the series `name` whose labels are exactly `labels` (in any
/// order), or None if the text has no such series.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let mut have: Vec<String> = label_text
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            have.sort();
            (metric == name && have == wanted).then(|| value.parse().ok())?
        })
}
