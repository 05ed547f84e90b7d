//! Backends by DNS name end to end: a real DNS server (dnsmasq, in the node's
//! namespace) answers `web-stable.lab` and `web-canary.lab`; the agent splits across
//! the addresses it resolves, follows a changed answer within the TTL without moving
//! an open connection, and keeps the last answer when the server is gone.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Context, Result};
use canary_lab::{
    agent::Agent,
    backend::{self, BANNER_PORT, ECHO_PORT},
    banner_connections,
    topology::{CANARY_V4, LEAF_IFACE, NODE_CLIENT_V4, STABLE_V4},
    BannerReport, ChildGuard, NetNs, Topology, Version, VIP_V4,
};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");
const DNSMASQ: &str = "/usr/sbin/dnsmasq";
/// A second canary backend, the address the changed answer names.
const CANARY_B: &str = "198.18.3.3";
const DNS_PORT: u16 = 5353;

/// dnsmasq serving only `hosts` (TTL 1 s), on the node's client-side address.
fn start_dns(node: &NetNs, hosts: &Path) -> Result<ChildGuard> {
    let listen = format!("--listen-address={NODE_CLIENT_V4}");
    let port = format!("--port={DNS_PORT}");
    let hosts = format!("--addn-hosts={}", hosts.display());
    let args = [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        &listen,
        &port,
        &hosts,
        "--local-ttl=1",
        "--user=root",
        "--pid-file=",
        "--log-facility=-",
    ];
    let mut child = node.spawn(DNSMASQ, &args)?;
    child.wait_for_log("read ", Duration::from_secs(10))?;
    Ok(child)
}

fn connections(topo: &Topology, n: usize) -> Result<BannerReport> {
    let vip = SocketAddr::new(VIP_V4.into(), 80);
    topo.client
        .enter(|| banner_connections(vip, n, 4, &[], Duration::from_secs(2)))
}

/// One echo exchange (a line) on an open connection.
fn echo(stream: &mut TcpStream, text: &str) -> Result<()> {
    let line = format!("{text}\n");
    stream.write_all(line.as_bytes())?;
    let mut back = vec![0; line.len()];
    stream.read_exact(&mut back)?;
    ensure!(back == line.as_bytes(), "echoed {back:?}");
    Ok(())
}

/// The addresses and error status shows for backend name `name`.
fn name_status(agent: &Agent, name: &str) -> Result<serde_json::Value> {
    let status = agent.status()?;
    status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["names"].as_array().cloned().unwrap_or_default())
        .find(|n| n["name"].as_str().is_some_and(|n| n.contains(name)))
        .ok_or_else(|| anyhow!("{name} not in status: {status}"))
}

