//! Runs the real `canary` agent in the node namespace, with its maps pinned on a
//! private bpffs mount in the host mount namespace so that a restarted agent finds
//! them again (an `ip netns exec` mount would vanish with the process).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{netns::log_dir, ChildGuard, NetNs, NODE_CLIENT_IFACE};

/// A `[[service]]` table for the lab: `name` on VIP_V4:`port`, one stable and one
/// canary backend on `backend_port`, plus `extra` lines (weight, mode, policy...).
pub fn lab_service(name: &str, port: u16, backend_port: u16, extra: &str) -> String {
    use crate::topology::{CANARY_V4, STABLE_V4, VIP_V4};
    format!(
        "[[service]]\nname = \"{name}\"\nlisten = \"{VIP_V4}:{port}\"\nstable = [\"{STABLE_V4}:{backend_port}\"]\ncanary = [\"{CANARY_V4}:{backend_port}\"]\n{extra}\n"
    )
}

/// The agent binary: `$CANARY_BIN`, else the workspace's debug build.
pub fn canary_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("CANARY_BIN") {
        return Ok(p.into());
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/canary");
    if !p.exists() {
        bail!(
            "{} is missing: build it with `cargo build -p canary-agent` (make test does)",
            p.display()
        );
    }
    Ok(p)
}

pub struct Agent {
    child: Option<ChildGuard>,
    bin: PathBuf,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    node: String,
}

impl Agent {
    /// Writes a config with the given `[[service]]` tables (and any extra agent
    /// flags), starts the agent in `node` and waits until its control API listens.
    pub fn start(node: &NetNs, services: &str, extra_args: &[&str]) -> Result<Agent> {
        Self::start_with_files(node, services, &[], extra_args)
    }

    /// Like [`Agent::start`], also writing `files` (name, contents) beside the
    /// config, e.g. policy files the services name.
    pub fn start_with_files(
        node: &NetNs,
        services: &str,
        files: &[(&str, &str)],
        extra_args: &[&str],
    ) -> Result<Agent> {
        Self::start_inner(node, services, files, extra_args, true)
    }

    /// An agent whose `bpffs_dir` is under `/sys/fs/bpf` where nothing is mounted, as on
    /// a freshly booted host: `ip netns exec` gives it a mount namespace with a fresh
    /// sysfs and no bpffs, so the agent must mount one itself (which then lives and
    /// dies with that namespace: no restarts with this one).
    pub fn start_on_fresh_host(node: &NetNs, services: &str) -> Result<Agent> {
        Self::start_inner(node, services, &[], &[], false)
    }

    fn start_inner(
        node: &NetNs,
        services: &str,
        files: &[(&str, &str)],
        extra_args: &[&str],
        private_bpffs: bool,
    ) -> Result<Agent> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = log_dir().join(format!("agent-{n}"));
        std::fs::create_dir_all(&dir)?;
        let bpffs = if private_bpffs {
            let bpffs = dir.join("bpffs");
            std::fs::create_dir_all(&bpffs)?;
            let status = Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&bpffs)
                .status()?;
            if !status.success() {
                bail!("mounting bpffs on {}", bpffs.display());
            }
            bpffs
        } else {
            PathBuf::from(format!("/sys/fs/bpf/canary-lab-{}-{n}", std::process::id()))
        };
        for (name, contents) in files {
            std::fs::write(dir.join(name), contents)?;
        }
        let socket = dir.join("agent.sock");
        let config = dir.join("agent.toml");
        // The client-facing interface, unless the [agent] lines given name their own.
        let names_interface = services
            .lines()
            .take_while(|l| !l.starts_with('['))
            .any(|l| l.trim_start().starts_with("interface"));
        let interface = if names_interface {
            String::new()
        } else {
            format!("interface = \"{NODE_CLIENT_IFACE}\"\n")
        };
        std::fs::write(
            &config,
            format!(
                "[agent]\n{interface}control_socket = \"{}\"\nbpffs_dir = \"{}\"\nstate_dir = \"{}\"\n\n{services}",
                socket.display(),
                bpffs.display(),
                dir.join("state").display()
            ),
        )?;
        let mut agent = Agent {
            child: None,
            bin: canary_bin()?,
            dir,
            config,
            socket,
            bpffs,
            node: node.name().to_string(),
        };
        agent.launch(node, extra_args)?;
        Ok(agent)
    }

    fn launch(&mut self, node: &NetNs, extra_args: &[&str]) -> Result<()> {
        let config = self.config.to_string_lossy().into_owned();
        let mut args = vec!["agent", "--config", &config];
        args.extend_from_slice(extra_args);
        let mut child = node.spawn(&self.bin, &args)?;
        child.wait_for_log("control API listening", Duration::from_secs(20))?;
        self.child = Some(child);
        Ok(())
    }

    /// The running agent's pid (for CPU and memory readings from /proc).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::pid)
    }

    /// SIGTERM, as an orchestrator would send, then wait for the exit. The datapath
    /// stays attached (its links are pinned).
    pub fn stop(&mut self) -> Result<()> {
        self.signal_and_wait(libc::SIGTERM);
        Ok(())
    }

    /// Sends `signal` (e.g. SIGHUP) to the running agent.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.pid() as i32, signal) };
        }
    }

    /// Sends `signal` (SIGKILL, SIGTERM, ...) and waits until the process is gone.
    pub fn signal_and_wait(&mut self, signal: i32) {
        if let Some(child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.pid() as i32, signal) };
            for _ in 0..100 {
                if !Path::new(&format!("/proc/{}", child.pid())).exists()
                    || std::fs::read_to_string(format!("/proc/{}/stat", child.pid()))
                        .is_ok_and(|s| s.contains(") Z "))
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Restarts the agent the way a DaemonSet update does: SIGTERM, then a new agent
    /// that takes over the pinned links.
    pub fn restart(&mut self, node: &NetNs, extra_args: &[&str]) -> Result<()> {
        self.signal_and_wait(libc::SIGTERM);
        self.relaunch(node, extra_args)
    }

    /// Starts the agent again (after [`Agent::signal_and_wait`]) on the same config.
    pub fn relaunch(&mut self, node: &NetNs, extra_args: &[&str]) -> Result<()> {
        assert_eq!(node.name(), self.node, "restart in the same node namespace");
        self.launch(node, extra_args)
    }

    /// Replaces the `[[service]]` tables of the config file (the `[agent]` table stays).
    pub fn write_services(&self, services: &str) -> Result<()> {
        let text = std::fs::read_to_string(&self.config)?;
        let agent = text
            .split("\n\n")
            .next()
            .context("the config starts with its [agent] table")?;
        std::fs::write(&self.config, format!("{agent}\n\n{services}"))?;
        Ok(())
    }

    /// Whether the agent process is running (not stopped or killed by the test).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log(&self) -> String {
        self.child.as_ref().map(|c| c.log()).unwrap_or_default()
    }

    /// Runs a CLI command against this agent and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .context("running the canary CLI")?;
        if !out.status.success() {
            bail!(
                "canary {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Polls the first service's rollout every 50 ms until it is in `state`; returns
    /// how long that took, or `None` after `limit`.
    pub fn wait_for_rollout(&self, state: &str, limit: Duration) -> Result<Option<Duration>> {
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if self.status()?["services"][0]["rollout"]["state"] == state {
                return Ok(Some(started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(None)
    }

    /// `canary status --json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.cli(&["status", "--json"])?)?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.child.take();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.bpffs)
            .stderr(std::process::Stdio::null())
            .status();
    }
}
