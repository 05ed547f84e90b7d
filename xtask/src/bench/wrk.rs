//! wrk from the lab's client namespace, and what it printed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use canary_lab::Topology;

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
    /// Socket errors (a connection closed or reset before its response was whole,
    /// timeouts) plus responses other than 2xx/3xx.
    pub failed: u64,
    /// What wrk printed.
    pub output: String,
}

/// One load for `seconds` against `target`.
/// One load for `seconds` against `target`; any failed request is an error.
pub fn run(topo: &Topology, load: Load, target: &str, seconds: u32) -> Result<WrkResult> {
    let r = run_script(topo, load, target, seconds, None)?;
    if r.failed > 0 {
        bail!("wrk saw errors on {target}:\n{}", r.output);
    }
    Ok(r)
}

/// Like [`run`], with a Lua script that writes the requests (the header-routing
/// share, [`routing_script`]); failed requests are counted, not an error.
pub fn run_script(
    topo: &Topology,
    load: Load,
    target: &str,
    seconds: u32,
    script: Option<&Path>,
) -> Result<WrkResult> {
    let (conns, path, close) = match load {
        Load::KeepAlive => ("32", "/", false),
        Load::NewConnection => ("32", "/", true),
        Load::Bulk => ("4", "/1m", false),
    };
    let url = format!("http://{target}{path}");
    let seconds = seconds.to_string();
    let mut args = vec!["wrk", "-t1", "-c", conns, "-d", &seconds, "--latency"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    let script = script.map(|s| s.to_string_lossy().into_owned());
    if let Some(script) = &script {
        args.extend(["-s", script]);
    }
    args.push(&url);
    let out = topo.client.run(&args)?;
    let field = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
            .with_context(|| format!("wrk printed no {prefix:?} for {url}:\n{out}"))
    };
    // "Socket errors: connect 0, read 1681, write 0, timeout 0": every kind counts.
    let socket_errors: u64 = match field("Socket errors:") {
        Ok(list) => list
            .split(',')
            .map(|kind| kind.split_whitespace().last().unwrap_or("0").parse::<u64>())
            .sum::<Result<u64, _>>()?,
        Err(_) => 0,
    };
    let non_2xx: u64 = field("Non-2xx or 3xx responses:").map_or(Ok(0), str::parse)?;
    Ok(WrkResult {
        rps: field("Requests/sec:")?.parse()?,
        p50_ms: parse_time(field("50%")?)?,
        p99_ms: parse_time(field("99%")?)?,
        failed: socket_errors + non_2xx,
        output: out.clone(),
    })
}

/// One request in [`CANARY_EVERY`] carries `X-Canary: true`, every other one
/// `X-Canary: false` (wrk's `-H` headers kept), so every path parses the header on
/// every request and both versions get traffic: a per-request router (nginx, HAProxy)
/// sends 1 request in 10 to canary. A router that decides per connection sees only
/// each connection's first request, and wrk's Lua `request()` knows nothing of
/// connections: wrk calls it once to check the script, then the next calls are the
/// connections' first requests, so calls 1, 11, 21, 31 (0-based) make 4 of 32
/// keep-alive connections and 1 of 4 bulk connections canary; a new connection per
/// request gives 1 in 10 either way. The bench prints the router's own count.
pub const CANARY_EVERY: u32 = 10;

/// Writes the script of [`CANARY_EVERY`] into `dir`.
pub fn routing_script(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("x-canary.lua");
    let text = format!(
        r#"local n = 0
local reqs = {{}}
function init(args)
  for _, v in ipairs({{"true", "false"}}) do
    local h = {{}}
    for k, x in pairs(wrk.headers) do h[k] = x end
    h["X-Canary"] = v
    reqs[v] = wrk.format(nil, nil, h)
  end
end
function request()
  n = n + 1
  if n % {CANARY_EVERY} == 2 then return reqs["true"] end
  return reqs["false"]
end
"#
    );
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
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
