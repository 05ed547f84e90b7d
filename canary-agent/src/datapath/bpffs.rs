//! Makes sure the pin directory is on a bpf filesystem, mounting one if needed.
//!
//! A freshly booted host (and every `ip netns exec`, which remounts /sys) often has
//! no bpffs at `/sys/fs/bpf`: the directory exists but belongs to sysfs, which refuses
//! to create anything in it. Then bpffs is mounted at `/sys/fs/bpf`, as bpftool and
//! systemd do, and the pin directory is created inside it. A `bpffs_dir` anywhere else
//! is created and, unless it already is on bpffs, gets a bpffs of its own.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

const BPF_FS_MAGIC: i64 = 0xCAFE_4A11;
/// Where bpffs is conventionally mounted.
pub const STANDARD_MOUNT: &str = "/sys/fs/bpf";

fn is_bpffs(dir: &Path) -> Result<bool> {
    let c = CString::new(dir.as_os_str().as_bytes())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("statfs {}", dir.display()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(target: &Path) -> Result<()> {
    let c = CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: valid C strings; a plain bpffs mount with no data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context(format!(
            "mounting bpffs on {} (needs CAP_SYS_ADMIN in the host mount namespace)",
            target.display()
        ));
    }
    if !is_bpffs(target)? {
        bail!("{} is still not on bpffs after mounting", target.display());
    }
    if mount_namespace_is_private() {
        tracing::warn!(
            dir = %target.display(),
            "mounted bpffs inside a mount namespace private to this process: pins (and the \
             attached programs) will not outlive it; mount bpffs on the host instead"
        );
    } else {
        tracing::info!(dir = %target.display(), "mounted bpffs");
    }
    Ok(())
}

/// Whether this process runs in a mount namespace other than init's.
fn mount_namespace_is_private() -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    matches!((ns("self"), ns("1")), (Some(a), Some(b)) if a != b)
}

/// Makes `dir` exist on a bpf filesystem so that pins survive the agent.
pub fn ensure(dir: &Path) -> Result<()> {
    let standard = Path::new(STANDARD_MOUNT);
    if dir.starts_with(standard) && dir != standard && !dir.exists() && !is_bpffs(standard)? {
        mount_bpffs(standard)?;
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating {} (bpffs_dir)", dir.display()))?;
    if !is_bpffs(dir)? {
        mount_bpffs(dir)?;
    }
    make_private(dir)
}

/// The pin directory must be root's alone: whoever can write in it can plant a map
/// the agent would reuse, or a link it would take over. An existing one owned by
/// anyone else, or holding an entry of anyone else, is refused; a root-owned one with
/// a looser mode (a fresh bpffs is 1777) is made 0700.
fn make_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if dir == Path::new(STANDARD_MOUNT) {
        bail!(
            "bpffs_dir {STANDARD_MOUNT} is the host's shared bpffs: give the agent a directory              of its own in it (e.g. {STANDARD_MOUNT}/canary)"
        );
    }
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("checking bpffs_dir {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("bpffs_dir {} is not a directory", dir.display());
    }
    if meta.uid() != 0 {
        bail!(
            "bpffs_dir {} belongs to uid {}: it must belong to root (mode 0700)",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o077 == 0 {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let uid = entry.metadata()?.uid();
        if uid != 0 {
            bail!(
                "bpffs_dir {} was open to others (mode {:04o}) and holds {} of uid {uid}:                  refusing to use it",
                dir.display(),
                meta.mode() & 0o7777,
                entry.path().display()
            );
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making bpffs_dir {} root-only (0700)", dir.display()))
}

/// Whether a pin's name is one the datapath makes: its maps (`CANARY_*`, `ROUTE_*`,
/// with `_UPGRADING` during an upgrade), its link pins (`link-KIND-IFACE`) and the
/// router's sk_lookup link.
pub fn is_ours(name: &str) -> bool {
    let map = |n: &str| {
        (n.starts_with("CANARY_") || n.starts_with("ROUTE_"))
            && n.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    };
    map(name)
        || [super::route::LOOKUP_PIN, super::route::HANDOVER_LOOKUP_PIN].contains(&name)
        || ["link-xdp-", "link-tcin-", "link-tc-"]
            .iter()
            .any(|p| name.strip_prefix(p).is_some_and(|iface| !iface.is_empty()))
}

/// Refuses to clear the host's shared bpffs, or a bpffs mount root that holds pins
/// of others: uninstall removes only what the agent pinned, from a directory of its own.
pub fn check_removable(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if dir == Path::new(STANDARD_MOUNT) {
        bail!(
            "bpffs_dir {STANDARD_MOUNT} is the host's shared bpffs: refusing to uninstall from it              (the agent pins into a directory of its own)"
        );
    }
    let (Ok(here), Some(Ok(parent))) =
        (std::fs::metadata(dir), dir.parent().map(std::fs::metadata))
    else {
        return Ok(());
    };
    if here.dev() != parent.dev() {
        let others: Vec<String> = pins_in(dir)?
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .filter(|n| !is_ours(n))
            .collect();
        if !others.is_empty() {
            bail!(
                "bpffs_dir {} is the root of a bpffs that also holds pins not made by canary                  ({}): refusing to uninstall from it",
                dir.display(),
                others.join(", ")
            );
        }
    }
    Ok(())
}

/// Every pin in the pin directory (none when it does not exist). Names with a dot are
/// the kernel's own (`maps.debug`, `progs.debug` at a bpffs root): pins cannot have one.
pub fn pins_in(dir: &Path) -> Result<Vec<PathBuf>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter(|e| {
                e.as_ref()
                    .map_or(true, |e| !e.file_name().to_string_lossy().contains('.'))
            })
            .map(|e| Ok(e?.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("reading {}", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_datapaths_own_pin_names_are_ours() {
        for ours in [
            "CANARY_FLOWS",
            "CANARY_FLOWS_UPGRADING",
            "ROUTE_SOCKS",
            "route-lookup",
            "link-xdp-eth0",
            "link-tcin-veth1",
            "link-tc-eth0",
        ] {
            assert!(is_ours(ours), "{ours}");
        }
        for theirs in [
            "cilium_calls",
            "link-xdp-",
            "CANARY_x",
            "tc",
            "globals",
            "link-foo-eth0",
        ] {
            assert!(!is_ours(theirs), "{theirs}");
        }
    }

    #[test]
    fn the_hosts_shared_bpffs_is_never_the_pin_directory() {
        let standard = Path::new(STANDARD_MOUNT);
        assert!(check_removable(standard)
            .unwrap_err()
            .to_string()
            .contains("shared bpffs"));
        assert!(make_private(standard)
            .unwrap_err()
            .to_string()
            .contains("shared bpffs"));
    }

    #[test]
    fn a_pin_directory_of_another_owner_is_refused_and_a_loose_one_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("canary-bpffs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let planted = dir.join("CANARY_FLOWS");
        std::fs::write(&planted, "").unwrap();
        std::os::unix::fs::lchown(&planted, Some(65534), Some(65534)).unwrap();
        let e = make_private(&dir).unwrap_err().to_string();
        assert!(e.contains("uid 65534") && e.contains("CANARY_FLOWS"), "{e}");
        std::fs::remove_file(&planted).unwrap();
        make_private(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        std::os::unix::fs::lchown(&dir, Some(65534), None).unwrap();
        let e = make_private(&dir).unwrap_err().to_string();
        assert!(e.contains("belongs to uid 65534"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
