//! wrk from the lab's client namespace, and what it printed.

use anyhow::{bail, Context, Result};
use canary_lab::Topology;

const SECONDS: &str = "6";

/// The three loads of the benchmark.
#[derive(Clone, Copy, PartialEq)]
pub enum Load {
    /// 32 keep-alive connections, small responses.
    KeepAlive,
    /// A new connection per request (`Connection: close`), 32 at a time.
    NewConnection,
    /// 1 MiB responses over 4 keep-alive connections.
    Bulk,
}

impl Load {
    pub const ALL: [Load; 3] = [Load::KeepAlive, Load::NewConnection, Load::Bulk];

    pub fn name(self) -> &'static str {
        match self {
            Load::KeepAlive => "keep-alive",
            Load::NewConnection => "new connection per request",
            Load::Bulk => "1 MiB transfer",
        }
    }
}

#[derive(Clone)]
pub struct WrkResult {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

pub fn run(topo: &Topology, load: Load, target: &str) -> Result<WrkResult> {
    let (conns, path, close) = match load {
        Load::KeepAlive => ("32", "/", false),
        Load::NewConnection => ("32", "/", true),
        Load::Bulk => ("4", "/1m", false),
    };
    let url = format!("http://{target}{path}");
    let mut args = vec!["wrk", "-t1", "-c", conns, "-d", SECONDS, "--latency"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(&url);
    let out = topo.client.run(&args)?;
    if out.contains("Non-2xx") || out.contains("Socket errors") {
        bail!("wrk saw errors on {url}:\n{out}");
    }
    let field = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
            .with_context(|| format!("wrk printed no {prefix:?} for {url}:\n{out}"))
    };
    Ok(WrkResult {
        rps: field("Requests/sec:")?.parse()?,
        p50_ms: parse_time(field("50%")?)?,
        p99_ms: parse_time(field("99%")?)?,
    })
}

fn parse_time(s: &str) -> Result<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).context("unit")?);
    let v: f64 = num.parse()?;
    Ok(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        other => bail!("unknown wrk time unit {other}"),
    })
}
