//! The header-routing part of `cargo xtask bench`: the agent's router (`protocol =
//! "http"`, `define-header-routing` on `X-Canary`; it reads the first head, decides and
//! splices the connection in the kernel) against the direct path, nginx `http` (`map
//! $http_x_canary`, keep-alive upstreams) and HAProxy `mode http` (`use_backend` on
//! `req.hdr`), on a fresh lab per path and round with the same nginx backends and loads
//! as the split table. wrk marks one request in ten `X-Canary: true`, the rest
//! `X-Canary: false` ([`wrk::routing_script`]), on every path including direct.
//! Afterwards it prints what the router copied in userspace against what the kernel
//! carried (`status --json`), and the goals of issue 8.

use anyhow::{Context, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    topology::NODE_CLIENT_V4,
    ChildGuard, Topology, VIP_V4,
};

use super::{kernel, mean, peers, wrk};
use peers::{BACKEND_PORT, BULK_BYTES, HAPROXY_VIP, NGINX_VIP};
use wrk::{Load, WrkResult};

/// The policy of the routed service: `X-Canary: true` → canary, anything else → stable
/// (a policy needs a split; at 0 it never decides here, the header rule's default does).
const POLICY: &str = "(define-canary-split '((canary . 0)))\n\
    (define-header-routing '((header . \"X-Canary\") (values . (\"true\")) (default . stable)))\n";

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Direct,
    Router,
    Nginx,
    Haproxy,
}

const PATHS: [Path; 4] = [Path::Direct, Path::Router, Path::Nginx, Path::Haproxy];

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct (through the node, no routing)",
            Path::Router => "canary router (head in userspace, sockmap splice)",
            Path::Nginx => "nginx http map $http_x_canary",
            Path::Haproxy => "HAProxy http use_backend req.hdr",
        }
    }

    fn target(self) -> String {
        match self {
            Path::Direct => format!("{}:{BACKEND_PORT}", canary_lab::topology::STABLE_V4),
            Path::Router => format!("{VIP_V4}:80"),
            Path::Nginx => format!("{NGINX_VIP}:80"),
            Path::Haproxy => format!("{HAPROXY_VIP}:80"),
        }
    }
}

/// What the router's `status --json` said moved during one load of one round.
#[derive(Default, Clone, Copy)]
struct Moved {
    decisions: u64,
    to_canary: u64,
    userspace_bytes: u64,
    kernel_bytes: u64,
}

/// Port of the agent's Prometheus listener, on the node's own lab address.
const METRICS_PORT: u16 = 9464;

