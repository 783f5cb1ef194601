//! Restart safety and the durable outbox: reports survive the outbox being
//! closed and reopened, a node SIGKILLed with undelivered outcomes sends
//! them after it starts again, a lease redelivered after a restart does not
//! run again, the age bound drops what the control plane re-leased, and a
//! restarted node works again against a plane that answers its
//! re-registration with 500, as the Postgres-backed reference does.

use crate::support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use node_runtime::agent_store::AgentStore;
use node_runtime::control_plane::Capacity;
use node_runtime::dev_plane::{Budgets, DevPlane, NewRun, PlaneOptions, Reregistration, RunStatus};
use node_runtime::outbox::{Outbox, OutboxError, OutboxLimits, now_unix_ms};
use node_runtime::proto::{CompleteRequest, FailRequest};
use node_runtime::sandbox::{EngineSettings, Sandbox, SandboxConfig};
use node_runtime::worker::lease::Report;
use node_runtime::worker::{NodeHandle, NodeSettings};
use support::*;

fn settings(url: &str) -> NodeSettings {
    NodeSettings {
        node_id: "restarting-node".to_string(),
        control_plane_url: url.to_string(),
        slots: 2,
        max_leases: 2,
        heartbeat_interval: Duration::from_millis(300),
        capacity: Capacity {
            slots: 2,
            cpu: "2".to_string(),
            memory: "1Gi".to_string(),
        },
        metadata: BTreeMap::new(),
        drain_timeout: Duration::from_secs(5),
    }
}

fn start_node(url: &str, agents: &tempfile::TempDir, outbox: Outbox) -> NodeHandle {
    let sandbox = Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            max_concurrent_runs: 2,
            ..EngineSettings::default()
        },
        ..SandboxConfig::default()
    })
    .unwrap();
    let store = AgentStore::new(vec![agents.path().to_path_buf()]);
    NodeHandle::builder(settings(url), Arc::new(sandbox), Arc::new(store), outbox)
        .start()
        .unwrap()
}

fn complete(lease_id: &str, marker: &str) -> Report {
    Report::Complete(CompleteRequest {
        lease_id: lease_id.to_string(),
        run_id: format!("run-of-{lease_id}"),
        node_id: "restarting-node".to_string(),
        result: [("stored".to_string(), marker.to_string())].into_iter().collect(),
        ..CompleteRequest::default()
    })
}

fn fail(lease_id: &str) -> Report {
    Report::Fail(FailRequest {
        lease_id: lease_id.to_string(),
        run_id: format!("run-of-{lease_id}"),
        node_id: "restarting-node".to_string(),
        error_message: "it failed".to_string(),
        retryable: true,
        ..FailRequest::default()
    })
}

#[test]
fn reports_and_accepted_ids_survive_reopening_and_delivered_ones_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let deadline = now_unix_ms() + 60_000;
    {
        let outbox = Outbox::open(&dir.path().join("data")).unwrap();
        assert!(outbox.accept("lease-1", deadline).unwrap());
        assert!(!outbox.accept("lease-1", deadline).unwrap(), "accepted once");
        outbox.put(&complete("lease-1", "one"), deadline).unwrap();
        outbox.put(&fail("lease-2"), deadline).unwrap();
        outbox.put(&complete("lease-3", "three"), deadline).unwrap();
        assert!(outbox.remove("lease-2").unwrap(), "lease-2 was delivered");
        // A second open of the same file, while this one holds it, is refused.
        match Outbox::open(&dir.path().join("data")) {
            Err(OutboxError::Locked(path)) => assert!(path.ends_with("outbox.redb")),
            other => panic!("expected Locked, got {other:?}"),
        }
    }
    let outbox = Outbox::open(&dir.path().join("data")).unwrap();
    let pending = outbox.pending().unwrap();
    let ids: Vec<&str> = pending.iter().map(|p| p.lease_id()).collect();
    assert_eq!(ids, ["lease-1", "lease-3"]);
    assert_eq!(pending[0].kind(), "complete");
    assert_eq!(pending[0].run_id(), "run-of-lease-1");
    assert_eq!(pending[0].deadline_unix_ms, deadline);
    match &pending[1].report {
        Report::Complete(request) => assert_eq!(request.result["stored"], "three"),
        other => panic!("{other:?}"),
    }
    assert!(outbox.get("lease-2").unwrap().is_none());
    assert!(outbox.is_accepted("lease-1").unwrap());
    assert!(
        !outbox.accept("lease-1", deadline).unwrap(),
        "still accepted after reopening"
    );
}

