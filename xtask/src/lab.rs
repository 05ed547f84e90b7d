//! `cargo xtask lab ...`: the local lab of network namespaces with stable and canary
//! backends and the real agent splitting live traffic (the seed's make targets).
//!
//! Every scenario drives on what happens, not on a fixed amount of load: traffic runs
//! until the scenario's event happened or a stated bound passed, and the run ends with
//! one verdict line (`TARGET: OK: …` or `TARGET: FAILED: …`, then a non-zero exit).
//! `--quick` is the short form `make test` runs: the debug build, a faster clock and
//! less traffic, the same checks.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    backend::{metric_value, scrape_metrics, set_faults, ADMIN_PORT, BANNER_PORT, HTTP_PORT},
    banner_connections, http_load_until,
    topology::{CANARY_V4, STABLE_V4},
    Faults, Topology, VIP_V4,
};

use crate::workspace_root;

/// The full demo (`make TARGET`, release build) or its short form (`make test`).
#[derive(Clone, Copy)]
pub struct Form {
    pub quick: bool,
}

impl Form {
    /// The agent and backend binaries of the build this form uses.
    pub fn bins(self) -> Result<PathBuf> {
        let (profile, make) = if self.quick {
            ("debug", "cargo build --workspace --bins")
        } else {
            ("release", "make build")
        };
        let target = workspace_root().join("target").join(profile);
        let canary = target.join("canary");
        let backend = target.join("lab-backend");
        ensure!(
            canary.exists() && backend.exists(),
            "{} binaries missing: run `{make}` first",
            profile
        );
        // The lab's agent harness reads $CANARY_BIN.
        std::env::set_var("CANARY_BIN", &canary);
        Ok(backend)
    }
}

/// Prints the scenario's verdict line and turns a failed scenario into an error.
fn verdict(target: &str, outcome: Result<String>) -> Result<()> {
    match outcome {
        Ok(summary) => {
            println!("{target}: OK: {summary}");
            Ok(())
        }
        Err(e) => {
            println!("{target}: FAILED: {e:#}");
            bail!("{target} did not take place as it should")
        }
    }
}
/// The seed's progression (1 % → 5 % after 5 min → 20 % → 50 % → 100 % after 1 h),
/// with the seed's four stages and an approval-free path so the demo runs unattended.
const SEED_POLICY: &str = r#"step = [
  { at = 0, weight = 1 },
  { at = "5m", weight = 5 },
  { at = "10m", weight = 20 },
  { at = "30m", weight = 50 },
  { at = "1h", weight = 100 },
]
"#;

/// A full time-scaled rollout under steady client load (new connections, so each
/// one meets the current weight), with live status and the share the client saw.
/// Done when the rollout is promoted and every connection was answered.
pub fn deploy(form: Form) -> Result<()> {
    let backend = form.bins()?;
    let topo = Topology::build()?;
    let _backends = topo.start_backends(&backend)?;
    // The schedule's hour takes 30 s (quick: 10 s).
    let scale = if form.quick { "360" } else { "120" };
    let agent = Agent::start_with_files(
        &topo.node,
        &lab_service("web", 80, BANNER_PORT, "policy = \"web-policy.toml\""),
        &[("web-policy.toml", SEED_POLICY)],
        &["--time-scale", scale],
    )?;
    println!("lab: agent running on the node namespace, rollout clock x{scale}");
    print!(
        "{}",
        agent.cli(&["check", &agent.config.to_string_lossy()])?
    );
    topo.client
        .run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])?;
    let target = SocketAddr::new(VIP_V4.into(), 80);
    let seen = Mutex::new((0usize, 0usize, 0usize));
    let done = AtomicBool::new(false);
    // Twice the schedule's length, then the run is a failure.
    let bound = Duration::from_secs(if form.quick { 20 } else { 60 });
    let outcome = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            // Bounded: stops when the rollout ends or after 400 batches.
            for _ in 0..400 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let r = topo
                    .client
                    .enter(|| banner_connections(target, 100, 8, &[], Duration::from_secs(5)))?;
                let mut s = seen.lock().unwrap();
                s.0 += r.count("stable");
                s.1 += r.count("canary");
                s.2 += r.failed();
                drop(s);
                std::thread::sleep(Duration::from_millis(100));
            }
            anyhow::Ok(())
        });
        let watched = watch_rollout(&agent, &seen, bound, form);
        done.store(true, Ordering::Relaxed);
        load.join().expect("load thread")?;
        watched
    });
    let (stable, canary, failed) = *seen.lock().unwrap();
    println!("client: {stable} connections to stable, {canary} to canary, {failed} failed");
    verdict(
        "deploy-canary",
        outcome.and_then(|(state, took)| {
            ensure!(
                state == "promoted",
                "the rollout is {state:?} after {:.0} s, not promoted",
                took.as_secs_f64()
            );
            ensure!(failed == 0, "{failed} connections failed");
            ensure!(canary > 0, "no connection reached canary");
            Ok(format!(
                "promoted in {:.1} s (the schedule's hour at x{scale}); {stable} connections to stable, {canary} to canary, 0 failed",
                took.as_secs_f64()
            ))
        }),
    )
}

