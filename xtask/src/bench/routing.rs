//! The request-routing part of `cargo xtask bench`: the agent's per-request proxy
//! (`protocol = "http"`) against the direct path, nginx `http` (`map $http_x_canary` +
//! `split_clients $request_id`, keep-alive upstreams, `grpc_pass` for h2c) and HAProxy
//! `mode http` (`use_backend` on `req.hdr` + weighted servers, `proto h2` for h2c), all
//! making the same decision for every request: `X-Canary: true` → canary, else 10 % to
//! canary. A fresh lab per path and round, the same nginx backends and loads as the split
//! table plus unary h2c calls (h2load); wrk marks one request in ten `X-Canary: true`
//! ([`wrk::routing_script`]) on every path including direct. Then what the agent spent
//! per 10 000 requests, its resident memory with 10 000 idle clients, and the goals of
//! issue 20.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    topology::{NODE_CLIENT_V4, STABLE_V4},
    ChildGuard, Topology, VIP_V4,
};

use super::{kernel, mean, peers, wrk};
use peers::{BACKEND_PORT, BULK_BYTES, H2C_BACKEND_PORT, H2C_PORT, HAPROXY_VIP, NGINX_VIP};
use wrk::{H2Result, Load, WrkResult};

/// The proxy's policy: `X-Canary: true` → canary; anything else falls through to the
/// service's weight ([`WEIGHT`]), split per request (no user key: exact, ±1).
const POLICY: &str = "(define-header-routing '((header . \"X-Canary\") (values . (\"true\"))))\n";
/// The canary's share of requests without the header, in percent (as nginx's
/// `split_clients` and HAProxy's server weights).
const WEIGHT: u32 = 10;
/// wrk threads: one thread running a Lua `request()` tops out near 35 000 requests/s
/// here, below what the paths do; the direct row shows what wrk and the backends reach.
const WRK_THREADS: u32 = 2;
/// Idle clients held open while the agent's resident memory is read.
const IDLE: usize = 10_000;

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Direct,
    Proxy,
    Nginx,
    Haproxy,
}

const PATHS: [Path; 4] = [Path::Direct, Path::Proxy, Path::Nginx, Path::Haproxy];

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct (through the node, no routing)",
            Path::Proxy => "canary proxy (hyper, per request)",
            Path::Nginx => "nginx map + split_clients / grpc_pass",
            Path::Haproxy => "HAProxy use_backend + weights",
        }
    }

    fn target(self, h2: bool) -> String {
        let (backend, front) = if h2 {
            (H2C_BACKEND_PORT, H2C_PORT)
        } else {
            (BACKEND_PORT, 80)
        };
        match self {
            Path::Direct => format!("{STABLE_V4}:{backend}"),
            Path::Proxy => format!("{VIP_V4}:{front}"),
            Path::Nginx => format!("{NGINX_VIP}:{front}"),
            Path::Haproxy => format!("{HAPROXY_VIP}:{front}"),
        }
    }
}

/// What the proxy did during one load of one round.
#[derive(Default, Clone, Copy)]
struct Cost {
    /// Requests decided (header rule and split).
    decided: u64,
    by_header: u64,
    to_canary: u64,
    /// The agent's user + system CPU time over the load.
    cpu_s: f64,
}

/// The agent's resident memory (MiB) after the loads: alone, with [`IDLE`] clients
/// that sent nothing yet, and with as many idle after one keep-alive request each.
#[derive(Clone, Copy)]
struct IdleRss {
    base: f64,
    before_first_byte: f64,
    after_a_request: f64,
}

/// Port of the agent's Prometheus listener, on the node's own lab address.
const METRICS_PORT: u16 = 9464;

/// The two routed services: HTTP/1 on port 80, h2c on [`H2C_PORT`] (h2c to the backends,
/// as the client speaks). Idle clients may stay (`head_timeout`) and come from one
/// address (`max_client_connections`).
fn agent_config() -> String {
    let extra = format!(
        "protocol = \"http\"\npolicy = \"route.scm\"\nweight = {WEIGHT}\n\
         head_timeout = 300\nmax_client_connections = 20000"
    );
    // The first line continues the harness's [agent] table.
    format!("metrics_listen = \"{NODE_CLIENT_V4}:{METRICS_PORT}\"\n")
        + &lab_service("web", 80, BACKEND_PORT, &extra)
        + &lab_service("grpc", H2C_PORT, H2C_BACKEND_PORT, &extra)
}

