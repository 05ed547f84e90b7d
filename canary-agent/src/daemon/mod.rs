//! The daemon loop: ticks the rollouts, serves the control socket, /metrics and the
//! dashboard, calls webhooks, reloads on SIGHUP, and exits on SIGTERM/SIGINT with the
//! datapath still attached (the links are pinned): the next agent takes it over
//! without a gap. SIGUSR2 hands over to the binary now at the agent's path (an
//! upgrade, or the same binary) by re-executing in place, routed connections included
//! (`router::handover`).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::agent::{lock, Agent, GateCall};

mod control;
mod discovery;
mod health;
use crate::{
    config::Config,
    controller::{Actor, Clock, Command},
};

/// How often the controller is ticked (real time; `--time-scale` speeds the clock).
const TICK: Duration = Duration::from_millis(100);
/// The liveness probe fails once the loop has not ticked for this long.
const STALL_MS: u64 = 5_000;
/// Pause between two calls of a gate webhook that did not approve.
const WEBHOOK_RETRY: Duration = Duration::from_secs(2);

/// Runs the agent until SIGTERM or SIGINT (or an uninstall request).
pub async fn run(config: Config, clock: Arc<dyn Clock>) -> Result<()> {
    // Taken now: once an upgrade has replaced the file, /proc/self/exe names the old,
    // deleted one.
    let exe = std::env::current_exe().context("finding the agent's own executable")?;
    raise_open_file_limit();
    let socket = config.agent.control_socket.clone();
    // The dashboard's token is checked now: a world-readable token file is an error
    // to fix, not a dashboard to serve.
    if let Some(path) = &config.agent.ui_token_file {
        crate::config::load_ui_token(path).map_err(|e| anyhow!("[agent] ui_token_file: {e}"))?;
    }
    let ui_listener = match config.agent.ui_listen {
        Some(listen) => Some(crate::ui::bind(listen).await?),
        None => None,
    };
    let listener = control::bind(&socket)?;
    let fleet = config.fleet.clone();
    let node = config.agent.node_name.clone();
    let region = config.agent.region.clone();
    // A fleet member's controller clock can be moved forward to a stored rollout's.
    let fleet_clock = fleet
        .as_ref()
        .map(|_| Arc::new(crate::fleet::FleetClock::new(clock.clone())));
    let clock: Arc<dyn Clock> = match &fleet_clock {
        Some(c) => c.clone(),
        None => clock,
    };
    let load = |config: &Config| -> Result<Box<dyn crate::datapath::Dataplane>> {
        Ok(Box::new(crate::datapath::Datapath::load(
            &config.agent.bpffs_dir,
        )?))
    };
    // Backend names are answered before the services are installed, so a restart
    // does not install a service without the addresses its names give.
    let resolver = discovery::resolver(&config.agent);
    let resolved = match &resolver {
        Ok(r) => discovery::resolve_all(r, &config).await,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "no DNS resolver: backend names stay unanswered");
            Default::default()
        }
    };
    let (dns_min, dns_max) = (config.agent.dns_min_ttl, config.agent.dns_max_ttl);
    let config = config.with_resolved(&resolved);
    let (mut agent, uninstall) = Agent::start(config, clock, load)?;
    agent.seed_resolved(resolved);
    let agent = Arc::new(Mutex::new(agent));
    if let (Some(fleet), Some(fleet_clock)) = (fleet, fleet_clock) {
        let link = crate::fleet::Link::new(&node, region.as_deref());
        lock(&agent)?.join_fleet(link.clone());
        tracing::info!(%node, endpoints = ?fleet.etcd, "joining the fleet through etcd");
        let host: crate::fleet::SharedHost = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::fleet::run(fleet, link, host, fleet_clock).await {
                tracing::error!(error = %format!("{e:#}"), "fleet membership stopped");
            }
        });
    }
    tokio::spawn(control::serve(listener, agent.clone()));
    if let Some(ui_listener) = ui_listener {
        let agent = agent.clone();
        let hosts = lock(&agent)?.config().agent.ui_hosts.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::ui::serve(ui_listener, agent, hosts).await {
                tracing::error!(error = %format!("{e:#}"), "dashboard stopped");
            }
        });
    }
    tokio::spawn(query_prometheus(agent.clone()));
    tokio::spawn(health::run(agent.clone()));
    if let Ok(resolver) = resolver {
        tokio::spawn(discovery::run(agent.clone(), resolver, dns_min, dns_max));
    }
    // Milliseconds since `started` of the loop's last tick, for the liveness probe.
    let started = std::time::Instant::now();
    let heartbeat = Arc::new(AtomicU64::new(0));
    if let Some(listen) = lock(&agent)?.config().agent.metrics_listen {
        let source = agent.clone();
        let render: crate::metrics::Render = Arc::new(move || lock(&source)?.metrics());
        let (live, ready) = (heartbeat.clone(), agent.clone());
        let probes = crate::metrics::Probes {
            // Alive while the loop ticks (each tick takes the agent's state, so a wedged
            // agent stops it), without anyone's request taking that state.
            live: Arc::new(move || {
                let age = (started.elapsed().as_millis() as u64)
                    .saturating_sub(live.load(Ordering::Relaxed));
                if age <= STALL_MS {
                    Ok("ok".to_string())
                } else {
                    Err(format!("the agent's loop has not ticked for {} ms", age))
                }
            }),
            ready: Arc::new(move || lock(&ready).map_err(|e| e.to_string())?.readiness()),
        };
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listen, render, probes).await {
                tracing::error!(error = %format!("{e:#}"), "metrics endpoint stopped");
            }
        });
    }
    tracing::info!(socket = %socket.display(), "control API listening");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut tick = tokio::time::interval(TICK);
    let exit = loop {
        tokio::select! {
            _ = term.recv() => break Exit::Stop,
            _ = int.recv() => break Exit::Stop,
            _ = uninstall.notified() => break Exit::Uninstall,
            _ = usr2.recv() => {
                let config_path = lock(&agent)?.config().path.clone();
                match check_successor(&exe, &config_path).await {
                    Ok(()) => break Exit::HandOver,
                    Err(e) => tracing::error!(error = %format!("{e:#}"), exe = %exe.display(), "hand-over refused; this agent keeps running"),
                }
            }
            _ = hup.recv() => {
                match lock(&agent)?.reload() {
                    Ok(changes) => tracing::info!(?changes, "reloaded the config (SIGHUP)"),
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "reload refused; the running config stays"),
                }
            }
            _ = tick.tick() => {
                let (calls, alerts) = {
                    let mut a = lock(&agent)?;
                    (a.tick(), a.take_alerts())
                };
                heartbeat.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                for call in calls {
                    tokio::spawn(call_gate(call, agent.clone()));
                }
                if let Some((url, alerts)) = alerts {
                    tokio::spawn(send_alerts(url, alerts));
                }
            }
        }
    };
    let (bpffs_dir, state_dir) = {
        let a = lock(&agent)?;
        (
            a.config().agent.bpffs_dir.clone(),
            a.config().agent.state_dir.clone(),
        )
    };
    if let Exit::HandOver = exit {
        let router = lock(&agent)?.take_router();
        return hand_over(&exe, router).await;
    }
    if let Exit::Stop = exit {
        // Requests in flight finish; idle connections close at a request boundary.
        let (router, grace) = {
            let mut a = lock(&agent)?;
            (a.take_router(), a.config().agent.shutdown_grace)
        };
        if let Some(r) = router {
            r.drain(grace).await?;
            tracing::info!("routed connections drained");
        }
    }
    if let Exit::Uninstall = exit {
        drop(agent);
        let detached = crate::agent::uninstall(&bpffs_dir, &state_dir)?;
        tracing::info!(
            ?detached,
            "uninstalled: programs detached, pins and state removed"
        );
    } else {
        tracing::info!(
            "exiting; the datapath stays attached with its weights and flows for the next agent \
             (`canary uninstall` detaches it)"
        );
    }
    // Last: the socket's disappearance tells `canary uninstall` the agent is done.
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
/// Every routed connection holds two sockets while it is open (and idle clients one
/// until `head_timeout`): the soft limit on open files goes up to the hard one, as
/// servers do, so the limit an operator sets is the one that applies.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    tracing::debug!(open_files = lim.rlim_cur, "open file limit");
}

