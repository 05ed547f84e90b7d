//! The datapath facade: loads the embedded kernel object, pins its maps under bpffs,
//! attaches the programs, and is the only code that reads or writes the maps.

mod bpffs;
mod encode;
pub mod test_run;

use std::{os::fd::AsFd, path::Path};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLinkId,
        xdp::XdpLinkId,
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use canary_common::{
    histogram::LATENCY_BUCKETS, latency_index, stats_index, BackendStats, ServiceKey, ServiceValue,
    VersionTelemetry, MAP_LATENCY, MAP_SERVICES, MAP_STATS, MAP_TELEMETRY, MAX_BACKENDS,
    MAX_GROUP_BACKENDS, PROG_EGRESS, PROG_INGRESS,
};
pub use encode::{encode_service, service_key};

/// The kernel object built by `cargo xtask build-ebpf`, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/canary.bpf.o"));

pub struct Datapath {
    ebpf: Ebpf,
    bpffs_dir: std::path::PathBuf,
    /// Attachments per interface, so a hand-over can pin them.
    links: Vec<(String, XdpLinkId, SchedClassifierLinkId)>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    stats: PerCpuArray<MapData, BackendStats>,
    telemetry: PerCpuArray<MapData, VersionTelemetry>,
    latency: PerCpuArray<MapData, u64>,
}

/// One version's (stable or canary) application signals, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VersionSignals {
    /// New connections placed on the version's backends.
    pub connections: u64,
    pub counters: VersionTelemetry,
    /// Request -> response latency histogram (canary_common::histogram buckets).
    pub latency: Vec<u64>,
}

