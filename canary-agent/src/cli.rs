//! The `canary` command line: `agent` runs the daemon, the other commands talk to a
//! running agent over its control socket.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::{
    api::{self, Request, RolloutAction, Status},
    config::{self, Config},
    controller::{Clock, Event, ScaledClock, SystemClock},
    policy::{self, percent},
    units::{format_ms, round},
};

#[derive(Debug, Parser)]
#[command(name = "canary", version, about = "Kernel-level canary deployments")]
pub struct Cli {
    /// Control socket of the agent (default: the config's control_socket, else
    /// /run/canary/agent.sock).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Agent configuration file (TOML).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load the datapath, apply --config, serve the control API.
    Agent {
        /// Run rollout schedules N times faster than real time (labs and demos).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        time_scale: u32,
    },
    /// Validate a config or policy file without touching the datapath and print
    /// the resolved plan.
    Check { file: PathBuf },
    /// Rollout commands.
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// Pause automatic progression.
    Pause {
        service: String,
        #[arg(long, default_value = "paused by operator")]
        reason: String,
    },
    /// Resume progression; overriding an analysis pause needs --reason.
    Resume {
        service: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Approve the stage gate a rollout is waiting at.
    Approve {
        service: String,
        /// Why, for the history.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Go to the next step now, or with --full straight to 100 %.
    Promote {
        service: String,
        #[arg(long)]
        full: bool,
        /// Why, for the history.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Emergency rollback: canary weight 0 in one map write.
    Rollback {
        service: String,
        #[arg(long, default_value = "emergency rollback by operator")]
        reason: String,
    },
    /// A service's rollout transitions.
    History {
        service: String,
        #[arg(long)]
        json: bool,
    },
    /// Set a service's canary share, 0 to 100 percent in steps of 0.01.
    SetWeight {
        service: String,
        #[arg(value_parser = parse_percent)]
        percent: u16,
        /// Why, for the history (while a rollout runs).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Write a self-contained HTML report (inline SVG plots, no script) of a service's
    /// latest rollout from the event log and per-second series in the agent's
    /// state_dir (--config's, else /var/lib/canary). Needs no running agent.
    Report {
        service: String,
        /// Output file, e.g. web-report.html.
        #[arg(long)]
        out: PathBuf,
        /// State directory to read instead of the config's.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Re-read the agent's config file and apply it without a restart (as SIGHUP
    /// does); a bad config is refused whole and the running one stays.
    Reload,
    /// Detach the datapath from every interface, remove its pins and the agent's
    /// state. Stops a running agent first. Needs --config.
    Uninstall,
    /// Show services, weights and per-backend counters.
    Status {
        service: Option<String>,
        #[arg(long)]
        json: bool,
        /// Redraw every second until interrupted.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
        /// The fleet instead: its leader and each node's weights and heartbeat.
        #[arg(long, conflicts_with = "json")]
        fleet: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutCmd {
    /// Begin the service's rollout policy from its first step.
    Start { service: String },
}

/// Parses "12.5" or "12.5%" into basis points.
pub fn parse_percent(s: &str) -> Result<u16, String> {
    let n = s.strip_suffix('%').unwrap_or(s);
    let v: f64 = n
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number (expected a percentage such as 12.5)"))?;
    crate::units::percent_to_bp(v)
}

impl Cli {
    fn socket(&self) -> Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        match &self.config {
            Some(path) => Ok(Config::load(path)?.agent.control_socket),
            None => Ok(config::DEFAULT_SOCKET.into()),
        }
    }
}

pub fn run(cli: Cli) -> ExitCode {
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("canary: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Agent { time_scale } => {
            let path = cli
                .config
                .clone()
                .context("`canary agent` needs --config FILE")?;
            let mut config = Config::load(&path)?;
            if let Some(s) = &cli.socket {
                config.agent.control_socket = s.clone();
            }
            init_tracing();
            let clock: std::sync::Arc<dyn Clock> = if *time_scale == 1 {
                std::sync::Arc::new(SystemClock)
            } else {
                let start = crate::agent::last_clock_ms(&config.agent.state_dir)
                    .unwrap_or(0)
                    .max(SystemClock.now_ms());
                tracing::info!(
                    factor = time_scale,
                    "rollout clock runs faster than real time"
                );
                std::sync::Arc::new(ScaledClock::starting_at(start, *time_scale))
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(crate::daemon::run(config, clock))
        }
        Command::Check { file } => {
            print!("{}", check(file)?);
            Ok(())
        }
        Command::Rollout(RolloutCmd::Start { service }) => {
            rollout(&cli, service, RolloutAction::Start)
        }
        Command::Pause { service, reason } => rollout(
            &cli,
            service,
            RolloutAction::Pause {
                reason: reason.clone(),
            },
        ),
        Command::Resume { service, reason } => rollout(
            &cli,
            service,
            RolloutAction::Resume {
                reason: reason.clone(),
            },
        ),
        Command::Approve { service, reason } => rollout(
            &cli,
            service,
            RolloutAction::Approve {
                reason: reason.clone(),
            },
        ),
        Command::Promote {
            service,
            full,
            reason,
        } => rollout(
            &cli,
            service,
            RolloutAction::Promote {
                full: *full,
                reason: reason.clone(),
            },
        ),
        Command::Report {
            service,
            out,
            state_dir,
        } => {
            let dir = match (state_dir, &cli.config) {
                (Some(dir), _) => dir.clone(),
                (None, Some(path)) => Config::load(path)?.agent.state_dir,
                (None, None) => config::DEFAULT_STATE_DIR.into(),
            };
            let html = crate::ui::report::from_state_dir(&dir, service, SystemClock.now_ms())?;
            write_report(out, html.as_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{service}: report written to {}", out.display());
            Ok(())
        }
        Command::Rollback { service, reason } => rollout(
            &cli,
            service,
            RolloutAction::Rollback {
                reason: reason.clone(),
            },
        ),
        Command::History { service, json } => {
            let v = api::call(
                &cli.socket()?,
                &Request::History {
                    service: service.clone(),
                },
            )?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let events: Vec<Event> = serde_json::from_value(v)?;
                print!("{}", render_history(&events));
            }
            Ok(())
        }
        Command::SetWeight {
            service,
            percent,
            reason,
        } => {
            let v = api::call(
                &cli.socket()?,
                &Request::SetWeight {
                    service: service.clone(),
                    weight_bp: *percent,
                    by: operator(),
                    reason: reason.clone(),
                },
            )?;
            let status: Status = serde_json::from_value(v)?;
            println!("{service}: canary weight {}%", status.services[0].weight);
            Ok(())
        }
        Command::Reload => {
            let v = api::call(&cli.socket()?, &Request::Reload)?;
            let changes: Vec<String> = serde_json::from_value(v["changes"].clone())?;
            if changes.is_empty() {
                println!("reloaded: nothing changed");
            }
            for change in changes {
                println!("reloaded: {change}");
            }
            Ok(())
        }
        Command::Uninstall => uninstall(&cli),
        Command::Status {
            service,
            json,
            watch,
            fleet,
        } => {
            let request = Request::Status {
                service: service.clone(),
            };
            if *json {
                let v = api::call(&cli.socket()?, &request)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            loop {
                let status: Status = serde_json::from_value(api::call(&cli.socket()?, &request)?)?;
                let text = if *fleet {
                    let fleet = status
                        .fleet
                        .as_ref()
                        .context("this agent runs on its own: its config has no [fleet] section")?;
                    render_fleet(fleet)
                } else {
                    render_status(&status)
                };
                if !*watch {
                    print!("{text}");
                    return Ok(());
                }
                // Clear the screen and redraw, like watch(1).
                print!("\x1b[2J\x1b[H{text}");
                std::io::Write::flush(&mut std::io::stdout())?;
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}

/// Writes a report where the operator said, as root: never through a link planted at
/// that name, and only into a regular file (a FIFO or device there is refused).
fn write_report(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => anyhow::anyhow!("it is a symbolic link: not followed"),
            _ => e.into(),
        })?;
    if !file.metadata()?.is_file() {
        bail!("not a regular file");
    }
    file.set_len(0)?;
    file.write_all(bytes)?;
    Ok(())
}

/// `canary status --fleet`: who leads, and every node's weights and heartbeat.
fn render_fleet(fleet: &api::FleetStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let leader = fleet.leader.as_deref().unwrap_or("(none elected)");
    let _ = writeln!(out, "fleet leader: {leader}   (asked: {})", fleet.node);
    if let Some(e) = &fleet.error {
        let _ = writeln!(out, "  {e}");
    }
    for node in &fleet.nodes {
        let weights: Vec<String> = node
            .weights
            .iter()
            .map(|(svc, bp)| format!("{svc} {}%", crate::units::bp_to_percent(*bp)))
            .collect();
        let lag = node.apply_lag_ms.map_or(String::new(), |ms| {
            format!(", last weight applied {ms} ms after the decision")
        });
        let region = match (&node.region, &node.zone) {
            (Some(r), Some(z)) => format!("  region {r}/{z}"),
            (Some(r), None) => format!("  region {r}"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  {:<16}{region} heartbeat {:.1}s ago   weights: {}   (revision {}{lag})",
            node.name,
            node.heartbeat_age_s,
            weights.join(", "),
            node.weights_revision,
        );
    }
    out
}

/// Stops a running agent (which detaches as it exits), then removes whatever is left
/// of the datapath's pins and the agent's state, so an agent that is not running can
/// be uninstalled too.
fn uninstall(cli: &Cli) -> Result<()> {
    let path = cli
        .config
        .clone()
        .context("`canary uninstall` needs --config FILE (it names bpffs_dir and state_dir)")?;
    let config = Config::load(&path)?;
    let socket = cli
        .socket
        .clone()
        .unwrap_or(config.agent.control_socket.clone());
    let mut detached = Vec::new();
    if let Ok(answer) = api::call(&socket, &Request::Uninstall) {
        // The running agent detaches these as it exits; a bounded wait for that.
        detached = serde_json::from_value(answer["interfaces"].clone()).unwrap_or_default();
        for _ in 0..100 {
            if !socket.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    for iface in crate::agent::uninstall(&config.agent.bpffs_dir, &config.agent.state_dir)? {
        if !detached.contains(&iface) {
            detached.push(iface);
        }
    }
    println!(
        "uninstalled: datapath detached{}, pins in {} and state in {} removed",
        if detached.is_empty() {
            String::new()
        } else {
            format!(" from {}", detached.join(", "))
        },
        config.agent.bpffs_dir.display(),
        config.agent.state_dir.display()
    );
    Ok(())
}

/// Who the operator is, for the event log.
fn operator() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "operator".into())
}

fn rollout(cli: &Cli, service: &str, action: RolloutAction) -> Result<()> {
    let v = api::call(
        &cli.socket()?,
        &Request::Rollout {
            service: service.into(),
            action,
            by: operator(),
        },
    )?;
    print!("{}", render_status(&serde_json::from_value(v)?));
    Ok(())
}

/// `canary check`: an agent config (validated with each service's policy) or a
/// policy file on its own, rendered as the plan it resolves to.
pub fn check(file: &std::path::Path) -> Result<String> {
    let is_agent_config = file.extension().is_some_and(|e| e == "toml")
        && std::fs::read_to_string(file)
            .with_context(|| format!("reading {}", file.display()))?
            .lines()
            .any(|l| l.trim() == "[agent]" || l.trim() == "[[service]]");
    if !is_agent_config {
        let policy = policy::load_policy(file)?;
        return Ok(format!(
            "{}: valid policy\n{}{}",
            file.display(),
            policy.render_plan(),
            pass_needs(&policy)
        ));
    }
    let config = Config::load(file)?;
    let mut out = format!(
        "{}: valid agent config, {} service(s) on {}\n",
        file.display(),
        config.services.len(),
        config.agent.interfaces.join(", ")
    );
    for svc in &config.services {
        out += &format!(
            "\nservice {} {} ({} stable, {} canary), initial weight {}\n",
            svc.name,
            svc.listen,
            svc.stable.len(),
            svc.canary.len(),
            percent(svc.weight_bp)
        );
        if let Some(path) = &svc.policy {
            let policy = policy::load_policy(path)
                .map_err(|e| anyhow::anyhow!("service {:?}: policy: {e}", svc.name))?;
            crate::router::check_service(svc, &policy).map_err(|e| anyhow::anyhow!(e))?;
            out += &policy.render_plan();
            out += &pass_needs(&policy);
        }
    }
    Ok(out)
}

/// Total requests per second used to turn a step's needs into time.
const REFERENCE_RPS: f64 = 100.0;

/// What each metric needs of every step that must pass before the next: the canary
/// requests a healthy canary (the same as stable) must send within the step, with 0 %
/// and 1 % errors on both versions, and the time that takes at [`REFERENCE_RPS`].
/// Flags what is unrealistic (over an hour at that rate): such thresholds hold the
/// rollout for that long, at every step that needs them.
fn pass_needs(policy: &policy::Policy) -> String {
    use crate::analysis::{metric_name, Analyzer, DEFAULT_ALPHA};
    if policy.metrics.is_empty() {
        return String::new();
    }
    let analyzer = Analyzer::new(policy.metrics.clone(), Vec::new(), DEFAULT_ALPHA)
        .with_error_floor(policy.analysis.error_floor);
    let weights: Vec<u16> = {
        let mut w: Vec<u16> = policy.steps.iter().map(|s| s.weight_bp).collect();
        w.pop(); // the last step has no next one to pass to
        w.retain(|&bp| bp > 0 && bp < 10_000);
        w.dedup();
        w
    };
    let mut out = format!(
        "Pass needs (canary requests within one step for a canary equal to stable, α = \
         {DEFAULT_ALPHA}; time at {REFERENCE_RPS:.0} req/s in all):\n"
    );
    for (i, m) in policy.metrics.iter().enumerate() {
        let name = metric_name(&m.name);
        if matches!(m.name, crate::policy::MetricName::Custom(_)) {
            out += &format!("  {name}: depends on the rate of its queries' events\n");
            continue;
        }
        for &bp in &weights {
            let share = f64::from(bp) / 10_000.0;
            let mut parts = Vec::new();
            let mut unrealistic = false;
            let rates: &[f64] = if m.name == crate::policy::MetricName::LatencyP99 {
                &[0.0]
            } else {
                &[0.0, 0.01]
            };
            for &errors in rates {
                let what = if m.name == crate::policy::MetricName::LatencyP99 {
                    "with 1% of both ten times slower".to_string()
                } else {
                    format!("with {:.0}% errors", errors * 100.0)
                };
                match analyzer.requests_to_pass(i, share, errors) {
                    Some(n) => {
                        let secs = n as f64 / (share * REFERENCE_RPS);
                        unrealistic |= secs > 3600.0;
                        parts.push(format!("{n} {what} ({})", duration_text(secs)));
                    }
                    None => {
                        unrealistic = true;
                        parts.push(format!("over 10^9 {what}"));
                    }
                }
            }
            out += &format!(
                "  {name} at {}: {}{}\n",
                percent(bp),
                parts.join(", "),
                if unrealistic {
                    "  [unrealistic: the threshold cannot be shown at this rate within an hour]"
                } else {
                    ""
                }
            );
        }
    }
    out
}

/// 42 → "42 s", 5400 → "1.5 h".
fn duration_text(secs: f64) -> String {
    match secs {
        s if s < 120.0 => format!("{s:.0} s"),
        s if s < 7200.0 => format!("{:.0} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.0} days", s / 86_400.0),
    }
}

pub fn render_history(events: &[Event]) -> String {
    let mut out = String::new();
    for e in events {
        out += &format!(
            "{}  {:<17} -> {:<17} weight {:>7}  {}  by {}: {}\n",
            format_ms(e.at_ms),
            e.from.to_string(),
            e.to.to_string(),
            percent(e.weight_bp),
            e.stage.as_deref().unwrap_or("-"),
            serde_json::to_value(&e.actor)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            e.reason
        );
    }
    out
}

/// "  fired by window (20 s)" for a Fail's statistic, empty otherwise.
fn fired_by(statistic: &serde_json::Value) -> String {
    let num = |k: &str| statistic[k].as_u64().unwrap_or(0);
    match statistic["statistic"].as_str() {
        Some("window") => format!("  fired by window ({} s)", num("span_s")),
        Some("from-start") => format!("  fired by from-start e-process ({} s)", num("age_s")),
        Some("change") => format!(
            "  fired by change detector (change since t = {} s, {} s ago)",
            num("since_s"),
            num("age_s")
        ),
        _ => String::new(),
    }
}

/// A 30-character bar for a fraction in 0..=1.
fn bar(fraction: f64) -> String {
    let filled = (fraction.clamp(0.0, 1.0) * 30.0).round() as usize;
    format!("[{}{}]", "#".repeat(filled), "-".repeat(30 - filled))
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

/// Human-readable status table.
pub fn render_status(status: &Status) -> String {
    let mut out = String::new();
    for s in &status.services {
        out += &format!(
            "{} {}/{}  canary {}%  mode {}  sticky {}\n",
            s.name, s.listen, s.protocol, s.weight, s.mode, s.sticky
        );
        out += &format!(
            "  {:<7} {:<28} {:>10} {:>12} {:>12} {:>14} {:>14}\n",
            "group", "backend", "conns", "pkts in", "pkts out", "bytes in", "bytes out"
        );
        if let Some(r) = &s.rollout {
            let step = r
                .step
                .map(|i| format!("{}/{}", i + 1, r.steps))
                .unwrap_or("-".into());
            out += &format!(
                "  rollout {} stage {} step {}  {} {}",
                r.state,
                r.stage.as_deref().unwrap_or("-"),
                step,
                bar(r.weight_bp as f64 / 10_000.0),
                percent(r.weight_bp)
            );
            if let Some(t) = r.next_step_in_s {
                out += &format!("  next step in {t:.0}s");
            }
            out += &format!("\n  reason: {}\n", r.reason);
            if let Some(w) = &r.wave {
                out += &format!(
                    "  wave {}/{}: regions {} (the others wait at 0 %, the earlier ones stay at 100 %)\n",
                    w.index + 1,
                    w.of,
                    w.regions.join(", ")
                );
            }
            if let Some(left) = r.verify_left_s {
                out += &format!("  verifying: {left:.0}s left at 100 %\n");
            }
            if let Some(b) = &s.baseline {
                out += &format!("  judged against {b}\n");
            }
            if let Some(ret) = &r.retiring {
                out += &format!(
                    "  retiring: {} old-version connections open ({}, {:.0}s to the timeout)\n",
                    ret.remaining,
                    ret.connections.as_str(),
                    ret.timeout_in_s
                );
            }
            if let Some(g) = &r.waiting_gate {
                let what = if g.stage.starts_with("wave ") {
                    ""
                } else {
                    "stage "
                };
                out += &format!(
                    "  gate: {what}{} waits for approval{} ({:.0}s)\n",
                    g.stage,
                    g.webhook
                        .as_deref()
                        .map(|w| format!(" or webhook {w}"))
                        .unwrap_or_default(),
                    g.waiting_s
                );
            }
            if let Some(h) = &r.holding {
                out += &format!("  holding: {h}\n");
            }
        }
        if s.draining {
            out += "  draining: closing canary connections at request boundaries\n";
        }
        for v in &s.analysis {
            out += &format!(
                "  analysis {:<16} {:<13} canary {} stable {} confidence {}{}  {}\n",
                v["metric"].as_str().unwrap_or("?"),
                v["verdict"].as_str().unwrap_or("?"),
                round(&v["canary"]),
                round(&v["stable"]),
                round(&v["confidence"]),
                fired_by(&v["fired_by"]),
                v["reason"].as_str().unwrap_or("")
            );
        }
        for b in &s.backends {
            out += &format!(
                "  {:<7} {:<28} {:>10} {:>12} {:>12} {:>14} {:>14}\n",
                b.group,
                b.address,
                b.connections,
                b.packets_in,
                b.packets_out,
                b.bytes_in,
                b.bytes_out
            );
            if b.source != b.address {
                out += &format!("          from {}\n", b.source);
            }
            if let Some(h) = b
                .health
                .as_ref()
                .filter(|h| h.state != "up" || h.failures > 0 || h.ejections > 0)
            {
                out += &format!("          health {}: {}\n", h.state, h.reason);
            }
        }
        if let Some(check) = &s.health_check {
            out += &format!("  health checks: {check}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_never_written_through_a_link() {
        let dir = std::env::temp_dir().join(format!("canary-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let out = dir.join("report.html");
        std::os::unix::fs::symlink(&victim, &out).unwrap();
        let e = write_report(&out, b"<html>").unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        std::fs::remove_file(&out).unwrap();
        std::fs::write(&out, "a much longer old report").unwrap();
        write_report(&out, b"<html>").unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "<html>");
        assert!(write_report(&dir, b"x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("canary").chain(args.iter().copied()))
    }

    #[test]
    fn set_weight_accepts_hundredths() {
        let cli = parse(&["set-weight", "web", "12.34"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::SetWeight { percent: 1234, .. }
        ));
        let cli = parse(&["--socket", "/tmp/s", "set-weight", "web", "5%"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::SetWeight { percent: 500, .. }
        ));
        assert_eq!(cli.socket.as_deref(), Some(std::path::Path::new("/tmp/s")));
    }

    #[test]
    fn bad_arguments_are_errors_that_say_why() {
        let e = parse(&["set-weight", "web", "100.5"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("between 0 and 100"), "{e}");
        let e = parse(&["set-weight", "web", "1.001"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("two decimals"), "{e}");
        let e = parse(&["set-weight", "web", "ten"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a number"), "{e}");
        assert!(parse(&["set-weight", "web"]).is_err());
        assert!(parse(&["status", "--jsn"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
    }

    #[test]
    fn verdict_numbers_are_rounded_for_people() {
        use serde_json::json;
        assert_eq!(round(&json!(0.012345678)), "0.01235");
        assert_eq!(round(&json!(0.99999871)), "1.0000");
        assert_eq!(round(&json!(123.456789)), "123.5");
        assert_eq!(round(&json!(0.0)), "0");
        assert_eq!(round(&json!(null)), "-");
    }

    #[test]
    fn agent_without_config_is_a_clear_error() {
        let err = execute(parse(&["agent"]).unwrap()).unwrap_err().to_string();
        assert!(parse(&["agent", "--time-scale", "0"]).is_err());
        assert!(err.contains("needs --config"), "{err}");
    }

    /// A config with one service `web` of `protocol` under the routing fixture policy.
    fn agent_config(dir: &std::path::Path, protocol: &str) -> std::path::PathBuf {
        let fixture =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/routing.scm");
        let path = dir.join(format!("agent-{protocol}.toml"));
        std::fs::write(
            &path,
            format!(
                "[agent]\ninterface = \"eth0\"\n[[service]]\nname = \"web\"\n\
                 listen = \"198.19.0.10:80\"\nprotocol = \"{protocol}\"\n\
                 stable = [\"198.18.2.2:8080\"]\ncanary = [\"198.18.3.2:8080\"]\n\
                 policy = {:?}\n",
                fixture.display().to_string()
            ),
        )
        .unwrap();
        path
    }

    #[test]
    fn request_rules_need_an_http_service_and_check_prints_the_plan() {
        let dir = std::env::temp_dir().join(format!("canary-router-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for protocol in ["tcp", "udp"] {
            let err = check(&agent_config(&dir, protocol))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("service \"web\" is protocol = \"{protocol}\""))
                    && err.contains("routing.scm has request routing rules"),
                "{err}"
            );
        }
        // A plan of client-cidr and default cohorts needs no head: fine on tcp too.
        let cidr = dir.join("cidr.scm");
        std::fs::write(
            &cidr,
            "(define-progression '((0 . 1)))\n\
             (define-cohorts '((office (client-cidr . (\"10.0.0.0/8\")))))\n\
             (define-user-cohorts '((office . canary)))\n",
        )
        .unwrap();
        let tcp = std::fs::read_to_string(agent_config(&dir, "tcp"))
            .unwrap()
            .replace("policy = ", "policy = \"cidr.scm\"\n#");
        let tcp_path = dir.join("agent-cidr.toml");
        std::fs::write(&tcp_path, tcp).unwrap();
        let plan = check(&tcp_path).unwrap();
        assert!(plan.contains("decided in the kernel"), "{plan}");
        let plan = check(&agent_config(&dir, "http")).unwrap();
        assert!(
            plan.contains("Routing (decided per request") && !plan.contains("once per connection"),
            "{plan}"
        );
        assert!(
            plan.contains("beta-users       header X-User-Group is \"beta\" -> canary"),
            "{plan}"
        );
        // Routing forms alone are a valid policy: the weight is the service's.
        let only = dir.join("only.scm");
        std::fs::write(
            &only,
            "(define-header-routing '((header . \"X-Canary\") (values . (\"true\"))))\n",
        )
        .unwrap();
        let http = std::fs::read_to_string(agent_config(&dir, "http"))
            .unwrap()
            .replace("policy = ", "policy = \"only.scm\"\n#");
        let http_path = dir.join("agent-only.toml");
        std::fs::write(&http_path, http).unwrap();
        let plan = check(&http_path).unwrap();
        assert!(
            plan.contains("header X-Canary: \"true\" -> canary"),
            "{plan}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
