//! The control socket server: one JSON request line in, one JSON response line out.
//!
//! It must keep serving (and never stall the tick loop) whatever a client does:
//! requests are bounded in size and time, answers in time, and clients in number.
//! The agent lock is held only while a well-formed request is handled.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};

use crate::agent::Agent;
use crate::api::{Request, Response};

/// Longest request line accepted; real requests are a few hundred bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Time a client has to send its request line, and to take the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Clients served at once; more are told the agent is busy.
pub const MAX_CLIENTS: usize = 512;

/// Binds the socket at `path`. A socket left there by a killed agent is replaced;
/// anything else (a file, a link) is an error, never deleted. The new socket is made
/// root-only through the file just bound, so a link swapped in meanwhile is not
/// followed.
pub fn bind(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("another agent is already serving {}", path.display());
            }
            // Left by an agent that was killed.
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "control_socket {} exists and is not a socket: refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    restrict_socket(path).with_context(|| format!("making {} root-only", path.display()))?;
    Ok(listener)
}

/// chmod 0600 on the socket at `path`, through a descriptor of the very file (opened
/// without following links, checked to be a socket).
fn restrict_socket(path: &Path) -> Result<()> {
    use std::os::unix::{ffi::OsStrExt, fs::FileTypeExt, io::AsRawFd};
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a valid C string; the descriptor is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    if !file.metadata()?.file_type().is_socket() {
        bail!("not a socket any more");
    }
    let through = format!("/proc/self/fd/{}", file.as_raw_fd());
    let through = std::ffi::CString::new(through)?;
    // SAFETY: a valid C string naming our own descriptor.
    if unsafe { libc::chmod(through.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Accepts clients until the listener fails; each is served on its own task.
pub async fn serve(listener: UnixListener, agent: Arc<Mutex<Agent>>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "control socket accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = agent.clone();
        let slot = slots.clone().try_acquire_owned();
        tokio::spawn(async move {
            let result = match slot {
                Ok(_slot) => serve_client(stream, agent).await,
                Err(_) => {
                    let busy = format!("agent busy: {MAX_CLIENTS} control clients connected");
                    answer(stream, Response::Error(busy)).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %format!("{e:#}"), "control client");
            }
        });
    }
}

async fn serve_client(stream: UnixStream, agent: Arc<Mutex<Agent>>) -> Result<()> {
    // The socket mode already limits access to root; the credential check also covers
    // a socket directory with looser permissions.
    let uid = stream.peer_cred()?.uid();
    if uid != 0 {
        let denied = format!("permission denied: uid {uid} is not root");
        return answer(stream, Response::Error(denied)).await;
    }
    let (read, write) = stream.into_split();
    let response = match read_request(read).await {
        Err(e) => Response::Error(format!("bad request: {e}")),
        Ok(line) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Error(format!("bad request: {e}")),
            Ok(request) => {
                let host: crate::fleet::SharedHost = agent.clone();
                let result = crate::fleet::dispatch(&host, request).await;
                match result {
                    Ok(v) => Response::Ok(v),
                    Err(e) => Response::Error(format!("{e:#}")),
                }
            }
        },
    };
    write_answer(write, response).await
}

/// One request line: at most [`MAX_REQUEST`] bytes, UTF-8, within [`CLIENT_TIMEOUT`].
async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<String> {
    use tokio::io::AsyncReadExt;
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64 + 1));
    let mut line = Vec::new();
    let n = tokio::time::timeout(CLIENT_TIMEOUT, reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| {
            anyhow!(
                "no complete request line within {}s",
                CLIENT_TIMEOUT.as_secs()
            )
        })??;
    if n > MAX_REQUEST {
        bail!("request line longer than {MAX_REQUEST} bytes");
    }
    if line.last() != Some(&b'\n') {
        bail!("connection closed before the end of the request line");
    }
    let text = String::from_utf8(line).map_err(|_| anyhow!("request is not UTF-8"))?;
    Ok(text)
}

async fn answer(stream: UnixStream, response: Response) -> Result<()> {
    let (_, write) = stream.into_split();
    write_answer(write, response).await
}

async fn write_answer(
    mut write: tokio::net::unix::OwnedWriteHalf,
    response: Response,
) -> Result<()> {
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    tokio::time::timeout(CLIENT_TIMEOUT, write.write_all(out.as_bytes()))
        .await
        .map_err(|_| anyhow!("client did not take the answer"))??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn only_a_stale_socket_is_replaced_and_the_new_one_is_root_only() {
        let dir = std::env::temp_dir().join(format!("canary-control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        // A file that is not a socket stays, and the agent does not start.
        std::fs::write(&path, "precious").unwrap();
        let e = bind(&path).unwrap_err().to_string();
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        // Nor a link (to a file elsewhere).
        std::fs::remove_file(&path).unwrap();
        let target = dir.join("target");
        std::fs::write(&target, "x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(bind(&path).is_err());
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        std::fs::remove_file(&path).unwrap();
        // A stale socket (no listener behind it) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // A live one is not.
        assert!(bind(&path)
            .unwrap_err()
            .to_string()
            .contains("already serving"));
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
