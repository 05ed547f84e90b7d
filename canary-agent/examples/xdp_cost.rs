//! ns/packet of the XDP program, measured by the kernel over 10^6 BPF_PROG_TEST_RUN
//! repeats (run by `make bench`). Needs root.

use std::{net::IpAddr, os::fd::AsFd, process::Command};

use anyhow::{bail, Result};
use canary_agent::{
    config::Config,
    datapath::{encode_service, service_key, test_run, Datapath},
};
use canary_common::PROG_INGRESS;
use etherparse::PacketBuilder;

const VIP: [u8; 4] = [198, 19, 0, 10];

fn main() -> Result<()> {
    let pins = std::env::temp_dir().join(format!("canary-bench-{}", std::process::id()));
    let result = run(&pins);
    let _ = Command::new("umount").arg("-l").arg(&pins).status();
    let _ = std::fs::remove_dir_all(&pins);
    result
}

fn run(pins: &std::path::Path) -> Result<()> {
    let text = "[agent]\ninterface = \"lo\"\n[[service]]\nname = \"web\"\nlisten = \"198.19.0.10:80\"\nstable = [\"198.18.2.2:8080\"]\ncanary = [\"198.18.3.2:8080\"]\nweight = 10\n";
    let config = Config::parse(text, std::path::Path::new("bench.toml"))?;
    let mut dp = Datapath::load(pins)?;
    let svc = &config.services[0];
    dp.install(&service_key(svc), &encode_service(svc, 0, svc.weight_bp))?;
    let fd = dp.program_fd(PROG_INGRESS)?;
    let packet = |dst: IpAddr, syn: bool| -> Result<Vec<u8>> {
        let (IpAddr::V4(d), IpAddr::V4(s)) = (dst, IpAddr::from([198, 18, 1, 2])) else {
            bail!("v4 only")
        };
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(s.octets(), d.octets(), 64)
            .tcp(40000, 80, 1, 64000);
        let b = if syn { b.syn() } else { b.ack(1) };
        let mut out = Vec::new();
        b.write(&mut out, &[0u8; 64])?;
        Ok(out)
    };
    let cases = [
        (
            "not ours (other address)",
            packet([198, 19, 0, 99].into(), false)?,
        ),
        ("new flow (SYN, placement)", packet(VIP.into(), true)?),
        ("pinned flow (data packet)", packet(VIP.into(), false)?),
    ];
    println!("\nXDP program, BPF_PROG_TEST_RUN x 1,000,000 (kernel-measured mean)");
    let mut base = 0.0;
    for (i, (name, pkt)) in cases.iter().enumerate() {
        let r = test_run::run(fd.as_fd(), pkt, 1_000_000)?;
        if i == 0 {
            base = r.duration_ns as f64;
        }
        println!(
            "{name:<28} {:>6} ns/packet  ({:.2}x pass-through)",
            r.duration_ns,
            r.duration_ns as f64 / base
        );
    }
    Ok(())
}
