//! Config parser robustness (proptest, fixed case counts, no files written): random
//! bytes, random text, truncations and byte/line mutations of a valid agent.toml,
//! and generated configs with many services and odd values.
//!
//! Properties of `Config::parse(text, path)`:
//! * it never panics;
//! * every error names the file (`file` and the message's prefix) and a field
//!   (`agent...`, `service...`) or a line (`line N` within the text);
//! * whatever it accepts is within the datapath's limits and usable as is
//!   (interface names the kernel accepts, at most 1 024 services and 256 backends
//!   per group, weights within 0..=100 %, no port 0, one address family per service).

use std::{collections::HashSet, panic::AssertUnwindSafe, path::Path};

use canary_agent::config::{Config, ConfigError, Mode, Sticky};
use proptest::{collection::vec, prelude::*, test_runner::Config as PtConfig};

const FILE: &str = "/etc/canary/agent.toml";

/// The README's configuration plus a second service using the other options.
const VALID: &str = r#"[agent]
interface = ["eth0", "eth1"]                 # one name or a list
control_socket = "/run/canary/agent.sock"
bpffs_dir = "/sys/fs/bpf/canary"
state_dir = "/var/lib/canary"
metrics_listen = "198.18.1.1:9464"
prometheus_url = "http://198.18.1.1:9090"
alert_webhook = "http://198.18.1.1:9978/alerts"

[[service]]
name = "web"
listen = "198.19.0.10:80"
protocol = "tcp"
stable = ["198.18.2.2:8080", "198.18.2.3:8080"]
canary = ["198.18.3.2:8080"]
weight = 5.25
mode = "hash"
sticky = "connection"
policy = "web-policy.toml"

[[service]]
name = "dns_6"
listen = "[2001:db8:ffff::53]:53"
protocol = "udp"
stable = ["[2001:db8:2::2]:5353"]
canary = ["[2001:db8:3::2]:5353"]
weight = 0.01
mode = "exact"
"#;

/// Values worth putting where a value goes.
const VALUES: &[&str] = &[
    "\"\"",
    "0",
    "-1",
    "-0.0",
    "100",
    "100.01",
    "12.345",
    "99.99",
    "1e-300",
    "1e309",
    "nan",
    "inf",
    "-inf",
    "9223372036854775807",
    "true",
    "1979-05-27T07:32:00Z",
    "[]",
    "[\"\"]",
    "{}",
    "{ a = 1 }",
    "'''multi\nline'''",
    "\"198.19.0.10:0\"",
    "\"198.19.0.10\"",
    "\"1.2.3.4:65536\"",
    "\"[::1]:80\"",
    "\"[fe80::1%eth0]:80\"",
    "[\"198.18.2.2:1\", \"198.18.2.2:1\"]",
    "[\"[2001:db8::1]:1\"]",
    "\"eth0:1\"",
    "\".\"",
    "\"..\"",
    "\"a\\tb\"",
    "\"a\\u0000b\"",
    "\"a\\nb\"",
    "\"\\u00e9t\\u00e9\"",
    "\"0123456789abcdef\"",
    "\"http://x\"",
    "\"https://x\"",
    "\"hash\"",
    "\"exact\"",
    "\"client-ip\"",
    "\"udp\"",
    "\"sctp\"",
    "\"web\"",
    "\"../../etc/passwd\"",
];

/// Characters that matter to TOML and to the fields.
const ALPHABET: &[u8] = b"[]{}=\"'#\n\r\t .,:;0123456789-_+eE/\\azAZ\x00\x7f";

/// Field names the parser uses in its errors.
const FIELDS: &[&str] = &[
    "interface",
    "control_socket",
    "bpffs_dir",
    "state_dir",
    "metrics_listen",
    "prometheus_url",
    "alert_webhook",
    "name",
    "listen",
    "protocol",
    "stable",
    "canary",
    "weight",
    "mode",
    "sticky",
    "policy",
];

/// `line N` within the text, or a path of known fields under `agent` or `service`.
fn located(field: &str, text: &str) -> bool {
    if let Some(n) = field.strip_prefix("line ") {
        let lines = text.matches('\n').count() + 1;
        return n.parse::<usize>().is_ok_and(|n| (1..=lines).contains(&n));
    }
    let rest = if let Some(r) = field.strip_prefix("agent") {
        r
    } else if let Some(r) = field.strip_prefix("service") {
        // service[i] or service[i] (name)
        let r = match r.strip_prefix('[') {
            Some(r) => {
                let Some((i, r)) = r.split_once(']') else {
                    return false;
                };
                if i.parse::<usize>().is_err() {
                    return false;
                }
                match r.strip_prefix(" (") {
                    Some(r) => match r.split_once(')') {
                        Some((_, r)) => r,
                        None => return false,
                    },
                    None => r,
                }
            }
            None => r,
        };
        r
    } else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    let Some(rest) = rest.strip_prefix('.') else {
        return false;
    };
    let name = rest.split('[').next().unwrap();
    FIELDS.contains(&name)
}