#[test]
fn backends_follow_their_dns_names_and_keep_the_last_answer() -> Result<()> {
    let topo = Topology::build()?;
    topo.canary
        .add_address(&format!("{CANARY_B}/24"), LEAF_IFACE)?;
    let _stable = backend::start(&topo.stable, Path::new(BACKEND_BIN), Version::Stable)?;
    let _canary = backend::start(&topo.canary, Path::new(BACKEND_BIN), Version::Canary)?;
    let banner_b = format!("{CANARY_B}:{BANNER_PORT}");
    let echo_b = format!("{CANARY_B}:{ECHO_PORT}");
    let mut canary_b = topo.canary.spawn(
        BACKEND_BIN,
        &[
            "--name", "canary-b", "--banner", &banner_b, "--echo", &echo_b,
        ],
    )?;
    canary_b.wait_for_log(backend::READY_LINE, Duration::from_secs(10))?;

    // Beside the children's logs: kept for a look after a failure, like them.
    std::fs::create_dir_all(canary_lab::log_dir())?;
    let hosts = canary_lab::log_dir().join("discovery-hosts");
    std::fs::write(
        &hosts,
        format!("{STABLE_V4} web-stable.lab\n{CANARY_V4} web-canary.lab\n"),
    )?;
    let dns = start_dns(&topo.node, &hosts)?;
    let services = format!(
        "dns = [\"{NODE_CLIENT_V4}:{DNS_PORT}\"]\ndns_min_ttl = \"1s\"\n\n\
         [[service]]\nname = \"web\"\nlisten = \"{VIP_V4}:80\"\n\
         stable = [\"web-stable.lab:{BANNER_PORT}\"]\ncanary = [\"web-canary.lab:{BANNER_PORT}\"]\n\
         weight = 50\n\
         [[service]]\nname = \"echo\"\nlisten = \"{VIP_V4}:81\"\n\
         stable = [\"web-stable.lab:{ECHO_PORT}\"]\ncanary = [\"web-canary.lab:{ECHO_PORT}\"]\n\
         weight = 100\n"
    );
    let agent = Agent::start(&topo.node, &services, &[])?;

    let split = connections(&topo, 100)?;
    println!("resolved: {:?}", split.by_name);
    ensure!(
        split.failed() == 0 && split.count("stable") > 20 && split.count("canary") > 20,
        "{split:?}"
    );
    // A connection open on the first canary address, kept through the change.
    let echo_vip = SocketAddr::new(VIP_V4.into(), 81);
    let mut open = topo.client.enter(|| {
        Ok(TcpStream::connect_timeout(
            &echo_vip,
            Duration::from_secs(2),
        )?)
    })?;
    open.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut greeting = [0u8; 7];
    open.read_exact(&mut greeting)?;
    ensure!(&greeting == b"canary\n", "greeted by {greeting:?}");
    echo(&mut open, "before")?;

    // The canary's record changes; dnsmasq rereads its hosts file on SIGHUP.
    std::fs::write(
        &hosts,
        format!("{STABLE_V4} web-stable.lab\n{CANARY_B} web-canary.lab\n"),
    )?;
    let changed = Instant::now();
    // SAFETY: signalling our own child.
    let rc = unsafe { libc::kill(dns.pid() as i32, libc::SIGHUP) };
    ensure!(
        rc == 0,
        "SIGHUP dnsmasq: {}",
        std::io::Error::last_os_error()
    );
    let mut followed = None;
    while changed.elapsed() < Duration::from_secs(10) {
        let r = connections(&topo, 20)?;
        if r.count("canary-b") > 0 && r.count("canary") == 0 {
            followed = Some(changed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let followed = followed.ok_or_else(|| {
        anyhow!(
            "new connections never reached {CANARY_B}: {}",
            agent.status().unwrap_or_default()
        )
    })?;
    println!("new connections reach the new canary address {followed:?} after the change");
    // TTL 1 s, re-resolved at most 1 s later, and the 100 ms poll.
    ensure!(followed < Duration::from_secs(3), "took {followed:?}");
    echo(&mut open, "after the change").context("the open connection moved")?;
    let after = connections(&topo, 100)?;
    ensure!(
        after.failed() == 0 && after.count("canary-b") > 20 && after.count("stable") > 20,
        "{after:?}"
    );

    // The server gone: lookups fail, the last answer keeps serving.
    // A lookup gives up after 3 s (LOOKUP_TIMEOUT), one TTL after the last answer.
    drop(dns);
    let stopped = Instant::now();
    let mut status = name_status(&agent, "web-canary.lab")?;
    while status["error"].is_null() && stopped.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(200));
        status = name_status(&agent, "web-canary.lab")?;
    }
    println!("dnsmasq stopped, {:?} later: {status}", stopped.elapsed());
    ensure!(
        status["error"].is_string() && status["addresses"].to_string().contains(CANARY_B),
        "{status}"
    );
    let kept = connections(&topo, 100)?;
    println!("fail static: {:?}", kept.by_name);
    ensure!(
        kept.failed() == 0 && kept.count("canary-b") > 20 && kept.count("stable") > 20,
        "{kept:?}"
    );
    echo(&mut open, "still open")?;
    let alerts = agent.cli(&["status", "web"])?;
    println!("{alerts}");
    Ok(())
}
