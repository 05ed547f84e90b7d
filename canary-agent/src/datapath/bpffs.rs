//! Makes sure the pin directory is on a bpf filesystem, mounting one if needed.

use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path};

use anyhow::{bail, Context, Result};

const BPF_FS_MAGIC: i64 = 0xCAFE_4A11;

fn is_bpffs(dir: &Path) -> Result<bool> {
    let c = CString::new(dir.as_os_str().as_bytes())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("statfs {}", dir.display()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Creates `dir` and, when it is not already on bpffs, mounts a bpf filesystem there
/// so that pins survive the agent.
pub fn ensure(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if is_bpffs(dir)? {
        return Ok(());
    }
    let target = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: valid C strings; a plain bpffs mount with no data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context(format!("mounting bpffs on {} (bpffs_dir)", dir.display()));
    }
    if !is_bpffs(dir)? {
        bail!("{} is still not on bpffs after mounting", dir.display());
    }
    tracing::info!(dir = %dir.display(), "mounted bpffs for map pins");
    Ok(())
}
