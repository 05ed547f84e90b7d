//! Upgrades across a change of map layout. Maps are pinned by name and reused by the
//! next agent; if a new version's object declares a map differently (a flow entry that
//! grew a field, a larger table), reusing the old pin would make the verifier refuse
//! the new programs and the upgraded agent could not start. So before loading:
//!
//! 1. pins whose type, key size, value size or size differ from the object are moved
//!    aside (pinned again as NAME_UPGRADING), and the loader creates and pins fresh maps;
//! 2. after loading, entries are carried from each old map into its new one: keys
//!    must match in size; a value keeps its common prefix and the rest is zeroed,
//!    which is why map values only ever grow by appending fields (canary-common);
//!    per-CPU maps are copied CPU by CPU;
//! 3. once the new programs are attached, the old maps are copied once more (entries
//!    the old programs added meanwhile, e.g. flows placed during the upgrade) and
//!    their pins removed.
//!
//! Only a SYN opens a TCP flow (a non-SYN is re-placed only from a surviving reply
//! entry), so a segment of a flow the first pass missed passes untouched until the
//! second pass, a few milliseconds later, carries its entries; its retransmission then
//! finds them.

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context, Result};
use aya::maps::{MapData, MapInfo};

/// A map's shape as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// A pinned map of an earlier layout, moved aside for the carry-over.
#[derive(Debug)]
pub struct Aside {
    pub name: String,
    pub pin: PathBuf,
    pub layout: Layout,
}

/// The layout of every map the kernel object declares.
pub fn object_layouts(object: &[u8]) -> Result<Vec<(String, Layout)>> {
    let obj = aya_obj::Object::parse(object).context("parsing the kernel object")?;
    Ok(obj
        .maps
        .iter()
        .map(|(name, m)| {
            let layout = Layout {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
            };
            (name.clone(), layout)
        })
        .collect())
}

fn pinned_layout(pin: &Path) -> Result<Layout> {
    let info = MapInfo::from_pin(pin).with_context(|| format!("reading {}", pin.display()))?;
    Ok(Layout {
        map_type: info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
    })
}

/// Moves aside every pin in `dir` whose layout differs from the object's.
pub fn set_aside(dir: &Path, layouts: &[(String, Layout)]) -> Result<Vec<Aside>> {
    let mut aside = Vec::new();
    for (name, wanted) in layouts {
        let pin = dir.join(name);
        if !pin.exists() {
            continue;
        }
        let layout = pinned_layout(&pin)?;
        if layout == *wanted {
            continue;
        }
        // bpffs refuses dots in names.
        let moved = dir.join(format!("{name}_UPGRADING"));
        move_pin(&pin, &moved)
            .with_context(|| format!("moving {} aside for the upgrade", pin.display()))?;
        tracing::warn!(map = %name, from = ?layout, to = ?wanted, "map layout changed: carrying entries over to a new map");
        aside.push(Aside {
            name: name.clone(),
            pin: moved,
            layout,
        });
    }
    Ok(aside)
}

/// How entries are written into the new map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Before the new programs run: every entry, replacing.
    First,
    /// After they took over: only keys the new map lacks, so nothing the new programs
    /// wrote is overwritten with older state.
    Missing,
}

/// Copies the entries of the old maps into the new ones pinned in `dir`; returns the
/// number of entries copied.
pub fn carry_over(dir: &Path, aside: &[Aside], pass: Pass) -> Result<usize> {
    let mut copied = 0;
    for old in aside {
        let new_pin = dir.join(&old.name);
        let new = pinned_layout(&new_pin)?;
        if new.key_size != old.layout.key_size || new.map_type != old.layout.map_type {
            tracing::warn!(map = %old.name, "key or type changed: entries not carried over");
            continue;
        }
        let (from, to) = (open(&old.pin)?, open(&new_pin)?);
        copied += copy_entries(from.fd().as_fd(), old.layout, to.fd().as_fd(), new, pass)
            .with_context(|| format!("carrying {} over", old.name))?;
    }
    Ok(copied)
}

