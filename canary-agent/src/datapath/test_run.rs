//! BPF_PROG_TEST_RUN: runs a loaded program on a packet in the kernel and returns
//! the verdict, the (possibly rewritten) packet and the average run time. Used by
//! the packet-fixture tests and the ns/packet benchmark.

use std::os::fd::{AsRawFd, BorrowedFd};

use anyhow::{bail, Result};

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

pub struct TestRun {
    pub retval: u32,
    pub packet: Vec<u8>,
    /// Average nanoseconds per run as measured by the kernel.
    pub duration_ns: u32,
}

pub fn run(prog: BorrowedFd<'_>, packet: &[u8], repeat: u32) -> Result<TestRun> {
    run_inner(prog, packet, repeat, None)
}

/// The start of `struct __sk_buff` up to the fields a test run may set: `ifindex` picks
/// the device the packet arrives on, `ingress_ifindex` what the program reads as such.
#[repr(C)]
#[derive(Default)]
struct SkBuffCtx {
    before: [u32; 9],
    ingress_ifindex: u32,
    ifindex: u32,
}

/// [`run`] for a TC program on a packet that arrived on interface `ifindex` of the
/// calling thread's network namespace (FIB lookups and redirects then resolve there).
pub fn run_arriving_on(prog: BorrowedFd<'_>, packet: &[u8], ifindex: u32) -> Result<TestRun> {
    let ctx = SkBuffCtx {
        ingress_ifindex: ifindex,
        ifindex,
        ..Default::default()
    };
    run_inner(prog, packet, 1, Some(&ctx))
}

fn run_inner(
    prog: BorrowedFd<'_>,
    packet: &[u8],
    repeat: u32,
    ctx: Option<&SkBuffCtx>,
) -> Result<TestRun> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ctx_size_in: ctx.map_or(0, |_| std::mem::size_of::<SkBuffCtx>() as u32),
        ctx_in: ctx.map_or(0, |c| c as *const SkBuffCtx as u64),
        ..Default::default()
    };
    // SAFETY: attr points at valid buffers of the sizes given, for the duration of
    // the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    if rc != 0 {
        bail!("BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok(TestRun {
        retval: attr.retval,
        packet: out,
        duration_ns: attr.duration,
    })
}
