//! End-to-end: real TCP/UDP connections from a client namespace, through the agent's
//! XDP/TC datapath on the node namespace, to stable and canary backends in their own
//! namespaces. Run as root.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{ensure, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    backend::{BANNER_PORT, ECHO_PORT, UDP_PORT},
    banner_connections,
    topology::{
        CANARY_V4, CANARY_V6, CLIENT_V4, NODE_CANARY_IFACE, NODE_CLIENT_IFACE, NODE_STABLE_IFACE,
        STABLE_V4, STABLE_V6,
    },
    udp_probe, LongLived, Topology, VIP_V4, VIP_V6,
};
use serde_json::Value;

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");

/// Connections per group ("stable"/"canary") of one service in `status --json`.
fn connections(status: &Value, name: &str) -> BTreeMap<String, u64> {
    let svc = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap();
    let mut out = BTreeMap::new();
    for b in svc["backends"].as_array().unwrap() {
        *out.entry(b["group"].as_str().unwrap().to_string())
            .or_default() += b["connections"].as_u64().unwrap();
    }
    out
}

#[test]
fn twenty_thousand_connections_split_at_ten_percent() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let services = lab_service("hash", 80, BANNER_PORT, "weight = 10\nmode = \"hash\"")
        + &lab_service("exact", 81, BANNER_PORT, "weight = 10\nmode = \"exact\"");
    let agent = Agent::start(&topo.node, &services, &[])?;
    // Each run uses its own source address and a wide port range, so no 5-tuple is
    // reused while a backend still holds it in TIME_WAIT (a reused tuple can be
    // refused there and retried, which would count one client connection twice).
    topo.client
        .run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])?;
    let sources = topo.add_client_addrs(1)?;
    let cpus = std::thread::available_parallelism()?.get() as f64;
    for (name, port, source) in [
        ("hash", 80, IpAddr::from(CLIENT_V4)),
        ("exact", 81, sources[0]),
    ] {
        let n = 20_000;
        let target = SocketAddr::new(VIP_V4.into(), port);
        let report = topo
            .client
            .enter(|| banner_connections(target, n, 32, &[source], Duration::from_secs(5)))?;
        ensure!(
            report.failed() == 0,
            "{name}: failures {:?}",
            report.failures
        );
        let canary = report.count("canary") as f64;
        let share = 100.0 * canary / n as f64;
        println!("{name}: {n} connections, canary {canary} ({share:.2} %)");
        if name == "hash" {
            ensure!(
                (share - 10.0).abs() <= 1.0,
                "hash share {share:.2} % not within 10 ± 1"
            );
        } else {
            // Each CPU's smooth counter is within one of its ideal count.
            ensure!(
                (canary - n as f64 * 0.10).abs() <= cpus,
                "exact: {canary} canary, ideal {}",
                n as f64 * 0.10
            );
        }
        // (c) the agent's counters agree with what the client saw.
        let seen = connections(&agent.status()?, name);
        ensure!(
            seen["canary"] == report.count("canary") as u64
                && seen["stable"] == report.count("stable") as u64,
            "{name}: status {seen:?} vs client {:?}",
            report.by_name
        );
    }
    Ok(())
}

#[test]
fn long_lived_connections_survive_weight_changes() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let agent = Agent::start(
        &topo.node,
        &lab_service("echo", 80, ECHO_PORT, "weight = 10"),
        &[],
    )?;
    let target = SocketAddr::new(VIP_V4.into(), 80);
    let conns = topo
        .client
        .enter(|| LongLived::open(target, 200, &[CLIENT_V4.into()]))?;
    std::thread::sleep(Duration::from_millis(500));
    let before = conns.report();
    ensure!(
        before.conns.len() == 200 && before.resets() == 0,
        "{before:?}"
    );
    for weight in ["50", "0", "100", "10"] {
        agent.cli(&["set-weight", "echo", weight])?;
        std::thread::sleep(Duration::from_millis(700));
    }
    let after = conns.stop();
    ensure!(after.resets() == 0, "{} connections reset", after.resets());
    ensure!(after.stalls() == 0, "{} stalls", after.stalls());
    ensure!(
        after.by_backend() == before.by_backend(),
        "flows moved backend"
    );
    ensure!(
        after.min_messages_ok() > before.min_messages_ok() + 20,
        "some connection stopped exchanging data: {} -> {}",
        before.min_messages_ok(),
        after.min_messages_ok()
    );
    let counted = connections(&agent.status()?, "echo");
    ensure!(counted.values().sum::<u64>() == 200, "{counted:?}");
    Ok(())
}

