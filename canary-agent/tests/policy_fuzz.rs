//! Robustness of both policy parsers: truncated, mutated, random and extended inputs
//! never panic, and every rejection says where — the origin file and a line (the one
//! error about something missing from the whole file names the forms instead).
//!
//! Deterministic: one test walks every truncation of the seed fixtures; the property
//! tests run a fixed number of cases from a fixed seed (a few seconds in all, debug
//! build). A failing case is shrunk and printed by proptest.

use std::path::Path;

use canary_agent::policy::{parse_scheme, parse_toml, Policy, PolicyError};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[derive(Debug, Clone, Copy)]
enum Format {
    Toml,
    Scheme,
}

impl Format {
    const ORIGIN_TOML: &'static str = "fuzz/policy.toml";
    const ORIGIN_SCM: &'static str = "fuzz/policy.scm";

    fn origin(self) -> &'static str {
        match self {
            Format::Toml => Self::ORIGIN_TOML,
            Format::Scheme => Self::ORIGIN_SCM,
        }
    }

    fn parse(self, text: &str) -> Result<Policy, PolicyError> {
        match self {
            Format::Toml => parse_toml(text, self.origin()),
            Format::Scheme => parse_scheme(text, self.origin()),
        }
    }
}

/// Parses `text` (a panic fails the calling test) and checks any error is located.
fn check(format: Format, text: &str) -> Result<(), String> {
    let Err(err) = format.parse(text) else {
        return Ok(());
    };
    let shown = err.to_string();
    let origin = format.origin();
    let fail = |why: &str| Err(format!("{why}: {shown:?} for input {text:?}"));
    if err.origin != origin || !shown.starts_with(origin) {
        return fail("error does not name the origin");
    }
    if err.context.trim().is_empty() || err.reason.trim().is_empty() {
        return fail("error without context or reason");
    }
    match err.line {
        Some(line) => {
            let lines = text.split('\n').count();
            if line == 0 || line > lines {
                return fail(&format!(
                    "line {line} outside the {lines} lines of the text"
                ));
            }
            if !shown.starts_with(&format!("{origin}:{line}: ")) {
                return fail("line not shown");
            }
        }
        // A policy without steps or split: nothing to point at, so the message names
        // the forms/tables that are missing.
        None if err.context == "policy" && err.reason.contains("define-progression / [[step]]") => {
        }
        None => return fail("error without a line"),
    }
    Ok(())
}

fn check_both(text: &str) -> Result<(), String> {
    check(Format::Toml, text)?;
    check(Format::Scheme, text)
}

fn seeds() -> [(Format, String); 2] {
    [
        (Format::Toml, fixture("seed.toml")),
        (Format::Scheme, fixture("seed.scm")),
    ]
}

#[test]
fn seeds_parse() {
    for (format, text) in seeds() {
        format.parse(&text).unwrap();
    }
}

#[test]
fn every_truncation_of_the_seeds() {
    for (format, text) in seeds() {
        for end in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
            check(format, &text[..end]).unwrap();
        }
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    for depth in [100, 10_000, 200_000] {
        let open = "(".repeat(depth);
        let close = ")".repeat(depth);
        for text in [
            format!("(define-progression '{open}{close})"),
            format!("(define-progression '({open}{close} . 5))"),
            format!("(define-progression '{open}"),
            format!("step = {}{}\n", "[".repeat(depth), "]".repeat(depth)),
            format!("x = {}\n", "{ a = ".repeat(depth)),
        ] {
            check_both(&text).unwrap();
            // Messages quote the offending datum, cut short.
            for result in [parse_scheme(&text, "d.scm"), parse_toml(&text, "d.toml")] {
                let shown = result.unwrap_err().to_string();
                assert!(shown.chars().count() < 300, "{} chars", shown.len());
            }
        }
    }
}

/// Keys and values that appear in policies (and some that must be refused), for
/// inserting into otherwise valid files.
const SCHEME_KEYS: &[&str] = &[
    "canary",
    "stable",
    "threshold",
    "window",
    "on-fail",
    "events",
    "trials",
    "condition",
    "action",
    "weights",
    "gate",
    "approval",
    "webhook",
    "timeout",
    "error-floor",
    "max-hold",
    "connections",
    "colour",
    "define-analysis",
    "define-rollback",
    "define-stages",
    "define-header-routing",
    "quote",
    "baseline",
];
const SCHEME_VALUES: &[&str] = &[
    "0",
    "-1",
    "1.5",
    "0.01",
    "100",
    "101",
    "12.345",
    "1e400",
    "99999999999999999999999",
    "\"5m\"",
    "\"30 minutes\"",
    "\"\"",
    "#t",
    "#f",
    "drain",
    "keep",
    "immediate-rollback",
    "()",
    "(1 2)",
    "'(1 . 2)",
    "(> error-rate (* baseline 2))",
    "#\\(",
    "|a b|",
];
const TOML_KEYS: &[&str] = &[
    "canary",
    "stable",
    "at",
    "weight",
    "name",
    "threshold",
    "window",
    "on_fail",
    "events",
    "trials",
    "when",
    "action",
    "weights",
    "gate",
    "approval",
    "webhook",
    "timeout",
    "error_floor",
    "max_hold",
    "connections",
    "colour",
    "step",
    "split",
    "analysis",
    "rollback",
];
const TOML_VALUES: &[&str] = &[
    "0",
    "-1",
    "1.5",
    "0.01",
    "100",
    "101",
    "12.345",
    "1e400",
    "99999999999999999999999",
    "nan",
    "inf",
    "\"5m\"",
    "\"30 minutes\"",
    "\"\"",
    "true",
    "\"drain\"",
    "\"keep\"",
    "\"immediate-rollback\"",
    "\"error-rate > baseline * 2\"",
    "[]",
    "[0, 100]",
    "[1, 2, 3]",
    "{}",
    "{ approval = true }",
    "1979-05-27T07:32:00Z",
];
const TOML_HEADERS: &[&str] = &[
    "[split]",
    "[[step]]",
    "[[stage]]",
    "[[metric]]",
    "[[rule]]",
    "[analysis]",
    "[rollback]",
    "[other]",
    "[[split]]",
    "[analysis.extra]",
];