#[test]
fn the_bounds_drop_the_oldest_and_the_expired() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open_with(
        dir.path(),
        OutboxLimits {
            max_reports: 2,
            grace: Duration::from_secs(60),
            gather: false,
        },
    )
    .unwrap();
    let now = now_unix_ms();
    assert!(outbox.put(&fail("a"), now + 60_000).unwrap().is_empty());
    std::thread::sleep(Duration::from_millis(5));
    assert!(outbox.put(&fail("b"), now + 60_000).unwrap().is_empty());
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(outbox.put(&fail("c"), now + 60_000).unwrap(), ["a"], "the oldest goes");
    assert_eq!(outbox.pending_count().unwrap(), 2);

    outbox.accept("old", now - 120_000).unwrap();
    outbox.accept("new", now + 60_000).unwrap();
    outbox.put(&fail("old"), now - 120_000).unwrap();
    let pruned = outbox.prune(now_unix_ms()).unwrap();
    assert_eq!(pruned.expired_reports, ["old"]);
    assert_eq!(pruned.expired_accepted, 1);
    assert!(!outbox.is_accepted("old").unwrap());
    assert!(outbox.is_accepted("new").unwrap());
    // A running node prunes accepted ids alone.
    outbox.accept("older", now - 180_000).unwrap();
    assert_eq!(outbox.prune_accepted(now_unix_ms()).unwrap(), 1);
    assert!(outbox.is_accepted("new").unwrap());
}

