//! The datapath facade: loads the embedded kernel object, pins its maps under bpffs,
//! attaches the programs, and is the only code that reads or writes the maps.

mod bpffs;
mod cidr;
mod drain;
pub(crate) mod encode;
#[cfg(test)]
pub mod fake;
mod groups;
mod migrate;
mod plane;
mod route;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
pub use bpffs::ensure as ensure_bpffs;
use canary_common::{
    histogram::LATENCY_BUCKETS, latency_index, BackendStats, ServiceKey, ServiceValue,
    VersionTelemetry, MAP_GROUPS, MAP_LATENCY, MAP_SERVICES, MAP_SETTINGS, MAP_STATS, MAP_STRAY,
    MAP_TELEMETRY, MAX_BACKENDS, MAX_GROUP_BACKENDS, PROG_EGRESS, PROG_INGRESS, PROG_INGRESS_TC,
    SETTING_REPLIES_AT_INGRESS,
};

use crate::config::IngressHook;
pub use drain::{DrainGroup, DrainMode, DrainProgress, DRAIN_QUIET};
pub use encode::{
    decode_backend, encode_service, service_key, service_key_for, GroupSpec, KernelRouting,
    ServiceEntry,
};
pub use plane::Dataplane;
pub use route::Splicer;

/// The kernel object built by `cargo xtask build-ebpf`, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/canary.bpf.o"));

pub struct Datapath {
    ebpf: Ebpf,
    bpffs_dir: PathBuf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// The services' backends and counter slots (groups.rs).
    groups: groups::Groups,
    stats: PerCpuArray<MapData, BackendStats>,
    telemetry: PerCpuArray<MapData, VersionTelemetry>,
    latency: PerCpuArray<MapData, u64>,
    /// Per service: TCP segments that were no flow's, passed untouched (CANARY_STRAY).
    stray: PerCpuArray<MapData, u64>,
    /// Maps of an earlier layout, until [`Datapath::finish_upgrade`].
    upgrading: Vec<migrate::Aside>,
    /// The flow table and the drain's view of it (drain.rs).
    drain: drain::Drain,
    /// Client-address routing decided in the kernel (cidr.rs).
    cidr: cidr::Cidr,
    /// Node-wide switches of the programs (SETTING_*).
    settings: aya::maps::Array<MapData, u32>,
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
    ///
    /// Maps pinned by an earlier version with another layout are upgraded (see
    /// [`migrate`]): their entries are carried into new maps, and
    /// [`Datapath::finish_upgrade`] completes the move once the new programs are
    /// attached.
    pub fn load(bpffs_dir: &Path) -> Result<Self> {
        bpffs::ensure(bpffs_dir)?;
        let aside = migrate::set_aside(bpffs_dir, &migrate::object_layouts(OBJECT)?)?;
        match Self::load_object(bpffs_dir, &aside) {
            Ok(mut dp) => {
                dp.upgrading = aside;
                Ok(dp)
            }
            Err(e) => {
                migrate::restore(bpffs_dir, &aside);
                Err(e)
            }
        }
    }

