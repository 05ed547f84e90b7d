//! The control socket under abuse: garbage, half lines, a 10 MB line, 1000 clients at
//! once, a client that never reads. Each gets a clear error (or is cut off), and the
//! agent keeps answering the CLI and the datapath keeps splitting. Run as root.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use canary_lab::{
    agent::{lab_service, Agent},
    backend::BANNER_PORT,
    banner_connections,
    topology::CLIENT_V4,
    Topology, VIP_V4,
};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");

/// Sends `bytes` and returns the agent's one-line answer ("" if it closed first).
fn exchange(socket: &Path, bytes: &[u8]) -> Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    // The agent may stop reading (and close) before a huge request is written.
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut line = String::new();
    let _ = BufReader::new(stream).read_line(&mut line);
    Ok(line)
}

fn splits(topo: &Topology) -> Result<()> {
    let report = topo.client.enter(|| {
        banner_connections(
            SocketAddr::new(VIP_V4.into(), 80),
            100,
            16,
            &[CLIENT_V4.into()],
            Duration::from_secs(5),
        )
    })?;
    ensure!(
        report.failed() == 0,
        "datapath failures {:?}",
        report.failures
    );
    ensure!(
        report.count("stable") > 0 && report.count("canary") > 0,
        "not split: {:?}",
        report.by_name
    );
    Ok(())
}

#[test]
fn the_control_socket_survives_abuse() -> Result<()> {
    let topo = Topology::build()?;
    let _backends = topo.start_backends(Path::new(BACKEND_BIN))?;
    let agent = Agent::start(
        &topo.node,
        &lab_service("web", 80, BANNER_PORT, "weight = 50"),
        &[],
    )?;
    let socket = agent.socket.clone();

    let answer = exchange(&socket, b"\x00\xffgarbage{{{\n")?;
    ensure!(answer.contains("bad request"), "garbage: {answer:?}");
    let answer = exchange(&socket, b"{\"cmd\":\"frobnicate\"}\n")?;
    ensure!(
        answer.contains("bad request") && answer.contains("frobnicate"),
        "{answer:?}"
    );
    let answer = exchange(&socket, b"{\"cmd\":\"status\"")?;
    ensure!(
        answer.contains("closed before the end"),
        "half line: {answer:?}"
    );
    let big = vec![b'x'; 10 << 20];
    let answer = exchange(&socket, &big)?;
    ensure!(answer.contains("longer than"), "10 MB line: {answer:?}");

    // A client that sends half a line and then just waits is cut off by the timeout,
    // and one that asks but never reads does not hold anything up.
    let mut dawdler = UnixStream::connect(&socket)?;
    dawdler.write_all(b"{\"cmd\":")?;
    let mut deaf = UnixStream::connect(&socket)?;
    deaf.write_all(b"{\"cmd\":\"status\",\"service\":null}\n")?;
    agent.cli(&["status"])?;

    // 1000 clients at once, each asking for status.
    let started = Instant::now();
    let handles: Vec<_> = (0..1000)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                exchange(&socket, b"{\"cmd\":\"status\",\"service\":null}\n").unwrap_or_default()
            })
        })
        .collect();
    let answers: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_default())
        .collect();
    let ok = answers.iter().filter(|a| a.starts_with("{\"ok\"")).count();
    let busy = answers.iter().filter(|a| a.contains("agent busy")).count();
    println!(
        "1000 concurrent clients: {ok} answered, {busy} told busy, in {:?}",
        started.elapsed()
    );
    ensure!(ok + busy == 1000, "unanswered clients: {:?}", &answers[..5]);
    ensure!(ok >= 500, "only {ok} of 1000 answered");

    let mut rest = String::new();
    dawdler.set_read_timeout(Some(Duration::from_secs(15)))?;
    dawdler
        .read_to_string(&mut rest)
        .context("the half-line client is answered and closed")?;
    ensure!(rest.contains("no complete request line"), "{rest:?}");
    drop(deaf);

    // Still serving and splitting.
    let status = agent.status()?;
    ensure!(status["services"][0]["weight_bp"] == 5000, "{status}");
    splits(&topo)?;
    Ok(())
}