/// Service `name`'s decisions now: all, by the header rule, and to canary
/// (`canary_routing_decisions_total{service=name,version="canary"}`).
fn decisions(topo: &Topology, agent: &Agent, name: &str) -> Result<(u64, u64, u64)> {
    let metrics = topo.node.run(&[
        "curl",
        "-sf",
        &format!("http://{NODE_CLIENT_V4}:{METRICS_PORT}/metrics"),
    ])?;
    let to_canary = metrics
        .lines()
        .filter(|l| {
            l.starts_with("canary_routing_decisions_total{")
                && l.contains(&format!("service=\"{name}\""))
                && l.contains("version=\"canary\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap_or("").parse::<f64>())
        .sum::<Result<f64, _>>()
        .context("canary_routing_decisions_total")? as u64;
    let status = agent.status()?;
    let routing = status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .map(|s| &s["routing"])
        .with_context(|| format!("status --json has no service {name}"))?;
    let field = |f: &str| {
        routing[f]
            .as_u64()
            .with_context(|| format!("status --json has no routing.{f}: {routing}"))
    };
    Ok((
        field("header")? + field("split")?,
        field("header")?,
        to_canary,
    ))
}

/// Runs `load` while counting what the proxy decided and the CPU it spent (when the
/// path is the proxy).
fn measured<T>(
    topo: &Topology,
    agent: Option<&Agent>,
    service: &str,
    load: impl FnOnce() -> Result<T>,
) -> Result<(T, Option<Cost>)> {
    let Some(agent) = agent else {
        return Ok((load()?, None));
    };
    let pid = agent.pid().context("agent pid")?;
    let before = decisions(topo, agent, service)?;
    let cpu = kernel::cpu_seconds(pid)?;
    let out = load()?;
    let cpu_s = kernel::cpu_seconds(pid)? - cpu;
    let after = decisions(topo, agent, service)?;
    Ok((
        out,
        Some(Cost {
            decided: after.0 - before.0,
            by_header: after.1 - before.1,
            to_canary: after.2 - before.2,
            cpu_s,
        }),
    ))
}

pub fn run(rounds: usize, profile: bool, seconds: u32, scratch: &peers::Scratch) -> Result<()> {
    let script = wrk::routing_script(&scratch.0)?;
    let grpc_body = scratch.0.join(peers::GRPC_EMPTY);
    // results[path][load] = one WrkResult per round; h2[path] = one H2Result per round
    let mut results: Vec<Vec<Vec<WrkResult>>> =
        vec![vec![Vec::new(); Load::ALL.len()]; PATHS.len()];
    let mut h2: Vec<Vec<H2Result>> = vec![Vec::new(); PATHS.len()];
    // costs[load], the h2c load last: the proxy's, one per round
    let mut costs: Vec<Vec<Cost>> = vec![Vec::new(); Load::ALL.len() + 1];
    let mut idle = None;
    for round in 0..rounds {
        for (p, &path) in PATHS.iter().enumerate() {
            eprintln!("routing round {}/{rounds}: {}", round + 1, path.name());
            let topo = Topology::build()?;
            let _backends = peers::start_backends(&topo, &scratch.0)?;
            let mut _guards: Vec<ChildGuard> = Vec::new();
            let agent = match path {
                Path::Proxy => Some(Agent::start_with_files(
                    &topo.node,
                    &agent_config(),
                    &[("route.scm", POLICY)],
                    &[],
                )?),
                _ => None,
            };
            match path {
                Path::Nginx => _guards.push(peers::nginx_routing(&topo, &scratch.0)?),
                Path::Haproxy => _guards.push(peers::haproxy_routing(&topo, &scratch.0)?),
                _ => {}
            }
            for (l, &load) in Load::ALL.iter().enumerate() {
                let (r, cost) = measured(&topo, agent.as_ref(), "web", || {
                    wrk::run_script(
                        &topo,
                        load,
                        &path.target(false),
                        seconds,
                        WRK_THREADS,
                        Some(&script),
                    )
                })?;
                if r.failed > 0 {
                    // Which kind of failure (connect, read, write, timeout, status).
                    let kinds: Vec<&str> = r
                        .output
                        .lines()
                        .map(str::trim)
                        .filter(|l| l.starts_with("Socket errors") || l.starts_with("Non-2xx"))
                        .collect();
                    eprintln!("{}, {}: {}", path.name(), load.name(), kinds.join("; "));
                }
                results[p][l].push(r);
                costs[l].extend(cost);
            }
            let (r, cost) = measured(&topo, agent.as_ref(), "grpc", || {
                wrk::h2load(&topo, &path.target(true), seconds, &grpc_body)
            })?;
            if r.failed > 0 {
                eprintln!("{}, h2c: {} failed\n{}", path.name(), r.failed, r.output);
            }
            h2[p].push(r);
            costs[Load::ALL.len()].extend(cost);
            if let (Some(agent), 0) = (&agent, round) {
                idle = Some(idle_rss(&topo, agent)?);
                if profile {
                    profiled(&topo, path, seconds, &script, &grpc_body)?;
                }
            }
        }
    }
    print_table(&results, &h2, rounds, seconds);
    print_costs(&costs, idle);
    print_goals(&results, &h2, idle);
    Ok(())
}

/// `perf` over every CPU while the proxy carries each load once more (not counted in
/// the table: perf itself takes CPU).
fn profiled(
    topo: &Topology,
    path: Path,
    seconds: u32,
    script: &std::path::Path,
    grpc_body: &std::path::Path,
) -> Result<()> {
    let secs = seconds.max(6);
    for load in [Load::KeepAlive, Load::NewConnection, Load::Bulk] {
        let perf = kernel::Profile::start(&format!("{} via {}", load.name(), path.name()))?;
        wrk::run_script(
            topo,
            load,
            &path.target(false),
            secs,
            WRK_THREADS,
            Some(script),
        )?;
        perf.report()?;
    }
    let perf = kernel::Profile::start(&format!("h2c calls via {}", path.name()))?;
    wrk::h2load(topo, &path.target(true), secs, grpc_body)?;
    perf.report()
}

fn vm_rss_mib(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Reads one response (head, then a `content-length` body).
fn read_response(conn: &mut TcpStream) -> Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = conn.read(&mut chunk)?;
        ensure!(n > 0, "connection closed in a response");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        ensure!(head.starts_with("http/1.1 200"), "response {head:?}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .context("no content-length")?
            .trim()
            .parse()?;
        if buf.len() >= end + 4 + len {
            return Ok(());
        }
    }
}

/// [`IDLE`] clients on the proxy's HTTP/1 service: first connected and silent, then
/// each after one request (keep-alive, idle between two requests); the agent's
/// resident memory at each stage. The descriptors the agent holds show when all are
/// accepted.
fn idle_rss(topo: &Topology, agent: &Agent) -> Result<IdleRss> {
    let pid = agent.pid().context("agent pid")?;
    raise_fd_limit();
    let target: SocketAddr = Path::Proxy.target(false).parse()?;
    let fds = open_fds(pid)?;
    let base = vm_rss_mib(pid)?;
    let mut conns = topo.client.enter(|| -> Result<Vec<TcpStream>> {
        (0..IDLE)
            .map(|_| {
                let c = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                c.set_nodelay(true)?;
                Ok(c)
            })
            .collect()
    })?;
    let start = Instant::now();
    while open_fds(pid)? < fds + IDLE {
        if start.elapsed() > Duration::from_secs(20) {
            bail!(
                "{IDLE} idle clients not all accepted: the agent holds {} descriptors (from {fds})",
                open_fds(pid)?
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let before_first_byte = vm_rss_mib(pid)?;
    for conn in &mut conns {
        conn.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nX-Canary: false\r\n\r\n")?;
        read_response(conn)?;
    }
    let after_a_request = vm_rss_mib(pid)?;
    drop(conns);
    Ok(IdleRss {
        base,
        before_first_byte,
        after_a_request,
    })
}

/// Ten thousand client sockets need more than the usual soft limit of 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn rps(results: &[Vec<Vec<WrkResult>>], p: Path, l: usize) -> f64 {
    mean(results[at(p)][l].iter().map(|r| r.rps))
}

fn p99(results: &[Vec<Vec<WrkResult>>], p: Path, l: usize) -> f64 {
    mean(results[at(p)][l].iter().map(|r| r.p99_ms))
}

/// Failed requests per run (wrk's socket errors and non-2xx/3xx responses).
fn failed(results: &[Vec<Vec<WrkResult>>], p: Path, l: usize) -> f64 {
    mean(results[at(p)][l].iter().map(|r| r.failed as f64))
}

fn h2_rps(h2: &[Vec<H2Result>], p: Path) -> f64 {
    mean(h2[at(p)].iter().map(|r| r.rps))
}

fn at(path: Path) -> usize {
    PATHS.iter().position(|&p| p == path).unwrap_or(0)
}

fn print_table(results: &[Vec<Vec<WrkResult>>], h2: &[Vec<H2Result>], rounds: usize, seconds: u32) {
    println!(
        "\nRequest routing: {rounds} rounds, interleaved, a fresh lab per path and round; \
         wrk -t{WRK_THREADS} from the client namespace for {seconds} s per load, nginx \
         backends; every path gets `X-Canary: true` on 1 request in {} (→ canary) and \
         `X-Canary: false` on the others ({WEIGHT} % of them → canary, per request). Means \
         over rounds",
        wrk::CANARY_EVERY
    );
    println!(
        "\n| load | path | requests/s | vs direct | p50 ms | p99 ms | added p99 ms | failed per run |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (l, load) in Load::ALL.iter().enumerate() {
        let (direct_rps, direct_p99) =
            (rps(results, Path::Direct, l), p99(results, Path::Direct, l));
        for &path in &PATHS {
            let r = rps(results, path, l);
            let p50 = mean(results[at(path)][l].iter().map(|r| r.p50_ms));
            let p99 = p99(results, path, l);
            let shown = match load {
                Load::Bulk => format!(
                    "{r:.0} ({:.0} MiB/s)",
                    r * BULK_BYTES as f64 / (1 << 20) as f64
                ),
                _ => format!("{r:.0}"),
            };
            println!(
                "| {} | {} | {shown} | {:.2} | {p50:.2} | {p99:.2} | {:+.2} | {:.0} |",
                load.name(),
                path.name(),
                r / direct_rps,
                p99 - direct_p99,
                failed(results, path, l)
            );
        }
    }
    println!(
        "\nh2c unary calls (h2load -t2 -c {} -m {}: POST of an empty gRPC message, \
         `content-type: application/grpc`, answered with a `grpc-status: 0` trailer; no \
         `X-Canary` header, so every call is split per request, {WEIGHT} % to canary; the \
         backends speak h2c)",
        wrk::H2_CONNECTIONS,
        wrk::H2_STREAMS
    );
    println!("\n| path | calls/s | vs direct | mean ms | failed per run |");
    println!("|---|---:|---:|---:|---:|");
    let direct = h2_rps(h2, Path::Direct);
    for &path in &PATHS {
        let r = h2_rps(h2, path);
        println!(
            "| {} | {r:.0} | {:.2} | {:.2} | {:.0} |",
            path.name(),
            r / direct,
            mean(h2[at(path)].iter().map(|r| r.mean_ms)),
            mean(h2[at(path)].iter().map(|r| r.failed as f64)),
        );
    }
    for (l, load) in Load::ALL.iter().enumerate() {
        let proxy = rps(results, Path::Proxy, l);
        println!(
            "{}: proxy / nginx {:.2}×, / HAProxy {:.2}×",
            load.name(),
            proxy / rps(results, Path::Nginx, l),
            proxy / rps(results, Path::Haproxy, l)
        );
    }
    let proxy = h2_rps(h2, Path::Proxy);
    println!(
        "h2c calls: proxy / nginx {:.2}×, / HAProxy {:.2}×",
        proxy / h2_rps(h2, Path::Nginx),
        proxy / h2_rps(h2, Path::Haproxy)
    );
}

fn print_costs(costs: &[Vec<Cost>], idle: Option<IdleRss>) {
    println!(
        "\nThe proxy, per load (mean over rounds; `status --json` routing.header + \
         routing.split and canary_routing_decisions_total{{version=\"canary\"}} before and \
         after; the agent's CPU time from /proc)"
    );
    println!("| load | requests decided | by the header | to canary | canary share | agent CPU ms per 10 000 requests |");
    println!("|---|---:|---:|---:|---:|---:|");
    let names = Load::ALL.iter().map(|l| l.name()).chain(["h2c calls"]);
    for (name, c) in names.zip(costs) {
        let decided = mean(c.iter().map(|c| c.decided as f64));
        let canary = mean(c.iter().map(|c| c.to_canary as f64));
        let per_10k = mean(
            c.iter()
                .map(|c| 1e3 * c.cpu_s * 1e4 / (c.decided.max(1) as f64)),
        );
        println!(
            "| {name} | {decided:.0} | {:.0} | {canary:.0} | {:.3} | {per_10k:.0} |",
            mean(c.iter().map(|c| c.by_header as f64)),
            canary / decided.max(1.0)
        );
    }
    if let Some(i) = idle {
        println!(
            "Agent resident memory (release build, after the loads): {:.1} MiB; with {IDLE} idle \
             clients that sent nothing: {:.1} MiB; with {IDLE} idle after one keep-alive request \
             each: {:.1} MiB ({:.1} KiB per connection)",
            i.base,
            i.before_first_byte,
            i.after_a_request,
            (i.after_a_request - i.base) * 1024.0 / IDLE as f64
        );
    }
}

/// Issue 20's goals, each printed with what was measured. A load in which the proxy
/// failed requests meets no goal, whatever its numbers.
fn print_goals(results: &[Vec<Vec<WrkResult>>], h2: &[Vec<H2Result>], idle: Option<IdleRss>) {
    let verdict = |ok: bool, f: f64| match (ok, f > 0.0) {
        (_, true) => format!("NOT met ({f:.0} failed requests per run through the proxy)"),
        (true, false) => "met".to_string(),
        (false, false) => "NOT met".to_string(),
    };
    let [keep, new, bulk] = [0, 1, 2];
    let f = |l| failed(results, Path::Proxy, l);
    println!("\nGoals (issue 20):");
    let r = rps(results, Path::Proxy, keep) / rps(results, Path::Nginx, keep);
    println!(
        "  keep-alive ≥ 1.2× nginx's requests/s: {r:.2}× — {}",
        verdict(r >= 1.2, f(keep))
    );
    let r = rps(results, Path::Proxy, new) / rps(results, Path::Nginx, new);
    println!(
        "  new connection per request ≥ nginx: {r:.2}× — {}",
        verdict(r >= 1.0, f(new))
    );
    let r = rps(results, Path::Proxy, bulk) / rps(results, Path::Nginx, bulk);
    println!("  1 MiB ≥ nginx: {r:.2}× — {}", verdict(r >= 1.0, f(bulk)));
    for (l, load) in Load::ALL.iter().enumerate() {
        let direct = p99(results, Path::Direct, l);
        let (proxy, nginx) = (
            p99(results, Path::Proxy, l) - direct,
            p99(results, Path::Nginx, l) - direct,
        );
        println!(
            "  added p99 ≤ nginx's, {}: proxy {proxy:+.2} ms, nginx {nginx:+.2} ms — {}",
            load.name(),
            verdict(proxy <= nginx, f(l))
        );
    }
    let r = h2_rps(h2, Path::Proxy) / h2_rps(h2, Path::Nginx);
    let h2_failed = mean(h2[at(Path::Proxy)].iter().map(|r| r.failed as f64));
    println!(
        "  h2c unary calls over {} connections ≥ nginx grpc_pass: {r:.2}× — {}",
        wrk::H2_CONNECTIONS,
        verdict(r >= 1.0, h2_failed)
    );
    if let Some(i) = idle {
        let mb = i.after_a_request * 1.048_576;
        println!(
            "  agent RSS with {IDLE} idle clients ≤ 100 MB (release): {mb:.1} MB — {}",
            if mb <= 100.0 { "met" } else { "NOT met" }
        );
    }
}