    fn load_object(bpffs_dir: &Path, aside: &[migrate::Aside]) -> Result<Self> {
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
        let group_map = HashMap::try_from(take(&mut ebpf, MAP_GROUPS)?)?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, MAP_STATS)?)?;
        let telemetry = PerCpuArray::try_from(take(&mut ebpf, MAP_TELEMETRY)?)?;
        let latency = PerCpuArray::try_from(take(&mut ebpf, MAP_LATENCY)?)?;
        let stray = PerCpuArray::try_from(take(&mut ebpf, MAP_STRAY)?)?;
        let drain = drain::Drain::new(take(&mut ebpf, canary_common::MAP_FLOWS)?)?;
        let cidr = cidr::Cidr {
            trie: aya::maps::LpmTrie::try_from(take(&mut ebpf, canary_common::MAP_CIDR)?)?,
            decisions: PerCpuArray::try_from(take(&mut ebpf, canary_common::MAP_DECISIONS)?)?,
        };
        let settings = aya::maps::Array::try_from(take(&mut ebpf, MAP_SETTINGS)?)?;
        let xdp: &mut Xdp = program(&mut ebpf, PROG_INGRESS)?;
        xdp.load().context("loading the XDP program (verifier)")?;
        for name in [PROG_INGRESS_TC, PROG_EGRESS] {
            let tc: &mut SchedClassifier = program(&mut ebpf, name)?;
            tc.load()
                .with_context(|| format!("loading the TC program {name} (verifier)"))?;
        }
        if !aside.is_empty() {
            let n = migrate::carry_over(bpffs_dir, aside, migrate::Pass::First)?;
            tracing::info!(entries = n, "carried map entries over to the new layout");
        }
        let groups = groups::Groups::load(group_map, &services)?;
        Ok(Self {
            upgrading: Vec::new(),
            ebpf,
            bpffs_dir: bpffs_dir.to_path_buf(),
            services,
            groups,
            stats,
            telemetry,
            latency,
            stray,
            drain,
            cidr,
            settings,
        })
    }

    /// After the new programs are attached: carries over what the old ones added since
    /// [`Datapath::load`] (flows placed meanwhile) and drops the old maps.
    pub fn finish_upgrade(&mut self) -> Result<()> {
        let aside = std::mem::take(&mut self.upgrading);
        if aside.is_empty() {
            return Ok(());
        }
        let n = migrate::carry_over(&self.bpffs_dir, &aside, migrate::Pass::Missing)?;
        migrate::remove_aside(&aside)?;
        tracing::info!(entries = n, "map upgrade finished");
        Ok(())
    }

    fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    fn link_pin(&self, kind: &str, iface: &str) -> PathBuf {
        link_pin(&self.bpffs_dir, kind, iface)
    }

    /// Attaches ingress (at `hook`, see [`IngressHook`]) and egress (TC) to `iface`, and
    /// pins the links under `bpffs_dir` at once: the attachment then belongs to the pin,
    /// not to this process, so SIGTERM, SIGKILL, a panic or an OOM kill leave the
    /// programs attached and splitting with the last weights. Links an earlier agent
    /// pinned are taken over: the kernel swaps this agent's program into the existing
    /// link atomically (`bpf_link_update`), so no packet goes unprocessed. When the
    /// ingress hook changed, the new one is attached before the old one is removed
    /// (a packet both see is rewritten once: after the first, its destination is a
    /// backend, not a service). Only [`detach`] (an explicit uninstall or an interface
    /// removed from the config) removes an attachment.
    pub fn attach(&mut self, iface: &str, hook: IngressHook) -> Result<()> {
        let tc_ingress = match hook {
            IngressHook::Xdp => false,
            IngressHook::Tc => true,
            IngressHook::Auto => is_virtual(iface),
        };
        let (kind, other) = if tc_ingress {
            ("tcin", "xdp")
        } else {
            ("xdp", "tcin")
        };
        let pin = self.link_pin(kind, iface);
        if tc_ingress {
            self.attach_tc(PROG_INGRESS_TC, TcAttachType::Ingress, &pin, iface)?;
        } else {
            self.attach_xdp(&pin, iface)?;
        }
        remove_pin(&self.link_pin(other, iface))?;
        let pin = self.link_pin("tc", iface);
        self.attach_tc(PROG_EGRESS, TcAttachType::Egress, &pin, iface)
    }

    /// XDP, native mode when the driver supports it.
    fn attach_xdp(&mut self, pin: &Path, iface: &str) -> Result<()> {
        let xdp: &mut Xdp = program(&mut self.ebpf, PROG_INGRESS)?;
        let taken = take_over(pin, iface, "XDP", |link| {
            // Taking the link back out of the program closes this process's fd on
            // drop, so only the pin holds the attachment.
            let id = xdp.attach_to_link(XdpLink::try_from(link)?)?;
            xdp.take_link(id)?;
            Ok(())
        })?;
        if taken {
            tracing::info!(%iface, "took over the attached XDP program");
            return Ok(());
        }
        let id = match xdp.attach(iface, XdpMode::Driver) {
            Ok(id) => id,
            Err(native) => {
                tracing::warn!(%iface, error = %native, "native XDP unavailable, using generic mode");
                xdp.attach(iface, XdpMode::Skb)
                    .with_context(|| format!("attaching XDP to {iface}"))?
            }
        };
        let link: FdLink = xdp.take_link(id)?.try_into()?;
        link.pin(pin)
            .with_context(|| format!("pinning the XDP link at {}", pin.display()))?;
        tracing::info!(%iface, "attached ingress at XDP");
        Ok(())
    }

    fn attach_tc(&mut self, name: &str, at: TcAttachType, pin: &Path, iface: &str) -> Result<()> {
        let tc: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let taken = take_over(pin, iface, "TC", |link| {
            let id = tc.attach_to_link(SchedClassifierLink::try_from(link)?)?;
            tc.take_link(id)?;
            Ok(())
        })?;
        if taken {
            tracing::info!(%iface, program = name, "took over the attached TC program");
            return Ok(());
        }
        let id = tc
            .attach(iface, at)
            .with_context(|| format!("attaching {name} to {iface} at TC {at:?}"))?;
        let link: FdLink = tc.take_link(id)?.try_into()?;
        link.pin(pin)
            .with_context(|| format!("pinning the TC link at {}", pin.display()))?;
        tracing::info!(%iface, program = name, "attached at TC {at:?}");
        Ok(())
    }

    /// Installs or replaces a service: packets see either the old or the new weight
    /// and backends, never a mix (groups.rs).
    pub fn install(&mut self, key: &ServiceKey, entry: &ServiceEntry) -> Result<()> {
        self.groups
            .install(key, entry, &mut self.services, &mut self.stats)
    }

    /// Whether TC ingress also takes replies of redirected flows (on a backend-facing
    /// interface): on while some service has `forward = "redirect"`, so that packets
    /// that are not ours cost no extra lookup otherwise.
    pub fn set_replies_at_ingress(&mut self, on: bool) -> Result<()> {
        let value = if on { SETTING_REPLIES_AT_INGRESS } else { 0 };
        self.settings
            .set(0, value, 0)
            .context("writing the settings map")
    }

    pub fn uninstall(&mut self, key: &ServiceKey) -> Result<()> {
        self.services
            .remove(key)
            .context("removing from the service map")?;
        self.groups.uninstalled(key);
        Ok(())
    }

    /// Services present in the (pinned) maps, e.g. left by the previous agent.
    pub fn installed(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>> {
        Ok(self.groups.installed())
    }

    /// Per-backend counters of service `id` by position (stable's `i` at `i`,
    /// canary's at `MAX_GROUP_BACKENDS + i`), summed over CPUs.
    pub fn stats(&self, id: u32) -> Result<Vec<BackendStats>> {
        let mut out = vec![BackendStats::default(); MAX_BACKENDS];
        let Some(slots) = self.groups.slots(id) else {
            return Ok(out);
        };
        let positions = slots.iter().enumerate().flat_map(|(g, list)| {
            list.iter()
                .enumerate()
                .map(move |(i, &slot)| (groups::position(g, i), slot))
        });
        for (position, slot) in positions {
            let total = &mut out[position];
            let per_cpu = self.stats.get(&(slot as u32), 0)?;
            for s in per_cpu.iter() {
                total.connections += s.connections;
                total.packets_in += s.packets_in;
                total.bytes_in += s.bytes_in;
                total.packets_out += s.packets_out;
                total.bytes_out += s.bytes_out;
                total.flow_misses += s.flow_misses;
                total.handshakes += s.handshakes;
                total.refused += s.refused;
            }
        }
        Ok(out)
    }

    /// TCP segments to service `id` that were neither a SYN nor of a connection it
    /// holds (spoofed or stray), passed untouched; summed over CPUs.
    pub fn stray(&self, id: u32) -> Result<u64> {
        Ok(self.stray.get(&id, 0)?.iter().sum())
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
        self.groups.clear(id, &mut self.stats)?;
        self.stray
            .set(id, aya::maps::PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
        for version in [id * 2, id * 2 + 1] {
            let zero = aya::maps::PerCpuValues::try_from(vec![VersionTelemetry::default(); cpus])?;
            self.telemetry.set(version, zero, 0)?;
            for b in 0..LATENCY_BUCKETS as u32 {
                let zero = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])?;
                self.latency.set(latency_index(version, b), zero, 0)?;
            }
        }
        self.clear_decisions(id)
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

fn link_pin(bpffs_dir: &Path, kind: &str, iface: &str) -> PathBuf {
    bpffs_dir.join(format!("link-{kind}-{iface}"))
}

/// Link pin kinds: ingress at XDP or at TC, egress at TC.
const LINK_KINDS: [&str; 3] = ["xdp", "tcin", "tc"];

/// Whether `iface` is a virtual interface (veth, bridge, lo, …): one without a device
/// behind it in sysfs, where XDP would run in the driver's copy path.
fn is_virtual(iface: &str) -> bool {
    !Path::new("/sys/class/net")
        .join(iface)
        .join("device")
        .exists()
}

/// Removes a pin if it is there (which detaches its link once no one holds it).
fn remove_pin(pin: &Path) -> Result<()> {
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", pin.display())),
    }
}