/// Concurrent writers share commits (group commit); each must still get
/// the answer it would have had alone, and every write must be on disk.
#[test]
fn concurrent_writers_each_get_their_own_answer_and_all_of_it_is_stored() {
    const THREADS: usize = 16;
    const LEASES: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let deadline = now_unix_ms() + 60_000;
    {
        let outbox = Outbox::open(dir.path()).unwrap();
        let fresh_per_thread: Vec<Vec<usize>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..THREADS)
                .map(|thread| {
                    let outbox = outbox.clone();
                    scope.spawn(move || {
                        let mut fresh = Vec::new();
                        // Every thread accepts every lease, in a different
                        // order; exactly one may win each.
                        for step in 0..LEASES {
                            let lease = (step + thread * 7) % LEASES;
                            if outbox.accept(&format!("lease-{lease}"), deadline).unwrap() {
                                fresh.push(lease);
                            }
                        }
                        // Each thread stores its own reports and removes
                        // every other one.
                        for n in 0..LEASES {
                            let id = format!("t{thread}-{n}");
                            assert!(outbox.put(&complete(&id, &id), deadline).unwrap().is_empty());
                            if n % 2 == 0 {
                                assert!(outbox.remove(&id).unwrap(), "{id} was just stored");
                                assert!(!outbox.remove(&id).unwrap(), "{id} was already removed");
                            }
                        }
                        fresh
                    })
                })
                .collect();
            workers.into_iter().map(|worker| worker.join().unwrap()).collect()
        });
        let mut won: Vec<usize> = fresh_per_thread.into_iter().flatten().collect();
        won.sort();
        assert_eq!(won, (0..LEASES).collect::<Vec<_>>(), "each lease accepted exactly once");
    }
    let outbox = Outbox::open(dir.path()).unwrap();
    assert_eq!(outbox.pending_count().unwrap(), (THREADS * LEASES / 2) as u64);
    for thread in 0..THREADS {
        for n in 0..LEASES {
            let id = format!("t{thread}-{n}");
            let stored = outbox.get(&id).unwrap();
            if n % 2 == 0 {
                assert!(stored.is_none(), "{id} was removed");
            } else {
                match stored.map(|pending| pending.report) {
                    Some(Report::Complete(request)) => assert_eq!(request.lease_id, id),
                    other => panic!("{id}: {other:?}"),
                }
            }
        }
    }
    for lease in 0..LEASES {
        assert!(outbox.is_accepted(&format!("lease-{lease}")).unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_redelivered_after_a_restart_is_not_run_again_and_its_stored_outcome_is_sent() {
    let now = now_unix_ms();
    let data = tempfile::tempdir().unwrap();
    // What an earlier life of the node left: lease-r accepted and finished,
    // its report not yet delivered.
    {
        let outbox = Outbox::open(data.path()).unwrap();
        outbox.accept("lease-r", now + 60_000).unwrap();
        outbox
            .put(&complete("lease-r", "from the outbox"), now + 60_000)
            .unwrap();
    }
    let (url, recorded) = scripted::serve(vec![
        scripted::lease("lease-r", "echo", now + 60_000),
        scripted::lease("lease-new", "echo", now + 60_000),
    ])
    .await;
    let agents = agents_layout();
    let node = start_node(&url, &agents, Outbox::open(data.path()).unwrap());
    eventually(Duration::from_secs(90), "two reports", || {
        (recorded.lock().unwrap().completes.len() >= 2).then_some(())
    })
    .await;
    // Give a wrongly repeated run or send time to show up.
    tokio::time::sleep(Duration::from_millis(700)).await;
    {
        let recorded = recorded.lock().unwrap();
        let of = |id: &str| {
            recorded
                .completes
                .iter()
                .filter(|c| c.lease_id == id)
                .cloned()
                .collect::<Vec<_>>()
        };
        let stored = of("lease-r");
        assert_eq!(
            stored.len(),
            1,
            "the stored outcome is sent once: {:?}",
            recorded.completes
        );
        assert_eq!(stored[0].result["stored"], "from the outbox", "not run again");
        assert_eq!(of("lease-new").len(), 1);
        assert!(recorded.fails.is_empty());
    }
    let stats = node.stats();
    assert_eq!(stats.runs_started.load(Ordering::SeqCst), 1, "only lease-new ran");
    assert_eq!(stats.duplicate_leases.load(Ordering::SeqCst), 1);
    node.shutdown().await;
    let outbox = Outbox::open(data.path()).unwrap();
    assert_eq!(outbox.pending_count().unwrap(), 0, "delivered reports are gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_age_bound_drops_an_expired_report_and_counts_it() {
    let now = now_unix_ms();
    let data = tempfile::tempdir().unwrap();
    {
        let outbox = Outbox::open(data.path()).unwrap();
        // Deadline plus the default 10-minute grace passed long ago.
        outbox.put(&fail("lease-expired"), now - 11 * 60_000).unwrap();
        outbox.put(&fail("lease-fresh"), now + 60_000).unwrap();
    }
    let (url, recorded) = scripted::serve(Vec::new()).await;
    let agents = agents_layout();
    let node = start_node(&url, &agents, Outbox::open(data.path()).unwrap());
    eventually(Duration::from_secs(30), "the fresh report", || {
        (!recorded.lock().unwrap().fails.is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        let recorded = recorded.lock().unwrap();
        let ids: Vec<&str> = recorded.fails.iter().map(|f| f.lease_id.as_str()).collect();
        assert_eq!(ids, ["lease-fresh"], "the expired report is never sent");
    }
    assert_eq!(node.stats().reports_expired.load(Ordering::SeqCst), 1);
    node.shutdown().await;
    assert_eq!(Outbox::open(data.path()).unwrap().pending_count().unwrap(), 0);
}

/// `node-runtime serve` as its own process, so it can be SIGKILLed.
fn spawn_node_process(url: &str, agents: &std::path::Path, data: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .arg("serve")
        .env("NodeRuntime__NodeId", "killed-node")
        .env("NodeRuntime__ControlPlaneUrl", url)
        .env("NodeRuntime__AgentsDirectory", agents)
        .env("NodeRuntime__DataDirectory", data)
        .env("NodeRuntime__HeartbeatIntervalSeconds", "1")
        .env("NodeRuntime__MaxConcurrentLeases", "6")
        .env("NodeRuntime__Capacity__Slots", "6")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("node-runtime serve starts")
}

async fn http_json(request: reqwest::RequestBuilder) -> Option<serde_json::Value> {
    request.send().await.ok()?.json().await.ok()
}

async fn runs(http: &reqwest::Client, url: &str) -> Option<Vec<serde_json::Value>> {
    Some(http_json(http.get(format!("{url}/v1/runs"))).await?.as_array()?.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_finished_while_the_plane_was_down_reach_it_once_after_the_node_is_sigkilled_and_restarted() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let plane_data = tempfile::tempdir().unwrap();
    let node_data = tempfile::tempdir().unwrap();
    node_runtime::support::tls::install_crypto_provider();
    let http = reqwest::Client::new();
    let mut plane = spawn_plane_process(port, plane_data.path(), "300s");
    eventually_async(Duration::from_secs(30), "the plane to listen", || runs(&http, &url)).await;
    let agents = agents_layout();
    let admin = format!("127.0.0.1:{}", free_port());
    // Not the shared spawner: this life also serves /metrics, to see when
    // every outcome is in the outbox.
    let mut node = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .arg("serve")
        .env("NodeRuntime__NodeId", "killed-node")
        .env("NodeRuntime__ControlPlaneUrl", &url)
        .env("NodeRuntime__AgentsDirectory", agents.path())
        .env("NodeRuntime__DataDirectory", node_data.path())
        .env("NodeRuntime__HeartbeatIntervalSeconds", "1")
        .env("NodeRuntime__MaxConcurrentLeases", "6")
        .env("NodeRuntime__Capacity__Slots", "6")
        .env("NodeRuntime__AdminListen", &admin)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("node-runtime serve starts");

    // Each run takes three seconds (sleep-forever, cut by its duration
    // budget), long enough to kill the plane while they run.
    let mut ids = Vec::new();
    for i in 0..6 {
        let body = serde_json::json!({
            "agentId": "sleep-forever",
            "version": "1.0.0",
            "inputRef": {"message": format!("run {i}")},
            "budgets": {"maxDurationSeconds": 3},
        });
        let answer = http_json(http.post(format!("{url}/v1/runs")).json(&body))
            .await
            .unwrap();
        ids.push(answer["runId"].as_str().unwrap().to_string());
    }
    eventually_async(Duration::from_secs(60), "every run to be acknowledged", || async {
        let runs = runs(&http, &url).await?;
        (runs.len() == ids.len() && runs.iter().all(|run| !run["ackedAt"].is_null())).then_some(())
    })
    .await;
    plane.kill().await.unwrap();
    // The runs end while the plane is down; their outcomes go to the outbox
    // (seen through /metrics: on a busy machine a fixed wait was too short).
    let outbox_file = node_data.path().join("outbox.redb");
    let depth = format!("outbox_depth {}\n", ids.len());
    eventually_async(Duration::from_secs(60), "every outcome in the outbox", || async {
        let text = http
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains(&depth).then_some(())
    })
    .await;
    node.kill().await.unwrap(); // SIGKILL
    {
        let outbox = Outbox::open(node_data.path()).expect("the killed node released the file");
        assert_eq!(
            outbox.pending_count().unwrap(),
            ids.len() as u64,
            "every outcome is on disk"
        );
    }
    let list = outbox_command(node_data.path(), &["list"], None).await;
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(listed.contains(&format!("{} pending report(s)", ids.len())), "{listed}");
    for id in &ids {
        assert!(listed.contains(id.as_str()), "run {id} in {listed}");
    }
    assert!(outbox_file.exists());

    let mut plane = spawn_plane_process(port, plane_data.path(), "300s");
    eventually_async(Duration::from_secs(30), "the plane to listen again", || {
        runs(&http, &url)
    })
    .await;
    let mut node = spawn_node_process(&url, agents.path(), node_data.path());
    let ended = eventually_async(Duration::from_secs(90), "every run to end", || async {
        let runs = runs(&http, &url).await?;
        let all_ended = runs.len() == ids.len()
            && runs
                .iter()
                .all(|run| matches!(run["status"].as_str(), Some("completed" | "failed")));
        all_ended.then_some(runs)
    })
    .await;
    // Time for a wrong second report to show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ended = runs(&http, &url).await.unwrap_or(ended);
    for run in &ended {
        assert_eq!(run["outcomes"], 1, "exactly one outcome: {run}");
        assert_eq!(run["status"], "failed", "{run}");
        let details: serde_json::Value =
            serde_json::from_str(run["errorInfo"]["errorDetails"].as_str().unwrap()).unwrap();
        assert_eq!(details["kind"], "budget.deadline", "the run's own outcome: {run}");
    }
    node.kill().await.unwrap();
    plane.kill().await.unwrap();
    let outbox = Outbox::open(node_data.path()).unwrap();
    assert_eq!(outbox.pending_count().unwrap(), 0, "all delivered");
}

/// `node-runtime outbox ...` against the outbox in `data`.
pub(crate) async fn outbox_command(data: &std::path::Path, args: &[&str], url: Option<&str>) -> std::process::Output {
    outbox_command_with(data, args, url, &[]).await
}

/// [`outbox_command`] with `env` set on top.
async fn outbox_command_with(
    data: &std::path::Path,
    args: &[&str],
    url: Option<&str>,
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"));
    command
        .arg("outbox")
        .args(args)
        .env("NodeRuntime__DataDirectory", data)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied());
    if let Some(url) = url {
        command.env("NodeRuntime__ControlPlaneUrl", url);
    }
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the command ends")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_commands_name_a_data_directory_that_holds_no_outbox_and_create_nothing() {
    let parent = tempfile::tempdir().unwrap();
    // Once, a mistyped directory showed "0 pending" and was created, with
    // an empty outbox in it.
    let missing = parent.path().join("no-such-dir");
    for command in [&["list"][..], &["purge", "--all"][..]] {
        let output = outbox_command(&missing, command, None).await;
        assert_eq!(output.status.code(), Some(2), "{command:?}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("does not exist"), "{stderr}");
        assert!(stderr.contains("no-such-dir"), "{stderr}");
        assert!(!missing.exists(), "nothing is created");
    }
    let empty = parent.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let output = outbox_command(&empty, &["list"], None).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("holds no outbox"),
        "{output:?}"
    );
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "nothing is created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_list_retry_and_purge_through_the_binary() {
    let data = tempfile::tempdir().unwrap();
    let deadline = now_unix_ms() + 60_000;
    {
        let outbox = Outbox::open(data.path()).unwrap();
        outbox.put(&complete("lease-one", "1"), deadline).unwrap();
        outbox.put(&fail("lease-two"), deadline).unwrap();
        outbox.put(&fail("lease-three"), 0).unwrap();
        outbox.put(&complete("lease-four", "4"), deadline).unwrap();

        // While a node (here: this test) holds the file, the command says so.
        let locked = outbox_command(data.path(), &["list"], None).await;
        assert_eq!(locked.status.code(), Some(2), "{locked:?}");
        let stderr = String::from_utf8_lossy(&locked.stderr);
        assert!(stderr.contains("locked by a running node"), "{stderr}");
    }

    let list = outbox_command(data.path(), &["list"], None).await;
    assert!(list.status.success(), "{list:?}");
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(stdout.contains("4 pending report(s)"), "{stdout}");
    for expected in ["lease-one", "run-of-lease-two", "complete", "fail", "none"] {
        assert!(stdout.contains(expected), "{expected} in {stdout}");
    }

    let purge = outbox_command(data.path(), &["purge", "--lease", "lease-two"], None).await;
    assert!(purge.status.success(), "{purge:?}");
    let missing = outbox_command(data.path(), &["purge", "--lease", "lease-two"], None).await;
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
    let neither = outbox_command(data.path(), &["purge"], None).await;
    assert_eq!(
        neither.status.code(),
        Some(2),
        "purge asks for --all or --lease: {neither:?}"
    );

    let (url, recorded) = scripted::serve(Vec::new()).await;
    // A dry run names the plane and the reports, and sends nothing.
    let dry = outbox_command(data.path(), &["retry", "--dry-run"], Some(&url)).await;
    assert!(dry.status.success(), "{dry:?}");
    let stdout = String::from_utf8_lossy(&dry.stdout);
    assert!(
        stdout.contains(&format!("would send 3 pending report(s) to {url}")),
        "{stdout}"
    );
    assert!(stdout.contains("would send lease-three"), "{stdout}");
    assert!(recorded.lock().unwrap().completes.is_empty(), "nothing sent");
    assert_eq!(Outbox::open(data.path()).unwrap().pending_count().unwrap(), 3);

    let retry = outbox_command(data.path(), &["retry"], Some(&url)).await;
    assert!(retry.status.success(), "{retry:?}");
    let stdout = String::from_utf8_lossy(&retry.stdout);
    assert!(
        stdout.contains(&format!("sending 3 pending report(s) to {url}")),
        "{stdout}"
    );
    assert!(stdout.contains("3 delivered"), "{stdout}");
    {
        let recorded = recorded.lock().unwrap();
        assert_eq!(recorded.completes.len(), 2);
        assert_eq!(recorded.fails.len(), 1);
        assert_eq!(recorded.fails[0].lease_id, "lease-three");
    }
    assert_eq!(Outbox::open(data.path()).unwrap().pending_count().unwrap(), 0);
    let asked = recorded.lock().unwrap().calls_streams;
    assert!(asked >= 1, "the retry asked for the Calls stream first");

    // NodeRuntime.CallsStream false: the retry does not ask for it.
    Outbox::open(data.path())
        .unwrap()
        .put(&fail("lease-six"), deadline)
        .unwrap();
    let retry = outbox_command_with(
        data.path(),
        &["retry"],
        Some(&url),
        &[("NodeRuntime__CallsStream", "false")],
    )
    .await;
    assert!(retry.status.success(), "{retry:?}");
    {
        let recorded = recorded.lock().unwrap();
        assert_eq!(recorded.fails.len(), 2, "lease-six delivered");
        assert_eq!(recorded.calls_streams, asked, "no Calls stream asked for");
    }

    Outbox::open(data.path())
        .unwrap()
        .put(&fail("lease-five"), deadline)
        .unwrap();
    let purge = outbox_command(data.path(), &["purge", "--all"], None).await;
    assert!(
        String::from_utf8_lossy(&purge.stdout).contains("purged 1 report(s)"),
        "{purge:?}"
    );
    let list = outbox_command(data.path(), &["list"], None).await;
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("0 pending report(s)"),
        "{list:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_works_again_against_a_plane_that_answers_500_to_its_re_registration() {
    let plane = DevPlane::start(PlaneOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        idle_poll: Duration::from_millis(200),
        reregistration: Reregistration::DuplicateKey,
        ..PlaneOptions::default()
    })
    .await
    .unwrap();
    let echo = |message: &str| NewRun {
        agent_id: "echo".to_string(),
        version: "1.0.0".to_string(),
        input_ref: BTreeMap::from([("message".to_string(), message.to_string())]),
        metadata: BTreeMap::new(),
        budgets: Budgets::default(),
    };
    let completed = |run_id: &str| {
        plane
            .run(run_id)
            .filter(|run| matches!(run.status, RunStatus::Completed | RunStatus::Failed))
    };
    let agents = agents_layout();
    let data = tempfile::tempdir().unwrap();
    let mut node = spawn_node_process(&plane.url(), agents.path(), data.path());
    let first = plane.submit(echo("before the restart")).await.unwrap().run_id;
    let run = eventually(Duration::from_secs(60), "the first run", || completed(&first)).await;
    assert_eq!(run.status, RunStatus::Completed, "{run:?}");

    // SIGTERM: the node drains, says so, and exits; the plane keeps it.
    let pid = node.id().expect("the node runs").to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::timeout(Duration::from_secs(30), node.wait())
        .await
        .expect("the node exits after SIGTERM")
        .unwrap();
    assert_eq!(plane.nodes()[0].status.state, "draining");

    // Started again with the same id, its registration is answered 500
    // (duplicate key) for as long as the plane lives; a heartbeat still
    // finds it known, so it goes back to work.
    let _node = spawn_node_process(&plane.url(), agents.path(), data.path());
    let second = plane.submit(echo("after the restart")).await.unwrap().run_id;
    let run = eventually(Duration::from_secs(60), "the run submitted after the restart", || {
        completed(&second)
    })
    .await;
    assert_eq!(run.status, RunStatus::Completed, "{run:?}");
    assert_eq!(run.node_id.as_deref(), Some("killed-node"));
    let nodes = plane.nodes();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(
        nodes[0].status.state, "active",
        "its heartbeat says it is back: {nodes:?}"
    );
    plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_running_when_the_node_is_sigkilled_is_failed_retryable_once_it_restarts() {
    let plane = DevPlane::start(PlaneOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        idle_poll: Duration::from_millis(200),
        ..PlaneOptions::default()
    })
    .await
    .unwrap();
    let agents = agents_layout();
    let data = tempfile::tempdir().unwrap();
    let mut node = spawn_node_process(&plane.url(), agents.path(), data.path());
    let sleeping = NewRun {
        agent_id: "sleep-forever".to_string(),
        version: "1.0.0".to_string(),
        input_ref: BTreeMap::new(),
        metadata: BTreeMap::new(),
        budgets: Budgets {
            max_duration_seconds: Some(60),
            ..Budgets::default()
        },
    };
    let run_id = plane.submit(sleeping).await.unwrap().run_id;
    eventually(Duration::from_secs(60), "the run to be acknowledged", || {
        plane.run(&run_id).filter(|run| run.acked_at.is_some())
    })
    .await;
    node.kill().await.unwrap(); // SIGKILL, mid-run
    assert_eq!(plane.run(&run_id).unwrap().status, RunStatus::Assigned);

    // Restarted, the node fails it at once rather than leave it to a plane
    // that never re-queues a run it believes is running (the lease TTL here
    // is 300 s: the test would time out first).
    let _node = spawn_node_process(&plane.url(), agents.path(), data.path());
    let run = eventually(Duration::from_secs(60), "the interrupted run to be failed", || {
        plane.run(&run_id).filter(|run| run.status == RunStatus::Failed)
    })
    .await;
    let info = run.error_info.as_ref().expect("a failed run has errorInfo");
    assert!(info.retryable, "{info:?}");
    assert_eq!(info.error_message, "the node restarted during this lease");
    let details: serde_json::Value = serde_json::from_str(&info.error_details).unwrap();
    assert_eq!(details["kind"], "node.unavailable", "{details}");
    // Time for a second report, or a second run, to show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let run = plane.run(&run_id).unwrap();
    assert_eq!(run.outcomes, 1, "{run:?}");
    assert_eq!(run.attempts, 1, "not leased again: {run:?}");
    plane.shutdown().await;
}
