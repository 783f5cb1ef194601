//! The node's own warnings that an agent can cause stay bounded per run:
//! an agent making thousands of denied requests gets the first few logged,
//! one summary line at its end, and the count in its report.

use crate::capture_logs;
use crate::support;

use node_runtime::sandbox::{BudgetRequest, HOST_WARNINGS_PER_KIND, RunOutcome};
use support::{load, request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_denied_requests_logs_the_first_few_and_one_summary() {
    let captured = capture_logs();
    let sandbox = support::sandbox();
    let agent = load(&sandbox, "hostile").await;
    // A unique agent id marks this run's lines among every test's.
    let agent_id = "denial-flood-7c1e";
    let input = [
        ("attack", "http-flood"),
        ("url", "http://127.0.0.1:9/"),
        ("count", "3000"),
    ];
    let result = sandbox
        .run(&agent, request(agent_id, &input, BudgetRequest::default()))
        .await;
    let RunOutcome::Completed(seen) = &result.outcome else {
        panic!("{:?}", result.outcome);
    };
    assert_eq!(seen["denied"], "3000");
    assert_eq!(result.report.http_denied, 3000);
    assert_eq!(result.report.host_warnings_suppressed, 3000 - HOST_WARNINGS_PER_KIND);

    let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    let lines: Vec<&str> = text.lines().filter(|line| line.contains(agent_id)).collect();
    let denials = lines
        .iter()
        .filter(|line| line.contains("outbound HTTP denied"))
        .count();
    assert_eq!(denials, HOST_WARNINGS_PER_KIND as usize, "{lines:#?}");
    let summaries: Vec<&&str> = lines.iter().filter(|line| line.contains("suppressed")).collect();
    assert_eq!(summaries.len(), 1, "{lines:#?}");
    assert!(
        summaries[0].contains(&format!(
            "{} more egress denials suppressed",
            3000 - HOST_WARNINGS_PER_KIND
        )),
        "{}",
        summaries[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_list_of_ungranted_entries_logs_the_first_few_and_counts_the_rest() {
    let captured = capture_logs();
    let sandbox = support::sandbox();
    let agent = load(&sandbox, "echo").await;
    let agent_id = "metadata-flood-3b9d";
    let paths: Vec<String> = (0..50).map(|n| format!("/not-granted-{n}")).collect();
    let names: Vec<String> = (0..30).map(|n| format!("NOT_GRANTED_{n}")).collect();
    let mut request = request(agent_id, &[("message", "{}")], BudgetRequest::default());
    request.context.metadata = support::map(&[("fs.allow", &paths.join(",")), ("env.allow", &names.join(","))]);
    let result = sandbox.run(&agent, request).await;
    assert!(
        matches!(result.outcome, RunOutcome::Completed(_)),
        "{:?}",
        result.outcome
    );
    assert_eq!(result.report.host_warnings_suppressed, 80 - HOST_WARNINGS_PER_KIND);

    let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    let lines: Vec<&str> = text.lines().filter(|line| line.contains(agent_id)).collect();
    let ignored = lines.iter().filter(|line| line.contains("; ignored")).count();
    assert_eq!(ignored, HOST_WARNINGS_PER_KIND as usize, "{lines:#?}");
    let summary = format!(
        "{} more ignored metadata entries suppressed",
        80 - HOST_WARNINGS_PER_KIND
    );
    assert_eq!(
        lines.iter().filter(|line| line.contains(&summary)).count(),
        1,
        "{lines:#?}"
    );
}
