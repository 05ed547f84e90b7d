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
    Topology, VIP_V4,
};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");
const POLICY: &str = "(define-canary-split '((canary . 0)))\n\
(define-header-routing '((header . \"X-Canary\") (values . (\"true\" \"test\" \"qa\")) (default . stable)))\n";

/// One response: status code and the backend version header.
fn read_response(conn: &mut TcpStream) -> Result<(u16, String)> {
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
    Ok((status, header(VERSION_HEADER).unwrap_or_default()))
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

#[test]
fn header_routing_is_decided_at_the_first_head_and_spliced_in_the_kernel() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let services = lab_service(
        "web",
        80,
        HTTP_PORT,
        "protocol = \"http\"\npolicy = \"route.scm\"",
    );
    let agent = Agent::start_with_files(&topo.node, &services, &[("route.scm", POLICY)], &[])?;
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
    ensure!(routing["bad_requests"].as_u64() == Some(1), "{routing}");
    ensure!(routing["too_large"].as_u64() == Some(1), "{routing}");
    let (user, kernel) = (
        routing["userspace_bytes"].as_u64().unwrap_or(0),
        routing["kernel_bytes"].as_u64().unwrap_or(0),
    );
    ensure!(
        kernel > 10 * user,
        "kernel carried {kernel} bytes, agent copied {user}"
    );
    // Every connection above is closed: no socket or map entry is left behind.
    let wait = std::time::Instant::now();
    loop {
        let routing = &agent.status()?["services"][0]["routing"];
        let entries = &routing["splice_entries"];
        let left = ["sockets", "peers", "state"]
            .iter()
            .map(|k| entries[k].as_u64().unwrap_or(u64::MAX))
            .sum::<u64>();
        if left == 0 && routing["open_connections"].as_u64() == Some(0) {
            break;
        }
        ensure!(
            wait.elapsed() < Duration::from_secs(5),
            "left behind: {routing}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
