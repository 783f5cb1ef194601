//! The node daemon against the dev control plane, both real, on loopback:
//! registration, heartbeats, the lease stream, slots, reports, restarts
//! and drain, as the control plane sees them; and registration against a
//! plane that answers it with 500, as the Postgres-backed reference does
//! for an id it knows.

use crate::support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use node_runtime::agent_store::AgentStore;
use node_runtime::control_plane::Capacity;
use node_runtime::dev_plane::{Budgets, DevPlane, NewRun, PlaneOptions, Run, RunStatus};
use node_runtime::outbox::Outbox;
use node_runtime::proto::BudgetConstraints;
use node_runtime::sandbox::{EngineSettings, Sandbox, SandboxConfig};
use node_runtime::worker::{NodeHandle, NodeSettings};
use support::*;

fn settings(url: &str, slots: u32) -> NodeSettings {
    NodeSettings {
        node_id: "node-under-test".to_string(),
        control_plane_url: url.to_string(),
        slots,
        max_leases: slots,
        heartbeat_interval: Duration::from_millis(300),
        capacity: Capacity {
            slots,
            cpu: "2".to_string(),
            memory: "1Gi".to_string(),
        },
        metadata: BTreeMap::from([("Region".to_string(), "test".to_string())]),
        drain_timeout: Duration::from_secs(5),
    }
}

fn start_node(url: &str, slots: u32, agents: &tempfile::TempDir) -> NodeHandle {
    let sandbox = Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            max_concurrent_runs: slots,
            ..EngineSettings::default()
        },
        ..SandboxConfig::default()
    })
    .unwrap();
    let store = AgentStore::new(vec![agents.path().to_path_buf()]);
    NodeHandle::builder(
        settings(url, slots),
        Arc::new(sandbox),
        Arc::new(store),
        scratch_outbox(),
    )
    .start()
    .unwrap()
}

/// An outbox in a temporary directory. The directory is removed at once;
/// the open file lives on until the node drops it.
fn scratch_outbox() -> Outbox {
    let dir = tempfile::tempdir().unwrap();
    Outbox::open(dir.path()).unwrap()
}

async fn start_plane(listen: &str) -> DevPlane {
    DevPlane::start(PlaneOptions {
        listen: listen.parse().unwrap(),
        idle_poll: Duration::from_millis(200),
        ..PlaneOptions::default()
    })
    .await
    .unwrap()
}

fn new_run(agent: &str, message: &str, budgets: Budgets) -> NewRun {
    NewRun {
        agent_id: agent.to_string(),
        version: "1.0.0".to_string(),
        input_ref: BTreeMap::from([("message".to_string(), message.to_string())]),
        metadata: BTreeMap::new(),
        budgets,
    }
}

fn ended(run: &Run) -> bool {
    matches!(run.status, RunStatus::Completed | RunStatus::Failed)
}

