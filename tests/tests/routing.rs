//! End-to-end request routing: a `protocol = "http"` service whose policy routes by
//! header, through the node's sk_lookup program to the agent's router and then spliced
//! in the kernel (sk_skb verdict) to the chosen version. Real connections from the
//! client namespace to the lab backends. Run as root.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    backend::{HTTP_PORT, VERSION_HEADER},
    topology::{CANARY_V4, STABLE_V4},
    Backends, Topology, Version, VIP_V4,
};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");
const POLICY: &str = "(define-canary-split '((canary . 0)))\n\
(define-header-routing '((header . \"X-Canary\") (values . (\"true\" \"test\" \"qa\")) (default . stable)))\n";

/// One response: status code and the backend version header.
fn read_response(conn: &mut TcpStream) -> Result<(u16, String)> {
    read_full(conn).map(|(status, version, _)| (status, version))
}

/// One response: status code, the backend version header and the body.
fn read_full(conn: &mut TcpStream) -> Result<(u16, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            bail!("connection closed in a response head ({} bytes)", buf.len());
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = head
        .get(9..12)
        .context("short status line")?
        .parse()
        .with_context(|| format!("status in {head:?}"))?;
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let len: usize = header("content-length").map_or(Ok(0), |v| v.parse())?;
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)?;
    Ok((status, header(VERSION_HEADER).unwrap_or_default(), body))
}

fn request(conn: &mut TcpStream, extra: &str) -> Result<(u16, String)> {
    write!(conn, "GET / HTTP/1.1\r\nHost: web\r\n{extra}\r\n")?;
    read_response(conn)
}

fn connect(target: SocketAddr) -> Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(conn)
}

/// The lab backends and an agent routing service "web" on port 80 by [`POLICY`];
/// `extra` adds service settings.
fn start_web(topo: &Topology, extra: &str) -> Result<(Backends, Agent, String)> {
    let backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let services = lab_service(
        "web",
        80,
        HTTP_PORT,
        &format!("protocol = \"http\"\npolicy = \"route.scm\"{extra}"),
    );
    let agent = Agent::start_with_files(&topo.node, &services, &[("route.scm", POLICY)], &[])?;
    Ok((backends, agent, services))
}