/// Starts the rollout and prints its status every few seconds until it is promoted
/// or rolled back, or `bound` passed; returns the last state and when it was seen.
fn watch_rollout(
    agent: &Agent,
    seen: &Mutex<(usize, usize, usize)>,
    bound: Duration,
    form: Form,
) -> Result<(String, Duration)> {
    agent.cli(&["rollout", "start", "web"])?;
    let started = Instant::now();
    let every = Duration::from_secs(if form.quick { 1 } else { 3 });
    let mut last = (0, 0);
    loop {
        std::thread::sleep(every);
        println!("\n{}", agent.cli(&["status", "web"])?);
        let (stable, canary, _) = *seen.lock().unwrap();
        let (ds, dc) = (stable - last.0, canary - last.1);
        last = (stable, canary);
        if ds + dc > 0 {
            println!(
                "  client, last {} s: {} new connections, {:.1}% canary",
                every.as_secs(),
                ds + dc,
                100.0 * dc as f64 / (ds + dc) as f64
            );
        }
        let json = agent.status()?;
        let state = json["services"][0]["rollout"]["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if state == "promoted" || state == "rolled-back" || started.elapsed() > bound {
            println!("lab: rollout {state}");
            println!("\nhistory:\n{}", agent.cli(&["history", "web"])?);
            return Ok((state, started.elapsed()));
        }
    }
}

/// Target versus observed canary share at several weights, hash and exact mode.
/// Done when every share is within its bound: for hash mode 4 binomial standard
/// deviations of the connection count, for exact mode one connection per CPU (the
/// smooth counter is per CPU) plus one.
pub fn traffic_split(form: Form) -> Result<()> {
    let backend = form.bins()?;
    let topo = Topology::build()?;
    let _backends = topo.start_backends(&backend)?;
    topo.client
        .run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])?;
    let services = ["hash", "exact"]
        .iter()
        .enumerate()
        .map(|(i, mode)| {
            lab_service(
                mode,
                80 + i as u16,
                BANNER_PORT,
                &format!("mode = \"{mode}\""),
            )
        })
        .collect::<String>();
    let agent = Agent::start(&topo.node, &services, &[])?;
    let sources = topo.add_client_addrs(16)?;
    let (n, weights): (usize, &[&str]) = if form.quick {
        (1_000, &["5", "50"])
    } else {
        (5_000, &["1", "5", "10", "25", "50", "90"])
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{:<6} {:>8} {:>10} {:>10} {:>8} {:>8}",
        "mode", "target", "observed", "error", "bound", "conns"
    );
    let mut round = 0;
    let mut worst: Option<String> = None;
    for weight in weights {
        for (i, mode) in ["hash", "exact"].iter().enumerate() {
            agent.cli(&["set-weight", mode, weight])?;
            // A fresh source address per round: no 5-tuple reuse across rounds.
            let source: IpAddr = sources[round % sources.len()];
            round += 1;
            let target = SocketAddr::new(VIP_V4.into(), 80 + i as u16);
            let r = topo
                .client
                .enter(|| banner_connections(target, n, 32, &[source], Duration::from_secs(5)))?;
            let target_pct: f64 = weight.parse()?;
            if r.failed() > 0 {
                return verdict(
                    "test-traffic-split",
                    Err(anyhow::anyhow!("{mode} at {weight}%: {:?}", r.failures)),
                );
            }
            let observed = 100.0 * r.count("canary") as f64 / n as f64;
            let p = target_pct / 100.0;
            let bound = if *mode == "hash" {
                400.0 * (p * (1.0 - p) / n as f64).sqrt()
            } else {
                100.0 * (cpus + 1) as f64 / n as f64
            };
            let error = observed - target_pct;
            println!(
                "{mode:<6} {target_pct:>7.2}% {observed:>9.2}% {error:>+9.2} {bound:>8.2}  {n:>7}"
            );
            if error.abs() > bound && worst.is_none() {
                worst = Some(format!(
                    "{mode} at {target_pct}%: observed {observed:.2}%, off by {error:+.2} points, bound {bound:.2}"
                ));
            }
        }
    }
    verdict(
        "test-traffic-split",
        match worst {
            Some(w) => Err(anyhow::anyhow!(w)),
            None => Ok(format!(
                "{} weights x 2 modes x {n} connections, every share within its bound",
                weights.len()
            )),
        },
    )
}