/// Why the daemon loop ended.
enum Exit {
    Stop,
    Uninstall,
    HandOver,
}

/// The binary at the agent's path must accept the running config before this agent
/// gives way to it (`canary check`): a bad upgrade or config leaves this agent running.
async fn check_successor(exe: &std::path::Path, config: &std::path::Path) -> Result<()> {
    let out = tokio::process::Command::new(exe)
        .arg("check")
        .arg(config)
        .output()
        .await
        .with_context(|| format!("running {} check", exe.display()))?;
    if !out.status.success() {
        bail!(
            "{} check {}: {}",
            exe.display(),
            config.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Re-executes the agent in place (same PID, same arguments) with the router's sockets
/// kept open for the next image. Every other descriptor is close-on-exec; the datapath
/// stays attached through its pins, and the rollout state is already on disk.
async fn hand_over(exe: &std::path::Path, router: Option<crate::router::Router>) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let record = match router {
        Some(r) => r.hand_over().await?,
        None => crate::router::handover::Record::default(),
    };
    let handed = (
        record.listeners.len(),
        record.spliced.len(),
        record.pending.len(),
    );
    let fd = record.seal()?;
    tracing::info!(
        exe = %exe.display(),
        listeners = handed.0,
        spliced = handed.1,
        pending = handed.2,
        "handing over to the next agent image"
    );
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(crate::router::handover::ENV, fd)
        .exec();
    // Only reached if the exec failed; the datapath stays attached, as after a crash.
    Err(err).with_context(|| format!("exec {}", exe.display()))
}

/// Calls a gate webhook once: a 2xx approves; anything else keeps the gate waiting
/// and the call is retried after a pause.
async fn call_gate(call: GateCall, agent: Arc<Mutex<Agent>>) {
    let result = crate::webhook::post_json(&call.url, &call.payload, Duration::from_secs(5)).await;
    let approved = matches!(result, Ok(code) if (200..300).contains(&code));
    // History, status and logs name the hook without its secrets.
    let shown = crate::webhook::redact_url(&call.url);
    if !approved {
        tracing::info!(service = %call.service, url = %shown, result = ?result.as_ref().map_err(|e| e.to_string()), "gate webhook did not approve");
        tokio::time::sleep(WEBHOOK_RETRY).await;
    }
    let Ok(mut agent) = agent.lock() else { return };
    agent.gate_call_done(&call.service);
    if approved {
        let command = Command::Approve { by: shown.clone() };
        if let Err(e) = agent.rollout_command(&call.service, command, Actor::Webhook(shown)) {
            tracing::warn!(service = %call.service, error = %e, "webhook approval not applied");
        }
    }
}

/// Every second, when `prometheus_url` is set, runs each PromQL metric's events and trials queries for both
/// versions (`{version}` substituted) and hands the counts to the analysis.
async fn query_prometheus(agent: Arc<Mutex<Agent>>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        let Ok((url, jobs)) = agent
            .lock()
            .map(|a| (a.config().agent.prometheus_url.clone(), a.custom_queries()))
        else {
            return;
        };
        let Some(url) = url else { continue };
        for job in jobs {
            let mut values = [(0u64, 0u64); 2];
            let mut complete = true;
            for (v, version) in ["stable", "canary"].into_iter().enumerate() {
                for (slot, query) in [&job.query.events, &job.query.trials]
                    .into_iter()
                    .enumerate()
                {
                    let query = query.replace("{version}", version);
                    match crate::webhook::prometheus_scalar(&url, &query, Duration::from_secs(2))
                        .await
                    {
                        Ok(Some(x)) if x.is_finite() && x >= 0.0 => {
                            let n = x.round() as u64;
                            if slot == 0 {
                                values[v].0 = n
                            } else {
                                values[v].1 = n
                            }
                        }
                        Ok(_) => complete = false,
                        Err(e) => {
                            tracing::warn!(service = %job.service, metric = %job.metric, error = %format!("{e:#}"), "PromQL query");
                            complete = false;
                        }
                    }
                }
            }
            if complete {
                if let Ok(mut a) = agent.lock() {
                    a.set_custom(&job.service, &job.metric, values);
                }
            }
        }
    }
}

/// POSTs alerts one by one; a failed delivery is logged (the event log has them too).
async fn send_alerts(url: String, alerts: Vec<serde_json::Value>) {
    for alert in alerts {
        match crate::webhook::post_json(&url, &alert, Duration::from_secs(5)).await {
            Ok(code) if (200..300).contains(&code) => {}
            other => {
                tracing::warn!(url = %crate::webhook::redact_url(&url), result = ?other.map_err(|e| e.to_string()), "alert not delivered")
            }
        }
    }
}