#[test]
fn header_routing_is_decided_at_the_first_head_and_spliced_in_the_kernel() -> Result<()> {
    let topo = Topology::build()?;
    let (_backends, agent, services) = start_web(&topo, "")?;
    let target = SocketAddr::new(VIP_V4.into(), 80);
    topo.client.enter(|| -> Result<()> {
        for (header, want) in [
            ("X-Canary: true\r\n", "canary"),
            ("X-Canary: test\r\n", "canary"),
            ("x-canary: qa\r\n", "canary"),
            ("X-Canary: TRUE\r\n", "stable"),
            ("X-Canary: no\r\n", "stable"),
            ("", "stable"),
        ] {
            let mut conn = connect(target)?;
            let (status, version) = request(&mut conn, header)?;
            ensure!(
                status == 200 && version == want,
                "{header:?}: {status} {version}"
            );
        }
        // Keep-alive: the connection stays on the version its first head chose; the
        // later requests go through the kernel splice (and carry no header at all).
        let mut conn = connect(target)?;
        let (_, first) = request(&mut conn, "X-Canary: qa\r\n")?;
        ensure!(first == "canary");
        for i in 0..200 {
            let (status, version) = request(&mut conn, "")?;
            ensure!(
                status == 200 && version == "canary",
                "request {i}: {status} {version}"
            );
        }
        drop(conn);
        // Bad input: not HTTP, and a head over the 16 KiB limit.
        let mut conn = connect(target)?;
        conn.write_all(b"\x16\x03\x01\x02\x00 not http\r\n\r\n")?;
        ensure!(read_response(&mut conn)?.0 == 400, "non-HTTP bytes");
        let mut conn = connect(target)?;
        conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")?;
        ensure!(read_response(&mut conn)?.0 == 400, "HTTP/2 preface");
        let mut conn = connect(target)?;
        let big = format!("X-Big: {}\r\n", "a".repeat(17 * 1024));
        let _ = conn.write_all(format!("GET / HTTP/1.1\r\nHost: web\r\n{big}\r\n").as_bytes());
        ensure!(read_response(&mut conn)?.0 == 431, "oversized head");
        Ok(())
    })?;
    let status = agent.status()?;
    let routing = &status["services"][0]["routing"];
    println!("routing: {routing}");
    ensure!(
        routing["header"].as_u64() == Some(7),
        "header decisions: {routing}"
    );
    ensure!(routing["bad_requests"].as_u64() == Some(2), "{routing}");
    // The backends' connection counts include the router's connections.
    let per_backend: Vec<u64> = status["services"][0]["backends"]
        .as_array()
        .context("backends")?
        .iter()
        .map(|b| b["connections"].as_u64().unwrap_or(0))
        .collect();
    ensure!(
        per_backend.iter().sum::<u64>() == 7 && per_backend.iter().all(|n| *n > 0),
        "routed connections per backend: {per_backend:?}"
    );
    ensure!(routing["too_large"].as_u64() == Some(1), "{routing}");
    let (user, kernel) = (
        routing["userspace_bytes"].as_u64().unwrap_or(0),
        routing["kernel_bytes"].as_u64().unwrap_or(0),
    );
    ensure!(
        kernel > 10 * user,
        "kernel carried {kernel} bytes, agent copied {user}"
    );
    // A reload gives new connections the new rules; a change to the set of routed
    // services is refused whole.
    let dir = agent.config.parent().context("config dir")?;
    std::fs::write(
        dir.join("route.scm"),
        POLICY.replace("\"true\" \"test\" \"qa\"", "\"yes\""),
    )?;
    agent.cli(&["reload"])?;
    topo.client.enter(|| -> Result<()> {
        for (header, want) in [
            ("X-Canary: yes\r\n", "canary"),
            ("X-Canary: true\r\n", "stable"),
        ] {
            let (status, version) = request(&mut connect(target)?, header)?;
            ensure!(
                status == 200 && version == want,
                "after the reload, {header:?}: {status} {version}"
            );
        }
        Ok(())
    })?;
    agent.write_services(
        &(services
            + &lab_service(
                "web2",
                81,
                HTTP_PORT,
                "protocol = \"http\"\npolicy = \"route.scm\"",
            )),
    )?;
    let err = agent.cli(&["reload"]).unwrap_err().to_string();
    ensure!(
        err.contains("takes a hand-over (SIGUSR2), not a reload") && err.contains("web2"),
        "{err}"
    );
    // Every connection above is closed: no socket or map entry is left behind.
    wait_no_splice(&agent, Duration::from_secs(5))?;
    Ok(())
}

/// FNV-1a over a byte stream: both ends compare what they saw.
fn fnv(data: &[u8], mut h: u64) -> u64 {
    for b in data {
        h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}
const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

/// The bulk payload: `n` bytes of a fixed pattern that shifts every 251 bytes.
fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ (i / 251) as u8).collect()
}

/// A test-owned HTTP/1.1 backend on a listener made in a backend namespace:
/// `GET /big` answers 1 MiB of `payload`, `POST /up` reads the body and answers its
/// hash; the `x-canary-version` header names the version. Serves until the test ends.
/// Port of the bulk backends ([`start_bulk_backends`]).
const BULK_PORT: u16 = 8090;

/// A bulk backend on [`BULK_PORT`] in the stable and the canary namespace.
fn start_bulk_backends(topo: &Topology) -> Result<()> {
    for (version, addr, name) in [
        (Version::Stable, STABLE_V4, "stable"),
        (Version::Canary, CANARY_V4, "canary"),
    ] {
        let listener = topo
            .backend(version)
            .enter(|| Ok(std::net::TcpListener::bind((addr, BULK_PORT))?))?;
        bulk_backend(listener, name);
    }
    Ok(())
}

fn bulk_backend(listener: std::net::TcpListener, version: &'static str) {
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve_bulk(conn, version));
        }
    });
}

fn serve_bulk(mut conn: TcpStream, version: &str) -> Result<()> {
    loop {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if conn.read(&mut byte)? == 0 {
                return Ok(());
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_string())
            })
            .map_or(Ok(0), |v| v.parse())?;
        let body = if head.starts_with("POST /up") {
            let mut hash = FNV0;
            let mut left = len;
            let mut buf = vec![0u8; 64 * 1024];
            while left > 0 {
                let n = conn.read(&mut buf[..left.min(64 * 1024)])?;
                ensure!(n > 0, "upload cut short");
                hash = fnv(&buf[..n], hash);
                left -= n;
            }
            format!("{hash:016x}").into_bytes()
        } else {
            payload(1 << 20)
        };
        write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{VERSION_HEADER}: {version}\r\n\r\n",
            body.len()
        )?;
        conn.write_all(&body)?;
    }
}

