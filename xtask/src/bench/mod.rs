//! `cargo xtask bench`: the splitter against the direct path and the usual ways to do
//! the same split (iptables `statistic` DNAT, nginx `stream` `split_clients`, HAProxy
//! TCP), on a fresh lab per path and round, with nginx backends; keep-alive requests,
//! a new connection per request, and 1 MiB transfers. Rounds are interleaved so drift on
//! the machine hits every path alike. While the splitter carries the load it also reads
//! each BPF program's run time per packet and the agent's CPU time and peak RSS. Then
//! the request-routing table ([`routing`]: the agent's per-request proxy against nginx
//! and HAProxy making the same decisions, HTTP/1 and h2c), and ns/packet from BPF_PROG_TEST_RUN, including the placement path
//! over distinct tuples. `--only split|routing` runs one table.

mod floor;
mod kernel;
mod peers;
mod routing;
mod wrk;

use std::process::Command;

use anyhow::{bail, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    topology::{NODE_CANARY_IFACE, NODE_STABLE_IFACE},
    ChildGuard, Topology, NODE_CLIENT_IFACE, VIP_V4,
};

use crate::lab::Form;
use peers::{BACKEND_PORT, BULK_BYTES, HAPROXY_VIP, IPTABLES_VIP, NGINX_VIP};
use wrk::{Load, WrkResult};

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Direct,
    /// Straight to a backend through the node, with the agent's XDP program attached
    /// to the client-facing veth: what the hook costs traffic that is not ours.
    DirectXdpAttached,
    /// Straight to a backend with two programs that only return "pass" at the TC hooks
    /// the splitter uses: the floor of a program's cost there ([`floor`]).
    DirectEmptyAttached,
    /// The splitter with its ingress program at XDP or at TC (`ingress_hook`).
    Splitter(&'static str),
    /// The splitter at TC ingress with `forward = "redirect"`, attached on the client-
    /// and backend-facing interfaces: requests and replies go straight to the next
    /// hop's interface instead of through IP forwarding.
    SplitterRedirect,
    /// The splitter (TC ingress) at weight 0: every packet takes the splitter's whole
    /// path, but to one backend, as direct does. Two backends mean one more busy
    /// process on the machine's two cores; this row separates that from the datapath.
    SplitterWeightZero,
    Iptables,
    NginxStream,
    Haproxy,
}

const PATHS: [Path; 10] = [
    Path::Direct,
    Path::DirectXdpAttached,
    Path::DirectEmptyAttached,
    Path::Splitter("tc"),
    Path::SplitterRedirect,
    Path::SplitterWeightZero,
    Path::Splitter("xdp"),
    Path::Iptables,
    Path::NginxStream,
    Path::Haproxy,
];

/// A split-table path as `--paths` names it.
#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum PathName {
    Direct,
    XdpAttached,
    EmptyAttached,
    Tc,
    TcRedirect,
    TcWeight0,
    Xdp,
    Iptables,
    Nginx,
    Haproxy,
}

