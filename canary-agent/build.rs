//! Builds and embeds the kernel object (canary-ebpf). The programs are part of the
//! agent: a changed kernel source rebuilds the object here, so `cargo test` never
//! tests a stale program. `cargo xtask build-ebpf` runs the same build by hand.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

fn main() {
    let ebpf = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("../canary-ebpf");
    let common = ebpf.join("../canary-common");
    let object = ebpf.join("target/bpfel-unknown-none/release/canary");
    let sources = [
        ebpf.join("src"),
        ebpf.join("Cargo.toml"),
        ebpf.join("Cargo.lock"),
        common.join("src"),
        common.join("Cargo.toml"),
    ];
    for source in &sources {
        println!("cargo:rerun-if-changed={}", source.display());
    }
    let built = modified(&object);
    if built.is_none() || sources.iter().any(|s| newest(s) > built) {
        build_object(&ebpf);
    }
    let bytes = fs::read(&object).unwrap_or_else(|e| {
        panic!(
            "kernel object {} is missing ({e}) after building it",
            object.display()
        )
    });
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("canary.bpf.o");
    fs::write(out, bytes).unwrap();
}

/// `cargo +nightly build` of the eBPF crate, with none of this build's flags.
fn build_object(dir: &Path) {
    // Through rustup, which picks the nightly toolchain whatever cargo runs this.
    let mut cmd = Command::new("rustup");
    cmd.current_dir(dir);
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        // The host build's settings must not leak into the BPF build.
        if key.starts_with("CARGO_") || key.starts_with("RUSTC") || key == "RUSTFLAGS" {
            cmd.env_remove(&key);
        }
    }
    cmd.env_remove("RUSTUP_TOOLCHAIN").args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--locked",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ]);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("running `rustup run nightly cargo` for canary-ebpf: {e} (`cargo xtask bootstrap` checks it)")
    });
    assert!(
        status.success(),
        "building canary-ebpf failed ({status}); `cargo xtask bootstrap` installs bpf-linker and rust-src"
    );
}

fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest modification time of a file or of any file below a folder.
fn newest(path: &Path) -> Option<SystemTime> {
    let own = modified(path);
    let Ok(entries) = fs::read_dir(path) else {
        return own;
    };
    entries
        .flatten()
        .map(|e| newest(&e.path()))
        .fold(own, |a, b| a.max(b))
}
