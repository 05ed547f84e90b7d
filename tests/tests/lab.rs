//! Self-tests of the lab, run as root. No XDP here: the client reaches the
//! backends' real addresses through the node's plain routing, which proves
//! the topology, the backend and the traffic drivers before the integration
//! tests put the load balancer in between.

use anyhow::{ensure, Result};
use canary_lab::backend::{
    metric_value, scrape_metrics, set_faults, ADMIN_PORT, BANNER_PORT, ECHO_PORT, HTTP_PORT,
    UDP_PORT,
};
use canary_lab::topology::{CANARY_V6, STABLE_V4};
use canary_lab::{
    banner_connections, http_load, http_request, udp_probe, Faults, LongLived, NetNs, Topology,
    Version,
};
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");

#[test]
fn banners_udp_and_long_lived_echo_reach_the_addressed_backend() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let sources = topo.add_client_addrs(4)?;

    for version in Version::ALL {
        for ip in [IpAddr::from(version.v4()), IpAddr::from(version.v6())] {
            let target = SocketAddr::new(ip, BANNER_PORT);
            let banners = topo
                .client
                .enter(|| banner_connections(target, 40, 8, &sources, Duration::from_secs(3)))?;
            ensure!(banners.failed() == 0, "{target}: {banners:?}");
            ensure!(banners.count(version.name()) == 40, "{target}: {banners:?}");
            ensure!(
                banners.by_source.len() == 4
                    && banners
                        .by_source
                        .values()
                        .all(|m| m.values().sum::<usize>() == 10),
                "{target}: sources not cycled evenly: {banners:?}"
            );

            let target = SocketAddr::new(ip, UDP_PORT);
            let probes = topo
                .client
                .enter(|| udp_probe(target, 12, &sources, Duration::from_secs(2)))?;
            ensure!(
                probes.failed() == 0 && probes.count(version.name()) == 12,
                "{target}: {probes:?}"
            );
            ensure!(probes.by_source.len() == 4, "{target}: {probes:?}");
        }
    }

    let stable_echo = SocketAddr::new(STABLE_V4.into(), ECHO_PORT);
    let canary_echo = SocketAddr::new(CANARY_V6.into(), ECHO_PORT);
    let (stable, canary) = topo.client.enter(|| {
        Ok((
            LongLived::open(stable_echo, 3, &sources)?,
            LongLived::open(canary_echo, 2, &[])?,
        ))
    })?;
    std::thread::sleep(Duration::from_millis(1200));
    ensure!(
        stable.report().min_messages_ok() > 0,
        "{:?}",
        stable.report()
    );
    let (stable, canary) = (stable.stop(), canary.stop());
    for (report, name, n) in [(&stable, "stable", 3), (&canary, "canary", 2)] {
        ensure!(report.by_backend().get(name) == Some(&n), "{report:?}");
        ensure!(
            report.resets() == 0 && report.stalls() == 0 && report.ended() == 0,
            "{report:?}"
        );
        // ~24 exchanges in 1.2 s at one per 50 ms; allow for a slow machine.
        ensure!(report.min_messages_ok() >= 10, "{report:?}");
    }
    Ok(())
}

