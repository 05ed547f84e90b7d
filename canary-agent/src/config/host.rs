//! What the config reads from the host rather than the file: the host name (a fleet
//! node's default name) and the dashboard's token file.

use std::path::Path;

/// The host name (`gethostname`), the default node name in a fleet.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; the name is NUL-terminated when it fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// A node name is part of etcd keys and of status output.
/// Shortest dashboard token accepted (bytes, after trimming whitespace).
pub const MIN_UI_TOKEN: usize = 16;

/// Reads the dashboard's bearer token from `ui_token_file`: a regular file owned by
/// root (or by the agent's user) that no one else may read or write (mode 0600 or
/// stricter), holding one token of at least [`MIN_UI_TOKEN`] printable characters.
/// Read on every control request, so a rotated token applies at once.
pub fn load_ui_token(path: &Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let shown = |e: std::io::Error| match e.raw_os_error() {
        Some(libc::ELOOP) => format!("{}: a symbolic link: name the file itself", path.display()),
        _ => format!("{}: {e}", path.display()),
    };
    // Opened once, never through a link and never blocking (a FIFO), and every check
    // made on the file opened: nothing can be swapped in between check and read.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(shown)?;
    let meta = file.metadata().map_err(shown)?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(format!(
            "{}: owned by uid {}; it must belong to root",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{}: mode {:04o} lets others read or write it; chmod 600 it",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    let mut text = String::new();
    // A token is a line; more than 4 KiB is not one.
    (&mut file)
        .take(4096)
        .read_to_string(&mut text)
        .map_err(shown)?;
    let token = text.trim();
    if token.len() < MIN_UI_TOKEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{}: the token must be one word of at least {MIN_UI_TOKEN} printable ASCII characters",
            path.display()
        ));
    }
    Ok(token.to_string())
}
