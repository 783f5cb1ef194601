//! WASI command echo: the `echo` agent written as a plain WASI command.
//!
//! Exercises the node's support for `wasi:cli/run` commands, which need no
//! bindings: the run context arrives as one JSON object on stdin, the result
//! map leaves as one JSON object on stdout, and a non-zero exit code (asked
//! for with input-ref `exit-code`) or invalid input fails the run.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::exit;

use serde::Deserialize;

#[derive(Deserialize)]
struct Context {
    run_id: String,
    lease_id: String,
    agent_id: String,
    agent_version: String,
    trace_id: String,
    input_ref: BTreeMap<String, String>,
    metadata: BTreeMap<String, String>,
}

fn main() {
    let mut stdin = Vec::new();
    if let Err(error) = std::io::stdin().read_to_end(&mut stdin) {
        eprintln!("cannot read stdin: {error}");
        exit(2);
    }
    let context: Context = match serde_json::from_slice(&stdin) {
        Ok(context) => context,
        Err(error) => {
            eprintln!("stdin is not a valid run context: {error}");
            exit(2);
        }
    };

    if let Some(code) = context.input_ref.get("exit-code")
        && let Ok(code @ (..=-1 | 1..)) = code.parse::<i32>()
    {
        eprintln!("asked to exit with {code}");
        exit(code);
    }

    // Same mapping as the `echo` agent; later entries win on a repeated key.
    let mut result: BTreeMap<String, String> = context.input_ref;
    result.insert("run_id".to_string(), context.run_id);
    result.insert("lease_id".to_string(), context.lease_id);
    result.insert("agent_id".to_string(), context.agent_id);
    result.insert("agent_version".to_string(), context.agent_version);
    result.insert("trace_id".to_string(), context.trace_id);
    for (key, value) in context.metadata {
        result.insert(format!("metadata.{key}"), value);
    }

    let mut stdout = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut stdout, &result)
        .map_err(std::io::Error::from)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    if let Err(error) = written {
        eprintln!("cannot write stdout: {error}");
        exit(2);
    }
}