impl Datapath {
    /// Loads the programs with their maps pinned in `bpffs_dir` (reusing maps already
    /// pinned there by an earlier agent), without attaching anything.
    pub fn load(bpffs_dir: &Path) -> Result<Self> {
        bpffs::ensure(bpffs_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(bpffs_dir)
            .load(OBJECT)
            .with_context(|| {
                format!(
                    "loading the kernel object with maps in {}",
                    bpffs_dir.display()
                )
            })?;
        let services = HashMap::try_from(take(&mut ebpf, MAP_SERVICES)?)?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, MAP_STATS)?)?;
        let telemetry = PerCpuArray::try_from(take(&mut ebpf, MAP_TELEMETRY)?)?;
        let latency = PerCpuArray::try_from(take(&mut ebpf, MAP_LATENCY)?)?;
        let xdp: &mut Xdp = program(&mut ebpf, PROG_INGRESS)?;
        xdp.load().context("loading the XDP program (verifier)")?;
        let tc: &mut SchedClassifier = program(&mut ebpf, PROG_EGRESS)?;
        tc.load().context("loading the TC program (verifier)")?;
        Ok(Self {
            ebpf,
            bpffs_dir: bpffs_dir.to_path_buf(),
            links: Vec::new(),
            services,
            stats,
            telemetry,
            latency,
        })
    }

    fn link_pin(&self, kind: &str, iface: &str) -> std::path::PathBuf {
        self.bpffs_dir.join(format!("link-{kind}-{iface}"))
    }

    /// Attaches ingress (XDP, native mode when the driver supports it) and egress (TC)
    /// to `iface`. Links live as long as `self`; dropping it detaches. Links that a
    /// previous agent pinned when handing over are taken over instead: the kernel swaps
    /// the program inside the link atomically, so no packet goes unprocessed.
    pub fn attach(&mut self, iface: &str) -> Result<()> {
        let (xdp_pin, tc_pin) = (self.link_pin("xdp", iface), self.link_pin("tc", iface));
        let xdp: &mut Xdp = program(&mut self.ebpf, PROG_INGRESS)?;
        let xdp_id = if xdp_pin.exists() {
            tracing::info!(%iface, "took over the previous agent's attachments");
            let link = PinnedLink::from_pin(&xdp_pin)?.unpin()?;
            xdp.attach_to_link(link.try_into()?)
                .with_context(|| format!("taking over the XDP link on {iface}"))?
        } else {
            match xdp.attach(iface, XdpMode::Driver) {
                Ok(id) => id,
                Err(native) => {
                    tracing::warn!(%iface, error = %native, "native XDP unavailable, using generic mode");
                    xdp.attach(iface, XdpMode::Skb)
                        .with_context(|| format!("attaching XDP to {iface}"))?
                }
            }
        };
        let tc: &mut SchedClassifier = program(&mut self.ebpf, PROG_EGRESS)?;
        let tc_id = if tc_pin.exists() {
            let link = PinnedLink::from_pin(&tc_pin)?.unpin()?;
            tc.attach_to_link(link.try_into()?)
                .with_context(|| format!("taking over the TC link on {iface}"))?
        } else {
            tc.attach(iface, TcAttachType::Egress)
                .with_context(|| format!("attaching TC egress to {iface}"))?
        };
        if xdp_pin.exists() || tc_pin.exists() {
            bail!("{iface}: a pinned link was left behind after the take-over");
        }
        self.links.push((iface.to_string(), xdp_id, tc_id));
        Ok(())
    }

    /// Pins every attachment under bpffs so the programs stay attached after this
    /// process exits, for the next agent to take over (a restart without a gap).
    pub fn hand_over(&mut self) -> Result<()> {
        for (iface, xdp_id, tc_id) in std::mem::take(&mut self.links) {
            let (xdp_pin, tc_pin) = (self.link_pin("xdp", &iface), self.link_pin("tc", &iface));
            let xdp: &mut Xdp = program(&mut self.ebpf, PROG_INGRESS)?;
            let link: FdLink = xdp.take_link(xdp_id)?.try_into()?;
            link.pin(&xdp_pin).context("pinning the XDP link")?;
            let tc: &mut SchedClassifier = program(&mut self.ebpf, PROG_EGRESS)?;
            let link: FdLink = tc.take_link(tc_id)?.try_into()?;
            link.pin(&tc_pin).context("pinning the TC link")?;
        }
        Ok(())
    }

    /// File descriptor of a loaded program, for BPF_PROG_TEST_RUN.
    pub fn program_fd(&self, name: &str) -> Result<std::os::fd::OwnedFd> {
        let prog = self
            .ebpf
            .program(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
        let fd = match prog {
            aya::programs::Program::Xdp(p) => p.fd()?.as_fd().try_clone_to_owned()?,
            aya::programs::Program::SchedClassifier(p) => p.fd()?.as_fd().try_clone_to_owned()?,
            _ => return Err(anyhow!("program {name} has an unexpected type")),
        };
        Ok(fd)
    }

    /// Installs or replaces a service in one map update, so packets see either the old
    /// or the new weight and backends, never a mix.
    pub fn install(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.services
            .insert(key, value, 0)
            .context("writing the service map")
    }

    pub fn uninstall(&mut self, key: &ServiceKey) -> Result<()> {
        self.services
            .remove(key)
            .context("removing from the service map")
    }

    /// Services present in the (pinned) map, e.g. left by the previous agent.
    pub fn installed(&self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        self.services
            .iter()
            .map(|r| r.context("reading the service map"))
            .collect()
    }

    /// Per-backend counters of service `id`, summed over CPUs.
    pub fn stats(&self, id: u32) -> Result<[BackendStats; MAX_BACKENDS]> {
        let mut out = [BackendStats::default(); MAX_BACKENDS];
        for (slot, total) in out.iter_mut().enumerate() {
            let per_cpu = self.stats.get(&stats_index(id, slot as u8), 0)?;
            for s in per_cpu.iter() {
                total.connections += s.connections;
                total.packets_in += s.packets_in;
                total.bytes_in += s.bytes_in;
                total.packets_out += s.packets_out;
                total.bytes_out += s.bytes_out;
                total.flow_misses += s.flow_misses;
            }
        }
        Ok(out)
    }

    /// Stable (`[0]`) and canary (`[1]`) signals of service `id`, summed over CPUs.
    pub fn signals(&self, id: u32) -> Result<[VersionSignals; 2]> {
        let mut out: [VersionSignals; 2] = Default::default();
        let stats = self.stats(id)?;
        for (version, sig) in out.iter_mut().enumerate() {
            let group = &stats[version * MAX_GROUP_BACKENDS..(version + 1) * MAX_GROUP_BACKENDS];
            sig.connections = group.iter().map(|s| s.connections).sum();
            let index = id * 2 + version as u32;
            for t in self.telemetry.get(&index, 0)?.iter() {
                let c = &mut sig.counters;
                c.requests += t.requests;
                for (a, b) in c.responses.iter_mut().zip(t.responses) {
                    *a += b;
                }
                c.resets += t.resets;
                c.handshakes += t.handshakes;
                c.handshake_ns += t.handshake_ns;
            }
            sig.latency = (0..LATENCY_BUCKETS as u32)
                .map(|b| {
                    let per_cpu = self.latency.get(&latency_index(index, b), 0)?;
                    Ok(per_cpu.iter().sum())
                })
                .collect::<Result<_>>()?;
        }
        Ok(out)
    }

    /// Zeroes the counters of a service id that is being given to a different service.
    pub fn clear_stats(&mut self, id: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        for slot in 0..MAX_BACKENDS {
            let zero = aya::maps::PerCpuValues::try_from(vec![BackendStats::default(); cpus])?;
            self.stats.set(stats_index(id, slot as u8), zero, 0)?;
        }
        for version in [id * 2, id * 2 + 1] {
            let zero = aya::maps::PerCpuValues::try_from(vec![VersionTelemetry::default(); cpus])?;
            self.telemetry.set(version, zero, 0)?;
            for b in 0..LATENCY_BUCKETS as u32 {
                let zero = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])?;
                self.latency.set(latency_index(version, b), zero, 0)?;
            }
        }
        Ok(())
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the kernel object"))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the kernel object"))?;
    Ok(prog.try_into()?)
}
