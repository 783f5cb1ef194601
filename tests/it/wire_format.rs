//! The LeaseService wire format, checked against the contract by a second,
//! independent reading: a hand-written protobuf walker decodes the bytes
//! prost produces for the node's messages and checks every field number
//! and wire type against contract.md, so a renumbered field cannot slip
//! through a change of the .proto.

use std::collections::{BTreeMap, HashMap};

use node_runtime::proto::{
    AckRequest, BudgetConstraints, CompleteRequest, CostInfo, FailRequest, Lease, PullRequest, RunSpec, SandboxReport,
    TimingInfo,
};
use prost::Message;

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;

/// A decoded field: its wire type and raw payload (a varint's value, or
/// the bytes of a length-delimited field).
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Varint(u64),
    Fixed64(u64),
    Bytes(Vec<u8>),
}

fn varint(bytes: &[u8], at: &mut usize) -> u64 {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = bytes[*at];
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
    }
    panic!("varint longer than 10 bytes");
}

/// Every field in `bytes`, by field number (repeated ones in order).
fn fields(bytes: &[u8]) -> BTreeMap<u32, Vec<Value>> {
    let mut fields: BTreeMap<u32, Vec<Value>> = BTreeMap::new();
    let mut at = 0;
    while at < bytes.len() {
        let key = varint(bytes, &mut at);
        let (number, wire_type) = ((key >> 3) as u32, (key & 7) as u8);
        let value = match wire_type {
            VARINT => Value::Varint(varint(bytes, &mut at)),
            FIXED64 => {
                let raw = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
                at += 8;
                Value::Fixed64(raw)
            }
            LEN => {
                let len = varint(bytes, &mut at) as usize;
                let payload = bytes[at..at + len].to_vec();
                at += len;
                Value::Bytes(payload)
            }
            other => panic!("unexpected wire type {other} for field {number}"),
        };
        fields.entry(number).or_default().push(value);
    }
    fields
}

fn string(value: &Value) -> String {
    match value {
        Value::Bytes(bytes) => String::from_utf8(bytes.clone()).unwrap(),
        other => panic!("expected a string, got {other:?}"),
    }
}

fn message(value: &Value) -> BTreeMap<u32, Vec<Value>> {
    match value {
        Value::Bytes(bytes) => fields(bytes),
        other => panic!("expected a message, got {other:?}"),
    }
}

/// A `map<string,string>` entry: key is field 1, value field 2.
fn map_entries(values: &[Value]) -> BTreeMap<String, String> {
    values
        .iter()
        .map(|entry| {
            let entry = message(entry);
            (string(&entry[&1][0]), string(&entry[&2][0]))
        })
        .collect()
}

#[test]
fn pull_request_is_node_id_1_and_max_leases_2() {
    let bytes = PullRequest {
        node_id: "node-1".into(),
        max_leases: 5,
    }
    .encode_to_vec();
    let f = fields(&bytes);
    assert_eq!(string(&f[&1][0]), "node-1");
    assert_eq!(f[&2], vec![Value::Varint(5)]);
    assert_eq!(f.len(), 2);
}

#[test]
fn lease_and_run_spec_keep_the_reference_numbers() {
    let lease = Lease {
        lease_id: "lease-r1-0123".into(),
        run_id: "r1".into(),
        run_spec: Some(RunSpec {
            agent_id: "invoice".into(),
            version: "1.0.0".into(),
            deployment_id: "dep-1".into(),
            input_ref: HashMap::from([("message".into(), "{}".into())]),
            budgets: Some(BudgetConstraints {
                max_tokens: 4000,
                max_duration_seconds: 60,
                max_fuel: 7,
                max_memory_bytes: 9,
            }),
            metadata: HashMap::from([("tenant".into(), "acme".into())]),
        }),
        deadline_unix_ms: 1_700_000_000_000,
        trace_id: "4bf92f35-77b3-4da6-a3ce-929d0e0e4736".into(),
    };
    let f = fields(&lease.encode_to_vec());
    assert_eq!(string(&f[&1][0]), "lease-r1-0123");
    assert_eq!(string(&f[&2][0]), "r1");
    assert_eq!(f[&4], vec![Value::Varint(1_700_000_000_000)]);
    assert_eq!(string(&f[&5][0]), "4bf92f35-77b3-4da6-a3ce-929d0e0e4736");
    let spec = message(&f[&3][0]);
    assert_eq!(string(&spec[&1][0]), "invoice");
    assert_eq!(string(&spec[&2][0]), "1.0.0");
    assert_eq!(string(&spec[&3][0]), "dep-1");
    assert_eq!(map_entries(&spec[&4])["message"], "{}");
    assert_eq!(map_entries(&spec[&6])["tenant"], "acme");
    let budgets = message(&spec[&5][0]);
    assert_eq!(budgets[&1], vec![Value::Varint(4000)]);
    assert_eq!(budgets[&2], vec![Value::Varint(60)]);
    // node-runtime's additions take new numbers.
    assert_eq!(budgets[&3], vec![Value::Varint(7)]);
    assert_eq!(budgets[&4], vec![Value::Varint(9)]);
}