/// A connection from a given source address of the client namespace.
fn connect_from(source: std::net::IpAddr, target: SocketAddr) -> Result<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let conn = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(source, 0))?;
        sock.connect(target).await
    })?;
    let conn = conn.into_std()?;
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(conn)
}

#[test]
fn cohorts_users_flags_bulk_and_failing_backends() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let inside = topo.add_client_addrs(1)?[0];
    start_bulk_backends(&topo)?;
    let users = format!(
        "(define-canary-split '((canary . 0)))\n\
         (define-cohorts '((beta-users (header . \"X-User-Group\") (values . (\"beta\")))\n\
                           (internal-users (client-cidr . (\"{inside}/32\")))\n\
                           (regular-users (default . #t))))\n\
         (define-user-key '(header . \"X-User-Id\"))\n\
         (define-user-cohorts '((beta-users . canary) (internal-users . canary) (percentage . ((regular-users . 10)))))\n\
         (define-feature-routing '((header . \"X-Features\") (flags . ((new-checkout . canary) (legacy-cart . stable)))))\n"
    );
    let services = lab_service("users", 81, HTTP_PORT, "protocol = \"http\"\npolicy = \"users.scm\"")
        + &lab_service("bulk", 82, BULK_PORT, "protocol = \"http\"\npolicy = \"route.scm\"")
        // Nothing listens on the canary's port 9: connections are refused.
        + &format!(
            "[[service]]\nname = \"refused\"\nlisten = \"{VIP_V4}:83\"\nprotocol = \"http\"\n\
             stable = [\"{STABLE_V4}:{HTTP_PORT}\"]\ncanary = [\"{CANARY_V4}:9\"]\n\
             policy = \"route.scm\"\nhead_timeout = 1\n"
        );
    let agent = Agent::start_with_files(
        &topo.node,
        &services,
        &[("users.scm", &users), ("route.scm", POLICY)],
        &[],
    )?;
    let at = |port| SocketAddr::new(VIP_V4.into(), port);
    topo.client.enter(|| -> Result<()> {
        // Cohorts and flags.
        for (headers, want) in [
            ("X-User-Group: beta\r\n", "canary"),
            (
                "X-Features: a, new-checkout\r\nX-User-Group: beta\r\n",
                "canary",
            ),
            (
                "X-Features: legacy-cart\r\nX-User-Group: beta\r\n",
                "stable",
            ),
        ] {
            let (status, version) = request(&mut connect(at(81))?, headers)?;
            ensure!(
                status == 200 && version == want,
                "{headers:?}: {status} {version}"
            );
        }
        for _ in 0..5 {
            let (_, version) = request(&mut connect_from(inside, at(81))?, "X-User-Id: u1\r\n")?;
            ensure!(version == "canary", "client-cidr cohort went to {version}");
        }
        // 2000 users at 10 %: sticky per user id, on every connection.
        let mut on_canary = Vec::new();
        for i in 0..2000 {
            let (status, version) =
                request(&mut connect(at(81))?, &format!("X-User-Id: user-{i}\r\n"))?;
            ensure!(status == 200, "user {i}: {status}");
            on_canary.push(version == "canary");
        }
        let share = 100.0 * on_canary.iter().filter(|c| **c).count() as f64 / 2000.0;
        println!("2000 users at 10 %: {share:.2} % on canary");
        ensure!((share - 10.0).abs() <= 1.5, "user share {share:.2} %");
        for (i, was) in on_canary.iter().enumerate().take(300) {
            let (_, version) = request(&mut connect(at(81))?, &format!("X-User-Id: user-{i}\r\n"))?;
            ensure!((version == "canary") == *was, "user-{i} moved to {version}");
        }
        // Bulk, spliced: 1 MiB responses and a 10 MiB upload arrive intact.
        for header in ["X-Canary: true\r\n", ""] {
            let mut conn = connect(at(82))?;
            write!(conn, "GET /big HTTP/1.1\r\nHost: b\r\n{header}\r\n")?;
            let (status, _, body) = read_full(&mut conn)?;
            ensure!(
                status == 200 && body == payload(1 << 20),
                "1 MiB response differs"
            );
            let (_, _, body) = {
                write!(conn, "GET /big HTTP/1.1\r\nHost: b\r\n\r\n")?;
                read_full(&mut conn)?
            };
            ensure!(body == payload(1 << 20), "second 1 MiB response differs");
            let up = payload(10 << 20);
            write!(
                conn,
                "POST /up HTTP/1.1\r\nHost: b\r\ncontent-length: {}\r\n\r\n",
                up.len()
            )?;
            conn.write_all(&up)?;
            let (status, _, body) = read_full(&mut conn)?;
            ensure!(
                status == 200 && body == format!("{:016x}", fnv(&up, FNV0)).into_bytes(),
                "10 MiB upload hash differs"
            );
        }
        // A canary that refuses connections: 502, and stable still serves.
        let (status, _) = request(&mut connect(at(83))?, "X-Canary: true\r\n")?;
        ensure!(status == 502, "refused canary gave {status}");
        let (status, version) = request(&mut connect(at(83))?, "")?;
        ensure!(status == 200 && version == "stable");
        // A client that sends nothing is closed after head_timeout (1 s); other
        // clients are served meanwhile.
        let idle: Vec<TcpStream> = (0..200).map(|_| connect(at(83))).collect::<Result<_>>()?;
        let (status, _) = request(&mut connect(at(83))?, "")?;
        ensure!(status == 200, "served while 200 clients idle");
        std::thread::sleep(Duration::from_millis(1500));
        for mut c in idle {
            let mut b = [0u8; 1];
            ensure!(matches!(c.read(&mut b), Ok(0)), "idle client not closed");
        }
        Ok(())
    })?;
    let status = agent.status()?;
    let svc = |name: &str| {
        status["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()["routing"]
            .clone()
    };
    let users = svc("users");
    println!("users routing: {users}");
    ensure!(users["flag"].as_u64() == Some(2), "{users}");
    ensure!(users["cohort"]["beta-users"].as_u64() == Some(1), "{users}");
    ensure!(
        users["cohort"]["internal-users"].as_u64() == Some(5),
        "{users}"
    );
    ensure!(
        users["cohort"]["regular-users"].as_u64() == Some(2300),
        "{users}"
    );
    let bulk = svc("bulk");
    println!("bulk routing: {bulk}");
    let (user, kernel) = (
        bulk["userspace_bytes"].as_u64().unwrap_or(0),
        bulk["kernel_bytes"].as_u64().unwrap_or(0),
    );
    ensure!(kernel > 20 << 20, "kernel carried {kernel} bytes");
    println!("bulk: agent copied {user} bytes, kernel carried {kernel}");
    let refused = svc("refused");
    ensure!(refused["head_timeouts"].as_u64() == Some(200), "{refused}");
    let metrics = agent.cli(&["status", "--json"])?;
    ensure!(metrics.contains("\"routing\""));
    Ok(())
}

