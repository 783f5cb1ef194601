//! From a lease to a run: an arbitrary `Lease` (strings, maps, budgets,
//! deadline, trace id, any of them absent or hostile) through
//! `AcceptedLease::run_request`, and `trace_id` on arbitrary text.
//! Checks: the trace id is always 32 lowercase hex digits (the lease's own
//! when it is a valid one); each budget is the lease's when positive and
//! None when 0 or negative, never more than the lease asked; the maps and
//! ids come through unchanged.
#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use node_runtime::proto::{BudgetConstraints, Lease, RunSpec};
use node_runtime::worker::lease::{AcceptedLease, trace_id};

#[derive(Debug, Arbitrary)]
struct Input {
    lease_id: String,
    run_id: String,
    deadline_unix_ms: i64,
    trace_id: TraceId,
    spec: Option<Spec>,
    raw_trace_id: String,
}

#[derive(Debug, Arbitrary)]
enum TraceId {
    Any(String),
    /// 16 bytes as a hyphenated GUID, in either case.
    Guid([u8; 16], bool),
    /// 16 bytes as 32 hex digits, in either case.
    Hex([u8; 16], bool),
}

#[derive(Debug, Arbitrary)]
struct Spec {
    agent_id: String,
    version: String,
    deployment_id: String,
    input_ref: HashMap<String, String>,
    metadata: HashMap<String, String>,
    budgets: Option<(i32, i32, i64, i64)>,
}

fn hex(bytes: &[u8; 16], upper: bool) -> String {
    let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if upper {
        text.to_ascii_uppercase()
    } else {
        text
    }
}

fn check_trace_id(raw: &str, id: &str) {
    assert_eq!(id.len(), 32, "{id:?}");
    assert!(
        id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{id:?}"
    );
    assert!(id.bytes().any(|b| b != b'0'), "{id:?}");
    let digits: String = raw.chars().filter(|c| *c != '-').collect();
    let valid = digits.len() == 32
        && digits.chars().all(|c| c.is_ascii_hexdigit())
        && digits.chars().any(|c| c != '0');
    if valid {
        assert_eq!(id, digits.to_ascii_lowercase());
    }
}

fuzz_target!(|input: Input| {
    let raw_trace = match &input.trace_id {
        TraceId::Any(text) => text.clone(),
        TraceId::Hex(bytes, upper) => hex(bytes, *upper),
        TraceId::Guid(bytes, upper) => {
            let h = hex(bytes, *upper);
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        }
    };
    let run_spec = input.spec.map(|spec| RunSpec {
        agent_id: spec.agent_id,
        version: spec.version,
        deployment_id: spec.deployment_id,
        input_ref: spec.input_ref,
        metadata: spec.metadata,
        budgets: spec.budgets.map(
            |(max_tokens, max_duration_seconds, max_fuel, max_memory_bytes)| BudgetConstraints {
                max_tokens,
                max_duration_seconds,
                max_fuel,
                max_memory_bytes,
            },
        ),
    });
    let lease = Lease {
        lease_id: input.lease_id,
        run_id: input.run_id,
        run_spec: run_spec.clone(),
        deadline_unix_ms: input.deadline_unix_ms,
        trace_id: raw_trace.clone(),
    };
    let accepted = AcceptedLease {
        lease: lease.clone(),
        received: Instant::now(),
    };
    let request = accepted.run_request();
    let _ = accepted.deadline_instant();

    let context = &request.context;
    assert_eq!(context.run_id, lease.run_id);
    assert_eq!(context.lease_id, lease.lease_id);
    check_trace_id(&raw_trace, &context.trace_id);

    let spec = run_spec.unwrap_or_default();
    assert_eq!(context.agent_id, spec.agent_id);
    assert_eq!(context.agent_version, spec.version);
    assert_eq!(context.input_ref.len(), spec.input_ref.len());
    assert!(
        spec.input_ref
            .iter()
            .all(|(k, v)| context.input_ref.get(k) == Some(v))
    );
    assert_eq!(context.metadata.len(), spec.metadata.len());
    assert!(
        spec.metadata
            .iter()
            .all(|(k, v)| context.metadata.get(k) == Some(v))
    );

    let asked = spec.budgets.unwrap_or_default();
    let budget = &request.budget;
    let expect = |asked: i64| (asked > 0).then(|| asked as u64);
    assert_eq!(budget.fuel, expect(asked.max_fuel));
    assert_eq!(budget.memory_bytes, expect(asked.max_memory_bytes));
    assert_eq!(
        budget.duration,
        expect(asked.max_duration_seconds.into()).map(Duration::from_secs)
    );
    assert_eq!(
        budget.tokens.map(u64::from),
        expect(asked.max_tokens.into())
    );

    match request.deadline {
        Some(_) => assert!(lease.deadline_unix_ms > 0),
        None => assert!(lease.deadline_unix_ms <= 0),
    }

    check_trace_id(&input.raw_trace_id, &trace_id(&input.raw_trace_id));
});
