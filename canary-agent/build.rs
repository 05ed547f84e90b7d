//! Embeds the kernel object built by `cargo xtask build-ebpf`.
use std::{env, fs, path::PathBuf};

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
    let object = root.join("canary-ebpf/target/bpfel-unknown-none/release/canary");
    println!("cargo:rerun-if-changed={}", object.display());
    let bytes = fs::read(&object).unwrap_or_else(|e| {
        panic!(
            "kernel object {} is missing ({e}): run `cargo xtask build-ebpf` first \
             (or `make build`, which does it)",
            object.display()
        )
    });
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("canary.bpf.o");
    fs::write(out, bytes).unwrap();
}
