//! The hostile-agent suite: agents that attack the node (CPU, memory,
//! tables, the stack, traps, output, logs, waiting forever, the
//! filesystem, the environment, sockets, outbound HTTP, the LLM budget,
//! what the host holds for a run: header maps, resources, random bytes,
//! oversized errors, a flood of denied requests, a symlink swapped into
//! a writable grant)
//! and artifacts that are not agents at all. Each case ends in a
//! classified outcome with the kind and message a user or the control
//! plane would see, and after each one `echo` still completes in the same
//! sandbox. The cases live in `hostile_set/`, shared with
//! `hostile_memory.rs`, which runs them all in one process and measures
//! resident memory.

use crate::hostile_set;
use crate::support;

use std::time::Duration;

use hostile_set::Env;

/// The deadline of the cases that end by the wall clock.
const SHORT: Duration = Duration::from_secs(1);

macro_rules! hostile_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let env = Env::start(SHORT).await;
            hostile_set::$name(&env).await;
            env.echo_completes().await;
        }
    )*};
}

hostile_tests!(
    busy_loop_out_of_fuel,
    busy_loop_past_the_deadline,
    host_call_loop_out_of_fuel,
    host_call_loop_past_the_deadline,
    log_call_loop_out_of_fuel,
    log_call_loop_past_the_deadline,
    random_draw_loop_past_the_deadline,
    memory_bomb,
    table_growth_refused,
    table_bomb_under_the_on_demand_allocator,
    deep_recursion,
    http_fields_bomb,
    kept_http_responses,
    audit_loop_pays_in_fuel,
    llm_request_of_escaped_characters,
    resource_table_exhaustion,
    random_bytes_past_the_limit,
    oversized_fail_message_and_details,
    panic,
    unreachable,
    huge_result,
    huge_single_log_line,
    log_flood,
    sleeping_forever,
    filesystem_access,
    environment_read,
    socket_attempt,
    http_to_a_denied_host,
    http_to_an_allowed_host_that_never_answers,
    llm_loop_is_refused_past_the_token_budget,
    llm_loop_past_the_token_budget_fails,
    a_core_module,
    not_webassembly,
    a_component_of_another_world,
    an_import_the_node_does_not_provide,
    a_truncated_file,
    a_corrupt_file,
    a_cwasm_from_a_network_source,
    a_zero_byte_file,
    llm_prompt_larger_than_the_remaining_budget,
    compile_bomb,
    egress_denial_flood,
    nested_grant_symlink_swap,
);

#[test]
fn every_case_of_the_set_has_its_own_test() {
    // The list above and the set's list are kept in step.
    assert_eq!(hostile_set::CASES.len(), 43);
}

/// What a user sees for an artifact the node refuses: `run-agent --json`
/// says `agent.invalid` with the reason, and exits 5.
#[test]
fn run_agent_reports_a_missing_import_as_agent_invalid() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .arg("run-agent")
        .arg(support::agent_path("missing-import"))
        .arg("--json")
        .output()
        .expect("run-agent starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|err| panic!("{err}: {stdout} {}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(json["outcome"], "failed", "{json}");
    assert_eq!(json["kind"], "agent.invalid", "{json}");
    assert!(
        json["message"].as_str().unwrap_or("").contains("nope:missing/thing"),
        "{json}"
    );
    assert_eq!(output.status.code(), Some(5), "{json}");
}
