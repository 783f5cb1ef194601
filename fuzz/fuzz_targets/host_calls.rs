//! The host calls a guest makes, with arbitrary arguments, through the
//! real host-side code (`node_runtime::fuzzing`, feature `fuzzing`):
//! `log.log` (admission against the run's caps, truncation of message and
//! fields), the egress policy of `wasi:http` (grant parsing, narrowing by
//! metadata `http.allow`, the request's destination), and the command
//! line's size, duration and KEY=VALUE parsers. Each wrapper asserts its
//! invariants; a panic is a bug.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use node_runtime::fuzzing;

#[derive(Debug, Arbitrary)]
enum Call {
    Log {
        lines: u8,
        bytes: u16,
        line_bytes: u16,
        log: Vec<(String, Vec<(String, String)>)>,
    },
    Truncate(String, u16),
    Egress {
        grants: Vec<String>,
        http_allow: Option<String>,
        uri: String,
    },
    Cli(String),
}

fuzz_target!(|calls: Vec<Call>| {
    for call in calls {
        match call {
            Call::Log {
                lines,
                bytes,
                line_bytes,
                log,
            } => fuzzing::log_lines(
                (
                    u32::from(lines),
                    usize::from(bytes),
                    usize::from(line_bytes),
                ),
                &log,
            ),
            Call::Truncate(text, max) => fuzzing::truncate_text(&text, usize::from(max)),
            Call::Egress {
                grants,
                http_allow,
                uri,
            } => fuzzing::egress(&grants, http_allow.as_deref(), &uri),
            Call::Cli(text) => fuzzing::cli_values(&text),
        }
    }
});