/// What the kernel accepts as an interface name (`dev_valid_name`: its `isspace`
/// is 9..=13, 32 and 0xA0), and no NUL.
fn valid_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() < 16
        && n != "."
        && n != ".."
        && !n.bytes().any(|b| {
            b == b'/' || b == b':' || b == 0 || (9..=13).contains(&b) || b == 32 || b == 0xA0
        })
}

fn sane(c: &Config) -> Result<(), String> {
    if c.agent.interfaces.is_empty() {
        return Err("no interface".into());
    }
    for i in &c.agent.interfaces {
        if !valid_ifname(i) {
            return Err(format!("interface name {i:?} accepted"));
        }
    }
    if c.services.len() > canary_common::MAX_SERVICES as usize {
        return Err(format!("{} services accepted", c.services.len()));
    }
    let mut names = HashSet::new();
    let mut listens = HashSet::new();
    for s in &c.services {
        if !names.insert(&s.name) || !listens.insert((s.listen, s.protocol)) {
            return Err(format!("duplicate service {s:?}"));
        }
        if s.name.is_empty()
            || !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!("service name {:?} accepted", s.name));
        }
        let most = canary_common::MAX_GROUP_BACKENDS;
        // A group of names is empty until they are resolved.
        if s.sources[0].is_empty() || s.stable.len() > most || s.canary.len() > most {
            return Err(format!("backend counts of {s:?}"));
        }
        if s.weight_bp > 10_000 || (s.weight_bp > 0 && s.sources[1].is_empty()) {
            return Err(format!("weight of {s:?}"));
        }
        if s.mode == Mode::Exact && s.sticky == Sticky::ClientIp {
            return Err(format!("exact + client-ip in {s:?}"));
        }
        for b in s.stable.iter().chain(&s.canary).chain([&s.listen]) {
            if b.port() == 0 || b.is_ipv4() != s.listen.is_ipv4() {
                return Err(format!("address {b} in {s:?}"));
            }
        }
    }
    Ok(())
}

fn check(text: &str) -> Result<(), TestCaseError> {
    let parsed =
        std::panic::catch_unwind(AssertUnwindSafe(|| Config::parse(text, Path::new(FILE))))
            .map_err(|_| TestCaseError::fail(format!("Config::parse panicked on {text:?}")))?;
    match parsed {
        Ok(c) => sane(&c).map_err(|e| TestCaseError::fail(format!("{e}\nin {text:?}"))),
        Err(e) => check_error(&e, text),
    }
}

fn check_error(e: &ConfigError, text: &str) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    prop_assert_eq!(&e.file, FILE);
    prop_assert!(msg.starts_with(&format!("{FILE}: ")), "{msg}");
    prop_assert!(
        located(&e.field, text),
        "error without a field or line: {msg:?}\nin {text:?}"
    );
    prop_assert!(!e.reason.is_empty(), "error without a reason: {msg:?}");
    Ok(())
}

fn cut(text: &str, at: usize) -> &str {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    &text[..at]
}