#[test]
fn client_ip_stickiness_only_grows_the_canary_set() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let clients: Vec<IpAddr> = topo
        .add_client_addrs(120)?
        .into_iter()
        .filter(|a| a.is_ipv4())
        .collect();
    let agent = Agent::start(
        &topo.node,
        &lab_service(
            "sticky",
            80,
            BANNER_PORT,
            "weight = 5\nsticky = \"client-ip\"",
        ),
        &[],
    )?;
    let target = SocketAddr::new(VIP_V4.into(), 80);
    let per_client = |report: &canary_lab::BannerReport| -> Result<BTreeMap<IpAddr, String>> {
        let mut out = BTreeMap::new();
        for (src, names) in &report.by_source {
            ensure!(
                names.len() == 1,
                "client {src} reached both versions: {names:?}"
            );
            out.insert(*src, names.keys().next().unwrap().clone());
        }
        Ok(out)
    };
    let sample = || {
        per_client(&topo.client.enter(|| {
            banner_connections(
                target,
                clients.len() * 8,
                16,
                &clients,
                Duration::from_secs(5),
            )
        })?)
    };
    let at5 = sample()?;
    agent.cli(&["set-weight", "sticky", "20"])?;
    let at20 = sample()?;
    let canary5: Vec<_> = at5
        .iter()
        .filter(|(_, v)| *v == "canary")
        .map(|(k, _)| *k)
        .collect();
    let canary20 = at20.values().filter(|v| *v == "canary").count();
    println!(
        "canary clients: {} at 5 %, {canary20} at 20 % (of {})",
        canary5.len(),
        clients.len()
    );
    ensure!(
        !canary5.is_empty() && canary20 > canary5.len(),
        "weights had no visible effect"
    );
    for c in canary5 {
        ensure!(
            at20[&c] == "canary",
            "client {c} left canary when the weight grew"
        );
    }
    Ok(())
}

#[test]
fn udp_and_ipv6_services_are_split_and_answered_from_the_service_address() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let services = format!(
        "[[service]]\nname = \"dns\"\nlisten = \"{VIP_V4}:53\"\nprotocol = \"udp\"\nstable = [\"{STABLE_V4}:{UDP_PORT}\"]\ncanary = [\"{CANARY_V4}:{UDP_PORT}\"]\nweight = 30\n\
         [[service]]\nname = \"web6\"\nlisten = \"[{VIP_V6}]:80\"\nstable = [\"[{STABLE_V6}]:{BANNER_PORT}\"]\ncanary = [\"[{CANARY_V6}]:{BANNER_PORT}\"]\nweight = 30\n"
    );
    let _agent = Agent::start(&topo.node, &services, &[])?;
    // The lab's UDP sockets are connected: a reply not from the VIP would be dropped.
    let udp = topo.client.enter(|| {
        udp_probe(
            SocketAddr::new(VIP_V4.into(), 53),
            400,
            &[CLIENT_V4.into()],
            Duration::from_secs(2),
        )
    })?;
    ensure!(udp.failed() == 0, "udp failures {:?}", udp.failures);
    let v6 = topo.client.enter(|| {
        banner_connections(
            SocketAddr::new(VIP_V6.into(), 80),
            2000,
            16,
            &[],
            Duration::from_secs(5),
        )
    })?;
    ensure!(v6.failed() == 0, "ipv6 failures {:?}", v6.failures);
    for (what, r, n) in [("udp", &udp, 400.0), ("ipv6", &v6, 2000.0)] {
        let share = r.count("canary") as f64 / n;
        println!("{what}: canary share {share:.3}");
        ensure!((0.2..0.4).contains(&share), "{what} canary share {share}");
    }
    Ok(())
}