#[test]
fn ack_complete_and_fail_keep_the_reference_numbers() {
    let ack = fields(
        &AckRequest {
            lease_id: "l".into(),
            node_id: "n".into(),
            ack_timestamp_unix_ms: 42,
        }
        .encode_to_vec(),
    );
    assert_eq!((string(&ack[&1][0]), string(&ack[&2][0])), ("l".into(), "n".into()));
    assert_eq!(ack[&3], vec![Value::Varint(42)]);

    let timings = TimingInfo {
        duration_ms: 30,
        queue_time_ms: 10,
        execution_time_ms: 20,
    };
    let complete = fields(
        &CompleteRequest {
            lease_id: "l".into(),
            run_id: "r".into(),
            node_id: "n".into(),
            result: HashMap::from([("category".into(), "invoice".into())]),
            timings: Some(timings),
            costs: Some(CostInfo {
                tokens_in: 100,
                tokens_out: 20,
                usd_cost: 0.5,
            }),
            sandbox: Some(SandboxReport {
                fuel_consumed: 11,
                peak_memory_bytes: 12,
                instantiate_us: 13,
                peak_host_bytes: 14,
                http_denied: 15,
                host_warnings_suppressed: 16,
            }),
        }
        .encode_to_vec(),
    );
    assert_eq!(string(&complete[&1][0]), "l");
    assert_eq!(string(&complete[&2][0]), "r");
    assert_eq!(string(&complete[&3][0]), "n");
    assert_eq!(map_entries(&complete[&4])["category"], "invoice");
    let t = message(&complete[&5][0]);
    assert_eq!(
        (t[&1].clone(), t[&2].clone(), t[&3].clone()),
        (
            vec![Value::Varint(30)],
            vec![Value::Varint(10)],
            vec![Value::Varint(20)]
        )
    );
    let costs = message(&complete[&6][0]);
    assert_eq!(costs[&1], vec![Value::Varint(100)]);
    assert_eq!(costs[&2], vec![Value::Varint(20)]);
    assert_eq!(costs[&3], vec![Value::Fixed64(0.5f64.to_bits())]);
    // node-runtime's addition takes a new number.
    let sandbox = message(&complete[&7][0]);
    assert_eq!(sandbox[&1], vec![Value::Varint(11)]);
    assert_eq!(sandbox[&2], vec![Value::Varint(12)]);
    assert_eq!(sandbox[&3], vec![Value::Varint(13)]);
    assert_eq!(sandbox[&4], vec![Value::Varint(14)]);
    assert_eq!(sandbox[&5], vec![Value::Varint(15)]);
    assert_eq!(sandbox[&6], vec![Value::Varint(16)]);

    let fail = fields(
        &FailRequest {
            lease_id: "l".into(),
            run_id: "r".into(),
            node_id: "n".into(),
            error_message: "boom".into(),
            error_details: "{}".into(),
            timings: Some(timings),
            retryable: true,
            sandbox: Some(SandboxReport::default()),
        }
        .encode_to_vec(),
    );
    assert_eq!(string(&fail[&4][0]), "boom");
    assert_eq!(string(&fail[&5][0]), "{}");
    assert!(matches!(fail[&6][0], Value::Bytes(_)));
    assert_eq!(fail[&7], vec![Value::Varint(1)]);
    assert!(
        matches!(fail[&8][0], Value::Bytes(_)),
        "SandboxReport is field 8 of FailRequest"
    );
}