/// Swaps this agent's program into the link pinned at `pin`, if there is one. A pin
/// whose link no longer works (its interface was deleted) is removed so that a fresh
/// attachment can take its place. Returns whether a link was taken over.
fn take_over(
    pin: &Path,
    iface: &str,
    kind: &str,
    update: impl FnOnce(FdLink) -> Result<()>,
) -> Result<bool> {
    if !pin.exists() {
        return Ok(false);
    }
    let link = PinnedLink::from_pin(pin)
        .with_context(|| format!("opening the pinned {kind} link {}", pin.display()))?;
    // `FdLink::from` keeps the pin: the attachment stays owned by bpffs throughout.
    match update(FdLink::from(link)) {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::warn!(%iface, error = %e, pin = %pin.display(), "pinned link is defunct; attaching anew");
            std::fs::remove_file(pin)
                .with_context(|| format!("removing the defunct link pin {}", pin.display()))?;
            Ok(false)
        }
    }
}

/// Interfaces with programs attached through pins in `bpffs_dir`.
pub fn attached_interfaces(bpffs_dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(bpffs_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", bpffs_dir.display())),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        for kind in LINK_KINDS {
            if let Some(iface) = name.strip_prefix(&format!("link-{kind}-")) {
                if !out.iter().any(|i| i == iface) {
                    out.push(iface.to_string());
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Detaches both programs from `iface` by removing their link pins: once no process
/// holds the links open, the kernel destroys them. An explicit act (uninstall, or an
/// interface removed from the config): no signal or crash of the agent does this.
pub fn detach(bpffs_dir: &Path, iface: &str) -> Result<()> {
    for kind in LINK_KINDS {
        remove_pin(&link_pin(bpffs_dir, kind, iface))?;
    }
    Ok(())
}

/// Removes everything the datapath left in `bpffs_dir`: the local routes of routed
/// service addresses, the link pins (which detaches the programs from every interface),
/// then the map pins (the kernel frees the maps, flow table included, once no program
/// uses them). Returns the interfaces that were detached.
pub fn remove_all(bpffs_dir: &Path) -> Result<Vec<String>> {
    bpffs::check_removable(bpffs_dir)?;
    route::remove_local_routes(bpffs_dir)?;
    let ifaces = attached_interfaces(bpffs_dir)?;
    for iface in &ifaces {
        detach(bpffs_dir, iface)?;
    }
    for pin in bpffs::pins_in(bpffs_dir)? {
        // Only the datapath's own: anything else in the directory is someone else's.
        let ours = pin
            .file_name()
            .is_some_and(|n| bpffs::is_ours(&n.to_string_lossy()));
        if ours {
            remove_pin(&pin)?;
        } else {
            tracing::warn!(pin = %pin.display(), "not a canary pin: left in place");
        }
    }
    Ok(ifaces)
}
