//! End-to-end request routing: a `protocol = "http"` service whose policy routes by
//! header, through the node's sk_lookup program to the agent's proxy, which decides
//! every request (HTTP/1.x and h2c) and sends it to the chosen version over pooled
//! connections; upgraded connections are spliced in the kernel (sk_skb verdict). Real
//! connections from the client namespace to the lab backends. Run as root.

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

/// One request, written whole in one call (a head in pieces would wait on Nagle).
fn request(conn: &mut TcpStream, extra: &str) -> Result<(u16, String)> {
    conn.write_all(format!("GET / HTTP/1.1\r\nHost: web\r\n{extra}\r\n").as_bytes())?;
    read_response(conn)
}

fn connect(target: SocketAddr) -> Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_nodelay(true)?;
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
fn every_request_is_decided_by_its_own_head() -> Result<()> {
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
        // Keep-alive: every request on the connection follows its own header.
        let mut conn = connect(target)?;
        for i in 0..200 {
            let (header, want) = if i % 3 == 0 {
                ("X-Canary: qa\r\n", "canary")
            } else {
                ("", "stable")
            };
            let (status, version) = request(&mut conn, header)?;
            ensure!(
                status == 200 && version == want,
                "request {i}: {status} {version}"
            );
        }
        // HTTP/1.0 (the proxy closes after the answer), chunked, Expect: 100-continue.
        let mut conn = connect(target)?;
        write!(conn, "GET / HTTP/1.0\r\nX-Canary: true\r\n\r\n")?;
        let (status, version) = read_response(&mut conn)?;
        ensure!(status == 200 && version == "canary", "HTTP/1.0: {status} {version}");
        let mut conn = connect(target)?;
        write!(
            conn,
            "POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n\
             5\r\nhello\r\n0\r\nx-sum: 5\r\n\r\n"
        )?;
        ensure!(read_response(&mut conn)?.0 == 200, "chunked upload");
        write!(
            conn,
            "POST / HTTP/1.1\r\nHost: web\r\nX-Canary: true\r\nExpect: 100-continue\r\ncontent-length: 5\r\n\r\n"
        )?;
        let (status, _) = read_response(&mut conn)?;
        ensure!(status == 100, "Expect: 100-continue answered {status}");
        conn.write_all(b"hello")?;
        let (status, version) = read_response(&mut conn)?;
        ensure!(status == 200 && version == "canary", "after 100: {status} {version}");
        // Bad input: not HTTP, and a head over the 16 KiB limit.
        let mut conn = connect(target)?;
        conn.write_all(b"\x16\x03\x01\x02\x00 not http\r\n\r\n")?;
        ensure!(read_response(&mut conn)?.0 == 400, "non-HTTP bytes");
        let mut conn = connect(target)?;
        let big = format!("X-Big: {}\r\n", "a".repeat(17 * 1024));
        let _ = conn.write_all(format!("GET / HTTP/1.1\r\nHost: web\r\n{big}\r\n").as_bytes());
        ensure!(read_response(&mut conn)?.0 == 431, "oversized head");
        Ok(())
    })?;
    let status = agent.status()?;
    let routing = &status["services"][0]["routing"];
    println!("routing: {routing}");
    // 6 single requests, 200 on one connection, HTTP/1.0, chunked, 100-continue.
    ensure!(
        routing["header"].as_u64() == Some(6 + 200 + 3),
        "header decisions: {routing}"
    );
    ensure!(routing["bad_requests"].as_u64() == Some(1), "{routing}");
    ensure!(routing["too_large"].as_u64() == Some(1), "{routing}");
    // The backends' counts include the proxy's requests, split over both versions.
    let per_backend: Vec<u64> = status["services"][0]["backends"]
        .as_array()
        .context("backends")?
        .iter()
        .map(|b| b["connections"].as_u64().unwrap_or(0))
        .collect();
    ensure!(
        per_backend.iter().sum::<u64>() >= 209 && per_backend.iter().all(|n| *n > 0),
        "routed requests per backend: {per_backend:?}"
    );
    // A reload gives the next requests the new rules; a change to the set of routed
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
        // Bulk, streamed through the proxy: 1 MiB responses and a 10 MiB upload arrive
        // intact.
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
    ensure!(bulk["header"].as_u64() == Some(6), "{bulk}");
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
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        request(&mut conn, header)?;
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
    let header_canary = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "canary_routing_decisions_total{service=\"web\",rule=\"header\",version=\"canary\"} ",
            )
        })
        .and_then(|n| n.trim().parse::<u64>().ok());
    ensure!(
        header_canary.is_some_and(|n| n > 10),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("routing"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

/// An upload whose body follows its head at once arrives intact (an earlier router
/// read the head and handed the rest over to the kernel, and lost this race).
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
    ensure!(routing["header"].as_u64() == Some(20), "{routing}");
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

/// Backend connections the proxy's pools may keep open after a burst (at most one per
/// concurrent request of the burst, per version): closed when idle for a minute.
const POOL_SLACK: usize = 16;

/// 10,000 connections that end every way a connection ends (after a request, before
/// any byte, in the middle of a head, by asking to close), then 10,000 idle clients:
/// the agent's descriptors return to where they started (but for pooled backend
/// connections), and the idle clients hold up nobody.
#[test]
fn ten_thousand_connections_leave_nothing_behind_and_idle_clients_block_nobody() -> Result<()> {
    raise_fd_limit();
    let topo = Topology::build()?;
    let (_backends, agent, _) = start_web(
        &topo,
        "\nhead_timeout = 120\nmax_client_connections = 20000",
    )?;
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
    wait_back_to(&agent, pid, fds + POOL_SLACK, Duration::from_secs(15))?;
    let fds = open_fds(pid)?;
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
    wait_back_to(&agent, pid, fds + POOL_SLACK, Duration::from_secs(20))?;
    Ok(())
}

/// One request on `conn`, opening a new connection first when the last answer said
/// `Connection: close` (as HTTP clients do) or there is none yet.
fn request_reconnecting(
    conn: &mut Option<TcpStream>,
    target: SocketAddr,
    header: &str,
) -> Result<(u16, String)> {
    if conn.is_none() {
        *conn = Some(connect(target)?);
    }
    let c = conn.as_mut().context("connection")?;
    c.write_all(format!("GET / HTTP/1.1\r\nHost: web\r\n{header}\r\n").as_bytes())?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if c.read(&mut byte)? == 0 {
            bail!("connection closed in a response head ({} bytes)", buf.len());
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let status: u16 = head.get(9..12).context("status")?.parse()?;
    let header_value = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    let len: usize = header_value("content-length").map_or(Ok(0), |v| v.parse())?;
    let mut body = vec![0u8; len];
    c.read_exact(&mut body)?;
    if header_value("connection").as_deref() == Some("close") {
        *conn = None;
    }
    Ok((status, header_value(VERSION_HEADER).unwrap_or_default()))
}

/// SIGUSR2 with 100 keep-alive connections (10 of them busy throughout), 5 clients
/// still to send their first byte, and new clients arriving: the agent re-executes in
/// place and no request fails. Idle connections go over to the next image between two
/// requests; a busy one is told `Connection: close` on its answer in flight and its
/// client reconnects. A config the binary refuses keeps the old agent running.
#[test]
fn a_hand_over_loses_no_request() -> Result<()> {
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
    let (mut idle, mut waiting) = topo.client.enter(|| -> Result<_> {
        let mut idle = Vec::new();
        for i in 0..100 {
            let mut conn = connect(target)?;
            let (status, version) = request(&mut conn, header(i))?;
            ensure!(
                status == 200 && version == want(i),
                "{i}: {status} {version}"
            );
            idle.push(conn);
        }
        let waiting: Vec<TcpStream> = (0..5).map(|_| connect(target)).collect::<Result<_>>()?;
        Ok((idle, waiting))
    })?;
    let busy: Vec<TcpStream> = idle.drain(..10).collect();
    let stop = AtomicBool::new(false);
    let (done, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let log_count = |text: &str| agent.log().matches(text).count();
    let listening = log_count("control API listening");
    std::thread::scope(|scope| -> Result<()> {
        for (i, conn) in busy.into_iter().enumerate() {
            let (stop, done, failed, topo) = (&stop, &done, &failed, &topo);
            scope.spawn(move || {
                topo.client.enter(|| {
                    let mut conn = Some(conn);
                    while !stop.load(Ordering::Relaxed) {
                        match request_reconnecting(&mut conn, target, header(i)) {
                            Ok((200, v)) if v == want(i) => done.fetch_add(1, Ordering::Relaxed),
                            other => {
                                println!("busy {i}: {other:?}");
                                conn = None;
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                    Ok(())
                })
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
    let (handed, adopted) = (number("pending="), number("adopted="));
    println!("idle connections handed over: {handed:?}, adopted: {adopted:?}");
    ensure!(
        handed >= Some(90) && handed == adopted,
        "hand-over log: {log}"
    );
    topo.client.enter(|| -> Result<()> {
        for (i, conn) in idle.iter_mut().enumerate() {
            let i = i + 10;
            let (status, version) = request(conn, header(i))?;
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
    drop((idle, waiting));
    wait_no_splice(&agent, Duration::from_secs(5))?;
    Ok(())
}

/// Requests spread over a pool of `pool` keep-alive connections, one thread per
/// connection, request `i` on connection `i % pool`: the version that answered each.
fn pooled(target: SocketAddr, pool: usize, headers: &[String]) -> Result<Vec<String>> {
    let answers = std::sync::Mutex::new(vec![String::new(); headers.len()]);
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..pool)
            .map(|w| {
                let answers = &answers;
                scope.spawn(move || -> Result<()> {
                    let mut conn = connect(target)?;
                    for i in (w..headers.len()).step_by(pool) {
                        let (status, version) = request(&mut conn, &headers[i])?;
                        ensure!(status == 200, "request {i}: {status}");
                        answers.lock().unwrap()[i] = version;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().expect("pool worker panicked")?;
        }
        Ok(())
    })?;
    Ok(answers.into_inner().unwrap())
}

/// A deterministic shuffle (xorshift), so a failure can be replayed.
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        items.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

/// Many users' requests through a pool of 8 keep-alive connections, as from an ingress
/// or any pooled HTTP client: each is decided by its own header, flag or user.
#[test]
fn pooled_connections_route_every_request_by_its_own_head() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let users = "(define-canary-split '((canary . 0)))\n\
         (define-cohorts '((beta-users (header . \"X-User-Group\") (values . (\"beta\")))\n\
                           (regular-users (default . #t))))\n\
         (define-user-key '(header . \"X-User-Id\"))\n\
         (define-user-cohorts '((beta-users . canary) (percentage . ((regular-users . 10)))))\n\
         (define-feature-routing '((header . \"X-Features\") (flags . ((new-checkout . canary) (legacy-cart . stable)))))\n";
    let services = lab_service(
        "web",
        80,
        HTTP_PORT,
        "protocol = \"http\"\npolicy = \"route.scm\"",
    ) + &lab_service(
        "users",
        81,
        HTTP_PORT,
        "protocol = \"http\"\npolicy = \"users.scm\"",
    );
    let agent = Agent::start_with_files(
        &topo.node,
        &services,
        &[("route.scm", POLICY), ("users.scm", users)],
        &[],
    )?;
    let at = |port| SocketAddr::new(VIP_V4.into(), port);
    topo.client.enter(|| -> Result<()> {
        // 4000 requests, every 4th with the header.
        let headers: Vec<String> = (0..4000)
            .map(|i| {
                if i % 4 == 0 {
                    "X-Canary: true\r\n".to_string()
                } else {
                    String::new()
                }
            })
            .collect();
        let got = pooled(at(80), 8, &headers)?;
        let wrong = (0..4000)
            .filter(|i| (got[*i] == "canary") != (i % 4 == 0))
            .count();
        println!("header through the pool: {wrong} of 4000 on the wrong version");
        ensure!(wrong == 0, "{wrong} of 4000 requests on the wrong version");
        // Flags: every 4th asks for the canary feature, every 4th + 1 for the stable one
        // of a beta user (whose cohort would say canary).
        let headers: Vec<String> = (0..4000)
            .map(|i| match i % 4 {
                0 => "X-Features: new-checkout\r\n".to_string(),
                1 => "X-Features: legacy-cart\r\nX-User-Group: beta\r\n".to_string(),
                _ => format!("X-User-Id: flagless-{i}\r\n"),
            })
            .collect();
        let got = pooled(at(81), 8, &headers)?;
        for (i, v) in got.iter().enumerate() {
            match i % 4 {
                0 => ensure!(v == "canary", "flag request {i} on {v}"),
                1 => ensure!(v == "stable", "flag request {i} on {v}"),
                _ => {}
            }
        }
        // Cohorts by user: 2000 users x 3 requests, shuffled over the pool.
        let mut order: Vec<usize> = (0..6000).map(|i| i % 2000).collect();
        shuffle(&mut order, 0x9e37_79b9_7f4a_7c15);
        let headers: Vec<String> = order
            .iter()
            .map(|u| format!("X-User-Id: user-{u}\r\n"))
            .collect();
        let got = pooled(at(81), 8, &headers)?;
        let mut seen: Vec<Option<&str>> = vec![None; 2000];
        let mut both = 0;
        for (u, v) in order.iter().zip(&got) {
            match seen[*u] {
                None => seen[*u] = Some(v),
                Some(was) if was != v => both += 1,
                _ => {}
            }
        }
        let on_canary = seen.iter().filter(|v| **v == Some("canary")).count();
        let share = 100.0 * on_canary as f64 / 2000.0;
        println!("2000 users x 3 pooled requests: {both} users saw both, {share:.2} % on canary");
        ensure!(both == 0, "{both} users saw both versions");
        ensure!((share - 10.0).abs() <= 2.5, "user share {share:.2} %");
        Ok(())
    })?;
    let status = agent.status()?;
    let users = &status["services"][1]["routing"];
    println!("users routing: {users}");
    ensure!(users["flag"].as_u64() == Some(2000), "{users}");
    Ok(())
}

const SPLIT_POLICY: &str = r#"step = [ { at = 0, weight = 20 }, { at = "10m", weight = 100 } ]
[routing.header]
header = "X-Canary"
values = ["true"]
"#;

/// The share of canary answers among `got`, in percent.
fn canary_share(got: &[String]) -> f64 {
    100.0 * got.iter().filter(|v| *v == "canary").count() as f64 / got.len() as f64
}

/// The weight split is taken per request through a pool: 20 % and 5 % within a point
/// over 20,000 requests of 8 keep-alive connections; a rollback moves the next request.
#[test]
fn the_weight_splits_pooled_requests_and_a_rollback_moves_the_next_one() -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let services = lab_service(
        "web",
        80,
        HTTP_PORT,
        "protocol = \"http\"\npolicy = \"split.toml\"",
    );
    let agent =
        Agent::start_with_files(&topo.node, &services, &[("split.toml", SPLIT_POLICY)], &[])?;
    agent.cli(&["rollout", "start", "web"])?;
    let target = SocketAddr::new(VIP_V4.into(), 80);
    let plain = vec![String::new(); 20_000];
    for (weight, want) in [("20", 20.0), ("5", 5.0)] {
        if weight != "20" {
            agent.cli(&["set-weight", "web", weight])?;
        }
        let got = topo.client.enter(|| pooled(target, 8, &plain))?;
        let share = canary_share(&got);
        println!("weight {weight} % through 8 pooled connections: {share:.3} % of 20,000 requests");
        ensure!(
            (share - want).abs() <= 1.0,
            "{share:.3} % at weight {weight} %"
        );
    }
    agent.cli(&["set-weight", "web", "50"])?;
    // A steady pooled load; every request records when it was sent and who answered.
    let stop = AtomicBool::new(false);
    let rolled_at = AtomicU64::new(u64::MAX);
    let epoch = std::time::Instant::now();
    let (late_canary, failed, after) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..8 {
            let (stop, rolled_at, late_canary, failed, after, topo) =
                (&stop, &rolled_at, &late_canary, &failed, &after, &topo);
            scope.spawn(move || {
                topo.client.enter(|| -> Result<()> {
                    let mut conn = connect(target)?;
                    while !stop.load(Ordering::Relaxed) {
                        let sent = epoch.elapsed().as_micros() as u64;
                        match request(&mut conn, "") {
                            Ok((200, v)) => {
                                if sent > rolled_at.load(Ordering::SeqCst) {
                                    after.fetch_add(1, Ordering::Relaxed);
                                    if v == "canary" {
                                        late_canary.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                            _ => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                conn = connect(target)?;
                            }
                        }
                    }
                    Ok(())
                })
            });
        }
        std::thread::sleep(Duration::from_millis(500));
        agent.cli(&["rollback", "web"])?;
        rolled_at.store(epoch.elapsed().as_micros() as u64, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1000));
        stop.store(true, Ordering::Relaxed);
        Ok(())
    })?;
    let (late, failed, after) = (
        late_canary.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        after.load(Ordering::Relaxed),
    );
    println!("after the rollback: {after} requests, {late} answered by canary, {failed} failed");
    ensure!(after > 100 && late == 0 && failed == 0);
    // The header rule no longer reaches the rolled-back canary either.
    topo.client.enter(|| -> Result<()> {
        let (status, version) = request(&mut connect(target)?, "X-Canary: true\r\n")?;
        ensure!(status == 200 && version == "stable", "{status} {version}");
        Ok(())
    })?;
    Ok(())
}

const GRPC_POLICY: &str = r#"step = [ { at = 0, weight = 10 }, { at = "10m", weight = 100 } ]
[routing.header]
header = "x-canary"
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

/// `n` calls on one h2c connection, at most `concurrent` at once; call `i` carries
/// `x-canary: true` when `canary(i)`, and is gRPC when `grpc`. Returns per call the
/// version header and the `grpc-status` (of trailers, or of a trailers-only head).
fn h2c_calls(
    target: SocketAddr,
    n: usize,
    concurrent: usize,
    grpc: bool,
    canary: impl Fn(usize) -> bool,
) -> Result<Vec<(String, String)>> {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(target).await?;
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await?;
        tokio::spawn(conn);
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrent));
        let mut calls = Vec::new();
        for i in 0..n {
            let mut sender = sender.clone();
            let permit = sem.clone().acquire_owned().await?;
            let mut req = http::Request::post(format!("http://{target}/svc.Echo/Call"));
            if grpc {
                req = req
                    .header("content-type", "application/grpc")
                    .header("te", "trailers");
            }
            if canary(i) {
                req = req.header("x-canary", "true");
            }
            let body = http_body_util::Full::new(hyper::body::Bytes::from_static(b"\0\0\0\0\0"));
            let req = req.body(body)?;
            calls.push(tokio::spawn(async move {
                let resp = sender.send_request(req).await?;
                let _permit = permit;
                let version = resp
                    .headers()
                    .get(VERSION_HEADER)
                    .map(|v| v.to_str().unwrap_or("").to_string())
                    .unwrap_or_default();
                let mut grpc_status = resp
                    .headers()
                    .get("grpc-status")
                    .map(|v| v.to_str().unwrap_or("").to_string());
                let collected = resp.into_body().collect().await?;
                if let Some(t) = collected.trailers() {
                    if let Some(s) = t.get("grpc-status") {
                        grpc_status = Some(s.to_str().unwrap_or("").to_string());
                    }
                }
                anyhow::Ok((version, grpc_status.unwrap_or_default()))
            }));
        }
        let mut out = Vec::new();
        for c in calls {
            out.push(c.await??);
        }
        Ok(out)
    })
}

/// h2c clients through the proxy to h2c backends: header routing per stream on one
/// connection with 50 streams at once, the weight split per stream, and a gRPC canary
/// failing 30 % of its calls (grpc-status 14 in the trailers) rolled back by the
/// error-rate rule. A protocol error closes only its own connection.
#[test]
fn h2c_streams_are_routed_per_request_and_a_failing_grpc_canary_is_rolled_back() -> Result<()> {
    use canary_lab::backend::{set_faults, ADMIN_PORT, H2C_PORT};
    use canary_lab::Faults;
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let services = lab_service(
        "grpc",
        90,
        H2C_PORT,
        "protocol = \"http\"\npolicy = \"grpc.toml\"",
    );
    let agent = Agent::start_with_files(&topo.node, &services, &[("grpc.toml", GRPC_POLICY)], &[])?;
    agent.cli(&["rollout", "start", "grpc"])?;
    let target = SocketAddr::new(VIP_V4.into(), 90);
    topo.client.enter(|| -> Result<()> {
        let got = h2c_calls(target, 600, 50, false, |i| i % 3 == 0)?;
        for (i, (v, _)) in got.iter().enumerate() {
            if i % 3 == 0 {
                ensure!(v == "canary", "stream {i} with the header on {v}");
            }
        }
        let plain: Vec<_> = got.iter().enumerate().filter(|(i, _)| i % 3 != 0).collect();
        let on = plain.iter().filter(|(_, (v, _))| v == "canary").count();
        println!(
            "h2c: 200 header streams on canary, {on} of {} others",
            plain.len()
        );
        let got = h2c_calls(target, 3000, 50, true, |_| false)?;
        let share = 100.0 * got.iter().filter(|(v, _)| v == "canary").count() as f64 / 3000.0;
        println!("gRPC at weight 10 %: {share:.2} % of 3000 streams on canary");
        ensure!((share - 10.0).abs() <= 2.0, "{share:.2} % on canary");
        ensure!(got.iter().all(|(_, s)| s == "0"), "a healthy call failed");
        // A protocol error on one connection: GOAWAY there, others unaffected.
        let mut bad = connect(target)?;
        // A SETTINGS frame whose length is not a multiple of 6: FRAME_SIZE_ERROR.
        bad.write_all(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x05\x04\x00\x00\x00\x00\x00abcde",
        )?;
        let mut buf = [0u8; 256];
        let mut seen = Vec::new();
        while let Ok(n) = bad.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        // A GOAWAY frame: type 7 in some frame header of what the proxy sent.
        let mut at = 0;
        let mut goaway = false;
        while at + 9 <= seen.len() {
            let len = u32::from_be_bytes([0, seen[at], seen[at + 1], seen[at + 2]]) as usize;
            goaway |= seen[at + 3] == 7;
            at += 9 + len;
        }
        ensure!(goaway, "no GOAWAY after a protocol error: {seen:?}");
        ensure!(h2c_calls(target, 10, 5, true, |_| false)?.len() == 10);
        Ok(())
    })?;
    topo.client.enter(|| {
        set_faults(
            SocketAddr::new(CANARY_V4.into(), ADMIN_PORT),
            &Faults {
                error_rate: 0.3,
                ..Default::default()
            },
        )
    })?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let after = std::thread::scope(|scope| -> Result<_> {
        let load = scope.spawn(|| {
            topo.client.enter(|| -> Result<()> {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    h2c_calls(target, 200, 20, true, |_| false)?;
                }
                Ok(())
            })
        });
        let after = agent.wait_for_rollout("rolled-back", Duration::from_secs(30));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        load.join().expect("load panicked")?;
        after
    })?;
    let status = agent.status()?;
    let after = after.ok_or_else(|| anyhow::anyhow!("no rollback: {status}"))?;
    println!(
        "gRPC canary rolled back {after:?} after the fault: {}",
        status["services"][0]["rollout"]["reason"]
    );
    Ok(())
}

/// What the h2c load of [`h2c_load`] saw.
#[derive(Default)]
struct H2Tally {
    /// Calls answered 200 by the version their header asks for, `grpc-status: 0`.
    done: std::sync::atomic::AtomicU64,
    /// Calls a connection going away (GOAWAY) did not send: sent on the next one.
    resent: std::sync::atomic::AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

impl H2Tally {
    fn fail(&self, why: String) {
        self.failures.lock().unwrap().push(why);
    }
}

/// gRPC calls over `connections` h2c connections, 4 streams at a time on each, until
/// `stop`; every other stream carries `x-canary: true`. A connection that is going away
/// is replaced by a new one, and a call it did not send goes on the next, as gRPC
/// clients do; anything else that does not end in a healthy answer is a failure.
fn h2c_load(
    target: SocketAddr,
    connections: usize,
    stop: &std::sync::atomic::AtomicBool,
    tally: &H2Tally,
) -> Result<()> {
    use http_body_util::BodyExt;
    use std::sync::atomic::Ordering;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stream_calls = |mut sender: hyper::client::conn::http2::SendRequest<_>, canary: bool| async move {
        let want = if canary { "canary" } else { "stable" };
        while !stop.load(Ordering::Relaxed) {
            if sender.ready().await.is_err() {
                return; // Going away: the connection is replaced.
            }
            let mut req = http::Request::post(format!("http://{target}/svc.Echo/Call"))
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            if canary {
                req = req.header("x-canary", "true");
            }
            let body = http_body_util::Full::new(hyper::body::Bytes::from_static(b"\0\0\0\0\0"));
            let resp = match sender.try_send_request(req.body(body).unwrap()).await {
                Ok(resp) => resp,
                Err(mut e) => {
                    let why = e.error().to_string();
                    match e.take_message() {
                        Some(_) => tally.resent.fetch_add(1, Ordering::Relaxed),
                        None => {
                            tally.fail(format!("call sent, no answer: {why}"));
                            0
                        }
                    };
                    return;
                }
            };
            let (status, version) = (
                resp.status(),
                resp.headers()
                    .get(VERSION_HEADER)
                    .map(|v| v.to_str().unwrap_or("").to_string())
                    .unwrap_or_default(),
            );
            let grpc = match resp.into_body().collect().await {
                Ok(b) => b
                    .trailers()
                    .and_then(|t| t.get("grpc-status"))
                    .map(|s| s.to_str().unwrap_or("").to_string()),
                Err(e) => {
                    tally.fail(format!("body of a call: {e}"));
                    return;
                }
            };
            if status == 200 && version == want && grpc.as_deref() == Some("0") {
                tally.done.fetch_add(1, Ordering::Relaxed);
            } else {
                tally.fail(format!("{status} from {version:?}, grpc-status {grpc:?}"));
            }
        }
    };
    let connection = |c: usize| async move {
        while !stop.load(Ordering::Relaxed) {
            let stream = match tokio::net::TcpStream::connect(target).await {
                Ok(s) => s,
                Err(e) => {
                    tally.fail(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (sender, conn) = match hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            {
                Ok(pair) => pair,
                Err(e) => {
                    tally.fail(format!("h2 handshake: {e}"));
                    continue;
                }
            };
            let driver = tokio::spawn(conn);
            let streams = (0..4).map(|s| stream_calls(sender.clone(), (c + s).is_multiple_of(2)));
            futures_join_all(streams).await;
            drop(sender);
            let _ = driver.await;
        }
    };
    rt.block_on(futures_join_all((0..connections).map(connection)));
    Ok(())
}

/// Runs futures on the current task to their end (no `'static` needed, unlike spawn).
async fn futures_join_all<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

/// SIGUSR2 under an h2c (gRPC) load of 8 connections with 4 streams each: the old
/// image sends GOAWAY and finishes the streams in flight, the clients reconnect to the
/// listener the next image took over, and no call fails.
#[test]
fn a_hand_over_under_h2c_load_fails_no_call() -> Result<()> {
    use canary_lab::backend::H2C_PORT;
    use std::sync::atomic::{AtomicBool, Ordering};
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let services = lab_service(
        "grpc",
        90,
        H2C_PORT,
        "protocol = \"http\"\npolicy = \"route.scm\"",
    );
    let agent = Agent::start_with_files(&topo.node, &services, &[("route.scm", POLICY)], &[])?;
    let pid = agent.pid().context("agent pid")?;
    let target = SocketAddr::new(VIP_V4.into(), 90);
    let (stop, tally) = (AtomicBool::new(false), H2Tally::default());
    let log_count = |text: &str| agent.log().matches(text).count();
    let listening = log_count("control API listening");
    let (before, at_hand_over) = std::thread::scope(|scope| -> Result<(u64, u64)> {
        let load = scope.spawn(|| topo.client.enter(|| h2c_load(target, 8, &stop, &tally)));
        std::thread::sleep(Duration::from_millis(500));
        let before = tally.done.load(Ordering::Relaxed);
        agent.signal(libc::SIGUSR2);
        let start = std::time::Instant::now();
        while log_count("control API listening") == listening
            && start.elapsed() < Duration::from_secs(20)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let at_hand_over = tally.done.load(Ordering::Relaxed);
        println!("hand-over done in {:?}", start.elapsed());
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        load.join().expect("h2c load panicked")?;
        Ok((before, at_hand_over))
    })?;
    ensure!(
        log_count("control API listening") == listening + 1,
        "no hand-over: {}",
        agent.log()
    );
    ensure!(
        agent.pid() == Some(pid) && agent.running(),
        "agent not running as pid {pid}"
    );
    let (done, resent) = (
        tally.done.load(Ordering::Relaxed),
        tally.resent.load(Ordering::Relaxed),
    );
    let failures = tally.failures.into_inner().unwrap();
    println!(
        "h2c calls: {before} before SIGUSR2, {} until the next image listened, {} after; \
         {resent} not sent by a closing connection and sent on a new one; {} failed",
        at_hand_over - before,
        done - at_hand_over,
        failures.len()
    );
    ensure!(
        failures.is_empty(),
        "failed calls: {:?}",
        &failures[..failures.len().min(10)]
    );
    ensure!(
        before > 0 && done > at_hand_over,
        "no calls served after the hand-over"
    );
    Ok(())
}

/// One h2c call (gRPC when `grpc`) with `x-canary: true` when `canary`: the HTTP status
/// and the `grpc-status` (of the trailers or of a trailers-only head).
fn h2c_call(target: SocketAddr, grpc: bool, canary: bool) -> Result<(u16, String)> {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(target).await?;
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await?;
        tokio::spawn(conn);
        let mut req = http::Request::post(format!("http://{target}/svc.Echo/Call"));
        if grpc {
            req = req
                .header("content-type", "application/grpc")
                .header("te", "trailers");
        }
        if canary {
            req = req.header("x-canary", "true");
        }
        let body = http_body_util::Full::new(hyper::body::Bytes::from_static(b"\0\0\0\0\0"));
        let resp = sender.send_request(req.body(body)?).await?;
        let status = resp.status().as_u16();
        let mut grpc_status = resp
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap_or("").to_string());
        if let Some(t) = resp.into_body().collect().await?.trailers() {
            if let Some(s) = t.get("grpc-status") {
                grpc_status = Some(s.to_str().unwrap_or("").to_string());
            }
        }
        Ok((status, grpc_status.unwrap_or_default()))
    })
}

/// The agent's Prometheus text, read from the client namespace.
fn metrics_text(topo: &Topology, port: u16) -> Result<String> {
    use canary_lab::topology::NODE_CLIENT_V4;
    topo.client.enter(|| {
        let mut conn = TcpStream::connect((NODE_CLIENT_V4, port))?;
        write!(
            conn,
            "GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        Ok(text)
    })
}

/// The value of the Prometheus sample `family` whose labels include all of `labels`.
fn sample(metrics: &str, family: &str, labels: &[&str]) -> Option<u64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(family)?.strip_prefix('{')?;
        let (set, value) = rest.split_once("} ")?;
        labels
            .iter()
            .all(|want| set.split(',').any(|kv| kv == *want))
            .then(|| value.trim().parse::<f64>().ok().map(|v| v as u64))?
    })
}

/// A canary that refuses connections: an HTTP/1 request for it gets 502, an h2c call
/// 502 and a gRPC call `grpc-status: 14` (UNAVAILABLE); each is a request of the
/// canary answered 5xx in the counters the analysis reads (Prometheus
/// `canary_http_requests_total` / `canary_http_responses_total`), and stable's
/// requests stay healthy.
#[test]
fn a_refusing_backend_is_a_failed_request_of_its_version() -> Result<()> {
    use canary_lab::backend::H2C_PORT;
    use canary_lab::topology::NODE_CLIENT_V4;
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    // Nothing listens on the canary's port 9: its connections are refused.
    let refusing = |name: &str, port: u16, stable_port: u16| {
        format!(
            "[[service]]\nname = \"{name}\"\nlisten = \"{VIP_V4}:{port}\"\nprotocol = \"http\"\n\
             stable = [\"{STABLE_V4}:{stable_port}\"]\ncanary = [\"{CANARY_V4}:9\"]\n\
             policy = \"route.scm\"\n"
        )
    };
    let services = format!("metrics_listen = \"{NODE_CLIENT_V4}:9464\"\n")
        + &refusing("web", 83, HTTP_PORT)
        + &refusing("grpc", 91, H2C_PORT);
    let _agent = Agent::start_with_files(&topo.node, &services, &[("route.scm", POLICY)], &[])?;
    let (web, grpc) = (
        SocketAddr::new(VIP_V4.into(), 83),
        SocketAddr::new(VIP_V4.into(), 91),
    );
    topo.client.enter(|| -> Result<()> {
        for _ in 0..3 {
            let (status, _) = request(&mut connect(web)?, "X-Canary: true\r\n")?;
            ensure!(status == 502, "HTTP/1 to a refusing canary: {status}");
            let (status, version) = request(&mut connect(web)?, "")?;
            ensure!(status == 200 && version == "stable", "{status} {version}");
        }
        let (status, _) = h2c_call(grpc, false, true)?;
        ensure!(status == 502, "h2c to a refusing canary: {status}");
        for _ in 0..4 {
            let (status, grpc_status) = h2c_call(grpc, true, true)?;
            ensure!(
                status == 200 && grpc_status == "14",
                "gRPC to a refusing canary: {status}, grpc-status {grpc_status:?}"
            );
            let (_, grpc_status) = h2c_call(grpc, true, false)?;
            ensure!(
                grpc_status == "0",
                "gRPC to stable: grpc-status {grpc_status:?}"
            );
        }
        Ok(())
    })?;
    let metrics = metrics_text(&topo, 9464)?;
    let count = |family: &str, service: &str, version: &str, class: Option<&str>| {
        let (s, v) = (
            format!("service=\"{service}\""),
            format!("version=\"{version}\""),
        );
        let c = class.map(|c| format!("class=\"{c}\""));
        let mut labels = vec![s.as_str(), v.as_str()];
        labels.extend(c.as_deref());
        sample(&metrics, family, &labels).unwrap_or(0)
    };
    let got: Vec<u64> = [
        ("web", "canary", Some("5xx")),
        ("web", "canary", None),
        ("web", "stable", Some("5xx")),
        ("web", "stable", Some("2xx")),
        ("grpc", "canary", Some("5xx")),
        ("grpc", "canary", None),
        ("grpc", "stable", Some("5xx")),
        ("grpc", "stable", Some("2xx")),
    ]
    .iter()
    .map(|&(service, version, class)| match class {
        Some(class) => count("canary_http_responses_total", service, version, Some(class)),
        None => count("canary_http_requests_total", service, version, None),
    })
    .collect();
    println!(
        "(canary 5xx, canary requests, stable 5xx, stable 2xx): web {:?}, grpc {:?}",
        &got[..4],
        &got[4..]
    );
    ensure!(
        got == [3, 3, 0, 3, 5, 5, 0, 4],
        "counters {got:?}:\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("canary_http_re"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

/// SIGTERM under a pooled keep-alive load whose every response takes 500 ms: each
/// request in flight is answered (saying `Connection: close`) before the agent exits,
/// none is lost. Then requests slower than `[agent] shutdown_grace` (2 s): the agent
/// waits for them that long, no longer, and exits.
#[test]
fn sigterm_drains_requests_in_flight_for_the_grace_period() -> Result<()> {
    use canary_lab::backend::{set_faults, ADMIN_PORT};
    use canary_lab::Faults;
    use std::sync::atomic::{AtomicU64, Ordering};
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let services = "shutdown_grace = \"2s\"\n".to_string()
        + &lab_service(
            "web",
            80,
            HTTP_PORT,
            "protocol = \"http\"\npolicy = \"route.scm\"",
        );
    let mut agent = Agent::start_with_files(&topo.node, &services, &[("route.scm", POLICY)], &[])?;
    let target = SocketAddr::new(VIP_V4.into(), 80);
    let slow = |ms: u64| {
        topo.client.enter(|| {
            for addr in [STABLE_V4, CANARY_V4] {
                set_faults(
                    SocketAddr::new(addr.into(), ADMIN_PORT),
                    &Faults {
                        extra_latency_ms: ms,
                        ..Default::default()
                    },
                )?;
            }
            Ok(())
        })
    };
    // Waits (bounded) for the agent process to end; how long that took.
    let exited = |pid: u32, limit: Duration| -> Result<Duration> {
        let start = std::time::Instant::now();
        loop {
            let gone = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.contains(") Z "));
            if gone {
                return Ok(start.elapsed());
            }
            ensure!(
                start.elapsed() < limit,
                "agent {pid} still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    slow(500)?;
    let (done, closed, failed) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let pid = agent.pid().context("agent pid")?;
    let took = std::thread::scope(|scope| -> Result<Duration> {
        for c in 0..8 {
            let (done, closed, failed, topo) = (&done, &closed, &failed, &topo);
            scope.spawn(move || {
                topo.client.enter(|| -> Result<()> {
                    let header = if c % 2 == 0 { "X-Canary: true\r\n" } else { "" };
                    let want = if c % 2 == 0 { "canary" } else { "stable" };
                    let mut conn = Some(connect(target)?);
                    // Until the drain closes the connection (bounded: 40 × 500 ms).
                    for _ in 0..40 {
                        match request_reconnecting(&mut conn, target, header) {
                            Ok((200, v)) if v == want => done.fetch_add(1, Ordering::Relaxed),
                            other => {
                                println!("connection {c}: {other:?}");
                                failed.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        };
                        if conn.is_none() {
                            closed.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    Ok(())
                })
            });
        }
        std::thread::sleep(Duration::from_millis(1200));
        agent.signal(libc::SIGTERM);
        exited(pid, Duration::from_secs(10))
    })?;
    let (done, closed, failed) = (
        done.load(Ordering::Relaxed),
        closed.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    println!(
        "SIGTERM under load: {done} requests answered, {closed} of 8 connections closed after \
         their last answer, {failed} failed; the agent exited {took:?} after the signal"
    );
    ensure!(
        failed == 0 && closed == 8,
        "{failed} failed, {closed} of 8 closed"
    );
    ensure!(
        agent.log().contains("routed connections drained"),
        "{}",
        agent.log()
    );
    // Requests slower (5 s) than the grace: the agent exits when the grace runs out.
    agent.signal_and_wait(libc::SIGTERM);
    agent.relaunch(&topo.node, &[])?;
    slow(5000)?;
    let pid = agent.pid().context("agent pid")?;
    let took = std::thread::scope(|scope| -> Result<Duration> {
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    topo.client
                        .enter(|| request(&mut connect(target)?, "").map(|(s, _)| s))
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        agent.signal(libc::SIGTERM);
        let took = exited(pid, Duration::from_secs(10))?;
        for w in waiting {
            let answer = w.join().expect("client panicked");
            ensure!(
                answer.is_err(),
                "a request slower than the grace got {answer:?}"
            );
        }
        Ok(took)
    })?;
    println!("requests slower than the 2 s grace: the agent exited {took:?} after SIGTERM");
    ensure!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(4500),
        "exit {took:?} after SIGTERM with a 2 s grace and 5 s requests"
    );
    Ok(())
}

/// A WebSocket-style upgrade: decided by its upgrade request, answered 101, then the
/// two sockets spliced in the kernel, which carries a 10 MiB echo intact.
#[test]
fn an_upgraded_connection_is_spliced_in_the_kernel() -> Result<()> {
    use canary_lab::backend::UPGRADE_PORT;
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let services = lab_service(
        "ws",
        84,
        UPGRADE_PORT,
        "protocol = \"http\"\npolicy = \"route.scm\"",
    );
    let agent = Agent::start_with_files(&topo.node, &services, &[("route.scm", POLICY)], &[])?;
    let target = SocketAddr::new(VIP_V4.into(), 84);
    topo.client.enter(|| -> Result<()> {
        for (header, want) in [("X-Canary: true\r\n", "canary"), ("", "stable")] {
            let mut conn = connect(target)?;
            conn.set_read_timeout(Some(Duration::from_secs(20)))?;
            write!(
                conn,
                "GET /ws HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{header}\r\n"
            )?;
            let (status, version) = read_response(&mut conn)?;
            ensure!(status == 101 && version == want, "upgrade: {status} {version}");
            let data = payload(10 << 20);
            let mut writer = conn.try_clone()?;
            let sent = data.clone();
            let w = std::thread::spawn(move || writer.write_all(&sent));
            let mut back = vec![0u8; data.len()];
            conn.read_exact(&mut back)?;
            w.join().expect("writer panicked")?;
            ensure!(fnv(&back, FNV0) == fnv(&data, FNV0), "10 MiB echo differs");
        }
        Ok(())
    })?;
    let routing = &agent.status()?["services"][0]["routing"];
    let (user, kernel) = (
        routing["userspace_bytes"].as_u64().unwrap_or(u64::MAX),
        routing["kernel_bytes"].as_u64().unwrap_or(0),
    );
    println!("upgraded echoes: agent copied {user} bytes, kernel carried {kernel}");
    ensure!(routing["upgrades"].as_u64() == Some(2), "{routing}");
    ensure!(
        kernel >= 2 * 2 * (10 << 20),
        "kernel carried {kernel} bytes"
    );
    ensure!(user <= 64 * 1024, "agent copied {user} bytes");
    wait_no_splice(&agent, Duration::from_secs(10))?;
    Ok(())
}

/// The connection caps: past `max_client_connections` a client's new connections are
/// closed at once, another client is served, and a freed place is taken again.
#[test]
fn connection_caps_hold_per_client_and_per_service() -> Result<()> {
    let topo = Topology::build()?;
    let other = topo.add_client_addrs(1)?[0];
    let (_backends, agent, _) =
        start_web(&topo, "\nmax_client_connections = 3\nmax_connections = 5")?;
    let target = SocketAddr::new(VIP_V4.into(), 80);
    topo.client.enter(|| -> Result<()> {
        let mut held: Vec<TcpStream> = (0..3).map(|_| connect(target)).collect::<Result<_>>()?;
        std::thread::sleep(Duration::from_millis(200));
        let mut over = connect(target)?;
        let _ = over.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n");
        let mut b = [0u8; 1];
        ensure!(
            matches!(over.read(&mut b), Ok(0) | Err(_)),
            "a 4th connection of one client was served"
        );
        // Another client address is not held up by this one.
        let (status, _) = request(&mut connect_from(other, target)?, "")?;
        ensure!(status == 200, "other client: {status}");
        // Its place is given back once the proxy sees the close: wait for that, or the
        // next connection would meet a full service.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while agent.status()?["services"][0]["routing"]["open_connections"] != 3 {
            ensure!(
                std::time::Instant::now() < deadline,
                "the other client's closed connection still holds a place"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The service cap (5): 3 + 2 from the other address, then nobody.
        let _b: Vec<TcpStream> = (0..2)
            .map(|_| connect_from(other, target))
            .collect::<Result<_>>()?;
        std::thread::sleep(Duration::from_millis(200));
        let mut full = connect_from(other, target)?;
        let _ = full.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n");
        ensure!(
            matches!(full.read(&mut b), Ok(0) | Err(_)),
            "a connection past the service cap was served"
        );
        // A freed place is taken again.
        drop(held.pop());
        std::thread::sleep(Duration::from_millis(200));
        let (status, _) = request(&mut connect(target)?, "")?;
        ensure!(status == 200, "after a place was freed: {status}");
        Ok(())
    })?;
    let routing = &agent.status()?["services"][0]["routing"];
    println!("caps: {routing}");
    ensure!(
        routing["refused_connections"].as_u64() == Some(2),
        "{routing}"
    );
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
