//! Developer workflows: `cargo xtask bootstrap | build-ebpf`.

mod bench;
mod bootstrap;
mod deps;
mod lab;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (LLVM 22, bpf-linker, rust-src, test tools).
    Bootstrap,
    /// Build the kernel object (canary-ebpf) that the agent embeds.
    BuildEbpf,
    /// Print canary-agent's module dependency graph; fail on an import cycle.
    Deps,
    /// The local lab: `deploy`, `traffic-split`, `simulate-failures`, `verify-rollback`.
    Lab {
        scenario: String,
        /// The short form `make test` runs: the debug build, a faster clock, less traffic.
        #[arg(long)]
        quick: bool,
    },
    /// The splitter against direct, iptables, nginx and HAProxy; its per-packet cost;
    /// request routing (the proxy) against direct, nginx http and HAProxy http.
    Bench {
        /// Interleaved rounds per path (each on a fresh lab).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Also sample the whole machine with `perf record` (split table: during each
        /// path's keep-alive load; routing: extra loads through the proxy) and print
        /// where the CPU time went.
        #[arg(long)]
        profile: bool,
        /// Run one table only: `split` or `routing` (default: both).
        #[arg(long, value_enum)]
        only: Option<bench::Part>,
        /// Seconds of wrk per load (short runs check that everything works).
        #[arg(long, default_value_t = 6)]
        seconds: u32,
        /// Split table paths to run, comma-separated (default: all): direct,
        /// xdp-attached, empty-attached, tc, tc-redirect, tc-weight0, xdp, iptables, nginx, haproxy. `direct` always runs: the
        /// ratios are to it.
        #[arg(long, value_delimiter = ',', value_enum)]
        paths: Vec<bench::PathName>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Bootstrap => bootstrap::run(),
        Task::BuildEbpf => build_ebpf(),
        Task::Deps => deps::run(),
        Task::Lab { scenario, quick } => {
            let form = lab::Form { quick };
            match scenario.as_str() {
                "deploy" => lab::deploy(form),
                "traffic-split" => lab::traffic_split(form),
                "simulate-failures" => lab::failures(false, form),
                "verify-rollback" => lab::failures(true, form),
                other => bail!("unknown lab scenario {other:?}"),
            }
        }
        Task::Bench {
            rounds,
            profile,
            only,
            seconds,
            paths,
        } => bench::run(rounds, profile, only, seconds, &paths),
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `~/.cargo/bin` first on PATH, so a freshly installed bpf-linker is found.
pub fn cargo_path() -> String {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    format!(
        "{}:{}",
        home.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn build_ebpf() -> Result<()> {
    let dir = workspace_root().join("canary-ebpf");
    let status = Command::new("cargo")
        .current_dir(&dir)
        .env("PATH", cargo_path())
        // The host workspace's flags and target dir must not leak into the BPF build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .args([
            "+nightly",
            "build",
            // The lock pins aya-build 0.2.0: newer releases need a newer rustc.
            "--locked",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .status()
        .context(
            "running cargo +nightly (is the nightly toolchain installed? `cargo xtask bootstrap`)",
        )?;
    if !status.success() {
        bail!(
            "building canary-ebpf failed; `cargo xtask bootstrap` installs bpf-linker and rust-src"
        );
    }
    println!(
        "kernel object: {}",
        dir.join("target/bpfel-unknown-none/release/canary")
            .display()
    );
    Ok(())
}