/// The router service's counters now: header decisions (from `status --json` and,
/// for the canary ones, `canary_routing_decisions_total{version="canary"}`), bytes
/// the agent copied, bytes the kernel carried.
fn router_counters(topo: &Topology, agent: &Agent) -> Result<Moved> {
    let metrics = topo.node.run(&[
        "curl",
        "-sf",
        &format!("http://{NODE_CLIENT_V4}:{METRICS_PORT}/metrics"),
    ])?;
    let to_canary = metrics
        .lines()
        .filter(|l| {
            l.starts_with("canary_routing_decisions_total{") && l.contains("version=\"canary\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap_or("").parse::<f64>())
        .sum::<Result<f64, _>>()
        .context("canary_routing_decisions_total")? as u64;
    let status = agent.status()?;
    let routing = &status["services"][0]["routing"];
    let field = |name: &str| {
        routing[name]
            .as_u64()
            .with_context(|| format!("status --json has no routing.{name}: {routing}"))
    };
    Ok(Moved {
        decisions: field("header")?,
        to_canary,
        userspace_bytes: field("userspace_bytes")?,
        kernel_bytes: field("kernel_bytes")?,
    })
}

pub fn run(rounds: usize, profile: bool, seconds: u32, scratch: &peers::Scratch) -> Result<()> {
    let script = wrk::routing_script(&scratch.0)?;
    // results[path][load] = one WrkResult per round
    let mut results: Vec<Vec<Vec<WrkResult>>> =
        vec![vec![Vec::new(); Load::ALL.len()]; PATHS.len()];
    // moved[load] = the router's counters' growth, one per round
    let mut moved: Vec<Vec<Moved>> = vec![Vec::new(); Load::ALL.len()];
    let mut agent_cost = Vec::new();
    for round in 0..rounds {
        for (p, &path) in PATHS.iter().enumerate() {
            eprintln!("routing round {}/{rounds}: {}", round + 1, path.name());
            let topo = Topology::build()?;
            let _backends = peers::start_backends(&topo, &scratch.0)?;
            let mut _guards: Vec<ChildGuard> = Vec::new();
            let agent = match path {
                Path::Router => Some(Agent::start_with_files(
                    &topo.node,
                    // The first line continues the harness's [agent] table.
                    &(format!("metrics_listen = \"{NODE_CLIENT_V4}:{METRICS_PORT}\"\n")
                        + &lab_service(
                            "web",
                            80,
                            BACKEND_PORT,
                            "protocol = \"http\"\npolicy = \"route.scm\"",
                        )),
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
            let pid = agent.as_ref().and_then(Agent::pid);
            let cpu0 = pid.map(kernel::cpu_seconds).transpose()?;
            let started = std::time::Instant::now();
            for (l, &load) in Load::ALL.iter().enumerate() {
                let before = agent
                    .as_ref()
                    .map(|a| router_counters(&topo, a))
                    .transpose()?;
                let perf = (profile
                    && load == Load::KeepAlive
                    && matches!(path, Path::Direct | Path::Router))
                .then(|| kernel::Profile::start(path.name()))
                .transpose()?;
                let r = wrk::run_script(&topo, load, &path.target(), seconds, Some(&script))?;
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
                if let Some(perf) = perf {
                    perf.report()?;
                }
                if let (Some(agent), Some(b)) = (&agent, before) {
                    let a = router_counters(&topo, agent)?;
                    moved[l].push(Moved {
                        decisions: a.decisions - b.decisions,
                        to_canary: a.to_canary - b.to_canary,
                        userspace_bytes: a.userspace_bytes - b.userspace_bytes,
                        kernel_bytes: a.kernel_bytes - b.kernel_bytes,
                    });
                }
            }
            if let (Some(pid), Some(cpu0)) = (pid, cpu0) {
                let cpu = kernel::cpu_seconds(pid)? - cpu0;
                agent_cost.push((
                    100.0 * cpu / started.elapsed().as_secs_f64(),
                    kernel::peak_rss_mib(pid)?,
                ));
            }
        }
    }
    print_table(&results, rounds, seconds);
    print_moved(&moved, &agent_cost);
    print_goals(&results);
    Ok(())
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

fn at(path: Path) -> usize {
    PATHS.iter().position(|&p| p == path).unwrap_or(0)
}

fn print_table(results: &[Vec<Vec<WrkResult>>], rounds: usize, seconds: u32) {
    println!(
        "\nHeader routing: {rounds} rounds, interleaved, a fresh lab per path and round; wrk \
         -t1 from the client namespace for {seconds} s per load, nginx backends; every path gets \
         `X-Canary: true` on 1 request in {} and `X-Canary: false` on the others",
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
    for (l, load) in Load::ALL.iter().enumerate() {
        let router = rps(results, Path::Router, l);
        println!(
            "{}: router / nginx {:.2}×, / HAProxy {:.2}×",
            load.name(),
            router / rps(results, Path::Nginx, l),
            router / rps(results, Path::Haproxy, l)
        );
    }
}

fn print_moved(moved: &[Vec<Moved>], agent_cost: &[(f64, f64)]) {
    println!(
        "\nRouter, per load (mean over rounds; `status --json` routing.header, \
         routing.userspace_bytes, routing.kernel_bytes and \
         canary_routing_decisions_total{{version=\"canary\"}} before and after)"
    );
    println!("| load | connections decided | of them to canary | bytes copied by the agent | bytes carried by the kernel | kernel share |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (l, load) in Load::ALL.iter().enumerate() {
        let decisions = mean(moved[l].iter().map(|m| m.decisions as f64));
        let to_canary = mean(moved[l].iter().map(|m| m.to_canary as f64));
        let user = mean(moved[l].iter().map(|m| m.userspace_bytes as f64));
        let kernel = mean(moved[l].iter().map(|m| m.kernel_bytes as f64));
        println!(
            "| {} | {decisions:.0} | {to_canary:.0} | {user:.0} | {kernel:.0} | {:.4} |",
            load.name(),
            kernel / (user + kernel).max(1.0)
        );
    }
    if !agent_cost.is_empty() {
        let cpu = mean(agent_cost.iter().map(|c| c.0));
        let rss = agent_cost.iter().map(|c| c.1).fold(0.0, f64::max);
        println!("Agent during the router's loads: {cpu:.1} % of one core, peak RSS {rss:.1} MiB");
    }
}

/// Issue 8's goals, each printed with what was measured. A load in which the router
/// failed requests meets no goal, whatever its numbers.
fn print_goals(results: &[Vec<Vec<WrkResult>>]) {
    let verdict = |ok: bool, l: usize| {
        let f = failed(results, Path::Router, l);
        match (ok, f > 0.0) {
            (_, true) => format!("NOT met ({f:.0} failed requests per run through the router)"),
            (true, false) => "met".to_string(),
            (false, false) => "NOT met".to_string(),
        }
    };
    let [keep, new, bulk] = [0, 1, 2];
    println!("\nGoals (issue 8):");
    let r = rps(results, Path::Router, keep) / rps(results, Path::Nginx, keep);
    println!(
        "  keep-alive ≥ 2× nginx's requests/s: {r:.2}× — {}",
        verdict(r >= 2.0, keep)
    );
    let r = rps(results, Path::Router, new) / rps(results, Path::Nginx, new);
    println!(
        "  new connections ≥ nginx: {r:.2}× — {}",
        verdict(r >= 1.0, new)
    );
    let r = rps(results, Path::Router, bulk) / rps(results, Path::Direct, bulk);
    println!(
        "  1 MiB ≥ 0.9 of direct: {r:.2} — {}",
        verdict(r >= 0.9, bulk)
    );
    for (l, load) in Load::ALL.iter().enumerate() {
        let direct = p99(results, Path::Direct, l);
        let (router, nginx) = (
            p99(results, Path::Router, l) - direct,
            p99(results, Path::Nginx, l) - direct,
        );
        println!(
            "  added p99 ≤ nginx's, {}: router {router:+.2} ms, nginx {nginx:+.2} ms — {}",
            load.name(),
            verdict(router <= nginx, l)
        );
    }
}
