//! What routed connections need to survive an agent hand-over (SIGUSR2). The agent
//! re-executes its binary in place (same PID, so supervisors see no exit); the proxy's
//! sockets are kept open across the exec (their descriptors lose `FD_CLOEXEC`) and
//! listed in a memfd whose number the next image finds in [`ENV`]. Listeners keep
//! their accept queue, so new connections wait instead of being refused; HTTP/1
//! connections idle between two requests go over with the bytes already read of them;
//! upgraded (spliced) pairs stay in the pinned SockHash under the verdict throughout.

use std::io::{Read, Seek, Write};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Names the memfd that lists the inherited sockets.
pub const ENV: &str = "CANARY_HANDOVER_FD";

/// The router's sockets, by service name, as handed from one agent image to the next.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Record {
    pub listeners: Vec<ListenerFd>,
    pub pending: Vec<ClientFd>,
    pub spliced: Vec<PairFd>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerFd {
    pub service: String,
    pub fd: RawFd,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClientFd {
    pub service: String,
    pub fd: RawFd,
    /// What the previous image had read of the connection and not yet served.
    #[serde(default)]
    pub buffered: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PairFd {
    pub service: String,
    pub client: RawFd,
    pub backend: RawFd,
    /// Bytes each socket had written when it joined the splice.
    pub client_base: u64,
    pub backend_base: u64,
}

fn set_cloexec(fd: RawFd, on: bool) -> Result<()> {
    // SAFETY: F_GETFD/F_SETFD on a descriptor this process owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error()).context(format!("fcntl({fd}, F_GETFD)"));
    }
    let flags = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(std::io::Error::last_os_error()).context(format!("fcntl({fd}, F_SETFD)"));
    }
    Ok(())
}

/// Keeps a socket open across the coming exec; returns its descriptor number.
pub fn keep(sock: impl IntoRawFd) -> Result<RawFd> {
    let fd = sock.into_raw_fd();
    set_cloexec(fd, false)?;
    Ok(fd)
}

impl Record {
    /// Writes the record to a memfd kept across exec; returns the value for [`ENV`].
    pub fn seal(&self) -> Result<String> {
        let name = c"canary-handover";
        // SAFETY: valid name; no MFD_CLOEXEC, so the descriptor survives the exec.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("memfd_create");
        }
        // SAFETY: a fresh descriptor owned here; leaked below on purpose (kept for exec).
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.write_all(&serde_json::to_vec(self)?)?;
        file.rewind()?;
        Ok(file.into_raw_fd().to_string())
    }

    /// The record the previous image left, if this process was started by a hand-over.
    /// Every descriptor it names is checked to be a socket and made close-on-exec again.
    pub fn inherited() -> Result<Option<Record>> {
        let Ok(value) = std::env::var(ENV) else {
            return Ok(None);
        };
        std::env::remove_var(ENV);
        let fd: RawFd = value
            .parse()
            .with_context(|| format!("{ENV}={value:?} is not a descriptor number"))?;
        // SAFETY: the previous image passed this memfd to this one.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        let mut text = String::new();
        file.read_to_string(&mut text)
            .with_context(|| format!("reading the hand-over record (fd {fd})"))?;
        let record: Record = serde_json::from_str(&text).context("parsing the hand-over record")?;
        for fd in record.fds() {
            is_socket(fd)?;
            set_cloexec(fd, true)?;
        }
        Ok(Some(record))
    }

    /// Closes every socket of the record (the next agent routes no service).
    pub fn close(self) {
        for fd in self.fds() {
            drop(own(fd));
        }
    }

    /// Every descriptor the record names.
    fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.listeners
            .iter()
            .map(|l| l.fd)
            .chain(self.pending.iter().map(|c| c.fd))
            .chain(self.spliced.iter().flat_map(|p| [p.client, p.backend]))
    }
}

fn is_socket(fd: RawFd) -> Result<()> {
    // SAFETY: fstat writes into the zeroed struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        bail!("hand-over record names fd {fd}, which is not an open socket");
    }
    Ok(())
}

/// Takes ownership of an inherited descriptor (checked by [`Record::inherited`]).
pub fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: the record's descriptors were passed to this image, checked, and each
    // is taken once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
