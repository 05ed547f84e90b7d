//! Types, constants and pure functions shared by the kernel programs (`canary-ebpf`)
//! and the userspace agent (`canary-agent`). Everything here is `no_std`, allocation
//! free and verifier friendly, so both sides compute exactly the same answers.
#![no_std]

pub mod csum;
pub mod histogram;
pub mod maps;
pub mod ring;
pub mod select;

pub use maps::*;
pub use select::*;
