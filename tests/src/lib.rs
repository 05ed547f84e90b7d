//! Test lab for canary: builds network-namespace topologies with real
//! processes, and drives and observes traffic through them.
//!
//! Everything runs as root. Addresses are confined to 198.18.0.0/15 and
//! 2001:db8::/32, inside namespaces this crate creates and removes itself.

pub mod agent;
pub mod backend;
pub mod client;
pub mod fleet;
pub mod netns;
pub mod topology;
pub mod webhook;

pub use backend::{Backends, Faults};
pub use client::{
    banner_connections, http_load, http_load_until, http_request, udp_probe, BannerReport,
    ConnStats, HttpReport, HttpResponse, Latency, LongLived, LongLivedReport,
};
pub use netns::{log_dir, ChildGuard, NetNs};
pub use topology::{Topology, Version, NODE_CLIENT_IFACE, VIP_V4, VIP_V6};

#[cfg(test)]
mod tests {
    /// `autotests = false` in Cargo.toml: a suite file not listed there would never
    /// be built, and so never fail.
    #[test]
    fn every_suite_is_listed() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests");
        let manifest = include_str!("../Cargo.toml");
        for entry in std::fs::read_dir(dir).expect("tests/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.extension().is_some_and(|e| e == "rs") {
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                assert!(
                    manifest.contains(&format!("[[test]]\nname = \"{name}\"\n")),
                    "tests/tests/{name}.rs is not listed as a [[test]] in tests/Cargo.toml"
                );
            }
        }
    }
}