/// Byte edits: (position, kind, byte) replace, insert, delete or duplicate a byte.
fn edit_bytes(edits: &[(usize, u8, u8)]) -> String {
    let mut b = VALID.as_bytes().to_vec();
    for &(pos, kind, byte) in edits {
        let at = pos % (b.len() + 1);
        let byte = ALPHABET[byte as usize % ALPHABET.len()];
        match kind % 4 {
            0 if at < b.len() => b[at] = byte,
            1 => b.insert(at, byte),
            2 if at < b.len() => {
                b.remove(at);
            }
            _ if at < b.len() => b.insert(at, b[at]),
            _ => b.push(byte),
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// Line edits: delete, duplicate, swap, or give the line's key another value.
fn edit_lines(edits: &[(usize, usize, u8)]) -> String {
    let mut lines: Vec<String> = VALID.lines().map(String::from).collect();
    for &(i, j, kind) in edits {
        if lines.is_empty() {
            break;
        }
        let (i, j) = (i % lines.len(), j % lines.len());
        match kind % 4 {
            0 => {
                lines.remove(i);
            }
            1 => lines.insert(j, lines[i].clone()),
            2 => lines.swap(i, j),
            _ => {
                let value = VALUES[j % VALUES.len()];
                if let Some((key, _)) = lines[i].split_once('=') {
                    lines[i] = format!("{key}= {value}");
                }
            }
        }
    }
    lines.join("\n")
}

/// A config with `n` services whose fields come from `VALUES` or are left out.
fn generated(n: usize, picks: &[(u8, u8)]) -> String {
    let mut s = String::from("[agent]\ninterface = \"eth0\"\n");
    let mut p = picks.iter().cycle();
    for i in 0..n {
        s.push_str(&format!(
            "[[service]]\nname = \"s{i}\"\nlisten = \"198.19.{}.{}:80\"\nstable = [\"198.18.2.2:80\"]\n",
            i / 256,
            i % 256
        ));
        for field in ["canary", "weight", "mode", "sticky", "protocol", "listen"] {
            let &(use_it, v) = p.next().unwrap();
            if use_it % 3 == 0 {
                s.push_str(&format!(
                    "{field} = {}\n",
                    VALUES[v as usize % VALUES.len()]
                ));
            }
        }
    }
    s
}

fn config(cases: u32) -> PtConfig {
    PtConfig {
        cases,
        failure_persistence: None,
        ..PtConfig::default()
    }
}

proptest! {
    #![proptest_config(config(2_000))]

    #[test]
    fn random_bytes(bytes in vec(any::<u8>(), 0..600)) {
        check(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn random_text(chars in vec(any::<char>(), 0..300)) {
        check(&chars.into_iter().collect::<String>())?;
    }

    #[test]
    fn truncations(at in 0..=VALID.len()) {
        check(cut(VALID, at))?;
    }

    #[test]
    fn byte_mutations(edits in vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..10)) {
        check(&edit_bytes(&edits))?;
    }

    #[test]
    fn line_mutations(edits in vec((any::<usize>(), any::<usize>(), any::<u8>()), 1..8)) {
        check(&edit_lines(&edits))?;
    }

    #[test]
    fn generated_services(n in prop_oneof![0usize..70, 1020usize..1030], picks in vec((any::<u8>(), any::<u8>()), 1..64)) {
        check(&generated(n, &picks))?;
    }
}

/// The unmutated config is accepted (so the mutations start from a valid one).
#[test]
fn the_base_config_is_valid() {
    let c = Config::parse(VALID, Path::new(FILE)).unwrap();
    assert_eq!(c.services.len(), 2);
    sane(&c).unwrap();
}

/// Found by the fuzz: TOML syntax errors at a stray control character or at the end
/// of the file came out with an empty reason ("agent.toml: line 1: ").
#[test]
fn syntax_errors_always_have_a_reason() {
    for (text, line, reason) in [
        ("#\0\0", "line 1", "control character '\\0'"),
        ("\rA", "line 1", "control character '\\r'"),
        (
            "[agent]\ninterface = \"eth0\"\nx = ",
            "line 3",
            "end of file",
        ),
        (
            "[agent]\ninterface = [\"eth0\"",
            "line 2",
            "invalid array: expected `]`",
        ),
    ] {
        let e = Config::parse(text, Path::new(FILE)).unwrap_err();
        assert_eq!(e.field, line, "{e}");
        assert!(e.reason.contains(reason), "{e:?} lacks {reason:?}");
        check_error(&e, text).unwrap();
    }
}

/// Found by the fuzz: interface names the kernel refuses (an alias with ':', ".",
/// "..", tabs, NUL, a UTF-8 character containing byte 0xA0) were accepted.
#[test]
fn interface_names_are_ones_the_kernel_accepts() {
    for name in [
        "eth0:1",
        ".",
        "..",
        "a\\tb",
        "a\\u0000b",
        "\\u00e0b",
        "a b",
        "0123456789abcdef",
    ] {
        let text = format!("[agent]\ninterface = \"{name}\"\n");
        let e = Config::parse(&text, Path::new(FILE)).expect_err(name);
        assert_eq!(e.field, "agent.interface[0]", "{e}");
    }
    for name in [
        "eth0",
        "veth-canary_1",
        "e.1",
        "0123456789abcde",
        "\\u00e9th",
    ] {
        let text = format!("[agent]\ninterface = \"{name}\"\n");
        Config::parse(&text, Path::new(FILE)).unwrap();
    }
}