/// The pkts column of each rule of an `iptables -nvxL CHAIN` listing.
fn rule_packets(listing: &str) -> Vec<u64> {
    listing
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// `forward = "redirect"` with the agent on the client-facing and both backend-facing
/// interfaces: every packet of every connection skips the node's IP forwarding, which
/// the FORWARD chain's counters show.
#[test]
fn forward_redirect_takes_both_directions_past_ip_forwarding() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let services = format!(
        "interface = [\"{NODE_CLIENT_IFACE}\", \"{NODE_STABLE_IFACE}\", \"{NODE_CANARY_IFACE}\"]\n\
         ingress_hook = \"tc\"\nforward = \"redirect\"\n{}\
         [[service]]\nname = \"web6\"\nlisten = \"[{VIP_V6}]:80\"\nstable = [\"[{STABLE_V6}]:{BANNER_PORT}\"]\ncanary = [\"[{CANARY_V6}]:{BANNER_PORT}\"]\nweight = 30\n\
         [[service]]\nname = \"dns\"\nlisten = \"{VIP_V4}:53\"\nprotocol = \"udp\"\nstable = [\"{STABLE_V4}:{UDP_PORT}\"]\ncanary = [\"{CANARY_V4}:{UDP_PORT}\"]\nweight = 30\n",
        lab_service("web", 80, BANNER_PORT, "weight = 30")
    );
    let _agent = Agent::start(&topo.node, &services, &[])?;
    // Count forwarded packets towards the backends' networks and back from them.
    for (tool, backends) in [
        ("iptables", "198.18.2.0/23"),
        ("ip6tables", "2001:db8:2::/63"),
    ] {
        topo.node
            .run(&[tool, "-w", "-A", "FORWARD", "-d", backends, "-j", "ACCEPT"])?;
        topo.node
            .run(&[tool, "-w", "-A", "FORWARD", "-s", backends, "-j", "ACCEPT"])?;
    }
    let v4 = topo.client.enter(|| {
        banner_connections(
            SocketAddr::new(VIP_V4.into(), 80),
            2000,
            16,
            &[],
            Duration::from_secs(5),
        )
    })?;
    let v6 = topo.client.enter(|| {
        banner_connections(
            SocketAddr::new(VIP_V6.into(), 80),
            2000,
            16,
            &[],
            Duration::from_secs(5),
        )
    })?;
    let udp = topo.client.enter(|| {
        udp_probe(
            SocketAddr::new(VIP_V4.into(), 53),
            400,
            &[CLIENT_V4.into()],
            Duration::from_secs(2),
        )
    })?;
    for (what, r, n) in [
        ("ipv4", &v4, 2000.0),
        ("ipv6", &v6, 2000.0),
        ("udp", &udp, 400.0),
    ] {
        ensure!(r.failed() == 0, "{what} failures {:?}", r.failures);
        let share = r.count("canary") as f64 / n;
        ensure!((0.2..0.4).contains(&share), "{what} canary share {share}");
    }
    for tool in ["iptables", "ip6tables"] {
        let counts = rule_packets(&topo.node.run(&[tool, "-w", "-nvxL", "FORWARD"])?);
        println!("{tool} FORWARD packets (to backends, from backends): {counts:?}");
        ensure!(counts.len() == 2, "{tool}: {counts:?}");
        // Only packets sent while a neighbour entry was being resolved take the stack:
        // at most the first segments of the 16 connections open at a time, per next
        // hop. Through the stack it would be every packet (over 6000 each way).
        ensure!(
            counts.iter().all(|&n| n <= 64),
            "{tool}: {counts:?} packets (to, from the backends) went through IP forwarding"
        );
    }
    Ok(())
}
