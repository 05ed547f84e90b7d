//! The hook's own cost: two programs that only return "pass", attached where the
//! agent's programs go (TC ingress and egress of the node's client-facing veth).
//! Their ns/run under the same load is the floor every program there pays before it
//! does anything: the call itself, a cold instruction cache, and `bpf_stats`' two clock
//! reads. Loaded with the raw bpf(2) calls: two instructions need no object file.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};
use canary_lab::{NetNs, NODE_CLIENT_IFACE};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// `bpf_attr` for BPF_PROG_LOAD, up to the fields used.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// `bpf_attr` for BPF_LINK_CREATE of a tcx link (appended after what is there).
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

/// Held links: the programs stay attached until this drops.
pub struct EmptyPrograms {
    _fds: Vec<OwnedFd>,
}

/// `r0 = 0 (TCX_PASS); exit`
const PASS: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];

fn bpf<T>(cmd: libc::c_long, attr: &T, what: &str) -> Result<OwnedFd> {
    // SAFETY: `attr` is a repr(C) prefix of bpf_attr and lives across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if fd < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn load(name: &str) -> Result<OwnedFd> {
    let license = CString::new("GPL")?;
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: PASS.len() as u32,
        insns: PASS.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    attr.prog_name[..name.len()].copy_from_slice(name.as_bytes());
    bpf(BPF_PROG_LOAD, &attr, &format!("loading {name}"))
}

/// Attaches an empty program at both TC hooks of the node's client-facing interface.
pub fn attach(node: &NetNs) -> Result<EmptyPrograms> {
    let ns_path = format!("/run/netns/{}", node.name());
    // setns(CLONE_NEWNET) moves only the calling thread: do it on a thread of its own.
    std::thread::scope(|s| {
        s.spawn(|| -> Result<EmptyPrograms> {
            let ns = std::fs::File::open(&ns_path).with_context(|| format!("opening {ns_path}"))?;
            // SAFETY: a valid namespace descriptor; affects this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("entering {ns_path}: {}", std::io::Error::last_os_error());
            }
            let iface = CString::new(NODE_CLIENT_IFACE)?;
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(iface.as_ptr()) };
            if ifindex == 0 {
                bail!("no interface {NODE_CLIENT_IFACE} in {}", node.name());
            }
            let mut fds = Vec::new();
            for (name, attach_type) in [
                ("empty_ingress", BPF_TCX_INGRESS),
                ("empty_egress", BPF_TCX_EGRESS),
            ] {
                let prog = load(name)?;
                let link = LinkCreate {
                    prog_fd: prog.as_raw_fd() as u32,
                    target_ifindex: ifindex,
                    attach_type,
                    ..Default::default()
                };
                fds.push(bpf(BPF_LINK_CREATE, &link, &format!("attaching {name}"))?);
                fds.push(prog);
            }
            Ok(EmptyPrograms { _fds: fds })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("attaching the empty programs panicked"))?
    })
}