fn config(cases: u32, seed: u64) -> Config {
    Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    }
}

/// Inserts `piece` into `text` before byte `at` (moved back to a char boundary).
fn insert(text: &str, at: usize, piece: &str) -> String {
    let mut at = at % (text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    format!("{}{piece}{}", &text[..at], &text[at..])
}

/// Byte offsets just after each '(' in `text`, where an entry may start.
fn after_parens(text: &str) -> Vec<usize> {
    text.match_indices('(').map(|(i, _)| i + 1).collect()
}

/// Byte offsets of the starts of lines.
fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

proptest! {
    #![proptest_config(config(400, 0x5eed_0001))]

    #[test]
    fn byte_deletions_from_the_seeds(which in 0..2usize, cuts in proptest::collection::vec(any::<usize>(), 1..4)) {
        let (format, text) = seeds()[which].clone();
        let mut bytes = text.into_bytes();
        for at in cuts {
            bytes.remove(at % bytes.len());
        }
        check(format, &String::from_utf8_lossy(&bytes)).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn single_byte_mutations_of_the_seeds(which in 0..2usize, at in any::<usize>(), byte in any::<u8>()) {
        let (format, text) = seeds()[which].clone();
        let mut bytes = text.into_bytes();
        let at = at % bytes.len();
        bytes[at] = byte;
        check(format, &String::from_utf8_lossy(&bytes)).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn truncated_and_mutated_seeds(which in 0..2usize, end in any::<usize>(), mutations in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4)) {
        let (format, text) = seeds()[which].clone();
        let mut bytes = text.into_bytes();
        bytes.truncate(end % (bytes.len() + 1));
        for (at, byte) in mutations {
            if !bytes.is_empty() {
                let at = at % bytes.len();
                bytes[at] = byte;
            }
        }
        check(format, &String::from_utf8_lossy(&bytes)).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn scheme_entries_inserted(at in any::<usize>(), key in 0..SCHEME_KEYS.len(), value in 0..SCHEME_VALUES.len(), shape in 0..4u8) {
        let text = fixture("seed.scm");
        let spots = after_parens(&text);
        let at = spots[at % spots.len()];
        let (k, v) = (SCHEME_KEYS[key], SCHEME_VALUES[value]);
        let piece = match shape {
            0 => format!("({k} . {v}) "),
            1 => format!("({k} {v}) "),
            2 => format!("{v} "),
            _ => format!("({k} '(({k} . {v})))\n"),
        };
        check(Format::Scheme, &insert(&text, at, &piece)).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn toml_keys_inserted(at in any::<usize>(), key in 0..TOML_KEYS.len(), value in 0..TOML_VALUES.len(), header in proptest::option::of(0..TOML_HEADERS.len())) {
        let text = fixture("seed.toml");
        let starts = line_starts(&text);
        let at = starts[at % starts.len()];
        let line = format!("{} = {}\n", TOML_KEYS[key], TOML_VALUES[value]);
        let piece = match header {
            Some(h) => format!("{}\n{line}", TOML_HEADERS[h]),
            None => line,
        };
        check(Format::Toml, &insert(&text, at, &piece)).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn settings_values(floor in prop_oneof![any::<f64>(), -1.0..2.0f64], hold in any::<i64>(), connections in "[a-z]{0,6}") {
        let toml = format!(
            "[split]\ncanary = 5\n[analysis]\nerror_floor = {floor:?}\nmax_hold = {hold}\n[rollback]\nconnections = \"{connections}\"\n"
        );
        check(Format::Toml, &toml).map_err(TestCaseError::fail)?;
        let scm = format!(
            "(define-canary-split '((canary . 5)))\n(define-analysis '((error-floor . {floor:?}) (max-hold . {hold})))\n(define-rollback '((connections . {connections})))\n"
        );
        check(Format::Scheme, &scm).map_err(TestCaseError::fail)?;
        let valid = floor > 0.0 && floor < 1.0 && hold >= 0 && (connections == "drain" || connections == "keep");
        prop_assert_eq!(Format::Toml.parse(&toml).is_ok(), valid, "{}", toml);
    }
}

proptest! {
    #![proptest_config(config(1500, 0x5eed_0002))]

    #[test]
    fn random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let text = String::from_utf8_lossy(&bytes);
        check_both(&text).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn random_text_of_policy_characters(text in "[\\[\\]()'.=\"#;a-z0-9 \\n_{},*<>-]{0,300}") {
        check_both(&text).map_err(TestCaseError::fail)?;
    }
}