/// The canary's policy in the failure scenarios: the seed's error-rate and p99
/// metrics and its error-spike rule, a first step short enough for a lab run.
const FAILURE_POLICY: &str = r#"step = [ { at = 0, weight = 10 }, { at = "5s", weight = 50 }, { at = "10m", weight = 100 } ]
[[metric]]
name = "error-rate"
threshold = 1.05
window = "60s"
[[metric]]
name = "latency-p99"
threshold = 1.2
window = "60s"
[[rule]]
name = "error-spike"
when = "error-rate > baseline * 1.5"
action = "immediate-rollback"
"#;

/// Requests per second in the failure scenarios: enough that a healthy canary at
/// 10 % passes its first step's analysis within the reach bound below.
const FAILURE_RPS: u32 = 400;

/// Both backends answer after this long, as a real service takes some time: the
/// scheduling jitter of a busy lab machine (a few ms) is then noise, not a 20 %
/// p99 regression of the less loaded canary process.
const SERVICE_TIME_MS: u64 = 50;
/// ... plus an exponential tail of this mean. Latencies need a tail, as a real
/// service's have: with every response in one histogram bucket (or under a hard
/// bound), stable has no responses above its p99 to compare the canary's with, and
/// latency-p99 could never pass a step.
const SERVICE_JITTER_MS: u64 = 5;

/// The seed's rollback check: a rollout under steady HTTP load until its second
/// step, a 5xx fault injected into canary there, then what the agent did, with the
/// load running until the canary is rolled back or a bound passed. The scenario
/// fails when the rollout never reaches the second step (saying why), or the
/// canary is not rolled back. With `verify` it also fails unless a named rule
/// rolled back, stable answered every request without error and no request failed
/// at the connection level.
pub fn failures(verify: bool, form: Form) -> Result<()> {
    let target = if verify {
        "verify-rollback"
    } else {
        "simulate-failures"
    };
    let backend = form.bins()?;
    let topo = Topology::build()?;
    let _backends = topo.start_backends(&backend)?;
    let service = lab_service("web", 80, HTTP_PORT, "policy = \"policy.toml\"");
    let agent = Agent::start_with_files(
        &topo.node,
        &service,
        &[("policy.toml", FAILURE_POLICY)],
        &[],
    )?;
    print!(
        "{}",
        agent.cli(&["check", &agent.config.to_string_lossy()])?
    );
    let vip = SocketAddr::new(VIP_V4.into(), 80);
    let canary_admin = SocketAddr::new(CANARY_V4.into(), ADMIN_PORT);
    for version in [STABLE_V4, CANARY_V4] {
        topo.client.enter(|| {
            set_faults(
                SocketAddr::new(version.into(), ADMIN_PORT),
                &Faults {
                    extra_latency_ms: SERVICE_TIME_MS,
                    latency_jitter_ms: SERVICE_JITTER_MS,
                    ..Default::default()
                },
            )
        })?;
    }
    // Bounds: the second step must be reached within `reach`, the rollback must
    // follow within `react`; the load's own bound covers both.
    let reach = Duration::from_secs(90);
    let react = Duration::from_secs(30);
    let stop = Arc::new(AtomicBool::new(false));
    println!(
        "lab: {FAILURE_RPS} requests/s over 64 keep-alive connections (backends answer in {SERVICE_TIME_MS} ms + an exponential tail of mean {SERVICE_JITTER_MS} ms) until the canary is rolled back (at most {} s)",
        (reach + react).as_secs()
    );
    let (scenario, report) = std::thread::scope(|scope| -> Result<_> {
        let load = scope.spawn(|| {
            topo.client
                .enter(|| http_load_until(vip, "/", FAILURE_RPS, reach + react, 64, &stop))
        });
        let scenario = drive_failure(&agent, &topo, canary_admin, reach, react);
        stop.store(true, Ordering::Relaxed);
        let report = load.join().expect("load thread");
        Ok((scenario, report?))
    })?;
    println!("{}", agent.cli(&["status", "web"])?);
    println!("history:\n{}", agent.cli(&["history", "web"])?);
    let stable = topo
        .client
        .enter(|| scrape_metrics(SocketAddr::new(STABLE_V4.into(), ADMIN_PORT)))?;
    let stable_errors =
        metric_value(&stable, "lab_requests_total", &[("code", "503")]).unwrap_or(0.0);
    let failed = report.failed();
    println!(
        "client: {} requests, by status {:?}, by version {:?}, {failed} failed at the connection level; stable 503s: {stable_errors}",
        report.sent, report.by_status, report.by_version
    );
    let canary_503 = report.status(503);
    verdict(
        target,
        scenario.and_then(|(reached, reacted, reason)| {
            let summary = format!(
                "second step reached after {reached:.1} s, 50 % 5xx injected into canary, rolled back {reacted:.1} s later ({reason}); canary served {canary_503} 503s, stable {stable_errors}; {failed} requests failed"
            );
            if verify {
                ensure!(reason.contains("fired"), "no rule named: {summary}");
                ensure!(stable_errors == 0.0, "stable answered errors: {summary}");
                ensure!(failed == 0, "requests failed at the connection level: {summary}");
            }
            Ok(summary)
        }),
    )
}