fn error_details(run: &Run) -> serde_json::Value {
    let info = run.error_info.as_ref().expect("a failed run has errorInfo");
    serde_json::from_str(&info.error_details).expect("errorDetails is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_echo_runs_complete_at_the_plane_within_the_slots() {
    let plane = start_plane("127.0.0.1:0").await;
    let agents = agents_layout();
    let slots = 4;
    let node = start_node(&plane.url(), slots, &agents);
    let mut ids = Vec::new();
    for i in 0..200 {
        let run = plane
            .submit(new_run("echo", &format!("invoice {i}"), Budgets::default()))
            .await
            .unwrap();
        ids.push((run.run_id, format!("invoice {i}")));
    }
    let mut busiest_heartbeat = 0;
    eventually(Duration::from_secs(120), "200 echo runs to end", || {
        for node in plane.nodes() {
            assert!(node.status.available_slots >= 0, "{node:?}");
            assert!(node.status.active_runs <= slots as i32, "{node:?}");
            busiest_heartbeat = busiest_heartbeat.max(node.status.active_runs);
        }
        plane.runs().iter().all(ended).then_some(())
    })
    .await;

    for (id, message) in &ids {
        let run = plane.run(id).unwrap();
        assert_eq!(run.status, RunStatus::Completed, "{run:?}");
        let result = run.result.as_ref().unwrap();
        assert_eq!(&result["message"], message);
        assert_eq!(result["run_id"], *id);
        assert_eq!(run.node_id.as_deref(), Some("node-under-test"));
        assert_eq!(run.outcomes, 1, "exactly one report: {run:?}");
        let timings = run.timings.as_ref().unwrap();
        assert!(timings.duration_ms >= timings.queue_time_ms, "{timings:?}");
        assert!(timings.duration_ms >= timings.execution_time_ms, "{timings:?}");
        assert!(run.costs.is_some());
        let sandbox = run.sandbox.expect("the node reports its meters");
        assert!(
            sandbox.fuel_consumed > 0 && sandbox.peak_memory_bytes > 0,
            "{sandbox:?}"
        );
    }
    let stats = node.stats();
    assert!(stats.max_active_runs.load(Ordering::SeqCst) <= slots);
    assert!(stats.max_active_runs.load(Ordering::SeqCst) >= 2, "runs did overlap");
    assert_eq!(stats.duplicate_leases.load(Ordering::SeqCst), 0);
    node.shutdown().await;
    plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_over_its_fuel_budget_fails_budget_fuel_not_retryable() {
    let plane = start_plane("127.0.0.1:0").await;
    let agents = agents_layout();
    let node = start_node(&plane.url(), 2, &agents);
    let budgets = Budgets {
        max_fuel: Some(5_000_000),
        ..Budgets::default()
    };
    let id = plane
        .submit(new_run("spin-forever", "{}", budgets))
        .await
        .unwrap()
        .run_id;
    let run = eventually(Duration::from_secs(30), "the spin run to end", || {
        plane.run(&id).filter(ended)
    })
    .await;
    assert_eq!(run.status, RunStatus::Failed);
    let info = run.error_info.as_ref().unwrap();
    assert!(!info.retryable);
    let details = error_details(&run);
    assert_eq!(details["kind"], "budget.fuel");
    assert_eq!(details["report"]["fuel_consumed"], 5_000_000);
    node.shutdown().await;
    plane.shutdown().await;
}

/// Where the plane has the Calls stream, Ack, Complete and Fail take it,
/// each answered as its unary call: a report too large for the stream is
/// sent unary, and every run ends as it would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_and_reports_share_one_stream_where_the_plane_has_it() {
    let plane = start_plane("127.0.0.1:0").await;
    let agents = agents_layout();
    let node = start_node(&plane.url(), 4, &agents);
    // The first call opens the stream (and is itself unary).
    let first = plane
        .submit(new_run("echo", "first", Budgets::default()))
        .await
        .unwrap()
        .run_id;
    eventually(Duration::from_secs(30), "the first run to end", || {
        plane.run(&first).filter(ended)
    })
    .await;
    eventually(Duration::from_secs(10), "the node to open the Calls stream", || {
        (plane.calls_on_streams().0 == 1).then_some(())
    })
    .await;
    let answered_before = plane.calls_on_streams().1;
    let echoes = 10;
    let mut ids = Vec::new();
    for n in 0..echoes {
        ids.push(
            plane
                .submit(new_run("echo", &format!("run {n}"), Budgets::default()))
                .await
                .unwrap()
                .run_id,
        );
    }
    let fuel = Budgets {
        max_fuel: Some(5_000_000),
        ..Budgets::default()
    };
    let spin = plane.submit(new_run("spin-forever", "{}", fuel)).await.unwrap().run_id;
    let mut big = new_run("big-result", "", Budgets::default());
    big.input_ref.insert("size".to_string(), (200 * 1024).to_string());
    let big = plane.submit(big).await.unwrap().run_id;
    for id in ids.iter().chain([&spin, &big]) {
        eventually(Duration::from_secs(30), "each run to end", || {
            plane.run(id).filter(ended)
        })
        .await;
    }
    for id in &ids {
        assert_eq!(plane.run(id).unwrap().status, RunStatus::Completed);
    }
    let spin = plane.run(&spin).unwrap();
    assert_eq!(spin.status, RunStatus::Failed);
    assert_eq!(error_details(&spin)["kind"], "budget.fuel");
    let big = plane.run(&big).unwrap();
    assert_eq!(big.status, RunStatus::Completed);
    assert_eq!(
        big.result
            .as_ref()
            .and_then(|result| result.get("big"))
            .map(String::len),
        Some(200 * 1024)
    );
    // Each run's Ack and report on the one stream, but for the report of
    // 200 KiB, sent unary.
    let (opened, answered) = plane.calls_on_streams();
    assert_eq!(opened, 1, "one stream, kept open");
    assert_eq!(answered - answered_before, 2 * (echoes + 2) - 1);
    node.shutdown().await;
    plane.shutdown().await;
}

/// `NodeRuntime.CallsStream` false: every Ack, Complete and Fail is a
/// request of its own, even to a plane that has the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_stream_false_keeps_every_call_unary() {
    let plane = start_plane("127.0.0.1:0").await;
    let agents = agents_layout();
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("serve.log");
    let mut node = serve_logging_to(
        &log,
        &plane.url(),
        agents.path(),
        data.path(),
        &[("NodeRuntime__CallsStream", "false")],
    );
    // One run, then more: with the stream on, the first call opens it and
    // the later ones use it.
    for round in [1, 3] {
        let mut ids = Vec::new();
        for n in 0..round {
            let run = new_run("echo", &format!("round {round}, run {n}"), Budgets::default());
            ids.push(plane.submit(run).await.unwrap().run_id);
        }
        for id in &ids {
            let run = eventually(Duration::from_secs(60), "each run to end", || {
                plane.run(id).filter(ended)
            })
            .await;
            assert_eq!(run.status, RunStatus::Completed, "{run:?}");
        }
    }
    assert_eq!(
        plane.calls_on_streams(),
        (0, 0),
        "no stream opened, nothing sent on one"
    );
    node.kill().await.unwrap();
    plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_agent_fails_naming_what_was_looked_for() {
    let plane = start_plane("127.0.0.1:0").await;
    let agents = agents_layout();
    let node = start_node(&plane.url(), 1, &agents);
    let id = plane
        .submit(new_run("no-such-agent", "{}", Budgets::default()))
        .await
        .unwrap()
        .run_id;
    let run = eventually(Duration::from_secs(30), "the run to fail", || {
        plane.run(&id).filter(ended)
    })
    .await;
    let info = run.error_info.as_ref().unwrap();
    assert!(!info.retryable);
    assert!(info.error_message.contains("no-such-agent/1.0.0.wasm"), "{info:?}");
    assert_eq!(error_details(&run)["kind"], "agent.invalid");
    node.shutdown().await;
    plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_retries_until_the_plane_starts() {
    // Reserve a port, free it, and point the node there before anything
    // listens.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let agents = agents_layout();
    let node = start_node(&url, 1, &agents);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(node.stats().registrations.load(Ordering::SeqCst), 0);

    let plane = start_plane(&format!("127.0.0.1:{port}")).await;
    let id = plane
        .submit(new_run("echo", "late plane", Budgets::default()))
        .await
        .unwrap()
        .run_id;
    let run = eventually(Duration::from_secs(90), "the run to complete", || {
        plane.run(&id).filter(ended)
    })
    .await;
    assert_eq!(run.status, RunStatus::Completed, "{run:?}");
    node.shutdown().await;
    plane.shutdown().await;
}

/// What a plane answering every registration with 500 was asked.
#[derive(Default)]
struct Calls {
    registrations: std::sync::atomic::AtomicU32,
    heartbeats: std::sync::atomic::AtomicU32,
    pulls: std::sync::atomic::AtomicU32,
}

/// A control plane whose registrations always fail with 500 (the
/// reference's duplicate key) and whose heartbeats answer `heartbeat`.
async fn plane_refusing_registration(heartbeat: u16) -> (String, Arc<Calls>) {
    fake_plane(500, heartbeat).await
}

/// A plane that answers every registration with `register` (500: with
/// Postgres's duplicate-key message) and every heartbeat with
/// `heartbeat`, and counts the calls.
async fn fake_plane(register: u16, heartbeat: u16) -> (String, Arc<Calls>) {
    use axum::http::StatusCode;
    let calls = Arc::new(Calls::default());
    let (on_register, on_heartbeat, on_other) = (calls.clone(), calls.clone(), calls.clone());
    let app = axum::Router::new()
        .route(
            "/v1/nodes:register",
            axum::routing::post(move || async move {
                on_register.registrations.fetch_add(1, Ordering::SeqCst);
                let body = if register == 500 {
                    "23505: duplicate key value violates unique constraint"
                } else {
                    "{}"
                };
                (StatusCode::from_u16(register).unwrap(), body)
            }),
        )
        .route(
            "/v1/nodes/{target}",
            axum::routing::post(move || async move {
                on_heartbeat.heartbeats.fetch_add(1, Ordering::SeqCst);
                StatusCode::from_u16(heartbeat).unwrap()
            }),
        )
        .fallback(move |uri: axum::http::Uri| async move {
            if uri.path().ends_with("/Pull") {
                on_other.pulls.fetch_add(1, Ordering::SeqCst);
            }
            StatusCode::NOT_FOUND
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_registration_answered_500_goes_on_to_heartbeat_and_a_200_confirms_it() {
    let (url, calls) = plane_refusing_registration(200).await;
    let agents = agents_layout();
    let node = start_node(&url, 1, &agents);
    eventually(Duration::from_secs(30), "the lease stream to be opened", || {
        (calls.pulls.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    assert_eq!(
        calls.registrations.load(Ordering::SeqCst),
        1,
        "registered once, never again"
    );
    assert!(calls.heartbeats.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        node.stats().registrations.load(Ordering::SeqCst),
        1,
        "confirmed by the heartbeat"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_answered_500_then_a_heartbeat_404_registers_again_with_backoff_and_never_pulls() {
    let (url, calls) = plane_refusing_registration(404).await;
    let agents = agents_layout();
    let node = start_node(&url, 1, &agents);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (registrations, heartbeats) = (
        calls.registrations.load(Ordering::SeqCst),
        calls.heartbeats.load(Ordering::SeqCst),
    );
    assert!(
        heartbeats >= 1,
        "a 500 is followed by a heartbeat: {registrations} registrations, {heartbeats} heartbeats"
    );
    assert!(registrations >= 2, "a 404 goes back to registering: {registrations}");
    // Backoff from 0.5 s, doubling: a handful in 3 s, not a hot loop.
    assert!(registrations <= 8, "{registrations} registrations in 3 s");
    assert!(
        heartbeats <= registrations,
        "{heartbeats} heartbeats, {registrations} registrations"
    );
    assert_eq!(calls.pulls.load(Ordering::SeqCst), 0, "never registered, never pulled");
    assert_eq!(node.stats().registrations.load(Ordering::SeqCst), 0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plane_that_takes_every_registration_and_forgets_it_at_once_gets_no_hot_loop() {
    // Replicas that share nothing behind one address: each registration is
    // answered 201, each heartbeat 404.
    let (url, calls) = fake_plane(201, 404).await;
    let agents = agents_layout();
    let node = start_node(&url, 1, &agents);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let registrations = calls.registrations.load(Ordering::SeqCst);
    assert!(registrations >= 2, "a 404 goes back to registering: {registrations}");
    // Backoff from 0.5 s, doubling: a handful in 3 s, not thousands.
    assert!(registrations <= 8, "{registrations} registrations in 3 s");
    node.shutdown().await;
}

/// The node binary against a plane that forgets the node at once (201
/// to every registration, 404 to every heartbeat, as a plane that lost its
/// state or a node id it routes elsewhere): black-box testing once saw
/// about 8,000 registrations a second, and a SIGINT that logged
/// "draining" without the process ever exiting. Registration backs off,
/// and either signal ends the process while it waits.
/// A SIGTERM that comes while the node is still starting (its first log
/// line written, its sandbox and outbox not yet ready) stops it cleanly,
/// exit status 0: until 2026-12-07 the handler was installed by a task
/// that ran only after the start, and such a signal killed the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_the_start_stops_the_node_cleanly() {
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    for attempt in 0..3 {
        let data = tempfile::tempdir().unwrap();
        let log = data.path().join("node.log");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
            .arg("serve")
            .env("NodeRuntime__NodeId", "early-term-node")
            .env("NodeRuntime__ControlPlaneUrl", &nowhere)
            .env("NodeRuntime__DataDirectory", data.path().join("data"))
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("node-runtime serve starts");
        // Its first line: the configuration is read, nothing started yet.
        let started = std::time::Instant::now();
        while !std::fs::read_to_string(&log).unwrap().contains("configuration:") {
            assert!(started.elapsed() < Duration::from_secs(30), "no first line within 30 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let pid = child.id().unwrap();
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("the node exits within 30 s of the signal")
            .unwrap();
        assert!(
            status.success(),
            "attempt {attempt}: exit status {status:?}\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_against_a_plane_that_404s_every_heartbeat_backs_off_and_exits_on_either_signal() {
    for signal in ["INT", "TERM"] {
        let (url, calls) = fake_plane(201, 404).await;
        let data = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
            .arg("serve")
            .env("NodeRuntime__NodeId", "forgotten-node")
            .env("NodeRuntime__ControlPlaneUrl", &url)
            .env("NodeRuntime__DataDirectory", data.path())
            .env("NodeRuntime__HeartbeatIntervalSeconds", "1")
            .env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("node-runtime serve starts");
        // Two rounds seen (the node is up and going round), then a window
        // of 2 s counted.
        eventually(Duration::from_secs(30), "a second registration", || {
            (calls.registrations.load(Ordering::SeqCst) >= 2).then_some(())
        })
        .await;
        let before = calls.registrations.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let in_window = calls.registrations.load(Ordering::SeqCst) - before;
        // Backoff from 0.5 s, doubling, up to 60 s: a handful, not thousands.
        assert!(
            in_window <= 5,
            "SIG{signal}: {in_window} registrations in 2 s: no backoff"
        );

        let pid = child.id().unwrap();
        let kill = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .unwrap_or_else(|_| panic!("SIG{signal}: the node did not exit within 20 s of the signal"))
            .unwrap();
        assert!(status.success(), "SIG{signal}: exit status {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plane_restarted_without_persistence_gets_the_node_back_by_itself() {
    let first = start_plane(&format!("127.0.0.1:{}", free_port())).await;
    let addr = first.local_addr();
    let agents = agents_layout();
    let node = start_node(&first.url(), 1, &agents);
    let id = first
        .submit(new_run("echo", "before", Budgets::default()))
        .await
        .unwrap()
        .run_id;
    eventually(Duration::from_secs(30), "the first run", || {
        first.run(&id).filter(ended)
    })
    .await;
    first.shutdown().await;

    let second = start_plane(&addr.to_string()).await;
    assert!(second.nodes().is_empty(), "the new plane knows no node");
    let id = second
        .submit(new_run("echo", "after", Budgets::default()))
        .await
        .unwrap()
        .run_id;
    let run = eventually(Duration::from_secs(90), "the run on the restarted plane", || {
        second.run(&id).filter(ended)
    })
    .await;
    assert_eq!(run.status, RunStatus::Completed, "{run:?}");
    assert!(
        node.stats().registrations.load(Ordering::SeqCst) >= 2,
        "registered again"
    );
    node.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_finished_runs_complete_unfinished_ones_are_handed_back() {
    let plane = start_plane("127.0.0.1:0").await;
    let agents = agents_layout();
    let data = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .arg("serve")
        .env("NodeRuntime__NodeId", "draining-node")
        .env("NodeRuntime__ControlPlaneUrl", plane.url())
        .env("NodeRuntime__AgentsDirectory", agents.path())
        .env("NodeRuntime__DataDirectory", data.path())
        .env("NodeRuntime__HeartbeatIntervalSeconds", "1")
        .env("NodeRuntime__DrainTimeoutSeconds", "3")
        .env("NodeRuntime__MaxConcurrentLeases", "3")
        .env("NodeRuntime__Capacity__Slots", "3")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("node-runtime serve starts");

    let echo = plane
        .submit(new_run("echo", "before the signal", Budgets::default()))
        .await
        .unwrap()
        .run_id;
    eventually(Duration::from_secs(60), "echo to complete", || {
        plane.run(&echo).filter(ended)
    })
    .await;
    let short = Budgets {
        max_duration_seconds: Some(1),
        ..Budgets::default()
    };
    // sleep-forever compiled and kept before the signal: on a loaded
    // machine its first compile can take longer than the whole drain,
    // and the 1 s run below must start at once to end inside it.
    let warm = plane
        .submit(new_run("sleep-forever", "{}", short))
        .await
        .unwrap()
        .run_id;
    eventually(Duration::from_secs(120), "a first sleep-forever to end", || {
        plane.run(&warm).filter(ended)
    })
    .await;
    let ends_during_drain = plane
        .submit(new_run("sleep-forever", "{}", short))
        .await
        .unwrap()
        .run_id;
    let long = Budgets {
        max_duration_seconds: Some(60),
        ..Budgets::default()
    };
    let cut_short = [
        plane.submit(new_run("sleep-forever", "{}", long)).await.unwrap().run_id,
        plane.submit(new_run("sleep-forever", "{}", long)).await.unwrap().run_id,
    ];
    eventually(Duration::from_secs(30), "the sleepers to be acknowledged", || {
        let all = [&ends_during_drain, &cut_short[0], &cut_short[1]];
        all.iter()
            .all(|id| plane.run(id).unwrap().acked_at.is_some())
            .then_some(())
    })
    .await;

    let signalled = std::time::Instant::now();
    let pid = child.id().unwrap();
    let kill = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .unwrap();
    assert!(kill.success());
    // While it drains, the node goes on heartbeating, as `draining`: each
    // heartbeat the plane records while the node is draining, until exit.
    let mut draining_beats = std::collections::BTreeSet::new();
    let status = loop {
        let node = plane.nodes().into_iter().find(|n| n.node_id == "draining-node");
        if let Some(node) = node.filter(|node| node.status.state == "draining") {
            draining_beats.extend(node.heartbeat_at);
        }
        match tokio::time::timeout(Duration::from_millis(100), child.wait()).await {
            Ok(status) => break status.unwrap(),
            Err(_) => assert!(
                signalled.elapsed() < Duration::from_secs(20),
                "the node exits after its drain"
            ),
        }
    };
    assert!(status.success(), "exit status {status:?}");
    assert!(
        draining_beats.len() >= 2,
        "heartbeats go on during a 3 s drain at a 1 s interval: {draining_beats:?}"
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(15),
        "took {:?}",
        signalled.elapsed()
    );

    assert_eq!(plane.run(&echo).unwrap().status, RunStatus::Completed);
    let drained = plane.run(&ends_during_drain).unwrap();
    assert_eq!(
        error_details(&drained)["kind"],
        "budget.deadline",
        "it finished during the drain: {drained:?}"
    );
    for id in &cut_short {
        let run = plane.run(id).unwrap();
        assert_eq!(run.status, RunStatus::Failed, "{run:?}");
        assert!(run.error_info.as_ref().unwrap().retryable, "{run:?}");
        assert_eq!(error_details(&run)["kind"], "node.unavailable");
        assert_eq!(run.outcomes, 1);
    }
    let node = plane
        .nodes()
        .into_iter()
        .find(|n| n.node_id == "draining-node")
        .unwrap();
    assert_eq!(node.status.state, "draining");
    assert_eq!(node.status.available_slots, 0);
    plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_sent_twice_runs_once_and_a_lease_past_its_deadline_never_runs() {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let (url, recorded) = scripted::serve(vec![
        scripted::lease("lease-a", "echo", now_ms + 60_000),
        scripted::lease("lease-a", "echo", now_ms + 60_000),
        scripted::lease("lease-late", "echo", now_ms - 1_000),
    ])
    .await;
    let agents = agents_layout();
    let node = start_node(&url, 2, &agents);
    eventually(Duration::from_secs(30), "two reports", || {
        let recorded = recorded.lock().unwrap();
        (recorded.completes.len() + recorded.fails.len() >= 2).then_some(())
    })
    .await;
    // Give a wrongly repeated run time to report too, before judging.
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        let recorded = recorded.lock().unwrap();
        assert_eq!(recorded.completes.len(), 1, "lease-a ran once");
        assert_eq!(recorded.completes[0].lease_id, "lease-a");
        assert_eq!(
            recorded.completes[0].result["trace_id"],
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(recorded.fails.len(), 1);
        let late = &recorded.fails[0];
        assert_eq!(late.lease_id, "lease-late");
        assert!(late.retryable, "{late:?}");
        let details: serde_json::Value = serde_json::from_str(&late.error_details).unwrap();
        assert_eq!(details["kind"], "budget.deadline");
        assert_eq!(details["report"]["fuel_consumed"], 0, "it never ran");
        // Like the reference, the script has no Calls stream: the node
        // asked once, then made unary calls.
        assert_eq!(recorded.calls_streams, 1);
    }
    assert_eq!(node.stats().duplicate_leases.load(Ordering::SeqCst), 1);
    node.shutdown().await;
}

/// A plane that takes the Calls stream but never answers on it, nor ends
/// it: each call on it times out (10 s) and is made again unary, and no
/// stream is opened again, since one the plane stopped reading cannot be
/// taken back (each would stay open at the plane).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_stream_that_never_answers_is_given_up_and_every_report_arrives_unary() {
    let calls_streams = unanswered_calls_stream(scripted::CallsStream::Silent).await;
    assert_eq!(calls_streams, 1, "the stream was not opened again");
}

/// The same plane, but it ends the stream once the node has ended its
/// side: nothing of it is left, so a later call opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_stream_given_up_is_opened_again_once_the_plane_has_ended_it() {
    let calls_streams = unanswered_calls_stream(scripted::CallsStream::SilentUntilEnd).await;
    assert_eq!(calls_streams, 2, "a new stream after the old one ended");
}

/// A plane that takes the Calls stream only to end it at once, answering
/// nothing: the node does not ask every two seconds, but ever less often,
/// and every report arrives, unary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_stream_ended_at_once_is_asked_for_less_and_less_often() {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let answers = scripted::Answers {
        calls: scripted::CallsStream::EndsAtOnce,
        ..scripted::Answers::default()
    };
    // A Fail a second, for twelve seconds: a call whenever the stream may
    // reopen. Every two seconds, it would be opened seven times.
    let leases = (1..=12)
        .map(|n| scripted::lease(&format!("lease-{n}"), "sleep-forever", now_ms + n * 1_000))
        .collect();
    let (url, recorded) = scripted::serve_with(leases, answers).await;
    let agents = agents_layout();
    let node = start_node(&url, 16, &agents);
    eventually(Duration::from_secs(60), "twelve reports", || {
        (recorded.lock().unwrap().fails.len() >= 12).then_some(())
    })
    .await;
    {
        let recorded = recorded.lock().unwrap();
        let mut failed: Vec<&str> = recorded.fails.iter().map(|fail| fail.lease_id.as_str()).collect();
        failed.sort_unstable();
        failed.dedup();
        assert_eq!(failed.len(), 12, "each lease failed once: {failed:?}");
        // At 0, within 2 s, within 4 s more, within 8 s more: four at most.
        assert!(
            (2..=4).contains(&recorded.calls_streams),
            "streams asked for: {}",
            recorded.calls_streams
        );
    }
    node.shutdown().await;
}

/// A plane that reads calls on the stream and then ends it unanswered:
/// the Acks waiting on it are made again unary (nothing else sends an Ack
/// again), and the reports are resent by their senders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_lost_with_a_broken_calls_stream_are_made_again_unary() {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let answers = scripted::Answers {
        calls: scripted::CallsStream::EndsAfter(3),
        // The first lease's Ack opens the stream (made unary meanwhile);
        // the later ones arrive while it is open.
        lease_gap: Duration::from_millis(300),
        ..scripted::Answers::default()
    };
    let ids: Vec<String> = (1..=6).map(|n| format!("lease-{n}")).collect();
    let leases = ids
        .iter()
        .map(|id| scripted::lease(id, "echo", now_ms + 120_000))
        .collect();
    let (url, recorded) = scripted::serve_with(leases, answers).await;
    let agents = agents_layout();
    let node = start_node(&url, 4, &agents);
    eventually(Duration::from_secs(60), "six reports", || {
        (recorded.lock().unwrap().completes.len() >= 6).then_some(())
    })
    .await;
    let acked = |recorded: &scripted::Recorded| {
        let mut acked: Vec<String> = recorded.acks.iter().map(|(ack, _)| ack.lease_id.clone()).collect();
        acked.sort_unstable();
        acked.dedup();
        acked
    };
    eventually(Duration::from_secs(30), "every lease acknowledged", || {
        (acked(&recorded.lock().unwrap()) == ids).then_some(())
    })
    .await;
    {
        let recorded = recorded.lock().unwrap();
        assert!(
            recorded.streamed_calls >= 1,
            "no call went on the stream: the test proves nothing"
        );
        let mut completed: Vec<&str> = recorded.completes.iter().map(|c| c.lease_id.as_str()).collect();
        completed.sort_unstable();
        completed.dedup();
        assert_eq!(completed, ids, "each lease completed");
    }
    node.shutdown().await;
}

/// Runs two leases that end at once and one cut off by its deadline 14 s
/// on (after the stream is given up, at 10 s, and after the 2 s a broken
/// stream waits before it reopens) against a plane whose Calls stream
/// never answers; checks every report arrived once, unary. Returns the
/// Calls streams the node opened.
async fn unanswered_calls_stream(mode: scripted::CallsStream) -> usize {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let answers = scripted::Answers {
        calls: mode,
        ..scripted::Answers::default()
    };
    let (url, recorded) = scripted::serve_with(
        vec![
            scripted::lease("lease-a", "echo", now_ms + 60_000),
            scripted::lease("lease-b", "echo", now_ms + 60_000),
            scripted::lease("lease-late", "sleep-forever", now_ms + 14_000),
        ],
        answers,
    )
    .await;
    let agents = agents_layout();
    let node = start_node(&url, 4, &agents);
    eventually(Duration::from_secs(60), "three reports", || {
        let recorded = recorded.lock().unwrap();
        (recorded.completes.len() + recorded.fails.len() >= 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls_streams = {
        let recorded = recorded.lock().unwrap();
        let mut completed: Vec<&str> = recorded.completes.iter().map(|c| c.lease_id.as_str()).collect();
        completed.sort_unstable();
        assert_eq!(completed, ["lease-a", "lease-b"]);
        assert_eq!(recorded.fails.len(), 1);
        assert_eq!(recorded.fails[0].lease_id, "lease-late");
        assert!(
            recorded.streamed_calls >= 1,
            "calls went to the stream and got no answer"
        );
        recorded.calls_streams
    };
    node.shutdown().await;
    calls_streams
}

async fn http_json(request: reqwest::RequestBuilder) -> Option<serde_json::Value> {
    request.send().await.ok()?.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plane_killed_with_runs_in_flight_and_restarted_with_its_data_ends_each_run_once() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let data = tempfile::tempdir().unwrap();
    node_runtime::support::tls::install_crypto_provider();
    let http = reqwest::Client::new();
    let mut plane = spawn_plane_process(port, data.path(), "10s");
    eventually_async(Duration::from_secs(30), "the plane to listen", || {
        http_json(http.get(format!("{url}/v1/runs")))
    })
    .await;

    let agents = agents_layout();
    let node = start_node(&url, 4, &agents);
    let mut ids = Vec::new();
    for i in 0..12 {
        // Each run takes a second: sleep-forever cut by its duration budget.
        let body = serde_json::json!({
            "agentId": if i % 3 == 0 { "echo" } else { "sleep-forever" },
            "version": "1.0.0",
            "inputRef": {"message": format!("run {i}")},
            "budgets": {"maxDurationSeconds": 1},
        });
        let answer = http_json(http.post(format!("{url}/v1/runs")).json(&body))
            .await
            .unwrap();
        ids.push(answer["runId"].as_str().unwrap().to_string());
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    plane.kill().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut plane = spawn_plane_process(port, data.path(), "10s");

    let runs = eventually_async(Duration::from_secs(90), "every run to end", || async {
        let runs = http_json(http.get(format!("{url}/v1/runs"))).await?;
        let runs = runs.as_array()?.clone();
        let all_ended = runs.len() == ids.len()
            && runs
                .iter()
                .all(|run| matches!(run["status"].as_str(), Some("completed" | "failed")));
        all_ended.then_some(runs)
    })
    .await;
    for run in &runs {
        assert_eq!(run["outcomes"], 1, "exactly one outcome: {run}");
    }
    node.shutdown().await;
    plane.kill().await.unwrap();
}

/// A lease from the scripted plane whose run sleeps for longer than the
/// test lasts.
fn long_lease(lease_id: &str, deadline_unix_ms: i64) -> node_runtime::proto::Lease {
    let mut lease = scripted::lease(lease_id, "sleep-forever", deadline_unix_ms);
    if let Some(spec) = lease.run_spec.as_mut() {
        spec.budgets = Some(node_runtime::proto::BudgetConstraints {
            max_duration_seconds: 50,
            ..Default::default()
        });
    }
    lease
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_the_slots_is_acknowledged_only_as_far_as_there_is_room() {
    let now = node_runtime::outbox::now_unix_ms();
    let burst: Vec<_> = (0..12)
        .map(|i| long_lease(&format!("lease-burst-{i}"), now + 120_000))
        .collect();
    let (url, recorded) = scripted::serve(burst).await;
    let agents = agents_layout();
    let slots = 2;
    let node = start_node(&url, slots, &agents);
    // Room: the two slots, the queue (2 x slots, at least 4), and the one
    // lease the dispatcher holds while it waits for the next free slot.
    let room = 2 + 4 + 1;
    eventually(Duration::from_secs(30), "the node to fill its room", || {
        (recorded.lock().unwrap().acks.len() >= room).then_some(())
    })
    .await;
    // Time for a wrong Ack beyond the room to show; no run ends meanwhile.
    tokio::time::sleep(Duration::from_secs(1)).await;
    {
        let recorded = recorded.lock().unwrap();
        assert!(
            recorded.fails.is_empty() && recorded.completes.is_empty(),
            "no run ended yet"
        );
        let acked: Vec<&str> = recorded.acks.iter().map(|(ack, _)| ack.lease_id.as_str()).collect();
        assert_eq!(
            acked.len(),
            room,
            "acknowledged before any run ended: {acked:?}; room for {room}"
        );
    }
    assert_eq!(node.stats().runs_started.load(Ordering::SeqCst), 2);
    // Stopping hands back (Fail, retryable) exactly what was acknowledged;
    // the rest was never read, so the plane still holds it.
    node.shutdown().await;
    let recorded = recorded.lock().unwrap();
    let mut failed: Vec<&str> = recorded.fails.iter().map(|fail| fail.lease_id.as_str()).collect();
    let mut acked: Vec<&str> = recorded.acks.iter().map(|(ack, _)| ack.lease_id.as_str()).collect();
    failed.sort();
    acked.sort();
    assert_eq!(
        failed, acked,
        "one report for each acknowledged lease, none for the others"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_without_a_lease_id_is_refused_and_the_next_one_runs() {
    let now = node_runtime::outbox::now_unix_ms();
    let mut nameless = scripted::lease("", "echo", now + 60_000);
    nameless.run_id = "run-without-a-lease-id".to_string();
    let (url, recorded) = scripted::serve(vec![nameless, scripted::lease("lease-named", "echo", now + 60_000)]).await;
    let agents = agents_layout();
    let node = start_node(&url, 2, &agents);
    eventually(Duration::from_secs(30), "the named lease's report", || {
        (!recorded.lock().unwrap().completes.is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        let recorded = recorded.lock().unwrap();
        let completed: Vec<&str> = recorded.completes.iter().map(|c| c.lease_id.as_str()).collect();
        assert_eq!(completed, ["lease-named"]);
        assert!(
            recorded.fails.is_empty(),
            "nothing is failed: a Fail needs the lease id"
        );
        let acked: Vec<&str> = recorded.acks.iter().map(|(ack, _)| ack.lease_id.as_str()).collect();
        assert_eq!(acked, ["lease-named"], "no Ack without a lease id");
    }
    let stats = node.stats();
    assert_eq!(
        stats.runs_started.load(Ordering::SeqCst),
        1,
        "the nameless lease never ran"
    );
    assert_eq!(stats.leases_without_id.load(Ordering::SeqCst), 1);
    node.shutdown().await;
}

/// A lease whose input is `bytes` long.
fn lease_with_input(lease_id: &str, bytes: usize) -> node_runtime::proto::Lease {
    let mut lease = scripted::lease(lease_id, "echo", node_runtime::outbox::now_unix_ms() + 60_000);
    if let Some(spec) = lease.run_spec.as_mut() {
        spec.input_ref.insert("message".to_string(), "x".repeat(bytes));
    }
    lease
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_with_a_5_mib_input_runs_under_the_default_message_limit() {
    // gRPC's default decode limit (4 MiB) once broke the stream on it, and
    // the run stayed assigned for ever, with no Ack and no report.
    let (url, recorded) = scripted::serve_with(
        vec![lease_with_input("lease-5mib", 5 << 20)],
        scripted::Answers {
            max_message_bytes: Some(64 << 20),
            ..scripted::Answers::default()
        },
    )
    .await;
    let agents = agents_layout();
    let node = start_node(&url, 2, &agents);
    eventually(Duration::from_secs(60), "the 5 MiB lease's report", || {
        let recorded = recorded.lock().unwrap();
        (recorded.completes.len() + recorded.fails.len() == 1).then_some(())
    })
    .await;
    {
        let recorded = recorded.lock().unwrap();
        let acked: Vec<&str> = recorded.acks.iter().map(|(ack, _)| ack.lease_id.as_str()).collect();
        assert_eq!(acked, ["lease-5mib"]);
        let reported = recorded
            .completes
            .iter()
            .map(|c| c.lease_id.as_str())
            .chain(recorded.fails.iter().map(|f| f.lease_id.as_str()))
            .collect::<Vec<_>>();
        assert_eq!(reported, ["lease-5mib"]);
    }
    let stats = node.stats();
    assert_eq!(stats.runs_started.load(Ordering::SeqCst), 1);
    assert_eq!(stats.lease_messages_too_large.load(Ordering::SeqCst), 0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_over_max_lease_message_bytes_is_logged_and_counted_and_the_next_lease_runs() {
    node_runtime::support::tls::install_crypto_provider();
    // The first stream carries a 2 MiB lease, over the 1 MiB configured;
    // the stream the node reopens carries a small one.
    let (url, recorded) = scripted::serve_pulls(
        vec![
            vec![lease_with_input("lease-too-large", 2 << 20)],
            vec![scripted::lease(
                "lease-small",
                "echo",
                node_runtime::outbox::now_unix_ms() + 60_000,
            )],
        ],
        scripted::Answers::default(),
    )
    .await;
    let agents = agents_layout();
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("serve.log");
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut node = serve_logging_to(
        &log,
        &url,
        agents.path(),
        data.path(),
        &[
            ("NodeRuntime__MaxLeaseMessageBytes", "1MiB"),
            ("NodeRuntime__AdminListen", &admin.to_string()),
            ("RUST_LOG", "warn"),
        ],
    );
    eventually(Duration::from_secs(60), "the small lease's report", || {
        (!recorded.lock().unwrap().completes.is_empty()).then_some(())
    })
    .await;
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    node.kill().await.unwrap();
    {
        let recorded = recorded.lock().unwrap();
        let acked: Vec<&str> = recorded.acks.iter().map(|(ack, _)| ack.lease_id.as_str()).collect();
        assert_eq!(acked, ["lease-small"], "the undecodable lease cannot be acknowledged");
        assert_eq!(recorded.completes.len(), 1);
        assert_eq!(recorded.completes[0].lease_id, "lease-small");
        assert!(recorded.fails.is_empty(), "nor failed: it names no lease");
        assert!(recorded.pulls >= 2, "the stream was reopened");
    }
    assert!(metrics.contains("lease_messages_too_large_total 1\n"), "{metrics}");
    let stderr = std::fs::read_to_string(&log).unwrap();
    let line = stderr
        .lines()
        .find(|line| line.contains("MaxLeaseMessageBytes"))
        .unwrap_or_else(|| panic!("no log line names the setting:\n{stderr}"));
    assert!(line.contains("1048576"), "the limit: {line}");
    assert!(line.contains("found 2097"), "the size found: {line}");
}

/// A guest cut off while computing is reported first; its backtrace, taken
/// when its call is unwound after the report, goes to the node's log with
/// the lease's ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_cut_off_while_computing_is_failed_and_where_it_was_is_logged() {
    node_runtime::support::tls::install_crypto_provider();
    // A second of budget, and a lease deadline far enough that a slow
    // first compile of the agent does not pass it.
    let mut lease = scripted::lease(
        "lease-spinning",
        "spin-forever",
        node_runtime::outbox::now_unix_ms() + 120_000,
    );
    lease.run_spec.as_mut().unwrap().budgets = Some(BudgetConstraints {
        max_duration_seconds: 1,
        ..BudgetConstraints::default()
    });
    let (url, recorded) = scripted::serve_pulls(vec![vec![lease]], scripted::Answers::default()).await;
    let agents = agents_layout();
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("serve.log");
    let mut node = serve_logging_to(&log, &url, agents.path(), data.path(), &[("RUST_LOG", "info")]);
    let fail = eventually(Duration::from_secs(60), "the spinning lease's report", || {
        recorded.lock().unwrap().fails.first().cloned()
    })
    .await;
    assert_eq!(fail.lease_id, "lease-spinning");
    assert!(
        fail.error_message.contains("deadline") && !fail.error_message.contains("host call"),
        "{fail:?}"
    );
    let logged = eventually(Duration::from_secs(30), "where the guest was, logged", || {
        let stderr = std::fs::read_to_string(&log).unwrap();
        let at = stderr.find("where the guest was when its deadline cut it off")?;
        Some(stderr[..at].rsplit_once('\n').map_or("", |(_, line)| line).to_string() + &stderr[at..])
    })
    .await;
    node.kill().await.unwrap();
    assert!(logged.contains("lease-spinning"), "the lease's ids: {logged}");
    assert!(logged.contains("spin_forever.wasm!run"), "the guest's frames: {logged}");
}

/// `node-runtime serve` against `url`, its data under `data/data`, its log
/// (stderr) written to `log`, with `env` set on top.
fn serve_logging_to(
    log: &std::path::Path,
    url: &str,
    agents: &std::path::Path,
    data: &std::path::Path,
    env: &[(&str, &str)],
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .arg("serve")
        .env("NodeRuntime__ControlPlaneUrl", url)
        .env("NodeRuntime__AgentsDirectory", agents)
        .env("NodeRuntime__DataDirectory", data.join("data"))
        .env("NodeRuntime__HeartbeatIntervalSeconds", "1")
        .envs(env.iter().copied())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}
