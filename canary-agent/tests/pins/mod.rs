//! A private bpffs mount for one test datapath, shared by the tests that load the
//! real kernel programs (packet fixtures, fuzz, upgrade), and [`Programs`]: the same
//! programs run on a packet by BPF_PROG_TEST_RUN through aya's `TestRun`.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

/// A fresh pin directory under the temp dir; `Datapath::load` mounts bpffs on it.
/// Unmounted and removed on drop, also when loading failed after the mount was made.
pub struct Pins(pub PathBuf);

impl Pins {
    #[allow(dead_code)] // the program_cost example makes its own directory
    pub fn new(label: &str) -> Pins {
        static N: AtomicU32 = AtomicU32::new(0);
        Pins(std::env::temp_dir().join(format!(
            "canary-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )))
    }

    /// Loads the datapath on these pins and installs the config's services, service
    /// `i` with id `i` at its configured weight.
    #[allow(dead_code)] // not every test binary installs services
    pub fn load_with_services(
        &self,
        config: &canary_agent::config::Config,
    ) -> canary_agent::datapath::Datapath {
        use canary_agent::datapath::{encode_service, service_key, Datapath};
        let mut dp = Datapath::load(&self.0).expect("loading the datapath (run as root)");
        for (id, svc) in config.services.iter().enumerate() {
            dp.install(
                &service_key(svc),
                &encode_service(svc, id as u32, svc.weight_bp),
            )
            .unwrap();
        }
        dp
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: valid path; unmounting our own private bpffs mount.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The kernel object's programs loaded against the maps pinned in a [`Pins`] directory,
/// so that a test run sees what the datapath loaded there wrote (every map of the
/// object is pinned by name but a per-CPU scratch array).
#[allow(dead_code)] // not every test binary runs programs
pub struct Programs(aya::Ebpf);

/// What one test run gave.
#[allow(dead_code)]
pub struct TestRun {
    pub retval: u32,
    pub packet: Vec<u8>,
    /// Mean time per run, as the kernel measured it.
    pub duration_ns: u64,
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

#[allow(dead_code)]
impl Programs {
    /// `dir`: the bpffs directory a `Datapath` was loaded on.
    pub fn load(dir: &std::path::Path) -> Programs {
        let ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(dir)
            .load(canary_agent::datapath::OBJECT)
            .expect("loading the kernel object on the pinned maps");
        Programs(ebpf)
    }

    /// Runs program `name` on `packet` `repeat` times.
    pub fn run(&mut self, name: &str, packet: &[u8], repeat: u32) -> Result<TestRun, String> {
        self.run_with(name, packet, repeat, None)
    }

    /// [`Programs::run`] for a TC program on a packet that arrived on interface
    /// `ifindex` of the calling thread's network namespace (FIB lookups and redirects
    /// then resolve there).
    pub fn run_arriving_on(
        &mut self,
        name: &str,
        packet: &[u8],
        ifindex: u32,
    ) -> Result<TestRun, String> {
        let ctx = SkBuffCtx {
            ingress_ifindex: ifindex,
            ifindex,
            ..Default::default()
        };
        self.run_with(name, packet, 1, Some(&ctx))
    }

    fn run_with(
        &mut self,
        name: &str,
        packet: &[u8],
        repeat: u32,
        ctx: Option<&SkBuffCtx>,
    ) -> Result<TestRun, String> {
        use aya::programs::{Program, TestRun as _, TestRunOptions};
        let ctx_bytes = ctx.map(|c| {
            // SAFETY: SkBuffCtx is plain repr(C) integers, read as its own bytes.
            unsafe {
                std::slice::from_raw_parts(
                    (c as *const SkBuffCtx).cast::<u8>(),
                    std::mem::size_of::<SkBuffCtx>(),
                )
            }
        });
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: ctx_bytes,
            repeat,
            ..Default::default()
        };
        let program = self
            .0
            .program_mut(name)
            .unwrap_or_else(|| panic!("program {name} missing from the object"));
        let result = match program {
            Program::Xdp(p) => {
                if p.fd().is_err() {
                    p.load().map_err(|e| format!("loading {name}: {e}"))?;
                }
                p.test_run(opts)
            }
            Program::SchedClassifier(p) => {
                if p.fd().is_err() {
                    p.load().map_err(|e| format!("loading {name}: {e}"))?;
                }
                p.test_run(opts)
            }
            _ => panic!("program {name} is not an XDP or TC program"),
        }
        .map_err(|e| format!("BPF_PROG_TEST_RUN: {e}"))?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRun {
            retval: result.return_value,
            packet: out,
            duration_ns: result.duration.as_nanos() as u64,
        })
    }
}