/// Waits for the rollout's second step, injects the fault, waits for the rollback.
/// Returns the seconds to each and the rollback's reason, or why the scenario did
/// not take place.
fn drive_failure(
    agent: &Agent,
    topo: &Topology,
    canary_admin: SocketAddr,
    reach: Duration,
    react: Duration,
) -> Result<(f64, f64, String)> {
    agent.cli(&["rollout", "start", "web"])?;
    let started = Instant::now();
    let mut last_print = Instant::now();
    let reached = loop {
        std::thread::sleep(Duration::from_millis(250));
        let status = agent.status()?;
        let service = &status["services"][0];
        let r = &service["rollout"];
        if r["step"].as_u64() >= Some(1) {
            println!(
                "lab: rollout at step 2 ({} bp) after {:.1} s; the analysis that let it through:",
                r["weight_bp"],
                started.elapsed().as_secs_f64()
            );
            for a in service["analysis"].as_array().into_iter().flatten() {
                println!("  {}: {}: {}", a["metric"], a["verdict"], a["reason"]);
            }
            println!("lab: injecting 50 % 5xx into canary");
            break started.elapsed().as_secs_f64();
        }
        if r["state"] != "progressing" {
            bail!(
                "the rollout is {} before its second step: {}",
                r["state"],
                r["reason"]
            );
        }
        if started.elapsed() > reach {
            bail!(
                "the rollout never reached its second step in {} s: holding: {}; analysis: {}",
                reach.as_secs(),
                r["holding"],
                service["analysis"]
            );
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            println!(
                "lab: {:.0} s at step 1, holding: {}",
                started.elapsed().as_secs_f64(),
                r["holding"]
            );
        }
    };
    topo.client.enter(|| {
        set_faults(
            canary_admin,
            &Faults {
                error_rate: 0.5,
                extra_latency_ms: SERVICE_TIME_MS,
                latency_jitter_ms: SERVICE_JITTER_MS,
                ..Default::default()
            },
        )
    })?;
    let injected = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let status = agent.status()?;
        let r = &status["services"][0]["rollout"];
        if r["state"] == "rolled-back" {
            // The rule's name; its numbers are in the status and history above.
            let reason = r["reason"].as_str().unwrap_or("");
            let reason = reason.split(':').next().unwrap_or(reason).to_string();
            return Ok((reached, injected.elapsed().as_secs_f64(), reason));
        }
        if injected.elapsed() > react {
            bail!(
                "the canary was not rolled back within {} s of the fault: {}",
                react.as_secs(),
                r
            );
        }
    }
}