const ROLLBACK_POLICY: &str = r#"step = [ { at = 0, weight = 0 }, { at = "10m", weight = 100 } ]
[routing.header]
header = "X-Canary"
values = ["true"]
[[metric]]
name = "error-rate"
threshold = 1.05
window = "60s"
[[rule]]
name = "error-spike"
when = "error-rate > baseline * 1.5"
action = "immediate-rollback"
"#;

#[test]
fn a_failing_header_routed_canary_is_rolled_back() -> Result<()> {
    use canary_lab::backend::{set_faults, ADMIN_PORT};
    use canary_lab::{topology::NODE_CLIENT_V4, Faults};
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let services = format!("metrics_listen = \"{NODE_CLIENT_V4}:9464\"\n")
        + &lab_service(
            "web",
            80,
            HTTP_PORT,
            "protocol = \"http\"\npolicy = \"policy.toml\"",
        );
    let agent = Agent::start_with_files(
        &topo.node,
        &services,
        &[("policy.toml", ROLLBACK_POLICY)],
        &[],
    )?;
    agent.cli(&["rollout", "start", "web"])?;
    let target = SocketAddr::new(VIP_V4.into(), 80);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let after = std::thread::scope(|scope| -> Result<_> {
        for header in ["X-Canary: true\r\n", "X-Canary: true\r\n", "", ""] {
            let (topo, stop) = (&topo, &stop);
            scope.spawn(move || {
                topo.client.enter(|| -> Result<()> {
                    let mut conn = connect(target)?;
                    request(&mut conn, header)?;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        request(&mut conn, "")?;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Ok(())
                })
            });
        }
        std::thread::sleep(Duration::from_secs(2));
        topo.client.enter(|| {
            set_faults(
                SocketAddr::new(CANARY_V4.into(), ADMIN_PORT),
                &Faults {
                    error_rate: 1.0,
                    ..Default::default()
                },
            )
        })?;
        let after = agent.wait_for_rollout("rolled-back", Duration::from_secs(20));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        after
    })?;
    let status = agent.status()?;
    let after = after.ok_or_else(|| anyhow::anyhow!("no rollback: {status}"))?;
    println!(
        "header-routed canary rolled back {after:?} after the fault: {}",
        status["services"][0]["rollout"]["reason"]
    );
    // After the rollback the header no longer reaches the canary.
    topo.client.enter(|| -> Result<()> {
        let (status, version) = request(&mut connect(target)?, "X-Canary: true\r\n")?;
        ensure!(status == 200 && version == "stable", "{status} {version}");
        Ok(())
    })?;
    let metrics = topo.client.enter(|| {
        let mut conn = TcpStream::connect((NODE_CLIENT_V4, 9464))?;
        write!(
            conn,
            "GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        Ok(text)
    })?;
    ensure!(
        metrics.contains(
            "canary_routing_decisions_total{service=\"web\",rule=\"header\",version=\"canary\"} 2"
        ),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("routing"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

/// An upload whose body follows its head at once: the router only peeks at the head,
/// so the kernel carries the whole byte stream in order, head included. (An earlier
/// router read the head and handed the rest over to the kernel, and lost this race.)
#[test]
fn an_upload_sent_with_its_head_arrives_intact() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    start_bulk_backends(&topo)?;
    let services = lab_service(
        "bulk",
        82,
        BULK_PORT,
        "protocol = \"http\"\npolicy = \"route.scm\"",
    );
    let agent = Agent::start_with_files(&topo.node, &services, &[("route.scm", POLICY)], &[])?;
    let at = |port| SocketAddr::new(VIP_V4.into(), port);
    topo.client.enter(|| -> Result<()> {
        for i in 0..20 {
            let mut conn = connect(at(82))?;
            let up = payload(4 << 20);
            let mut req = format!(
                "POST /up HTTP/1.1\r\nHost: b\r\ncontent-length: {}\r\n\r\n",
                up.len()
            )
            .into_bytes();
            req.extend_from_slice(&up);
            conn.write_all(&req)?;
            let (_, _, body) = read_full(&mut conn)?;
            ensure!(
                body == format!("{:016x}", fnv(&up, FNV0)).into_bytes(),
                "eager upload {i} differs"
            );
        }
        Ok(())
    })?;
    let routing = &agent.status()?["services"][0]["routing"];
    let (user, kernel) = (
        routing["userspace_bytes"].as_u64().unwrap_or(u64::MAX),
        routing["kernel_bytes"].as_u64().unwrap_or(0),
    );
    println!("eager uploads: agent peeked at {user} bytes, kernel carried {kernel}");
    ensure!(kernel >= 20 * (4 << 20), "kernel carried {kernel} bytes");
    ensure!(user <= 20 * 16 * 1024, "agent copied {user} bytes");
    Ok(())
}

/// A log without its colour escapes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Open descriptors of a process.
fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Sockets, peers and state entries of the splice maps, and the router's open count.
fn splice_left(agent: &Agent) -> Result<(u64, u64)> {
    let routing = &agent.status()?["services"][0]["routing"];
    let entries = &routing["splice_entries"];
    let left = ["sockets", "peers", "state"]
        .iter()
        .map(|k| entries[k].as_u64().unwrap_or(u64::MAX))
        .sum::<u64>();
    Ok((
        left,
        routing["open_connections"].as_u64().unwrap_or(u64::MAX),
    ))
}

/// Waits (bounded) until no splice map entry and no routed connection is left.
fn wait_no_splice(agent: &Agent, limit: Duration) -> Result<()> {
    let start = std::time::Instant::now();
    while splice_left(agent)? != (0, 0) {
        ensure!(
            start.elapsed() < limit,
            "left behind: (entries, open) = {:?}",
            splice_left(agent)?
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Waits (bounded) until the agent holds at most `fds` descriptors and no splice
/// entry or open routed connection.
fn wait_back_to(agent: &Agent, pid: u32, fds: usize, limit: Duration) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        let now = (open_fds(pid)?, splice_left(agent)?);
        if now.0 <= fds && now.1 == (0, 0) {
            return Ok(());
        }
        ensure!(
            start.elapsed() < limit,
            "agent not back to {fds} fds and no splice entry: (fds, (entries, open)) = {now:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// 10,000 connections that end every way a connection ends (after a request, before
/// any byte, in the middle of a head, by the backend closing first), then 10,000 idle
/// clients: the agent's descriptors and the splice maps return to where they started,
/// and the idle clients hold up nobody.
#[test]
fn ten_thousand_connections_leave_nothing_behind_and_idle_clients_block_nobody() -> Result<()> {
    raise_fd_limit();
    let topo = Topology::build()?;
    let (_backends, agent, _) = start_web(&topo, "\nhead_timeout = 120")?;
    let pid = agent.pid().context("agent pid")?;
    let target = SocketAddr::new(VIP_V4.into(), 80);
    // One routed connection first, so that every lazily opened descriptor is open.
    topo.client
        .enter(|| request(&mut connect(target)?, "").map(|_| ()))?;
    wait_back_to(&agent, pid, usize::MAX, Duration::from_secs(5))?;
    let fds = open_fds(pid)?;
    topo.client.enter(|| -> Result<()> {
        std::thread::scope(|scope| -> Result<()> {
            let workers: Vec<_> = (0..4)
                .map(|w| {
                    scope.spawn(move || -> Result<()> {
                        for i in (w..10_000).step_by(4) {
                            let mut conn = connect(target)?;
                            match i % 4 {
                                0 => {
                                    let (status, _) = request(
                                        &mut conn,
                                        if i % 8 == 0 { "X-Canary: true\r\n" } else { "" },
                                    )?;
                                    ensure!(status == 200, "connection {i}: {status}");
                                }
                                1 => {}
                                2 => conn.write_all(b"GET / HTTP/1.1\r\nHost: we")?,
                                _ => {
                                    let (status, _) = request(&mut conn, "Connection: close\r\n")?;
                                    ensure!(status == 200, "connection {i}: {status}");
                                    let mut b = [0u8; 1];
                                    ensure!(
                                        matches!(conn.read(&mut b), Ok(0)),
                                        "backend close not passed on ({i})"
                                    );
                                }
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            for w in workers {
                w.join().expect("worker panicked")?;
            }
            Ok(())
        })
    })?;
    wait_back_to(&agent, pid, fds, Duration::from_secs(15))?;
    println!("after 10,000 connections: agent back to {fds} descriptors, no splice entry");
    // Idle clients hold a descriptor each until head_timeout (long enough here for all
    // of them to connect first; the close at head_timeout itself is tested above with
    // 200). The test then closes them and the agent lets go of every one.
    let idle = topo.client.enter(|| -> Result<Vec<TcpStream>> {
        let idle: Vec<TcpStream> = (0..10_000)
            .map(|_| connect(target))
            .collect::<Result<_>>()?;
        for (i, header) in ["", "X-Canary: true\r\n", ""].iter().enumerate() {
            let (status, _) = request(&mut connect(target)?, header)?;
            ensure!(
                status == 200,
                "request {i} while 10,000 clients idle: {status}"
            );
        }
        Ok(idle)
    })?;
    let start = std::time::Instant::now();
    while open_fds(pid)? < fds + 10_000 {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "idle clients not all accepted: the agent holds {} descriptors",
            open_fds(pid)?
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .map(|l| l.trim_start_matches("VmRSS:").trim().to_string())
        .unwrap_or_default();
    println!(
        "10,000 idle clients: the agent holds {} descriptors and {rss} resident, other clients were served",
        open_fds(pid)?
    );
    drop(idle);
    wait_back_to(&agent, pid, fds, Duration::from_secs(20))?;
    Ok(())
}

/// SIGUSR2 with 100 spliced connections (10 of them busy throughout), 5 clients still
/// to send their head, and new clients arriving: the agent re-executes in place and
/// none of them notices. A config the binary refuses keeps the old agent running.
#[test]
fn a_hand_over_keeps_every_routed_connection() -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let topo = Topology::build()?;
    let (_backends, agent, _) = start_web(&topo, "")?;
    let pid = agent.pid().context("agent pid")?;
    let target = SocketAddr::new(VIP_V4.into(), 80);
    let header = |i: usize| {
        if i.is_multiple_of(2) {
            "X-Canary: true\r\n"
        } else {
            ""
        }
    };
    let want = |i: usize| {
        if i.is_multiple_of(2) {
            "canary"
        } else {
            "stable"
        }
    };
    let (mut spliced, mut waiting) = topo.client.enter(|| -> Result<_> {
        let mut spliced = Vec::new();
        for i in 0..100 {
            let mut conn = connect(target)?;
            let (status, version) = request(&mut conn, header(i))?;
            ensure!(
                status == 200 && version == want(i),
                "{i}: {status} {version}"
            );
            spliced.push(conn);
        }
        let waiting: Vec<TcpStream> = (0..5).map(|_| connect(target)).collect::<Result<_>>()?;
        Ok((spliced, waiting))
    })?;
    let busy: Vec<TcpStream> = spliced.drain(..10).collect();
    let stop = AtomicBool::new(false);
    let (done, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let log_count = |text: &str| agent.log().matches(text).count();
    let listening = log_count("control API listening");
    std::thread::scope(|scope| -> Result<()> {
        for (i, mut conn) in busy.into_iter().enumerate() {
            let (stop, done, failed) = (&stop, &done, &failed);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match request(&mut conn, "") {
                        Ok((200, v)) if v == want(i) => done.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        let newcomers = scope.spawn(|| {
            topo.client.enter(|| -> Result<u64> {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (status, _) = request(&mut connect(target)?, "")?;
                    ensure!(
                        status == 200,
                        "new connection during the hand-over: {status}"
                    );
                    n += 1;
                }
                Ok(n)
            })
        });
        std::thread::sleep(Duration::from_millis(300));
        agent.signal(libc::SIGUSR2);
        let start = std::time::Instant::now();
        while log_count("control API listening") == listening {
            ensure!(
                start.elapsed() < Duration::from_secs(20),
                "no hand-over: {}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("hand-over done in {:?}", start.elapsed());
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let n = newcomers.join().expect("newcomers panicked")?;
        println!("new connections served during the hand-over: {n}");
        Ok(())
    })?;
    ensure!(
        agent.pid() == Some(pid) && agent.running(),
        "agent not running as pid {pid}"
    );
    let (done, failed) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("busy connections: {done} requests during the hand-over, {failed} failed");
    ensure!(failed == 0 && done > 0, "{failed} failed, {done} done");
    let log = plain(&agent.log());
    let number = |key: &str| -> Option<u64> {
        let at = log.rfind(key)? + key.len();
        log[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let (handed, adopted) = (number("spliced="), number("adopted="));
    println!("spliced connections handed over: {handed:?}, adopted: {adopted:?}");
    ensure!(
        handed >= Some(100) && handed == adopted,
        "hand-over log: {log}"
    );
    topo.client.enter(|| -> Result<()> {
        for (i, conn) in spliced.iter_mut().enumerate() {
            let i = i + 10;
            let (status, version) = request(conn, "")?;
            ensure!(
                status == 200 && version == want(i),
                "after: {i}: {status} {version}"
            );
        }
        for conn in &mut waiting {
            let (status, version) = request(conn, "X-Canary: true\r\n")?;
            ensure!(
                status == 200 && version == "canary",
                "waiting client: {status} {version}"
            );
        }
        Ok(())
    })?;
    // A config the binary refuses: the hand-over is refused and this agent serves on.
    agent.write_services("[[service]]\nname = \"web\"\nbogus = 1\n")?;
    agent.signal(libc::SIGUSR2);
    let start = std::time::Instant::now();
    while !agent.log().contains("hand-over refused") {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "no refusal: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(log_count("control API listening") == listening + 1);
    topo.client.enter(|| -> Result<()> {
        let (status, _) = request(&mut connect(target)?, "")?;
        ensure!(status == 200, "after a refused hand-over: {status}");
        Ok(())
    })?;
    drop((spliced, waiting));
    wait_no_splice(&agent, Duration::from_secs(5))?;
    Ok(())
}

/// What a client gets from a TCP connect to `target` and a UDP datagram to `udp`
/// (answered by an echo on a socket bound to 0.0.0.0 in the node): `Ok(true)` when
/// the TCP connect is refused and the datagram is not answered.
fn refused(target: SocketAddr, udp: SocketAddr) -> Result<(bool, String)> {
    let tcp = match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => None,
        Err(e) => Some(format!("TCP {target}: {e}")),
        Ok(_) => Some(format!("TCP {target}: connected")),
    };
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    sock.connect(udp)?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    sock.send(b"ping")?;
    let mut buf = [0u8; 64];
    // A refused datagram comes back as ICMP port unreachable: ECONNREFUSED here.
    let udp_seen = match sock.recv(&mut buf) {
        Ok(n) => Some(format!(
            "UDP {udp}: answered {:?}",
            String::from_utf8_lossy(&buf[..n])
        )),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => None,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => Some(format!("UDP {udp}: {e}")),
    };
    let what: Vec<String> = tcp.into_iter().chain(udp_seen).collect();
    Ok((what.is_empty(), what.join("; ")))
}

/// A TCP listener that accepts (and closes) and a UDP echo, served until dropped.
struct Daemons {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Daemons {
    fn serve(tcp: std::net::TcpListener, udp: std::net::UdpSocket) -> Result<Daemons> {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        let s = stop.clone();
        let accept = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if tcp.accept().is_err() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        let s = stop.clone();
        let echo = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        });
        Ok(Daemons {
            stop,
            threads: vec![accept, echo],
        })
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn a_routed_service_address_exposes_only_the_service_port() -> Result<()> {
    use canary_lab::topology::NODE_CLIENT_V4;
    let topo = Topology::build()?;
    let (_backends, mut agent, _) = start_web(&topo, "")?;
    // Host daemons in the node bound to every address: TCP (as sshd or kubelet would
    // be) and a UDP echo.
    let (tcp, udp) = topo.node.enter(|| {
        Ok((
            std::net::TcpListener::bind("0.0.0.0:2222")?,
            std::net::UdpSocket::bind("0.0.0.0:5300")?,
        ))
    })?;
    let _daemons = Daemons::serve(tcp, udp)?;
    let vip = |port| SocketAddr::new(VIP_V4.into(), port);
    let node = |port| SocketAddr::new(NODE_CLIENT_V4.into(), port);
    topo.client.enter(|| -> Result<()> {
        // The daemons answer on the node's own address...
        let (none, what) = refused(node(2222), node(5300))?;
        ensure!(
            !none && what.contains("connected") && what.contains("answered"),
            "{what}"
        );
        // ...and nothing but the service answers on the service address.
        let (none, what) = refused(vip(2222), vip(5300))?;
        ensure!(none, "the service address exposes a host daemon: {what}");
        let (status, _) = request(&mut connect(vip(80))?, "")?;
        ensure!(status == 200, "the service itself: {status}");
        Ok(())
    })?;
    // An agent that is gone leaves the address refusing (the sk_lookup link is
    // pinned), its own port included, until the next agent listens again.
    agent.signal_and_wait(libc::SIGKILL);
    topo.client.enter(|| -> Result<()> {
        let (none, what) = refused(vip(2222), vip(5300))?;
        ensure!(none, "with the agent killed: {what}");
        let (none, what) = refused(vip(80), vip(5300))?;
        ensure!(none, "the service port with the agent killed: {what}");
        Ok(())
    })?;
    agent.relaunch(&topo.node, &[])?;
    topo.client.enter(|| -> Result<()> {
        let (status, _) = request(&mut connect(vip(80))?, "")?;
        ensure!(status == 200, "after the restart: {status}");
        let (none, what) = refused(vip(2222), vip(5300))?;
        ensure!(none, "after the restart: {what}");
        Ok(())
    })?;
    // Uninstall takes the address's local route away with everything else.
    let config = agent.config.to_string_lossy().into_owned();
    agent.cli(&["--config", &config, "uninstall"])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while agent.socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let routes = topo.node.run(&["ip", "route", "show", "table", "local"])?;
    ensure!(
        !routes.contains(&VIP_V4.to_string()),
        "local route left after uninstall: {routes}"
    );
    Ok(())
}