impl PathName {
    fn path(self) -> Path {
        match self {
            PathName::Direct => Path::Direct,
            PathName::XdpAttached => Path::DirectXdpAttached,
            PathName::EmptyAttached => Path::DirectEmptyAttached,
            PathName::Tc => Path::Splitter("tc"),
            PathName::TcRedirect => Path::SplitterRedirect,
            PathName::TcWeight0 => Path::SplitterWeightZero,
            PathName::Xdp => Path::Splitter("xdp"),
            PathName::Iptables => Path::Iptables,
            PathName::Nginx => Path::NginxStream,
            PathName::Haproxy => Path::Haproxy,
        }
    }
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct (through the node, no split)",
            Path::DirectXdpAttached => "direct, agent's XDP attached",
            Path::DirectEmptyAttached => "direct, empty TC programs attached",
            Path::Splitter("tc") => "canary splitter (TC ingress + TC egress)",
            Path::Splitter(_) => "canary splitter (XDP ingress + TC egress)",
            Path::SplitterRedirect => "canary splitter (TC ingress, forward = redirect)",
            Path::SplitterWeightZero => "canary splitter at weight 0 (TC; one backend, as direct)",
            Path::Iptables => "iptables statistic DNAT",
            Path::NginxStream => "nginx stream split_clients",
            Path::Haproxy => "HAProxy tcp",
        }
    }

    fn target(self) -> String {
        match self {
            Path::Direct | Path::DirectXdpAttached | Path::DirectEmptyAttached => {
                format!("{}:{BACKEND_PORT}", canary_lab::topology::STABLE_V4)
            }
            Path::Splitter(_) | Path::SplitterRedirect | Path::SplitterWeightZero => {
                format!("{VIP_V4}:80")
            }
            Path::Iptables => format!("{IPTABLES_VIP}:80"),
            Path::NginxStream => format!("{NGINX_VIP}:80"),
            Path::Haproxy => format!("{HAPROXY_VIP}:80"),
        }
    }

    /// The agent's config for the paths that run one: lines before the first
    /// [[service]] table belong to its [agent] table.
    fn agent_config(self) -> Option<String> {
        let service = lab_service("web", 80, BACKEND_PORT, "weight = 10");
        match self {
            // On the backend-facing interfaces too, so replies skip forwarding as well.
            Path::SplitterRedirect => Some(format!(
                "interface = [\"{NODE_CLIENT_IFACE}\", \"{NODE_STABLE_IFACE}\", \"{NODE_CANARY_IFACE}\"]\n\
                 ingress_hook = \"tc\"\nforward = \"redirect\"\n{service}"
            )),
            Path::SplitterWeightZero => Some(format!(
                "ingress_hook = \"tc\"\n{}",
                lab_service("web", 80, BACKEND_PORT, "weight = 0")
            )),
            Path::DirectXdpAttached => Some(format!("ingress_hook = \"xdp\"\n{service}")),
            Path::Splitter(hook) => Some(format!("ingress_hook = \"{hook}\"\n{service}")),
            _ => None,
        }
    }
}

/// What the agent and its programs cost during one round's loads of one path.
#[derive(Default)]
struct SplitterCost {
    path: usize,
    /// (program, ns per run, runs) per load.
    programs: Vec<(Load, Vec<kernel::ProgramCost>)>,
    agent_cpu_s: f64,
    wall_s: f64,
    peak_rss_mib: f64,
}

/// Which tables `cargo xtask bench` runs (`--only`); both by default.
#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum Part {
    /// The connection split against direct, iptables, nginx stream, HAProxy tcp.
    Split,
    /// Request routing: the proxy against direct, nginx http and HAProxy http (h1, h2c).
    Routing,
}

pub fn run(
    rounds: usize,
    profile: bool,
    only: Option<Part>,
    seconds: u32,
    paths: &[PathName],
) -> Result<()> {
    Form { quick: false }.bins()?;
    let scratch = peers::Scratch::new()?;
    let _stats = kernel::BpfStats::enable()?;
    if only != Some(Part::Routing) {
        // Direct always runs: every ratio is to it.
        let selected: Vec<bool> = PATHS
            .iter()
            .map(|&p| p == Path::Direct || paths.is_empty() || paths.iter().any(|n| n.path() == p))
            .collect();
        split(rounds, profile, seconds, &selected, &scratch)?;
    }
    if only != Some(Part::Split) {
        routing::run(rounds, profile, seconds, &scratch)?;
    }
    if only != Some(Part::Routing) {
        per_packet()?;
    }
    Ok(())
}