#[test]
fn http_load_fault_injection_and_metrics() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let stable_http = SocketAddr::new(STABLE_V4.into(), HTTP_PORT);
    let stable_admin = SocketAddr::new(STABLE_V4.into(), ADMIN_PORT);
    let canary_http = SocketAddr::new(CANARY_V6.into(), HTTP_PORT);
    let canary_admin = SocketAddr::new(CANARY_V6.into(), ADMIN_PORT);

    topo.client.enter(|| {
        let healthy = http_load(stable_http, "/", 200, Duration::from_secs(1), 4)?;
        ensure!(
            healthy.sent == 200 && healthy.status(200) == 200,
            "{healthy:?}"
        );
        ensure!(
            healthy.version("stable") == 200 && healthy.failed() == 0,
            "{healthy:?}"
        );

        set_faults(
            stable_admin,
            &Faults {
                error_rate: 1.0,
                ..Faults::default()
            },
        )?;
        let failing = http_load(stable_http, "/", 100, Duration::from_millis(500), 2)?;
        ensure!(
            failing.status(503) == 50 && failing.version("stable") == 50,
            "{failing:?}"
        );

        set_faults(
            stable_admin,
            &Faults {
                reset_rate: 1.0,
                ..Faults::default()
            },
        )?;
        let reset = http_load(stable_http, "/", 50, Duration::from_millis(400), 2)?;
        ensure!(
            reset.failed() == 20 && reset.by_status.is_empty(),
            "{reset:?}"
        );

        set_faults(
            stable_admin,
            &Faults {
                extra_latency_ms: 100,
                ..Faults::default()
            },
        )?;
        let slow = http_load(stable_http, "/", 20, Duration::from_secs(1), 4)?;
        ensure!(
            slow.status(200) == 20 && slow.latency.p50_ms >= 100.0,
            "{slow:?}"
        );

        // A partial update keeps the other fields; invalid values are refused.
        let patched = http_request(
            stable_admin,
            "POST",
            "/faults",
            Some(r#"{"error_rate":0.0}"#),
            Duration::from_secs(5),
        )?;
        ensure!(
            patched.status == 200 && patched.body.contains(r#""extra_latency_ms":100"#),
            "{patched:?}"
        );
        let refused = http_request(
            stable_admin,
            "POST",
            "/faults",
            Some(r#"{"reset_rate":2}"#),
            Duration::from_secs(5),
        )?;
        ensure!(refused.status == 400, "{refused:?}");
        set_faults(stable_admin, &Faults::default())?;

        let text = scrape_metrics(stable_admin)?;
        let requests = |code: &str| {
            metric_value(
                &text,
                "lab_requests_total",
                &[("version", "stable"), ("code", code)],
            )
        };
        ensure!(requests("200") == Some(220.0), "{text}");
        ensure!(requests("503") == Some(50.0), "{text}");

        set_faults(
            canary_admin,
            &Faults {
                conversion_rate: 1.0,
                ..Faults::default()
            },
        )?;
        let converting = http_load(canary_http, "/checkout", 50, Duration::from_millis(400), 2)?;
        set_faults(canary_admin, &Faults::default())?;
        let flat = http_load(canary_http, "/checkout", 50, Duration::from_millis(200), 2)?;
        ensure!(
            converting.version("canary") == 20 && flat.version("canary") == 10,
            "{converting:?} {flat:?}"
        );

        let text = scrape_metrics(canary_admin)?;
        let canary = [("version", "canary")];
        ensure!(
            metric_value(&text, "lab_checkout_attempts_total", &canary) == Some(30.0),
            "{text}"
        );
        ensure!(
            metric_value(&text, "lab_conversions_total", &canary) == Some(20.0),
            "{text}"
        );
        Ok(())
    })
}

#[test]
fn namespaces_and_processes_are_removed_on_drop_and_on_panic() -> Result<()> {
    let topo = Topology::build()?;
    let names = ns_names(&topo);
    let guarded = topo.node.spawn("sleep", &["30"])?;
    // A process no guard owns: the namespace's teardown must kill it too.
    let stray: u32 = topo
        .node
        .run(&["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"])?
        .trim()
        .parse()?;
    ensure!(names.iter().all(|n| listed(n)), "{names:?} not all listed");
    let guarded_pid = guarded.pid();
    drop(topo);
    drop(guarded);
    assert_gone(&names, &[guarded_pid, stray]);

    let seen = Mutex::new((Vec::new(), 0));
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let topo = Topology::build().expect("building the topology");
        let child = topo.stable.spawn("sleep", &["30"]).expect("spawning sleep");
        *seen.lock().unwrap() = (ns_names(&topo), child.pid());
        panic!("deliberate panic while the lab is up");
    }));
    ensure!(outcome.is_err(), "the closure should have panicked");
    let (names, pid) = seen.into_inner().unwrap();
    ensure!(names.len() == 4, "the topology was not built");
    assert_gone(&names, &[pid]);

    let ns = NetNs::new("errors")?;
    let err = ns
        .run(&["ip", "link", "set", "nosuch0", "up"])
        .unwrap_err()
        .to_string();
    ensure!(err.contains("nosuch0") && err.contains(ns.name()), "{err}");
    Ok(())
}

fn ns_names(topo: &Topology) -> Vec<String> {
    topo.namespaces()
        .iter()
        .map(|ns| ns.name().to_string())
        .collect()
}

fn listed(name: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("running ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

/// Asserts the namespaces are gone and the processes dead, giving the stray
/// process (reaped by init, not by us) a moment.
fn assert_gone(names: &[String], pids: &[u32]) {
    for name in names {
        assert!(!listed(name), "namespace {name} survived");
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    for &pid in pids {
        while alive(pid) {
            assert!(Instant::now() < deadline, "process {pid} survived");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Running and not a zombie (a zombie has left its namespace).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}
