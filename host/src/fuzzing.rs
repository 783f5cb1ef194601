//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`,
//! off by default): thin wrappers that drive the host-side code a guest
//! reaches with its arguments, each checking what must hold. Not an API.

use std::time::{Duration, Instant};

use crate::sandbox::HostLimits;
use crate::sandbox::NodeLimits;
use crate::sandbox::capabilities::http::{EgressPolicy, HostGrant, destination};
use crate::sandbox::capabilities::log::{RunLog, truncate};

/// `log.log`: admission against the run's caps and truncation of each
/// line, for a sequence of lines under the given caps. Panics if a line
/// or the counts break the caps.
pub fn log_lines(limits: (u32, usize, usize), lines: &[(String, Vec<(String, String)>)]) {
    let (log_lines, log_bytes, log_line_bytes) = limits;
    let limits = NodeLimits {
        log_lines,
        log_bytes,
        log_line_bytes,
        ..NodeLimits::default()
    };
    let mut log = RunLog::new(&limits);
    for (message, fields) in lines {
        let before = (log.lines(), log.dropped());
        match log.line(message, fields) {
            Some((message, fields)) => {
                assert_eq!((log.lines(), log.dropped()), (before.0 + 1, before.1));
                check_cut(&message, log_line_bytes);
                check_cut(&fields, log_line_bytes);
            }
            None => assert_eq!((log.lines(), log.dropped()), (before.0, before.1 + 1)),
        }
        assert!(log.lines() <= log_lines);
    }
}

/// `truncate` alone: the kept part is a prefix of at most `max` bytes.
pub fn truncate_text(text: &str, max: usize) {
    let cut = truncate(text, max);
    check_cut(&cut, max);
    if text.len() <= max {
        assert_eq!(cut, text);
    }
}

fn check_cut(text: &str, max: usize) {
    if text.len() <= max {
        return;
    }
    // Longer than the cap: only as "<kept>... [N bytes cut]", what is kept
    // within the cap.
    let kept = text
        .strip_suffix(" bytes cut]")
        .expect("a line past the cap is marked as cut");
    let at = kept.rfind("... [").expect("a cut line is marked");
    assert!(at <= max, "kept {at} bytes past a cap of {max}");
}

/// The egress policy: the node's grants (parsed from `entries`), narrowed
/// by a run's `http.allow`, then asked about a request URI. Panics if
/// narrowing widens the node's grants, if a parsed grant does not
/// round-trip through its display form, or if an allowed request was not
/// allowed by the node.
pub fn egress(entries: &[String], metadata_allow: Option<&str>, uri: &str) {
    let grants: Vec<HostGrant> = entries
        .iter()
        .filter_map(|entry| HostGrant::parse(entry).ok())
        .collect();
    for grant in &grants {
        assert_eq!(HostGrant::parse(&grant.to_string()).as_ref(), Ok(grant));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let node = EgressPolicy::new(
        &grants,
        None,
        "run",
        "0af7651916cd43dd8448eb211c80319c",
        deadline,
        HostLimits::default(),
    );
    let run = EgressPolicy::new(&grants, metadata_allow, "run", "", deadline, HostLimits::default());
    let Ok(uri) = uri.parse::<http::Uri>() else {
        return;
    };
    if let Some((host, port)) = destination(&uri) {
        assert!(!host.is_empty());
        if run.allows(&host, port) {
            assert!(
                node.allows(&host, port),
                "http.allow widened the grants to {host}:{port}"
            );
        }
        if node.allows(&host, port) && metadata_allow.is_none() {
            assert!(run.allows(&host, port));
        }
    }
}

/// The command line's value parsers.
pub fn cli_values(text: &str) {
    if let Ok(bytes) = support::units::parse_size(text) {
        let _ = bytes;
    }
    let _ = support::units::parse_duration(text);
    if let Ok((key, value)) = crate::cli::parse_key_value(text) {
        assert!(!key.is_empty());
        assert_eq!(format!("{key}={value}"), text);
    }
}
