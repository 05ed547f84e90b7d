//! What the splitter costs while it carries the load: each BPF program's kernel-measured
//! run time per packet (`kernel.bpf_stats_enabled`, read from the agent's program fds in
//! /proc/PID/fdinfo, named by bpftool), the agent's CPU time and peak RSS, and a
//! `perf` profile of the whole machine.

use std::collections::BTreeMap;

use anyhow::{Context, Result};

/// Turns `kernel.bpf_stats_enabled` on for its lifetime (it is off by default because it
/// costs two clock reads per program run) and restores the previous value.
pub struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> Result<BpfStats> {
        let previous = std::fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_string();
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(BpfStats { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.previous);
    }
}

/// Cumulative run time and run count of each program the process holds, by program
/// name (from `bpftool`; the kernel keeps 15 characters of a name, so the TC ingress
/// program shows as `canary_ingress_`).
pub type ProgramRuns = BTreeMap<String, (u64, u64)>;

pub fn program_runs(pid: u32) -> Result<ProgramRuns> {
    let names = program_names()?;
    let mut out = ProgramRuns::new();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(ns), Some(runs)) =
            (field("prog_id:"), field("run_time_ns:"), field("run_cnt:"))
        else {
            continue;
        };
        let name = names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("id {id}"));
        let e = out.entry(name).or_default();
        e.0 += ns;
        e.1 += runs;
    }
    Ok(out)
}

/// Program id -> name of every loaded program.
fn program_names() -> Result<BTreeMap<u64, String>> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("running bpftool (Debian package bpftool)")?;
    let progs: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("parsing bpftool -j prog show")?;
    Ok(progs
        .iter()
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
        .collect())
}

/// One program's mean ns per run, and its number of runs, over an interval.
pub type ProgramCost = (String, f64, u64);

/// ns per run of each program between two readings.
pub fn ns_per_run(before: &ProgramRuns, after: &ProgramRuns) -> Vec<ProgramCost> {
    after
        .iter()
        .map(|(name, &(ns, runs))| {
            let (ns0, runs0) = before.get(name).copied().unwrap_or_default();
            let n = runs.saturating_sub(runs0);
            (
                name.clone(),
                ns.saturating_sub(ns0) as f64 / n.max(1) as f64,
                n,
            )
        })
        .collect()
}

/// User + system CPU time of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// Peak resident set size (VmHWM) of a process, in MiB.
pub fn peak_rss_mib(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

/// `perf record` of every CPU (software clock: this machine kind has no hardware
/// counters) while a load runs; the report is where kernel and user time went,
/// including the JIT-ed BPF programs (`bpf_prog_*`). The data stays in
/// `target/bench-perf/` for `perf report -i` / `perf annotate -i`.
pub struct Profile {
    child: std::process::Child,
    data: std::path::PathBuf,
    what: String,
}

impl Profile {
    pub fn start(what: &str) -> Result<Profile> {
        let dir = crate::workspace_root().join("target/bench-perf");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let slug: String = what
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let data = dir.join(format!("{slug}.data"));
        let child = std::process::Command::new("perf")
            .args([
                "record",
                "-a",
                "-g",
                "-e",
                "cpu-clock",
                "-F",
                "4999",
                "-q",
                "-o",
            ])
            .arg(&data)
            .args(["--", "sleep", "5"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting perf record (Debian package linux-perf)")?;
        Ok(Profile {
            child,
            data,
            what: what.to_string(),
        })
    }

    pub fn report(mut self) -> Result<()> {
        self.child.wait()?;
        let out = std::process::Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "sym",
                "-g",
                "none",
                "-i",
            ])
            .arg(&self.data)
            .output()?;
        println!("\nperf: where the CPU time went during {}", self.what);
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .collect();
        for line in lines.iter().take(25) {
            println!("{line}");
        }
        // Below the top: the datapath's own symbols (BPF programs, veth's XDP path,
        // skb copies and unclones, the sockmap splice's psock and strparser work),
        // wherever they rank.
        println!("  … datapath symbols:");
        for line in lines.iter().skip(25).filter(|l| {
            [
                "bpf",
                "xdp",
                "veth",
                "pskb",
                "skb_copy",
                "page_pool",
                "csum",
                "lru",
                "psock",
                "strp",
                "skb_send_sock",
            ]
            .iter()
            .any(|k| l.contains(k))
        }) {
            println!("{line}");
        }
        // Each program with the helpers and kernel functions it called: its whole share.
        let out = std::process::Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--children",
                "--sort",
                "sym",
                "-g",
                "none",
                "-i",
            ])
            .arg(&self.data)
            .output()?;
        println!("  … BPF programs with what they called (perf --children):");
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("bpf_prog_"))
        {
            println!("{line}");
        }
        println!("  (perf data: {})", self.data.display());
        Ok(())
    }
}