fn split(
    rounds: usize,
    profile: bool,
    seconds: u32,
    selected: &[bool],
    scratch: &peers::Scratch,
) -> Result<()> {
    // results[path][load] = one WrkResult per round
    let mut results: Vec<Vec<Vec<WrkResult>>> =
        vec![vec![Vec::new(); Load::ALL.len()]; PATHS.len()];
    let mut costs = Vec::new();
    for round in 0..rounds {
        for (p, &path) in PATHS.iter().enumerate().filter(|&(p, _)| selected[p]) {
            eprintln!("round {}/{rounds}: {}", round + 1, path.name());
            let topo = Topology::build()?;
            let _backends = peers::start_backends(&topo, &scratch.0)?;
            let mut _guards: Vec<ChildGuard> = Vec::new();
            let agent = match path.agent_config() {
                Some(config) => Some(Agent::start(&topo.node, &config, &[])?),
                None => None,
            };
            match path {
                Path::Iptables => peers::iptables_split(&topo)?,
                Path::NginxStream => _guards.push(peers::nginx_split(&topo, &scratch.0)?),
                Path::Haproxy => _guards.push(peers::haproxy_split(&topo, &scratch.0)?),
                _ => {}
            }
            let _empty = (path == Path::DirectEmptyAttached)
                .then(|| floor::attach(&topo.node))
                .transpose()?;
            let pid = agent.as_ref().and_then(Agent::pid);
            // Whose programs to read: the agent's, or this process's empty ones.
            let holder = pid.or(_empty.as_ref().map(|_| std::process::id()));
            let mut cost = SplitterCost {
                path: p,
                ..Default::default()
            };
            let cpu0 = pid.map(kernel::cpu_seconds).transpose()?;
            let started = std::time::Instant::now();
            for (l, &load) in Load::ALL.iter().enumerate() {
                let before = holder.map(kernel::program_runs).transpose()?;
                let perf = (profile
                    && load == Load::KeepAlive
                    && matches!(
                        path,
                        Path::Direct
                            | Path::Splitter(_)
                            | Path::SplitterRedirect
                            | Path::SplitterWeightZero
                    ))
                .then(|| kernel::Profile::start(&format!("keep-alive via {}", path.name())))
                .transpose()?;
                results[p][l].push(wrk::run(&topo, load, &path.target(), seconds)?);
                if let Some(perf) = perf {
                    perf.report()?;
                }
                if let (Some(holder), Some(before)) = (holder, before) {
                    let after = kernel::program_runs(holder)?;
                    cost.programs
                        .push((load, kernel::ns_per_run(&before, &after)));
                }
            }
            if let (Some(pid), Some(cpu0)) = (pid, cpu0) {
                cost.agent_cpu_s = kernel::cpu_seconds(pid)? - cpu0;
                cost.wall_s = started.elapsed().as_secs_f64();
                cost.peak_rss_mib = kernel::peak_rss_mib(pid)?;
            }
            if holder.is_some() {
                costs.push(cost);
            }
        }
    }
    print_table(&results, rounds);
    print_costs(&costs);
    Ok(())
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Median, and the range when there is more than one value: "0.91 (0.84–0.97)".
fn spread(v: Vec<f64>) -> String {
    let (lo, hi) = v
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    match v.len() {
        0 | 1 => format!("{:.2}", median(v)),
        _ => format!("{:.2} ({lo:.2}–{hi:.2})", median(v)),
    }
}

/// Per round, `what` of path `p` over `what` of path `q` at load `l`: rounds are
/// interleaved, so each ratio compares runs minutes apart, not a whole run apart.
fn round_ratios(
    results: &[Vec<Vec<WrkResult>>],
    l: usize,
    p: usize,
    q: usize,
    what: fn(&WrkResult) -> f64,
) -> Vec<f64> {
    results[p][l]
        .iter()
        .zip(&results[q][l])
        .map(|(a, b)| what(a) / what(b))
        .collect()
}

fn print_table(results: &[Vec<Vec<WrkResult>>], rounds: usize) {
    println!(
        "\n{} rounds, interleaved, a fresh lab per path and round; wrk from the client \
         namespace, nginx backends; splits send 10 % of connections to canary. Medians; a \
         ratio is the median of the per-round ratios, with their range",
        rounds
    );
    println!("\n| load | path | requests/s | vs direct | p50 ms | p99 ms | p99 vs direct |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (l, load) in Load::ALL.iter().enumerate() {
        for (p, path) in PATHS
            .iter()
            .enumerate()
            .filter(|&(p, _)| !results[p][l].is_empty())
        {
            let rps = median(results[p][l].iter().map(|r| r.rps).collect());
            let p50 = median(results[p][l].iter().map(|r| r.p50_ms).collect());
            let p99 = median(results[p][l].iter().map(|r| r.p99_ms).collect());
            let shown = match load {
                Load::Bulk => format!(
                    "{rps:.0} ({:.0} MiB/s)",
                    rps * BULK_BYTES as f64 / (1 << 20) as f64
                ),
                _ => format!("{rps:.0}"),
            };
            println!(
                "| {} | {} | {shown} | {} | {p50:.2} | {p99:.2} | {} |",
                load.name(),
                path.name(),
                spread(round_ratios(results, l, p, 0, |r| r.rps)),
                spread(round_ratios(results, l, p, 0, |r| r.p99_ms)),
            );
        }
    }
    let at = |path: Path| PATHS.iter().position(|&p| p == path).unwrap_or(0);
    let peers = [
        ("iptables", at(Path::Iptables)),
        ("nginx", at(Path::NginxStream)),
        ("HAProxy", at(Path::Haproxy)),
    ];
    for (name, splitter) in [
        ("splitter (TC ingress)", at(Path::Splitter("tc"))),
        ("splitter (forward = redirect)", at(Path::SplitterRedirect)),
    ] {
        for (l, load) in Load::ALL.iter().enumerate() {
            let against: Vec<String> = peers
                .iter()
                .filter(|(_, q)| !results[splitter][l].is_empty() && !results[*q][l].is_empty())
                .map(|(peer, q)| {
                    format!(
                        "/ {peer} {}×",
                        spread(round_ratios(results, l, splitter, *q, |r| r.rps))
                    )
                })
                .collect();
            if !against.is_empty() {
                println!("{}: {name} {}", load.name(), against.join(", "));
            }
        }
    }
}

fn print_costs(costs: &[SplitterCost]) {
    println!("\nAgent and programs under that load (kernel.bpf_stats_enabled; mean over rounds)");
    println!("| path | load | program | ns/run | runs/round |");
    println!("|---|---|---|---:|---:|");
    for (p, path) in PATHS.iter().enumerate() {
        let of_path: Vec<&SplitterCost> = costs.iter().filter(|c| c.path == p).collect();
        if of_path.is_empty() {
            continue;
        }
        for load in Load::ALL {
            let mut by_prog: std::collections::BTreeMap<&str, (f64, u64, usize)> =
                Default::default();
            for (_, progs) in of_path
                .iter()
                .flat_map(|c| &c.programs)
                .filter(|(l, _)| *l == load)
            {
                for (name, ns, runs) in progs {
                    let (ns, runs) = (*ns, *runs);
                    let e = by_prog.entry(name.as_str()).or_default();
                    e.0 += ns;
                    e.1 += runs;
                    e.2 += 1;
                }
            }
            // Programs loaded but not attached on this path never run.
            for (name, (ns, runs, n)) in by_prog.into_iter().filter(|(_, (_, runs, _))| *runs > 0) {
                let n = n.max(1);
                println!(
                    "| {} | {} | {name} | {:.0} | {} |",
                    path.name(),
                    load.name(),
                    ns / n as f64,
                    runs / n as u64
                );
            }
        }
        if *path == Path::DirectEmptyAttached {
            continue;
        }
        let cpu = mean(of_path.iter().map(|c| 100.0 * c.agent_cpu_s / c.wall_s));
        let rss = of_path.iter().map(|c| c.peak_rss_mib).fold(0.0, f64::max);
        println!(
            "Agent during {}: {cpu:.2} % of one core, peak RSS {rss:.1} MiB",
            path.name()
        );
    }
}

/// ns/packet of the ingress program at both hooks: the agent crate's `program_cost` example (it needs the
/// embedded kernel object, which xtask itself must build without).
fn per_packet() -> Result<()> {
    let status = Command::new("cargo")
        .current_dir(crate::workspace_root())
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "canary-agent",
            "--example",
            "program_cost",
        ])
        .status()?;
    if !status.success() {
        bail!("program_cost failed ({status})");
    }
    Ok(())
}
