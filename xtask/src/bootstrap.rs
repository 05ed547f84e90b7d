//! Idempotent machine set-up. Every step checks first, so a machine that has
//! everything finishes in well under a second.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::cargo_path;

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Debian packages the build, the tests and the benchmarks use, with a file each
/// package provides (checked instead of asking dpkg, which is slower).
const PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    ("libpolly-22-dev", "/usr/lib/llvm-22/lib/libPolly.a"),
    ("iproute2", "/usr/bin/ip"),
    ("ethtool", "/usr/sbin/ethtool"),
    ("iptables", "/usr/sbin/iptables"),
    ("wrk", "/usr/bin/wrk"),
    ("prometheus", "/usr/bin/prometheus"),
    // `make bench` compares the splitter with nginx and HAProxy, on nginx backends.
    ("nginx", "/usr/sbin/nginx"),
    (
        "libnginx-mod-stream",
        "/usr/lib/nginx/modules/ngx_stream_module.so",
    ),
    ("haproxy", "/usr/sbin/haproxy"),
    // The routing bench's h2c load (wrk speaks HTTP/1 only).
    ("nghttp2-client", "/usr/bin/h2load"),
    // `make bench`'s profile of where the datapath's time goes.
    ("linux-perf", "/usr/bin/perf"),
    ("bpftool", "/usr/sbin/bpftool"),
    // The dashboard test drives headless Chromium over WebDriver.
    ("chromium", "/usr/bin/chromium"),
    ("chromium-driver", "/usr/bin/chromedriver"),
    // The fleet tests run a real etcd; etcdctl for people and the cost simulation's checks.
    ("etcd-server", "/usr/bin/etcd"),
    ("etcd-client", "/usr/bin/etcdctl"),
    // The discovery test serves backend names from a real DNS server.
    ("dnsmasq-base", "/usr/sbin/dnsmasq"),
    // The TLS fleet test makes a throwaway CA and certificates with it.
    ("openssl", "/usr/bin/openssl"),
    // etcd-client (the agent's etcd API) compiles etcd's .proto files at build time:
    // protoc itself, and the well-known types those files import, which Debian ships
    // in libprotobuf-dev (only a Recommends of protobuf-compiler).
    ("protobuf-compiler", "/usr/bin/protoc"),
    (
        "libprotobuf-dev",
        "/usr/include/google/protobuf/descriptor.proto",
    ),
];

fn quiet(cmd: &mut Command) -> Result<bool> {
    Ok(cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success())
}

fn must(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

pub fn run() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, file)| !std::path::Path::new(file).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if !missing.is_empty() {
        println!("bootstrap: installing {}", missing.join(" "));
        must(
            Command::new("apt-get").args(["update", "-q"]),
            "apt-get update",
        )?;
        must(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
            "apt-get install",
        )?;
        // A package can install and still not provide the file the build reads
        // (renamed, split): stop here, naming both, not later inside a compiler.
        let still: Vec<String> = PACKAGES
            .iter()
            .filter(|(_, file)| !std::path::Path::new(file).exists())
            .map(|(pkg, file)| format!("{pkg} (for {file})"))
            .collect();
        if !still.is_empty() {
            bail!(
                "installed, but these files are still missing: {}",
                still.join(", ")
            );
        }
    }

    if !quiet(Command::new("rustup").args(["run", "nightly", "rustc", "--version"]))? {
        bail!("the nightly toolchain is missing (`rustup toolchain install nightly`)");
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()?;
    if !String::from_utf8_lossy(&components.stdout).contains("rust-src") {
        println!("bootstrap: adding rust-src to nightly");
        must(
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "rustup component add rust-src",
        )?;
    }

    let linker = Command::new("bpf-linker")
        .env("PATH", cargo_path())
        .arg("--version")
        .output();
    let have = linker
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !have {
        println!(
            "bootstrap: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        );
        must(
            Command::new("cargo")
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .env("PATH", format!("{LLVM_PREFIX}/bin:{}", cargo_path()))
                .args([
                    "install",
                    &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ]),
            "cargo install bpf-linker",
        )?;
    }
    println!("bootstrap: all set");
    Ok(())
}
