//! End-to-end client-address routing decided in the kernel: an `http` service whose
//! policy has only `client-cidr` and default cohorts never reaches the agent's router
//! (no listener, no `local` route, no head read). Its connections are decided by the
//! ingress program at their first packet. Real connections from two client addresses
//! (IPv4 and IPv6) to the lab backends; a reload that moves the range; a rollback.
//! Run as root.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    backend::{metric_value, scrape_metrics, HTTP_PORT, VERSION_HEADER},
    topology::{CANARY_V6, NODE_CLIENT_V4, STABLE_V6},
    Topology, VIP_V4, VIP_V6,
};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");
const METRICS_PORT: u16 = 9465;
const CONNECTIONS: u64 = 10;

/// A policy whose `internal-users` (the given ranges) go to canary; everyone else gets
/// the weight split (0 here: stable). A long progression, started only for the rollback.
fn policy(ranges: &[String]) -> String {
    let quoted: Vec<String> = ranges.iter().map(|r| format!("\"{r}\"")).collect();
    format!(
        "(define-progression '((0 . 1) (3600 . 50)))\n\
         (define-cohorts '((internal-users (client-cidr . ({})))\n\
                           (regular-users (default . #t))))\n\
         (define-user-cohorts '((internal-users . canary)))\n",
        quoted.join(" ")
    )
}

/// `web` on VIP_V4:80 and `web6` on [VIP_V6]:80, both `http` with the cidr policy.
fn services() -> String {
    format!("metrics_listen = \"{NODE_CLIENT_V4}:{METRICS_PORT}\"\n")
        + &lab_service(
            "web",
            80,
            HTTP_PORT,
            "protocol = \"http\"\npolicy = \"cidr.scm\"",
        )
        + &format!(
            "[[service]]\nname = \"web6\"\nlisten = \"[{VIP_V6}]:80\"\nprotocol = \"http\"\n\
             stable = [\"[{STABLE_V6}]:{HTTP_PORT}\"]\ncanary = [\"[{CANARY_V6}]:{HTTP_PORT}\"]\n\
             policy = \"cidr.scm\"\n"
        )
}

/// One request from `source` on a fresh connection; the version that answered.
fn version_from(source: IpAddr, target: SocketAddr) -> Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let conn = rt.block_on(async {
        let sock = if source.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.bind(SocketAddr::new(source, 0))?;
        tokio::time::timeout(Duration::from_secs(5), sock.connect(target))
            .await
            .map_err(|_| std::io::Error::other("connect timed out"))?
    });
    let mut conn: TcpStream = conn
        .with_context(|| format!("{source} -> {target}"))?
        .into_std()?;
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        conn,
        "GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    ensure!(text.starts_with("HTTP/1.1 200"), "{source}: {text:?}");
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(VERSION_HEADER)
                .then(|| v.trim().to_string())
        })
        .with_context(|| format!("{source}: no {VERSION_HEADER} in {text:?}"))
}

/// Every connection from each source lands on the version given with it.
fn expect(topo: &Topology, target: SocketAddr, cases: &[(IpAddr, &str)]) -> Result<()> {
    topo.client.enter(|| -> Result<()> {
        for (source, want) in cases {
            for i in 0..CONNECTIONS {
                let got = version_from(*source, target)?;
                ensure!(got == *want, "{source} connection {i}: {got}, want {want}");
            }
        }
        Ok(())
    })
}

#[test]
fn client_cidr_cohorts_are_decided_in_the_kernel_without_the_router() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    // 198.18.1.10 and .11, 2001:db8:1::a and ::b; the client's own 198.18.1.2 too.
    let extra = topo.add_client_addrs(2)?;
    let (inside, outside, inside6, outside6) = (extra[0], extra[1], extra[2], extra[3]);
    let main = IpAddr::V4(canary_lab::topology::CLIENT_V4);
    let agent = Agent::start_with_files(
        &topo.node,
        &services(),
        &[(
            "cidr.scm",
            &policy(&[format!("{inside}/32"), format!("{inside6}/128")]),
        )],
        &[],
    )?;
    let (web, web6) = (
        SocketAddr::new(VIP_V4.into(), 80),
        SocketAddr::new(VIP_V6.into(), 80),
    );
    expect(
        &topo,
        web,
        &[(inside, "canary"), (outside, "stable"), (main, "stable")],
    )?;
    expect(&topo, web6, &[(inside6, "canary"), (outside6, "stable")])?;

    let status = agent.status()?;
    for (i, split) in [(0, 2 * CONNECTIONS), (1, CONNECTIONS)] {
        let routing = &status["services"][i]["routing"];
        println!("{}: {routing}", status["services"][i]["name"]);
        ensure!(routing["decided_in"] == "kernel", "{routing}");
        ensure!(
            routing["cohort"]["internal-users"] == CONNECTIONS
                && routing["cohort"]["regular-users"] == 0
                && routing["split"] == split,
            "{routing}"
        );
        // The router never saw these services: it has no byte counts for them.
        ensure!(routing.get("userspace_bytes").is_none(), "{routing}");
    }
    // No router listener, no `local` route for the service addresses: nothing but the
    // ingress program's rewrite carries these connections.
    let local = topo
        .node
        .run(&["ip", "route", "show", "table", "local", "type", "local"])?;
    ensure!(
        !local.contains(&VIP_V4.to_string()),
        "a local route for the VIP: {local}"
    );
    let listeners = topo.node.run(&["ss", "-Hltn"])?;
    ensure!(
        listeners
            .lines()
            .all(|l| l.contains(&format!("{NODE_CLIENT_V4}:{METRICS_PORT}"))),
        "the node listens on more than the metrics port: {listeners}"
    );
    let metrics = topo
        .client
        .enter(|| scrape_metrics(SocketAddr::new(NODE_CLIENT_V4.into(), METRICS_PORT)))?;
    let decisions = |rule: &str, version: &str| {
        metric_value(
            &metrics,
            "canary_routing_decisions_total",
            &[("service", "web"), ("rule", rule), ("version", version)],
        )
    };
    ensure!(
        decisions("cohort:internal-users", "canary") == Some(CONNECTIONS as f64)
            && decisions("split", "stable") == Some(2.0 * CONNECTIONS as f64),
        "canary_routing_decisions_total: {:?} {:?}",
        decisions("cohort:internal-users", "canary"),
        decisions("split", "stable")
    );

    // A reload moves the range to the other client address.
    std::fs::write(
        agent.dir.join("cidr.scm"),
        policy(&[format!("{outside}/32"), format!("{outside6}/128")]),
    )?;
    agent.cli(&["reload"])?;
    expect(&topo, web, &[(inside, "stable"), (outside, "canary")])?;
    expect(&topo, web6, &[(inside6, "stable"), (outside6, "canary")])?;

    // A rolled-back canary gets no connection from a cohort.
    agent.cli(&["rollout", "start", "web"])?;
    agent.cli(&["rollback", "web", "--reason", "cidr test"])?;
    ensure!(agent.status()?["services"][0]["rollout"]["state"] == "rolled-back");
    expect(&topo, web, &[(outside, "stable")])?;
    let routing = &agent.status()?["services"][0]["routing"];
    ensure!(
        routing["cohort"]["internal-users"] == 3 * CONNECTIONS,
        "{routing}"
    );
    Ok(())
}
