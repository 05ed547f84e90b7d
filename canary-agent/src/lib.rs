//! The canary agent: loads the kernel datapath, applies the configuration, and serves
//! the control API that the `canary` CLI talks to.

pub mod agent;
pub mod analysis;
pub mod api;
pub mod cli;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod datapath;
pub mod fleet;
pub mod health;
pub mod httpd;
pub mod metrics;
pub mod policy;
pub mod router;
pub mod ui;
pub mod units;
pub mod webhook;
