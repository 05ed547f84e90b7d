//! wrk (HTTP/1) and h2load (h2c) from the lab's client namespace, and what they printed.

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

/// One load for `seconds` against `target` (one wrk thread); any failed request is an
/// error.
pub fn run(topo: &Topology, load: Load, target: &str, seconds: u32) -> Result<WrkResult> {
    let r = run_script(topo, load, target, seconds, 1, None)?;
    if r.failed > 0 {
        bail!("wrk saw errors on {target}:\n{}", r.output);
    }
    Ok(r)
}

/// Like [`run`] with `threads` wrk threads and a Lua script that writes the requests
/// (the header-routing share, [`routing_script`]); failed requests are counted, not an
/// error.
pub fn run_script(
    topo: &Topology,
    load: Load,
    target: &str,
    seconds: u32,
    threads: u32,
    script: Option<&Path>,
) -> Result<WrkResult> {
    let (conns, path, close) = match load {
        Load::KeepAlive => ("32", "/", false),
        Load::NewConnection => ("32", "/", true),
        Load::Bulk => ("4", "/1m", false),
    };
    let url = format!("http://{target}{path}");
    let seconds = seconds.to_string();
    let threads = format!("-t{threads}");
    let mut args = vec!["wrk", &threads, "-c", conns, "-d", &seconds, "--latency"];
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
/// every request and both versions get traffic. The count is per wrk thread (each has
/// its own Lua state), so the share holds whatever `-t`.
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

/// What h2load printed for one h2c load.
#[derive(Clone)]
pub struct H2Result {
    pub rps: f64,
    /// Mean time from a request's first frame to its last response frame.
    pub mean_ms: f64,
    /// Requests h2load counted failed (errors, timeouts, 4xx, 5xx), plus 3xx answers.
    pub failed: u64,
    pub output: String,
}

/// Connections of the h2c load, and concurrent streams on each.
pub const H2_CONNECTIONS: u32 = 8;
pub const H2_STREAMS: u32 = 16;

/// Unary gRPC-shaped calls for `seconds` over [`H2_CONNECTIONS`] h2c connections
/// (prior knowledge), [`H2_STREAMS`] at once on each, two h2load threads: a POST of an
/// empty gRPC message (`body`, 5 bytes) with `content-type: application/grpc` and
/// `te: trailers`.
pub fn h2load(topo: &Topology, target: &str, seconds: u32, body: &Path) -> Result<H2Result> {
    let url = format!("http://{target}/svc.Echo/Call");
    let (conns, streams, secs) = (
        H2_CONNECTIONS.to_string(),
        H2_STREAMS.to_string(),
        seconds.to_string(),
    );
    let body = body.to_string_lossy().into_owned();
    let out = topo.client.run(&[
        "h2load",
        "-t2",
        "-c",
        &conns,
        "-m",
        &streams,
        "-D",
        &secs,
        "-d",
        &body,
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        &url,
    ])?;
    let line = |prefix: &str| {
        out.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .with_context(|| format!("h2load printed no {prefix:?} for {url}:\n{out}"))
    };
    // "finished in 6.00s, 45678.50 req/s, 1.23MB/s"
    let rps: f64 = line("finished in")?
        .split(',')
        .nth(1)
        .and_then(|f| f.trim().strip_suffix(" req/s"))
        .context("req/s")?
        .parse()?;
    // "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
    let count = |text: &str, kind: &str| -> Result<u64> {
        text.split(',')
            .find_map(|f| f.trim().strip_suffix(kind))
            .with_context(|| format!("h2load: no {kind:?} in {text:?}"))?
            .trim()
            .parse()
            .map_err(Into::into)
    };
    let requests = line("requests:")?;
    let codes = line("status codes:")?;
    // h2load's "failed" includes the errored and timed-out requests and the answers
    // it does not count as success; 4xx and 5xx are among them, 3xx are not.
    let failed = count(requests, " failed")? + count(codes, " 3xx")?;
    // "time for request:  123us  12.34ms  1.23ms  456us  78.90%": min, max, mean, …
    let mean = line("time for request:")?
        .split_whitespace()
        .nth(2)
        .context("mean time for request")?;
    Ok(H2Result {
        rps,
        mean_ms: parse_time(mean)?,
        failed,
        output: out.clone(),
    })
}