/// Undoes [`set_aside`] after a failed load: the earlier agent's maps (still used by
/// its attached programs) get their pins back.
pub fn restore(dir: &Path, aside: &[Aside]) {
    for old in aside {
        let pin = dir.join(&old.name);
        let _ = std::fs::remove_file(&pin);
        if let Err(e) = move_pin(&old.pin, &pin) {
            tracing::error!(pin = %old.pin.display(), error = %e, "restoring a map pin after a failed load");
        }
    }
}

/// Drops the old maps' pins (the kernel frees them once unused).
pub fn remove_aside(aside: &[Aside]) -> Result<()> {
    for old in aside {
        std::fs::remove_file(&old.pin)
            .with_context(|| format!("removing {}", old.pin.display()))?;
    }
    Ok(())
}

const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_MAP_GET_NEXT_KEY: i64 = 4;
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;

/// The map-element member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

fn bpf<T>(cmd: i64, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a properly laid out prefix of `union bpf_attr` for `cmd`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn open(pin: &Path) -> Result<MapData> {
    MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))
}

/// Re-pins the map at `from` as `to` (bpffs has no rename).
fn move_pin(from: &Path, to: &Path) -> Result<()> {
    open(from)?
        .pin(to)
        .with_context(|| format!("pinning {}", to.display()))?;
    std::fs::remove_file(from).with_context(|| format!("removing {}", from.display()))
}

fn per_cpu(map_type: u32) -> bool {
    matches!(
        map_type,
        BPF_MAP_TYPE_PERCPU_HASH | BPF_MAP_TYPE_PERCPU_ARRAY | BPF_MAP_TYPE_LRU_PERCPU_HASH
    )
}

const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

fn copy_entries(
    from: BorrowedFd<'_>,
    old: Layout,
    to: BorrowedFd<'_>,
    new: Layout,
    pass: Pass,
) -> Result<usize> {
    let per_cpu = per_cpu(old.map_type);
    let cpus = if per_cpu {
        aya::util::nr_cpus().map_err(|(_, e)| anyhow!("counting CPUs: {e}"))?
    } else {
        1
    };
    // Per-CPU values are laid out at 8-byte strides, one per possible CPU.
    let stride = |size: u32| {
        if per_cpu {
            (size as usize).div_ceil(8) * 8
        } else {
            size as usize
        }
    };
    let (old_stride, new_stride) = (stride(old.value_size), stride(new.value_size));
    let common = old.value_size.min(new.value_size) as usize;
    let mut key = vec![0u8; old.key_size as usize];
    let mut next = vec![0u8; old.key_size as usize];
    let mut old_value = vec![0u8; old_stride * cpus];
    let mut new_value = vec![0u8; new_stride * cpus];
    let mut first = true;
    let mut copied = 0;
    loop {
        let mut attr = ElemAttr {
            map_fd: from.as_raw_fd() as u32,
            key: if first { 0 } else { key.as_ptr() as u64 },
            value_or_next_key: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e).context("iterating the old map"),
        }
        first = false;
        key.copy_from_slice(&next);
        let mut attr = ElemAttr {
            map_fd: from.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            value_or_next_key: old_value.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => {}
            // Evicted (LRU) or deleted since the key was listed.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e).context("reading the old map"),
        }
        new_value.fill(0);
        for cpu in 0..cpus {
            let (o, n) = (cpu * old_stride, cpu * new_stride);
            new_value[n..n + common].copy_from_slice(&old_value[o..o + common]);
        }
        let mut attr = ElemAttr {
            map_fd: to.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            value_or_next_key: new_value.as_ptr() as u64,
            flags: match pass {
                Pass::First => BPF_ANY,
                Pass::Missing => BPF_NOEXIST,
            },
            ..Default::default()
        };
        match bpf(BPF_MAP_UPDATE_ELEM, &mut attr) {
            Ok(_) => copied += 1,
            // An array index beyond a smaller new map: nothing to carry. Or, on the
            // second pass, a key the new map already has.
            Err(e) if matches!(e.raw_os_error(), Some(libc::E2BIG | libc::EEXIST)) => {}
            Err(e) => return Err(e).context("writing the new map"),
        }
    }
    Ok(copied)
}
