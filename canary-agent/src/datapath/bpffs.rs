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
