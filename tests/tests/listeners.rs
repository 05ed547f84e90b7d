//! The agent's own HTTP listeners (`metrics_listen`, `ui_listen`) hold up against
//! clients that hog them (README, Security): a connection cap, a deadline for each
//! request head, serving on after `accept` failed for want of descriptors, and a
//! dashboard that answers only to its own host names.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    backend::HTTP_PORT,
    topology::NODE_CLIENT_V4,
    Topology,
};

const METRICS_PORT: u16 = 9464;
const UI_PORT: u16 = 9480;
/// The agent's limits (canary_agent::httpd).
const MAX_CONNECTIONS: usize = 256;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// One request on a new connection; the status code, or None when the connection
/// was closed without an answer.
fn get(addr: SocketAddr, path: &str, host: &str) -> Result<Option<u16>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    match s.read_to_end(&mut reply) {
        Ok(_) => {}
        // A reset is a refused connection too.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let text = String::from_utf8_lossy(&reply);
    Ok(text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok()))
}

/// Whether the server closed `s` (EOF or reset) within `within`.
fn closed(s: &mut TcpStream, within: Duration) -> bool {
    let _ = s.set_read_timeout(Some(within));
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // A 408 for the unfinished head, then the close.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn open_files(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The soft limit on open files of `pid`.
fn file_limit(pid: u32) -> Result<String> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("Max open files")?;
    Ok(line
        .split_whitespace()
        .nth(3)
        .context("soft limit")?
        .to_string())
}

fn prlimit(pid: u32, files: &str) -> Result<()> {
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={files}")])
        .output()?;
    ensure!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn metrics_and_dashboard_listeners_cap_time_out_and_outlive_accept_errors() -> Result<()> {
    let topo = Topology::build()?;
    let services = format!(
        "metrics_listen = \"{NODE_CLIENT_V4}:{METRICS_PORT}\"\nui_listen = \"{NODE_CLIENT_V4}:{UI_PORT}\"\nui_hosts = [\"canary.example\"]\n"
    ) + &lab_service("web", 80, HTTP_PORT, "");
    let agent = Agent::start(&topo.node, &services, &[])?;
    let pid = agent.pid().context("agent pid")?;
    let metrics = SocketAddr::new(NODE_CLIENT_V4.into(), METRICS_PORT);
    let ui = SocketAddr::new(NODE_CLIENT_V4.into(), UI_PORT);
    let ip_host = metrics.to_string();

    topo.client.enter(|| {
        ensure!(get(metrics, "/metrics", &ip_host)? == Some(200));
        // DNS rebinding: a name that is not the dashboard's is refused, its own
        // names and addresses are served.
        ensure!(get(ui, "/api/status", "evil.example:9480")? == Some(421));
        ensure!(get(ui, "/api/status", "canary.example:9480")? == Some(200));
        ensure!(get(ui, "/api/status", &ui.to_string())? == Some(200));

        // A client that never finishes its head is dropped after the deadline.
        let mut slow = TcpStream::connect(metrics)?;
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")?;
        // The cap: idle connections up to it are held, the next is closed at once.
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS - 1 {
            held.push(TcpStream::connect(metrics)?);
        }
        let mut over = TcpStream::connect(metrics)?;
        ensure!(
            closed(&mut over, Duration::from_secs(2)),
            "a connection over the cap was kept"
        );
        let started = Instant::now();
        ensure!(
            closed(&mut slow, HEAD_TIMEOUT + Duration::from_secs(5)),
            "a head unfinished for {:?} was kept",
            started.elapsed()
        );
        // The idle ones went with the same deadline: the endpoint serves again.
        for s in held.iter_mut() {
            ensure!(
                closed(s, Duration::from_secs(5)),
                "an idle connection was kept"
            );
        }
        drop(held);
        ensure!(get(metrics, "/metrics", &ip_host)? == Some(200));
        anyhow::Ok(())
    })?;

    // Out of descriptors: accept fails (EMFILE) while clients wait; once some are
    // free again both listeners serve (before, /metrics ended for good).
    let limit = file_limit(pid)?;
    let before = open_files(pid)?;
    prlimit(pid, &format!("{}:", before + 2))?;
    let waiting = topo.client.enter(|| {
        let mut waiting = Vec::new();
        for _ in 0..20 {
            waiting.push(TcpStream::connect(metrics)?);
            waiting.push(TcpStream::connect(ui)?);
        }
        std::thread::sleep(Duration::from_secs(1));
        anyhow::Ok(waiting)
    })?;
    prlimit(pid, &format!("{limit}:"))?;
    drop(waiting);
    topo.client.enter(|| {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let m = get(metrics, "/metrics", &ip_host).ok().flatten();
            let d = get(ui, "/healthz", &ui.to_string()).ok().flatten();
            if (m, d) == (Some(200), Some(200)) {
                return Ok(());
            }
            ensure!(
                Instant::now() < until,
                "not serving after EMFILE: {m:?} {d:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    })?;
    ensure!(
        agent.log().contains("accept failed; retrying"),
        "the accept failure was not logged"
    );
    Ok(())
}
