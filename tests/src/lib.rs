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
