//! The agent's core on the fake dataplane: the config as desired state across reloads
//! and restarts, one map write per weight change, nothing half-applied when the kernel
//! refuses a write, drains, and rollouts on a simulated clock. The kernel side of the
//! same behaviour (live connections kept, removed services refused) stays in the
//! network-namespace suites (`tests/tests/lifecycle.rs`).

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use canary_common::{BackendStats, MAX_BACKENDS, MAX_GROUP_BACKENDS};

use super::Agent;
use crate::{
    api::{Request, RolloutAction, ServiceStatus},
    config::Config,
    controller::{RolloutState, SimClock},
    datapath::{
        fake::{FakeDataplane, Write},
        DrainGroup,
    },
};

/// A host for one agent: its files in a private directory, a fake kernel that
/// outlives agent restarts (as pinned maps do), and a simulated clock.
struct Host {
    dir: PathBuf,
    fake: FakeDataplane,
    clock: Arc<SimClock>,
}

const START_MS: u64 = 1_000_000;

fn service(name: &str, port: u16, extra: &str) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nlisten = \"198.18.0.10:{port}\"\nstable = [\"198.18.1.2:8080\"]\ncanary = [\"198.18.1.3:8080\"]\n{extra}\n"
    )
}

impl Host {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("canary-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test directory");
        Self {
            dir,
            fake: FakeDataplane::new(&["eth0"]),
            clock: Arc::new(SimClock::new(START_MS)),
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }

    /// Writes the config: the `[agent]` table (with `agent_extra`) and `services`.
    fn write_config(&self, agent_extra: &str, services: &str) {
        let text = format!(
            "[agent]\ninterface = \"eth0\"\ncontrol_socket = \"{d}/ctl.sock\"\nbpffs_dir = \"{d}/bpf\"\nstate_dir = \"{d}/state\"\n{agent_extra}\n{services}",
            d = self.dir.display()
        );
        std::fs::write(self.config_path(), text).expect("writing the config");
    }

    fn write_file(&self, name: &str, text: &str) {
        std::fs::write(self.dir.join(name), text).expect("writing a file");
    }

