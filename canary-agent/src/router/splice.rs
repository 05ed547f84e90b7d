//! Upgraded connections (`101 Switching Protocols`: WebSocket and the like) in the
//! kernel's splice: after the proxy has passed the upgrade request and its answer, the
//! client and backend sockets join the sockmap (datapath `Splicer`) and the `sk_skb`
//! verdict carries every later byte between them; the agent only watches for the close.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use canary_common::{SplicePeer, GROUP_CANARY, SPLICE_REQUESTS, SPLICE_RESPONSES};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::handover::{self, PairFd};
use super::state::{Service, Shared};

/// How long a close waits for spliced bytes that make no progress towards the peer.
const DRAIN_STALL: Duration = Duration::from_secs(5);

pub(super) fn cookie(sock: &impl AsRawFd) -> Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_COOKIE");
    }
    Ok(v)
}

/// Makes the kernel run the verdict over the bytes queued before the socket joined the
/// splice: `tcp_set_rcvlowat` signals data-ready at once.
fn kick(sock: &impl AsRawFd) {
    let one: libc::c_int = 1;
    // SAFETY: valid fd and option value.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Bytes a TCP socket has written: acknowledged plus still queued.
fn written(sock: &impl AsRawFd) -> Result<u64> {
    // SAFETY: getsockopt into a zeroed tcp_info of the size given.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("TCP_INFO");
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: valid fd, SIOCOUTQ writes one int.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCOUTQ");
    }
    Ok(info.tcpi_bytes_acked + queued.max(0) as u64)
}

/// A client and its backend joined in the kernel's splice.
pub(super) struct Spliced {
    pub client: TcpStream,
    pub backend: TcpStream,
    pub c_cookie: u64,
    pub b_cookie: u64,
    /// What each socket had written when it joined the splice.
    pub c_base: u64,
    pub b_base: u64,
}

impl Spliced {
    /// Both sockets into the splice, each with its peer written first, the backend's
    /// before the client's, so the verdict has a target for every byte; then the bytes
    /// queued on either socket meanwhile are run through the verdict.
    pub fn add(
        shared: &Shared,
        svc: &Service,
        client: TcpStream,
        backend: TcpStream,
        group: u8,
    ) -> Result<Self> {
        let _ = (client.set_nodelay(true), backend.set_nodelay(true));
        let (c_cookie, b_cookie) = (cookie(&client)?, cookie(&backend)?);
        let peer = |peer, dir| SplicePeer {
            peer,
            service: svc.id,
            version: group & GROUP_CANARY,
            dir,
            _pad: [0; 2],
        };
        let spliced = Self {
            c_base: written(&client)?,
            b_base: written(&backend)?,
            client,
            backend,
            c_cookie,
            b_cookie,
        };
        let mut s = shared.splicer_mut()?;
        let added = s
            .add(b_cookie, &spliced.backend, peer(c_cookie, SPLICE_RESPONSES))
            .and_then(|()| s.add(c_cookie, &spliced.client, peer(b_cookie, SPLICE_REQUESTS)));
        if let Err(e) = added {
            s.remove(c_cookie);
            s.remove(b_cookie);
            return Err(e);
        }
        drop(s);
        kick(&spliced.client);
        kick(&spliced.backend);
        Ok(spliced)
    }

    /// Watches the pair until both sides are closed (then the map entries go) or a
    /// hand-over takes it (then they stay for the next agent).
    pub async fn run(mut self, shared: &Shared, svc: &Service) {
        let ended = tokio::select! {
            r = self.watch(shared, svc) => Some(r),
            _ = shared.stopping() => None,
        };
        match ended {
            Some(r) => {
                if let Err(e) = r {
                    tracing::debug!(error = %format!("{e:#}"), "spliced connection ended");
                }
                if let Ok(mut s) = shared.splicer_mut() {
                    s.remove(self.c_cookie);
                    s.remove(self.b_cookie);
                }
            }
            None => {
                let service = svc.cfg.name.clone();
                shared.hand(|r| {
                    let client = handover::keep(self.client.into_std()?)?;
                    let backend = handover::keep(self.backend.into_std()?)?;
                    r.spliced.push(PairFd {
                        service,
                        client,
                        backend,
                        client_base: self.c_base,
                        backend_base: self.b_base,
                    });
                    Ok(())
                });
            }
        }
    }

    /// Passes a close on one side to the other, once the peer has sent every byte the
    /// kernel carried to it. A byte the verdict handed up (its peer's entry was gone)
    /// is forwarded here so none is lost.
    async fn watch(&mut self, shared: &Shared, svc: &Service) -> Result<()> {
        let counts = &svc.counts;
        let mut buf = vec![0u8; 16 * 1024];
        let (mut client_open, mut backend_open) = (true, true);
        while client_open || backend_open {
            tokio::select! {
                r = self.client.readable(), if client_open => {
                    r?;
                    match self.client.try_read(&mut buf) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Ok(n) if n > 0 => {
                            self.backend.write_all(&buf[..n]).await?;
                            counts.userspace_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        // End of stream, or a reset (which ends the side the same way:
                        // what was already carried the other way still goes out first).
                        ended => {
                            if let Err(e) = ended {
                                tracing::debug!(error = %e, "client side of a spliced connection");
                            }
                            client_open = false;
                            self.drained(shared, self.c_cookie, &self.backend, self.b_base).await;
                            let _ = self.backend.shutdown().await;
                        }
                    }
                }
                r = self.backend.readable(), if backend_open => {
                    r?;
                    match self.backend.try_read(&mut buf) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Ok(n) if n > 0 => {
                            self.client.write_all(&buf[..n]).await?;
                            counts.userspace_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        ended => {
                            if let Err(e) = ended {
                                tracing::debug!(error = %e, "backend side of a spliced connection");
                            }
                            backend_open = false;
                            self.drained(shared, self.b_cookie, &self.client, self.c_base).await;
                            // SAFETY: valid fd; half-close the client's side.
                            unsafe { libc::shutdown(self.client.as_raw_fd(), libc::SHUT_WR) };
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits until `to` has written every byte the kernel carried to it from `from`
    /// (a kernel worker sends redirected bytes a moment after the verdict), giving up
    /// after [`DRAIN_STALL`] without progress.
    async fn drained(&self, shared: &Shared, from: u64, to: &TcpStream, base: u64) {
        let mut last = (0, tokio::time::Instant::now());
        loop {
            let carried = shared.splicer().map_or(0, |s| s.carried(from));
            let Ok(sent) = written(to).map(|w| w.saturating_sub(base)) else {
                return;
            };
            if sent >= carried {
                return;
            }
            if sent != last.0 {
                last = (sent, tokio::time::Instant::now());
            } else if last.1.elapsed() > DRAIN_STALL {
                tracing::debug!(carried, sent, "spliced bytes not sent before a close");
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
