//! A private bpffs mount for one test datapath, shared by the tests that load the
//! real kernel programs (packet fixtures, fuzz, upgrade).

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

/// A fresh pin directory under the temp dir; `Datapath::load` mounts bpffs on it.
/// Unmounted and removed on drop, also when loading failed after the mount was made.
pub struct Pins(pub PathBuf);

impl Pins {
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
