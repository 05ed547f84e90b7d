//! Guards for network namespaces and the processes started in them.
//!
//! Every namespace and child process the lab creates is owned by a guard, so it
//! is removed on every exit path that unwinds (including a panicking test).
//! Namespaces left behind by a run that was killed outright are swept by the
//! next run: their names carry the creating pid.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Prefix of every namespace name this crate creates; the stale sweep only
/// ever touches names that carry it.
const PREFIX: &str = "cnry";
/// Where `ip netns` keeps its bind mounts.
const NETNS_DIR: &str = "/run/netns";
/// How long teardown waits for killed processes to leave a namespace.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How many trailing log lines a panicking test prints per child.
const LOG_TAIL_LINES: usize = 30;

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// Per-run directory holding the children's logs. It is kept after the run so
/// a failing test's logs can still be read.
pub fn log_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        std::env::temp_dir().join(format!("canary-lab-{}-{secs}", std::process::id()))
    })
}

/// A network namespace that is deleted, together with every process still in
/// it, when the guard drops.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `cnry-<pid>-<n>-<role>` and brings its loopback up.
    pub fn new(role: &str) -> Result<NetNs> {
        if role.is_empty() || !role.chars().all(|c| c.is_ascii_alphanumeric()) {
            bail!("namespace role must be non-empty ASCII alphanumerics, got {role:?}");
        }
        sweep_stale();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}-{}-{id}-{role}", std::process::id());
        {
            // Concurrent first-time `ip netns add` calls race on setting up
            // the shared /run/netns mount.
            static ADD: Mutex<()> = Mutex::new(());
            let _serial = ADD.lock().unwrap_or_else(|e| e.into_inner());
            command_output(Command::new("ip").args(["netns", "add", &name]))?;
        }
        // From here on the guard owns the namespace, so a failure below still
        // deletes it.
        let ns = NetNs { name };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace and returns its stdout; the error
    /// names the command and carries its stderr.
    pub fn run(&self, argv: &[&str]) -> Result<String> {
        command_output(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(argv),
        )
    }

    /// Adds address `cidr` (e.g. "198.18.2.3/24") to interface `dev` of the namespace.
    pub fn add_address(&self, cidr: &str, dev: &str) -> Result<()> {
        self.run(&["ip", "addr", "add", cidr, "dev", dev]).map(drop)
    }

    /// Starts a long-running process in the namespace. Its stdout and stderr
    /// go to a log file under [`log_dir`]; the guard kills it on drop.
    pub fn spawn(&self, program: impl AsRef<OsStr>, args: &[&str]) -> Result<ChildGuard> {
        let program = program.as_ref();
        let dir = log_dir();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let stem = Path::new(program)
            .file_name()
            .map_or_else(|| "child".into(), |s| s.to_string_lossy());
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let log = dir.join(format!("{}-{stem}-{id}.log", self.name));
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        // `ip netns exec` execs the program, so the child's pid is the
        // program's own and killing it needs no process-group games.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {program:?} {args:?} in {}", self.name))?;
        Ok(ChildGuard {
            label: format!("{} in {}", stem, self.name),
            child,
            log,
        })
    }

    /// Runs `f` on a fresh thread that has joined this namespace. Sockets
    /// created there stay in the namespace, and threads it spawns inherit it;
    /// the caller's thread is never moved. A panic in `f` is re-raised here.
    pub fn enter<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Result<T> + Send,
        T: Send,
    {
        let path = Path::new(NETNS_DIR).join(&self.name);
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        std::thread::scope(|scope| {
            let worker = scope.spawn(move || {
                // SAFETY: setns only reads the fd, which `file` keeps open.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let err = std::io::Error::last_os_error();
                    bail!("setns into {}: {err}", path.display());
                }
                f()
            });
            worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = destroy(&self.name) {
            eprintln!(
                "canary-lab: failed to remove namespace {}: {e:#}",
                self.name
            );
        }
    }
}

/// A child process that is killed and reaped when the guard drops.
#[derive(Debug)]
pub struct ChildGuard {
    label: String,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    /// The child's pid (in the root pid namespace).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file that collects the child's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The child's output so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until a line of the child's output contains `needle`; fails early
    /// (with the log) if the child exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.lines().any(|l| l.contains(needle)) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before logging {needle:?}:\n{log}",
                    self.label
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}:\n{log}",
                    self.label
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Errors mean the child is already gone, which is the goal.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!(
                "--- {} (log {}), last {} lines:\n{}",
                self.label,
                self.log.display(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// Runs a command and returns its stdout, or an error naming the command and
/// carrying its stderr.
fn command_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Kills every process in the namespace, waits for them to leave it (a
/// process inside keeps the namespace and its veths alive after the name is
/// gone), then deletes it.
fn destroy(name: &str) -> Result<()> {
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let pids = command_output(Command::new("ip").args(["netns", "pids", name]))?;
        let pids: Vec<libc::pid_t> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            bail!("processes {pids:?} still in {name} after {KILL_WAIT:?}");
        }
        for pid in pids {
            // SAFETY: plain syscall; the pid was just read from the namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    command_output(Command::new("ip").args(["netns", "del", name]))?;
    Ok(())
}

/// Once per process, removes namespaces named by this crate whose creating
/// process no longer exists (a run that was SIGKILLed or aborted).
fn sweep_stale() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let mut parts = name.split('-');
            if parts.next() != Some(PREFIX) {
                continue;
            }
            let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                if let Err(e) = destroy(&name) {
                    eprintln!("canary-lab: failed to sweep stale namespace {name}: {e:#}");
                }
            }
        }
    });
}