    fn start(&self) -> Result<Agent> {
        let config = Config::load(&self.config_path())?;
        let fake = self.fake.clone();
        let (agent, _uninstall) = Agent::start(config, self.clock.clone(), move |_| {
            Ok(Box::new(fake) as Box<dyn crate::datapath::Dataplane>)
        })?;
        Ok(agent)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn status(agent: &Agent, name: &str) -> Result<ServiceStatus> {
    agent
        .status(Some(name))?
        .services
        .into_iter()
        .next()
        .context("no such service in status")
}

fn weight_bp(agent: &Agent, name: &str) -> Result<u16> {
    Ok(status(agent, name)?.weight_bp)
}

fn rollout(agent: &mut Agent, name: &str, action: RolloutAction) -> Result<()> {
    agent.handle(Request::Rollout {
        service: name.into(),
        action,
        by: "test".into(),
    })?;
    Ok(())
}

fn reload(agent: &mut Agent) -> Result<String> {
    let reply = agent.handle(Request::Reload)?;
    Ok(reply.to_string())
}

const TWO_STEPS: &str = "step = [{ at = 0, weight = 20 }, { at = \"1h\", weight = 100 }]\n";

#[test]
fn the_config_is_the_desired_state_across_restarts() -> Result<()> {
    let host = Host::new("desired");
    host.write_file("web.toml", TWO_STEPS);
    let other = service("other", 81, "weight = 50");
    host.write_config(
        "",
        &(service("web", 80, "weight = 10\npolicy = \"web.toml\"") + &other),
    );
    let mut agent = host.start()?;
    rollout(&mut agent, "web", RolloutAction::Start)?;
    rollout(
        &mut agent,
        "web",
        RolloutAction::Rollback {
            reason: "test".into(),
        },
    )?;
    assert_eq!(weight_bp(&agent, "web")?, 0);
    drop(agent);

    // Restarted with the same weight and no policy: the rolled-back rollout is gone
    // with its policy, and the config's 10 % applies (stale state must not win).
    let plain = service("web", 80, "weight = 10") + &other;
    host.write_config("", &plain);
    let mut agent = host.start()?;
    let web = status(&agent, "web")?;
    assert_eq!(web.weight_bp, 1000, "{web:?}");
    assert!(
        web.rollout.is_none(),
        "a rollout survived its policy: {web:?}"
    );

    // An operator's weight survives a restart while the config is unchanged.
    agent.handle(Request::SetWeight {
        service: "web".into(),
        weight_bp: 1500,
        by: "test".into(),
        reason: String::new(),
    })?;
    drop(agent);
    let mut agent = host.start()?;
    assert_eq!(weight_bp(&agent, "web")?, 1500);

    // A changed config weight applies on reload, and says so.
    host.write_config("", &plain.replace("weight = 10", "weight = 30"));
    let out = reload(&mut agent)?;
    assert!(out.contains("web: weight 15% -> 30%"), "{out}");
    assert_eq!(weight_bp(&agent, "web")?, 3000);
    assert_eq!(
        host.fake
            .service(status_id(&agent, "web")?)
            .map(|v| v.weight_bp),
        Some(3000)
    );

    // The policy comes back: a fresh pending rollout, nothing of the old one.
    host.write_config(
        "",
        &service("web", 80, "weight = 30\npolicy = \"web.toml\""),
    );
    let out = reload(&mut agent)?;
    assert!(out.contains("other: removed"), "{out}");
    let web = status(&agent, "web")?;
    assert_eq!(web.weight_bp, 3000, "{web:?}");
    assert_eq!(
        web.rollout.as_ref().map(|r| r.state),
        Some(RolloutState::Pending),
        "{web:?}"
    );
    // The removed service left the map.
    assert_eq!(host.fake.state().services.len(), 1);
    Ok(())
}

fn status_id(agent: &Agent, name: &str) -> Result<u32> {
    agent
        .services
        .iter()
        .find(|s| s.cfg.name == name)
        .map(|s| s.id)
        .context("no such service")
}

#[test]
fn a_refused_config_changes_nothing() -> Result<()> {
    let host = Host::new("refused");
    let plain = service("web", 80, "weight = 30") + &service("other", 81, "weight = 50");
    host.write_config("", &plain);
    let mut agent = host.start()?;
    host.fake.take_writes();

    // A field the schema does not have: refused with the file and the field named.
    host.write_config(
        "",
        &(plain.replace("weight = 30", "weight = 70") + "colour = \"red\"\n"),
    );
    let err = format!("{:#}", agent.reload().unwrap_err());
    assert!(
        err.contains("agent.toml") && err.contains("colour"),
        "{err}"
    );
    assert_eq!(weight_bp(&agent, "web")?, 3000, "half-applied");
    assert_eq!(
        host.fake.take_writes(),
        vec![],
        "a refused config wrote to the kernel"
    );

    // An interface the host lacks: refused before any service changes in the kernel.
    let missing = plain.replace("weight = 30", "weight = 70");
    host.write_config("", &missing);
    let text = std::fs::read_to_string(host.config_path())?.replace(
        "interface = \"eth0\"",
        "interface = [\"eth0\", \"nosuch0\"]",
    );
    std::fs::write(host.config_path(), text)?;
    let err = format!("{:#}", agent.reload().unwrap_err());
    assert!(err.contains("nosuch0"), "{err}");
    assert_eq!(weight_bp(&agent, "web")?, 3000);
    assert_eq!(weight_bp(&agent, "other")?, 5000);
    let web = host
        .fake
        .service(status_id(&agent, "web")?)
        .context("web installed")?;
    assert_eq!(
        web.weight_bp, 3000,
        "the kernel holds a half-applied config"
    );

    // The kernel refuses the second service's write: the first one's is undone.
    host.write_config(
        "",
        &(service("web", 80, "weight = 40") + &service("other", 81, "weight = 60")),
    );
    host.fake.state().fail_install_after = Some(1);
    let err = format!("{:#}", agent.reload().unwrap_err());
    assert!(err.contains("injected failure"), "{err}");
    for (name, bp) in [("web", 3000), ("other", 5000)] {
        assert_eq!(weight_bp(&agent, name)?, bp, "{name} in memory");
        let v = host
            .fake
            .service(status_id(&agent, name)?)
            .context("installed")?;
        assert_eq!(v.weight_bp, bp, "{name} in the kernel");
    }

    // And the same reload, once the kernel takes it, applies whole.
    let out = reload(&mut agent)?;
    assert!(out.contains("web: weight 30% -> 40%"), "{out}");
    assert_eq!(weight_bp(&agent, "other")?, 6000);
    Ok(())
}

#[test]
fn a_rollback_is_one_map_write_and_drains_the_canary() -> Result<()> {
    let host = Host::new("rollback");
    host.write_file("web.toml", TWO_STEPS);
    host.write_config("", &service("web", 80, "policy = \"web.toml\""));
    let mut agent = host.start()?;
    let id = status_id(&agent, "web")?;
    host.fake.take_writes();
    rollout(&mut agent, "web", RolloutAction::Start)?;
    assert_eq!(
        host.fake.take_writes(),
        vec![Write::Install {
            id,
            weight_bp: 2000,
            rolled_back: false
        }]
    );
    host.fake.state().open.insert((id, DrainGroup::Canary), 7);
    rollout(
        &mut agent,
        "web",
        RolloutAction::Rollback {
            reason: "test".into(),
        },
    )?;
    assert_eq!(
        host.fake.take_writes(),
        vec![Write::Install {
            id,
            weight_bp: 0,
            rolled_back: true
        }],
        "a rollback is exactly one write"
    );
    assert!(status(&agent, "web")?.draining);
    host.clock.advance_ms(100);
    agent.tick();
    assert!(host.fake.state().open.is_empty(), "the drain did not run");
    assert!(
        !status(&agent, "web")?.draining,
        "still draining with nothing left"
    );
    Ok(())
}

#[test]
fn a_rollout_whose_metrics_see_no_traffic_holds_at_its_first_step() -> Result<()> {
    let host = Host::new("notraffic");
    host.write_file(
        "web.toml",
        r#"step = [{ at = 0, weight = 10 }, { at = "2s", weight = 50 }, { at = "4s", weight = 100 }]
[analysis]
max_hold = "10s"
[[metric]]
name = "error-rate"
threshold = 1.05
window = "30s"
"#,
    );
    host.write_config("", &service("web", 80, "policy = \"web.toml\""));
    let mut agent = host.start()?;
    rollout(&mut agent, "web", RolloutAction::Start)?;
    // 30 s of rollout clock: fifteen times the first step's dwell.
    for _ in 0..300 {
        host.clock.advance_ms(100);
        agent.tick();
    }
    let r = status(&agent, "web")?.rollout.context("rollout")?;
    assert_eq!(
        (r.step, r.state),
        (Some(0), RolloutState::Progressing),
        "{r:?}"
    );
    let holding = r.holding.unwrap_or_default();
    assert!(
        holding.contains("error-rate"),
        "status does not say why: {holding}"
    );
    // What `canary status` prints after "holding: ".
    assert!(holding.starts_with("inconclusive"), "{holding}");
    // max-hold (10 s past the due step) put an alert in the history.
    let history = agent.handle(Request::History {
        service: "web".into(),
    })?;
    assert!(history.to_string().contains("max-hold 10s"), "{history}");
    Ok(())
}

#[test]
fn a_healthy_canary_progresses_on_counters_from_the_dataplane() -> Result<()> {
    use crate::datapath::VersionSignals;
    let host = Host::new("healthy");
    host.write_file(
        "web.toml",
        r#"step = [{ at = 0, weight = 10 }, { at = "15s", weight = 50 }, { at = "30s", weight = 100 }]
[[metric]]
name = "error-rate"
threshold = 1.05
window = "300s"
"#,
    );
    host.write_config("", &service("web", 80, "policy = \"web.toml\""));
    let mut agent = host.start()?;
    let id = status_id(&agent, "web")?;
    rollout(&mut agent, "web", RolloutAction::Start)?;
    // 150 requests a second, all answered 2xx, split by the weight in force.
    let mut sent = [0u64; 2];
    let mut promoted_at = None;
    for tick in 0..3_000u64 {
        host.clock.advance_ms(100);
        if tick % 10 == 0 {
            let w = host.fake.service(id).context("installed")?.weight_bp as u64;
            let canary = 150 * w / 10_000;
            sent[1] += canary;
            sent[0] += 150 - canary;
            let signals = sent.map(|n| VersionSignals {
                connections: n,
                counters: canary_common::VersionTelemetry {
                    requests: n,
                    responses: [0, n, 0, 0, 0],
                    handshakes: n,
                    ..Default::default()
                },
                latency: vec![0; canary_common::histogram::LATENCY_BUCKETS],
            });
            host.fake.state().signals.insert(id, signals);
        }
        agent.tick();
        let state = status(&agent, "web")?.rollout.context("rollout")?.state;
        assert_ne!(
            state,
            RolloutState::RolledBack,
            "a healthy canary was rolled back"
        );
        if state == RolloutState::Promoted {
            promoted_at = Some(tick);
            break;
        }
    }
    let at = promoted_at.context("not promoted in 300 s of simulated clock")?;
    assert_eq!(host.fake.service(id).map(|v| v.weight_bp), Some(10_000));
    // The first step holds until ~500 error-free canary requests show it below the 1 %
    // floor (about 33 s at 15 req/s), then the schedule runs.
    assert!(
        at >= 300,
        "promoted after {} s: before the evidence could exist",
        at / 10
    );
    Ok(())
}

/// A service whose stable and canary are the given backends.
fn versions(stable: &str, canary: &str) -> String {
    format!(
        "[[service]]\nname = \"web\"\nlisten = \"198.18.0.10:80\"\nstable = [\"{stable}\"]\ncanary = [\"{canary}\"]\nweight = 0\npolicy = \"web.toml\"\n"
    )
}

/// Stable and canary backend addresses installed for service `id` (non-empty slots).
fn installed_groups(host: &Host, id: u32) -> (Vec<String>, Vec<String>) {
    let e = host.fake.entry(id).expect("installed");
    let names = |g: usize| e.groups[g].backends.iter().map(|a| a.to_string()).collect();
    (names(0), names(1))
}

fn tick_for(host: &Host, agent: &mut Agent, ms: u64) {
    for _ in 0..ms / 100 {
        host.clock.advance_ms(100);
        agent.tick();
    }
}

#[test]
fn a_finished_release_hands_over_and_the_next_config_moves_nothing() -> Result<()> {
    let host = Host::new("release");
    host.write_file(
        "web.toml",
        &format!("{TWO_STEPS}[verify]\nduration = \"10s\"\n[retire]\ntimeout = \"1m\"\n"),
    );
    let hook = "alert_webhook = \"http://198.18.0.1:9/hook\"";
    host.write_config(hook, &versions("198.18.1.2:8080", "198.18.1.3:8080"));
    let mut agent = host.start()?;
    let id = status_id(&agent, "web")?;
    rollout(&mut agent, "web", RolloutAction::Start)?;
    let promote = RolloutAction::Promote {
        full: true,
        reason: "looks good".into(),
    };
    rollout(&mut agent, "web", promote)?;
    let r = status(&agent, "web")?.rollout.context("rollout")?;
    assert_eq!((r.state, r.weight_bp), (RolloutState::Verifying, 10_000));
    // Seven keep-alive connections still on the old stable.
    host.fake.state().open.insert((id, DrainGroup::Stable), 7);
    tick_for(&host, &mut agent, 9_000);
    assert_eq!(
        status(&agent, "web")?.rollout.context("rollout")?.state,
        RolloutState::Verifying
    );
    assert_eq!(host.fake.state().open.len(), 1, "closed while verifying");
    host.fake.take_writes();
    tick_for(&host, &mut agent, 1_100);
    let r = status(&agent, "web")?.rollout.context("rollout")?;
    assert_eq!(r.state, RolloutState::Finished, "{r:?}");
    assert!(
        host.fake.state().open.is_empty(),
        "the old stable was not drained"
    );
    let release = r.released.context("released")?;
    assert_eq!(release.backends, ["198.18.1.3:8080"]);
    // The hand-over is one map write: the new version is the stable group, weight 0.
    assert_eq!(
        host.fake.take_writes(),
        vec![Write::Install {
            id,
            weight_bp: 0,
            rolled_back: false
        }]
    );
    let swapped = (vec!["198.18.1.3:8080".to_string()], vec![]);
    assert_eq!(installed_groups(&host, id), swapped);
    let backends = status(&agent, "web")?.backends;
    assert_eq!(
        backends
            .iter()
            .map(|b| (b.group.as_str(), b.address.as_str()))
            .collect::<Vec<_>>(),
        [("stable", "198.18.1.3:8080")]
    );
    let (_, alerts) = agent.take_alerts().context("the released event")?;
    let released = alerts
        .iter()
        .find(|a| a["event"] == "released")
        .context("no released event")?;
    assert_eq!(released["retired"][0], "198.18.1.2:8080");
    assert_eq!(released["stable"][0], "198.18.1.3:8080");
    assert!(released["summary"]["promoted_at_ms"].is_u64(), "{released}");
    let history = agent.handle(Request::History {
        service: "web".into(),
    })?;
    for state in ["\"verifying\"", "\"retiring\"", "\"finished\""] {
        assert!(history.to_string().contains(state), "{state}: {history}");
    }
    // An unchanged config: start is refused and says what to do.
    let err = rollout(&mut agent, "web", RolloutAction::Start).unwrap_err();
    assert!(err.to_string().contains("Name it `stable`"), "{err:#}");
    drop(agent);

    // A restart keeps the hand-over.
    let mut agent = host.start()?;
    assert_eq!(installed_groups(&host, id), swapped);
    assert_eq!(weight_bp(&agent, "web")?, 0);

    // The pipeline names the new version stable and the next one canary: a fresh
    // pending rollout at weight 0, so no open connection moves.
    host.write_config(hook, &versions("198.18.1.3:8080", "198.18.1.4:8080"));
    host.fake.take_writes();
    let changes = reload(&mut agent)?;
    assert!(changes.contains("new pending rollout"), "{changes}");
    let r = status(&agent, "web")?.rollout.context("rollout")?;
    assert_eq!((r.state, r.weight_bp), (RolloutState::Pending, 0));
    assert_eq!(
        installed_groups(&host, id),
        (
            vec!["198.18.1.3:8080".into()],
            vec!["198.18.1.4:8080".into()]
        )
    );
    assert_eq!(
        host.fake.take_writes(),
        vec![Write::Install {
            id,
            weight_bp: 0,
            rolled_back: false
        }]
    );
    rollout(&mut agent, "web", RolloutAction::Start)?;
    assert_eq!(weight_bp(&agent, "web")?, 2_000);
    Ok(())
}

#[test]
fn a_follower_hands_over_when_the_leaders_weight_names_its_canary() -> Result<()> {
    use crate::fleet::Host as _;
    let host = Host::new("follower-release");
    host.write_file("web.toml", TWO_STEPS);
    host.write_config("", &versions("198.18.1.2:8080", "198.18.1.3:8080"));
    let mut agent = host.start()?;
    agent.join_fleet(crate::fleet::Link::new("n2", Some("b")));
    let id = status_id(&agent, "web")?;
    agent.fleet_apply_weight("web", 10_000, &[])?;
    host.fake.take_writes();
    // A release of some earlier version is only a weight: nothing is swapped.
    agent.fleet_apply_weight("web", 0, &["198.18.1.9:8080".to_string()])?;
    let both = (
        vec!["198.18.1.2:8080".to_string()],
        vec!["198.18.1.3:8080".to_string()],
    );
    assert_eq!(installed_groups(&host, id), both);
    agent.fleet_apply_weight("web", 10_000, &[])?;
    host.fake.take_writes();
    // This node's canary released: the same hand-over as the leader's, in one write.
    agent.fleet_apply_weight("web", 0, &["198.18.1.3:8080".to_string()])?;
    assert_eq!(
        host.fake.take_writes(),
        vec![Write::Install {
            id,
            weight_bp: 0,
            rolled_back: false
        }]
    );
    assert_eq!(
        installed_groups(&host, id),
        (vec!["198.18.1.3:8080".to_string()], vec![])
    );
    // Read again (a watch restart), it changes nothing.
    agent.fleet_apply_weight("web", 0, &["198.18.1.3:8080".to_string()])?;
    assert!(host.fake.take_writes().is_empty());
    // The report carries the region for the leader's waves.
    assert_eq!(agent.fleet_report().region, None);
    Ok(())
}

#[test]
fn a_lone_node_skips_the_waves_of_other_regions() -> Result<()> {
    let host = Host::new("waves");
    host.write_file(
        "web.toml",
        &format!("{TWO_STEPS}[[wave]]\nregions = [\"a\"]\n[[wave]]\nregions = [\"b\"]\n"),
    );
    host.write_config(
        "region = \"b\"",
        &versions("198.18.1.2:8080", "198.18.1.3:8080"),
    );
    let mut agent = host.start()?;
    rollout(&mut agent, "web", RolloutAction::Start)?;
    tick_for(&host, &mut agent, 200);
    let r = status(&agent, "web")?.rollout.context("rollout")?;
    let wave = r.wave.context("wave")?;
    assert_eq!(
        (r.state, wave.index, r.weight_bp),
        (RolloutState::Progressing, 1, 2_000)
    );
    // The node of region b splits with wave 2's weight.
    assert_eq!(weight_bp(&agent, "web")?, 2_000);
    let history = agent.handle(Request::History {
        service: "web".into(),
    })?;
    assert!(
        history
            .to_string()
            .contains("wave 1/2 (a) has no node: skipped"),
        "{history}"
    );
    Ok(())
}

/// Service `web` with two stable backends and one canary, policy `web.toml`, and
/// `table` (its health tables).
fn two_stable_backends(table: &str) -> String {
    format!(
        "[[service]]\nname = \"web\"\nlisten = \"198.18.0.10:80\"\n\
         stable = [\"198.18.1.2:8080\", \"198.18.1.4:8080\"]\ncanary = [\"198.18.1.3:8080\"]\n\
         policy = \"web.toml\"\n{table}\n"
    )
}

#[test]
fn health_checks_take_backends_out_in_one_write_and_a_dead_canary_rolls_back() -> Result<()> {
    let host = Host::new("health");
    host.write_file("web.toml", TWO_STEPS);
    host.write_config(
        "",
        &two_stable_backends("[service.health]\nfall = 2\nrise = 2"),
    );
    let mut agent = host.start()?;
    let id = status_id(&agent, "web")?;
    let targets = agent.health_targets();
    assert_eq!(targets.len(), 3);
    let (s1, s2, c1) = (targets[0].backend, targets[1].backend, targets[2].backend);
    // Backends out of the selection, as (version, index) pairs.
    let down = |host: &Host| -> Vec<(usize, usize)> {
        let e = host.fake.entry(id).expect("installed");
        (0..2)
            .flat_map(|g| {
                let d = e.groups[g].down.clone();
                d.into_iter()
                    .enumerate()
                    .filter(|(_, d)| *d)
                    .map(move |(i, _)| (g, i))
            })
            .collect()
    };
    let refused = || Err("connection refused".to_string());
    rollout(&mut agent, "web", RolloutAction::Start)?;
    host.fake.take_writes();
    // One failure is not enough; the second takes the backend out, in one write.
    agent.record_health("web", s2, refused())?;
    assert!(host.fake.take_writes().is_empty());
    agent.record_health("web", s2, refused())?;
    assert_eq!(host.fake.take_writes().len(), 1);
    assert_eq!(down(&host), [(0, 1)]);
    let st = status(&agent, "web")?;
    let health = st.backends[1].health.as_ref().expect("health in status");
    assert_eq!(health.state, "down");
    assert!(
        health.reason.contains("2 checks failed in a row"),
        "{}",
        health.reason
    );
    let metrics = agent.metrics()?;
    let line =
        "canary_backend_up{service=\"web\",version=\"stable\",backend=\"198.18.1.4:8080\",source=\"198.18.1.4:8080\"} 0";
    assert!(metrics.contains(line), "{metrics}");
    // A reload keeps it out.
    reload(&mut agent)?;
    assert_eq!(down(&host), [(0, 1)]);
    // Every stable backend down: stable fails open, nothing is taken out.
    agent.record_health("web", s1, refused())?;
    agent.record_health("web", s1, refused())?;
    assert_eq!(down(&host), []);
    // Back after `rise` passes.
    for backend in [s1, s1, s2, s2] {
        agent.record_health("web", backend, Ok(()))?;
    }
    assert_eq!(down(&host), []);
    assert_eq!(
        status(&agent, "web")?.backends[1]
            .health
            .as_ref()
            .unwrap()
            .state,
        "up"
    );
    // The only canary backend down: out of the selection, and the rollout rolls back,
    // naming the health check.
    agent.record_health("web", c1, refused())?;
    agent.record_health("web", c1, refused())?;
    assert_eq!(down(&host), [(1, 0)]);
    let st = status(&agent, "web")?;
    assert_eq!(st.weight_bp, 0);
    let rollout = st.rollout.expect("rollout");
    assert_eq!(rollout.state, RolloutState::RolledBack);
    assert!(
        rollout.reason.contains("rule health-check fired")
            && rollout.reason.contains("198.18.1.3:8080"),
        "{}",
        rollout.reason
    );
    Ok(())
}

#[test]
fn passive_detection_ejects_a_backend_whose_handshakes_fail_and_a_dead_canary_rolls_back(
) -> Result<()> {
    let host = Host::new("outlier");
    host.write_file("web.toml", TWO_STEPS);
    host.write_config(
        "",
        &two_stable_backends("[service.outlier]\nejection = \"5s\""),
    );
    let mut agent = host.start()?;
    let id = status_id(&agent, "web")?;
    assert!(agent.health_targets().is_empty(), "no active checks");
    rollout(&mut agent, "web", RolloutAction::Start)?;
    host.fake.take_writes();
    // Each second 10 new connections per backend; the second stable backend answers
    // none of them (refused by a reset), the others answer all.
    let canary = MAX_GROUP_BACKENDS;
    let mut totals = [(0u64, 0u64, 0u64); 3];
    let mut feed = |host: &Host, dead: &[usize]| {
        let mut stats = vec![BackendStats::default(); MAX_BACKENDS];
        for (k, position) in [0, 1, canary].into_iter().enumerate() {
            let t = &mut totals[k];
            t.0 += 10;
            if dead.contains(&position) {
                t.2 += 10;
            } else {
                t.1 += 10;
            }
            stats[position] = BackendStats {
                connections: t.0,
                handshakes: t.1,
                refused: t.2,
                ..Default::default()
            };
        }
        host.fake.state().stats.insert(id, stats);
    };
    let down = |host: &Host| -> [Vec<bool>; 2] {
        let e = host.fake.entry(id).expect("installed");
        [e.groups[0].down.clone(), e.groups[1].down.clone()]
    };
    for _ in 0..3 {
        feed(&host, &[]);
        tick_for(&host, &mut agent, 1_000);
    }
    assert!(
        host.fake.take_writes().is_empty(),
        "healthy: nothing written"
    );
    // Dead: out within three seconds, in one write.
    let mut waited = 0;
    while down(&host)[0] != [false, true] {
        feed(&host, &[1]);
        tick_for(&host, &mut agent, 1_000);
        waited += 1;
        assert!(waited <= 3, "not ejected after {waited} s");
    }
    assert_eq!(host.fake.take_writes().len(), 1);
    let st = status(&agent, "web")?;
    let b = &st.backends[1];
    assert_eq!((b.handshakes, b.refused), (30, 10 * waited as u64));
    let health = b.health.as_ref().expect("health in status");
    assert_eq!(health.state, "down");
    assert!(health.ejected_until_ms.is_some());
    assert!(
        health.reason.contains("in a row got no SYN-ACK"),
        "{}",
        health.reason
    );
    assert!(
        health.reason.contains("refused by a reset"),
        "{}",
        health.reason
    );
    let metrics = agent.metrics()?;
    let line = "canary_backend_ejections_total{service=\"web\",version=\"stable\",\
                backend=\"198.18.1.4:8080\",source=\"198.18.1.4:8080\"} 1";
    assert!(metrics.contains(line), "{metrics}");
    // Back after its 5 s ejection (no new connections reach it meanwhile).
    tick_for(&host, &mut agent, 5_100);
    assert_eq!(down(&host)[0], [false, false]);
    let state = status(&agent, "web")?.rollout.map(|r| r.state);
    assert_eq!(
        state,
        Some(RolloutState::Progressing),
        "a stable ejection rolls nothing back"
    );
    // The only canary backend stops answering: ejected, the rollout rolls back.
    let mut waited = 0;
    while down(&host)[1] != [true] {
        feed(&host, &[canary]);
        tick_for(&host, &mut agent, 1_000);
        waited += 1;
        assert!(waited <= 3, "canary not ejected after {waited} s");
    }
    let rollout = status(&agent, "web")?.rollout.context("rollout")?;
    assert_eq!(rollout.state, RolloutState::RolledBack);
    assert!(
        rollout.reason.contains("rule health-check fired")
            && rollout.reason.contains("no canary backend is healthy")
            && rollout.reason.contains("SYN-ACK"),
        "{}",
        rollout.reason
    );
    Ok(())
}
