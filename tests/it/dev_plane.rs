//! The development control plane, driven the way nodes and developers
//! drive it: a real plane on a loopback port, REST over HTTP/1.1 with
//! reqwest, gRPC over HTTP/2 cleartext with the generated client, on the
//! same port. Every wait is bounded.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use node_runtime::dev_plane::{DevPlane, PlaneOptions, Reregistration, RunStatus};
use node_runtime::proto::lease_service_client::LeaseServiceClient;
use node_runtime::proto::{AckRequest, CompleteRequest, CostInfo, FailRequest, Lease, PullRequest, TimingInfo};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tonic::Streaming;
use tonic::transport::Channel;

/// The longest any single step may take before the test fails.
const WAIT: Duration = Duration::from_secs(5);

fn options() -> PlaneOptions {
    PlaneOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..PlaneOptions::default()
    }
}

struct Harness {
    plane: DevPlane,
    http: reqwest::Client,
    url: String,
}

async fn start(options: PlaneOptions) -> Harness {
    // reqwest is built against rustls without a provider; plain http://
    // still needs one installed to build a client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let plane = DevPlane::start(options).await.expect("the plane starts");
    let url = plane.url();
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    Harness { plane, http, url }
}

impl Harness {
    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(format!("{}{path}", self.url)).send().await.unwrap()
    }

    async fn delete(&self, path: &str) -> reqwest::Response {
        self.http.delete(format!("{}{path}", self.url)).send().await.unwrap()
    }

    async fn register(&self, node_id: &str, slots: i32) {
        let body = json!({
            "nodeId": node_id,
            "metadata": {"Region": "local"},
            "capacity": {"slots": slots, "cpu": "4", "memory": "8Gi"},
        });
        let response = self.post("/v1/nodes:register", body).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }

    async fn heartbeat(&self, node_id: &str, state: &str, available_slots: i32) -> reqwest::Response {
        let body = json!({"status": {"state": state, "activeRuns": 0, "availableSlots": available_slots}});
        self.post(&format!("/v1/nodes/{node_id}:heartbeat"), body).await
    }

    async fn submit(&self, body: Value) -> String {
        let response = self.post("/v1/runs", body).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let json: Value = response.json().await.unwrap();
        json["runId"].as_str().expect("a runId").to_string()
    }

    async fn submit_message(&self, message: &str) -> String {
        self.submit(json!({"agentId": "echo", "version": "1", "inputRef": {"message": message}}))
            .await
    }

    async fn run(&self, run_id: &str) -> Value {
        let response = self.get(&format!("/v1/runs/{run_id}")).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    async fn grpc(&self) -> LeaseServiceClient<Channel> {
        let channel = Channel::from_shared(self.url.clone()).unwrap().connect().await.unwrap();
        LeaseServiceClient::new(channel)
    }
}

/// Opens a Pull stream. Like the reference, the plane answers only with
/// the first lease, so a run must be pending for this to return.
async fn pull(client: &mut LeaseServiceClient<Channel>, node_id: &str, max_leases: i32) -> Streaming<Lease> {
    let request = PullRequest {
        node_id: node_id.to_string(),
        max_leases,
    };
    tokio::time::timeout(WAIT, client.pull(request))
        .await
        .expect("a lease within the wait")
        .expect("Pull is accepted")
        .into_inner()
}

async fn next_lease(stream: &mut Streaming<Lease>) -> Lease {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a lease within the wait")
        .expect("the stream is healthy")
        .expect("the stream is still open")
}

fn complete_request(lease: &Lease, node_id: &str) -> CompleteRequest {
    CompleteRequest {
        lease_id: lease.lease_id.clone(),
        run_id: lease.run_id.clone(),
        node_id: node_id.to_string(),
        result: [("message".to_string(), "done".to_string())].into(),
        timings: Some(TimingInfo {
            duration_ms: 30,
            queue_time_ms: 10,
            execution_time_ms: 20,
        }),
        costs: Some(CostInfo {
            tokens_in: 7,
            tokens_out: 9,
            usd_cost: 0.25,
        }),
        sandbox: None,
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

// ---- REST: nodes ---------------------------------------------------------

#[tokio::test]
async fn registering_a_node_answers_201_with_its_location_and_the_node() {
    let h = start(options()).await;
    let body = json!({
        "nodeId": "node-a",
        "metadata": {"Region": "westeurope", "Environment": "dev"},
        "capacity": {"slots": 4, "cpu": "2", "memory": "4Gi"},
    });
    let response = h.post("/v1/nodes:register", body).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["location"], "/v1/nodes/node-a");
    let node: Value = response.json().await.unwrap();
    assert_eq!(node["nodeId"], "node-a");
    // Map keys come back exactly as sent.
    assert_eq!(node["metadata"], json!({"Region": "westeurope", "Environment": "dev"}));
    assert_eq!(node["capacity"], json!({"slots": 4, "cpu": "2", "memory": "4Gi"}));
    // Schedulable before its first heartbeat.
    assert_eq!(
        node["status"],
        json!({"state": "active", "activeRuns": 0, "availableSlots": 4})
    );
    assert!(node["heartbeatAt"].as_str().unwrap().ends_with('Z'), "{node}");
    h.plane.shutdown().await;
}

#[tokio::test]
async fn property_names_are_matched_ignoring_case_and_written_in_camel_case() {
    let h = start(options()).await;
    let body = json!({"NodeId": "node-b", "Capacity": {"Slots": 2, "CPU": "1", "memory": "1Gi"}});
    let response = h.post("/v1/nodes:register", body).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let node: Value = response.json().await.unwrap();
    assert_eq!(node["nodeId"], "node-b");
    assert_eq!(node["capacity"], json!({"slots": 2, "cpu": "1", "memory": "1Gi"}));
    assert_eq!(node["metadata"], json!({}));
    h.plane.shutdown().await;
}

#[tokio::test]
async fn registering_without_a_node_id_is_400_with_the_reference_error() {
    let h = start(options()).await;
    for body in [json!({"nodeId": ""}), json!({"capacity": {"slots": 1}})] {
        let response = h.post("/v1/nodes:register", body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.text().await.unwrap(), r#"{"error":"NodeId is required"}"#);
    }
    h.plane.shutdown().await;
}

#[tokio::test]
async fn registering_an_existing_id_replaces_the_node() {
    let h = start(options()).await;
    h.register("node-a", 2).await;
    h.register("node-a", 6).await;
    let nodes: Value = h.get("/v1/nodes").await.json().await.unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 1);
    assert_eq!(nodes[0]["capacity"]["slots"], 6);
    h.plane.shutdown().await;
}

#[tokio::test]
async fn a_plane_like_the_postgres_reference_answers_500_to_a_known_node_id() {
    let h = start(PlaneOptions {
        reregistration: Reregistration::DuplicateKey,
        ..options()
    })
    .await;
    h.register("node-a", 2).await;
    let body = json!({"nodeId": "node-a", "capacity": {"slots": 6}});
    let again = h.post("/v1/nodes:register", body).await;
    assert_eq!(again.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let error: Value = again.json().await.unwrap();
    assert!(
        error["error"].as_str().unwrap_or_default().contains("duplicate key"),
        "{error}"
    );
    // The plane still knows the node, as it was: a heartbeat is answered.
    assert_eq!(h.heartbeat("node-a", "active", 2).await.status(), StatusCode::OK);
    assert_eq!(h.plane.nodes()[0].capacity.slots, 2);
    h.plane.shutdown().await;
}

#[tokio::test]
async fn a_heartbeat_for_an_unknown_node_is_404_with_an_empty_body() {
    let h = start(options()).await;
    let response = h.heartbeat("ghost", "active", 1).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.text().await.unwrap(), "");
    h.plane.shutdown().await;
}

#[tokio::test]
async fn a_heartbeat_replaces_the_status_and_get_list_and_delete_follow() {
    let h = start(options()).await;
    h.register("node-a", 4).await;
    let before: Value = h.get("/v1/nodes/node-a").await.json().await.unwrap();

    let response = h.heartbeat("node-a", "draining", 0).await;
    assert_eq!(response.status(), StatusCode::OK);
    let node: Value = response.json().await.unwrap();
    assert_eq!(
        node["status"],
        json!({"state": "draining", "activeRuns": 0, "availableSlots": 0})
    );
    assert_ne!(node["heartbeatAt"], before["heartbeatAt"]);

    let fetched = h.get("/v1/nodes/node-a").await;
    assert_eq!(fetched.status(), StatusCode::OK);
    assert_eq!(fetched.json::<Value>().await.unwrap(), node);
    let all: Value = h.get("/v1/nodes").await.json().await.unwrap();
    assert_eq!(all, json!([node]));

    assert_eq!(h.delete("/v1/nodes/node-a").await.status(), StatusCode::NO_CONTENT);
    let gone = h.get("/v1/nodes/node-a").await;
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    assert_eq!(gone.text().await.unwrap(), "");
    assert_eq!(h.delete("/v1/nodes/node-a").await.status(), StatusCode::NOT_FOUND);
    assert_eq!(h.heartbeat("node-a", "active", 1).await.status(), StatusCode::NOT_FOUND);
    h.plane.shutdown().await;
}

// ---- REST: runs ------------------------------------------------------------

#[tokio::test]
async fn a_run_needs_an_agent_id_and_a_version() {
    let h = start(options()).await;
    let cases = [
        (json!({"version": "1"}), r#"{"error":"AgentId is required"}"#),
        (json!({"agentId": "echo"}), r#"{"error":"Version is required"}"#),
    ];
    for (body, error) in cases {
        let response = h.post("/v1/runs", body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.text().await.unwrap(), error);
    }
    let unknown = h.get("/v1/runs/nope").await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(unknown.text().await.unwrap(), "");
    h.plane.shutdown().await;
}

#[tokio::test]
async fn a_submitted_run_is_pending_and_runs_list_in_submission_order() {
    let h = start(options()).await;
    let first = h
        .submit(json!({
            "agentId": "echo",
            "version": "2",
            "inputRef": {"message": "hi"},
            "metadata": {"Tenant": "acme"},
            "budgets": {"maxTokens": 100},
        }))
        .await;
    let second = h.submit_message("second").await;
    let run = h.run(&first).await;
    assert_eq!(run["runId"], first.as_str());
    assert_eq!(run["agentId"], "echo");
    assert_eq!(run["version"], "2");
    assert_eq!(run["status"], "pending");
    assert_eq!(run["nodeId"], Value::Null);
    assert_eq!(run["inputRef"], json!({"message": "hi"}));
    assert_eq!(run["metadata"], json!({"Tenant": "acme"}));
    assert_eq!(
        run["budgets"],
        json!({"maxTokens": 100, "maxDurationSeconds": null, "maxFuel": null, "maxMemoryBytes": null})
    );
    for empty in ["result", "timings", "costs", "errorInfo", "leaseId"] {
        assert_eq!(run[empty], Value::Null, "{empty} in {run}");
    }
    assert_eq!(run["attempts"], 0);
    assert_eq!(run["outcomes"], 0);
    assert!(run["createdAt"].is_string());

    let runs: Value = h.get("/v1/runs").await.json().await.unwrap();
    let ids: Vec<_> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["runId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [first.as_str(), second.as_str()]);
    h.plane.shutdown().await;
}

// ---- gRPC ------------------------------------------------------------------

#[tokio::test]
async fn a_run_is_leased_acked_and_completed_by_a_registered_node() {
    let h = start(options()).await;
    h.register("node-a", 2).await;
    let run_id = h
        .submit(json!({
            "agentId": "echo",
            "version": "1",
            "inputRef": {"message": "{\"invoice\": 7}"},
            "metadata": {"tenant": "acme"},
            "budgets": {"maxTokens": 100, "maxFuel": 5000},
        }))
        .await;
    let mut client = h.grpc().await;
    let mut stream = pull(&mut client, "node-a", 5).await;
    let lease = next_lease(&mut stream).await;

    assert_eq!(lease.run_id, run_id);
    let suffix = lease
        .lease_id
        .strip_prefix(&format!("lease-{run_id}-"))
        .expect("lease-{runId}-{hex}");
    assert_eq!(suffix.len(), 32);
    assert!(suffix.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_eq!(lease.trace_id.len(), 36);
    let ttl_left = lease.deadline_unix_ms - now_unix_ms();
    assert!((295_000..=300_000).contains(&ttl_left), "deadline {ttl_left} ms away");
    let spec = lease.run_spec.clone().unwrap();
    assert_eq!(
        (
            spec.agent_id.as_str(),
            spec.version.as_str(),
            spec.deployment_id.as_str()
        ),
        ("echo", "1", "dev")
    );
    assert_eq!(spec.input_ref["message"], "{\"invoice\": 7}");
    assert_eq!(spec.metadata["tenant"], "acme");
    let budgets = spec.budgets.unwrap();
    // Given budgets pass through; absent ones take the reference's defaults.
    assert_eq!(
        (
            budgets.max_tokens,
            budgets.max_duration_seconds,
            budgets.max_fuel,
            budgets.max_memory_bytes
        ),
        (100, 60, 5000, 0)
    );

    let assigned = h.run(&run_id).await;
    assert_eq!(assigned["status"], "assigned");
    assert_eq!(assigned["nodeId"], "node-a");
    assert_eq!(assigned["leaseId"], lease.lease_id.as_str());

    let ack = AckRequest {
        lease_id: lease.lease_id.clone(),
        node_id: "node-a".into(),
        ack_timestamp_unix_ms: 0,
    };
    let ack = client.ack(ack).await.unwrap().into_inner();
    assert!(ack.success, "{}", ack.message);
    let done = client
        .complete(complete_request(&lease, "node-a"))
        .await
        .unwrap()
        .into_inner();
    assert!(done.success, "{}", done.message);

    let run = h.run(&run_id).await;
    assert_eq!(run["status"], "completed");
    assert_eq!(run["nodeId"], "node-a");
    assert_eq!(run["result"], json!({"message": "done"}));
    assert_eq!(
        run["timings"],
        json!({"durationMs": 30, "queueTimeMs": 10, "executionTimeMs": 20})
    );
    assert_eq!(run["costs"], json!({"tokensIn": 7, "tokensOut": 9, "usdCost": 0.25}));
    assert_eq!(run["errorInfo"], Value::Null);
    assert_eq!(run["attempts"], 1);
    assert_eq!(run["outcomes"], 1);
    assert!(run["ackedAt"].is_string());
    h.plane.shutdown().await;
}

#[tokio::test]
async fn pull_for_an_unknown_node_ends_at_once_with_ok() {
    let h = start(options()).await;
    h.submit_message("waiting").await;
    let mut client = h.grpc().await;
    let mut stream = pull(&mut client, "ghost", 5).await;
    let end = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("ends at once");
    assert!(matches!(end, Ok(None)), "{end:?}");
    assert_eq!(h.plane.runs()[0].status, RunStatus::Pending);
    h.plane.shutdown().await;
}

#[tokio::test]
async fn pull_without_a_node_id_or_with_max_leases_below_1_is_invalid_argument() {
    let h = start(options()).await;
    h.register("node-a", 1).await;
    let mut client = h.grpc().await;
    for (node_id, max_leases) in [("node-a", 0), ("node-a", -3), ("", 5)] {
        let request = PullRequest {
            node_id: node_id.to_string(),
            max_leases,
        };
        let status = tokio::time::timeout(WAIT, client.pull(request))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{node_id:?} {max_leases}: {status}"
        );
    }
    h.plane.shutdown().await;
}

#[tokio::test]
async fn a_draining_node_gets_no_lease_until_it_is_active_again() {
    let h = start(options()).await;
    h.register("node-a", 4).await;
    assert_eq!(h.heartbeat("node-a", "draining", 0).await.status(), StatusCode::OK);
    let run_id = h.submit_message("later").await;

    let mut client = h.grpc().await;
    let waiting = tokio::spawn(async move {
        let mut stream = pull(&mut client, "node-a", 5).await;
        next_lease(&mut stream).await
    });
    // An idle Pull sends nothing, not even headers: the call is still open.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "a draining node must not get a lease");
    assert_eq!(h.run(&run_id).await["status"], "pending");

    // The heartbeat wakes the waiting stream; no 2 s idle poll needed.
    assert_eq!(h.heartbeat("node-a", "active", 4).await.status(), StatusCode::OK);
    let lease = tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap();
    assert_eq!(lease.run_id, run_id);
    h.plane.shutdown().await;
}

#[tokio::test]
async fn max_leases_caps_each_poll_not_the_stream() {
    let h = start(options()).await;
    // One free slot: the cap is not a slot count either, as in the reference.
    h.register("node-a", 1).await;
    let mut submitted = Vec::new();
    for i in 0..5 {
        submitted.push(h.submit_message(&format!("run {i}")).await);
    }
    let mut client = h.grpc().await;
    let mut stream = pull(&mut client, "node-a", 2).await;
    let mut leased = Vec::new();
    for _ in 0..5 {
        leased.push(next_lease(&mut stream).await.run_id);
    }
    // Oldest first, every run once, over several polls.
    assert_eq!(leased, submitted);
    h.plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_pulling_at_once_never_get_the_same_run() {
    const RUNS: usize = 20;
    let h = start(options()).await;
    h.register("node-a", 8).await;
    h.register("node-b", 8).await;
    let (found, mut leases) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let mut pullers = Vec::new();
    for node in ["node-a", "node-b"] {
        let mut client = h.grpc().await;
        let found = found.clone();
        pullers.push(tokio::spawn(async move {
            let request = PullRequest {
                node_id: node.to_string(),
                max_leases: 3,
            };
            let mut stream = client.pull(request).await.unwrap().into_inner();
            while let Ok(Some(lease)) = stream.message().await {
                if found.send((node.to_string(), lease.run_id)).is_err() {
                    break;
                }
            }
        }));
    }
    // Both streams are open and idle before the runs arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..RUNS {
        h.submit_message(&format!("run {i}")).await;
    }
    let mut run_ids = Vec::new();
    while run_ids.len() < RUNS {
        let (_node, run_id) = tokio::time::timeout(WAIT, leases.recv())
            .await
            .expect("all runs leased")
            .unwrap();
        run_ids.push(run_id);
    }
    let unique: HashSet<_> = run_ids.iter().collect();
    assert_eq!(unique.len(), RUNS, "a run was leased twice: {run_ids:?}");
    // Nothing more arrives: no run is leased a second time later.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), leases.recv())
            .await
            .is_err()
    );
    for puller in pullers {
        puller.abort();
    }
    h.plane.shutdown().await;
}

#[tokio::test]
async fn an_expired_lease_requeues_the_run_and_its_complete_is_refused() {
    let h = start(PlaneOptions {
        lease_ttl: Duration::from_millis(400),
        ..options()
    })
    .await;
    h.register("node-a", 1).await;
    let run_id = h.submit_message("slow").await;
    let mut client = h.grpc().await;
    let stale = {
        let mut stream = pull(&mut client, "node-a", 1).await;
        next_lease(&mut stream).await
        // The stream is dropped here: the node "dies" holding the lease.
    };

    let mut run = h.run(&run_id).await;
    for _ in 0..50 {
        if run["status"] == "pending" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        run = h.run(&run_id).await;
    }
    assert_eq!(run["status"], "pending", "{run}");
    assert_eq!(run["nodeId"], Value::Null);
    assert_eq!(run["attempts"], 1);

    let refused = client
        .complete(complete_request(&stale, "node-a"))
        .await
        .unwrap()
        .into_inner();
    assert!(!refused.success);
    assert!(refused.message.contains("stale"), "{}", refused.message);
    let ack = AckRequest {
        lease_id: stale.lease_id.clone(),
        node_id: "node-a".into(),
        ack_timestamp_unix_ms: 0,
    };
    assert!(!client.ack(ack).await.unwrap().into_inner().success);

    // Leased again with a new lease, which is the one that counts.
    let mut stream = pull(&mut client, "node-a", 1).await;
    let fresh = next_lease(&mut stream).await;
    assert_eq!(fresh.run_id, run_id);
    assert_ne!(fresh.lease_id, stale.lease_id);
    let done = client
        .complete(complete_request(&fresh, "node-a"))
        .await
        .unwrap()
        .into_inner();
    assert!(done.success, "{}", done.message);
    let run = h.run(&run_id).await;
    assert_eq!((run["attempts"].as_u64(), run["outcomes"].as_u64()), (Some(2), Some(1)));
    h.plane.shutdown().await;
}

#[tokio::test]
async fn a_report_from_a_node_that_does_not_hold_the_run_is_refused() {
    let h = start(options()).await;
    h.register("node-a", 1).await;
    h.register("node-b", 1).await;
    let run_id = h.submit_message("mine").await;
    let mut client = h.grpc().await;
    let mut stream = pull(&mut client, "node-a", 1).await;
    let lease = next_lease(&mut stream).await;

    let refused = client
        .complete(complete_request(&lease, "node-b"))
        .await
        .unwrap()
        .into_inner();
    assert!(!refused.success);
    assert!(refused.message.contains("held by node node-a"), "{}", refused.message);
    let fail = FailRequest {
        lease_id: lease.lease_id.clone(),
        run_id: run_id.clone(),
        node_id: "node-b".into(),
        error_message: "not mine".into(),
        ..FailRequest::default()
    };
    assert!(!client.fail(fail).await.unwrap().into_inner().success);
    let missing = CompleteRequest {
        run_id: String::new(),
        ..complete_request(&lease, "node-a")
    };
    let missing = client.complete(missing).await.unwrap().into_inner();
    assert_eq!(
        (missing.success, missing.message.as_str()),
        (false, "run_id is required")
    );
    let unknown = CompleteRequest {
        run_id: "nope".into(),
        ..complete_request(&lease, "node-a")
    };
    assert!(!client.complete(unknown).await.unwrap().into_inner().success);

    let run = h.run(&run_id).await;
    assert_eq!(
        (run["status"].as_str(), run["outcomes"].as_u64()),
        (Some("assigned"), Some(0))
    );
    h.plane.shutdown().await;
}

#[tokio::test]
async fn fail_records_the_error_echoes_retryable_and_does_not_requeue() {
    let h = start(options()).await;
    h.register("node-a", 1).await;
    let run_id = h.submit_message("doomed").await;
    let mut client = h.grpc().await;
    let mut stream = pull(&mut client, "node-a", 1).await;
    let lease = next_lease(&mut stream).await;

    for retryable in [true, false] {
        let fail = FailRequest {
            lease_id: lease.lease_id.clone(),
            run_id: run_id.clone(),
            node_id: "node-a".into(),
            error_message: "budget.fuel".into(),
            error_details: "ran out after 1000 units".into(),
            timings: Some(TimingInfo {
                duration_ms: 5,
                queue_time_ms: 1,
                execution_time_ms: 4,
            }),
            retryable,
            sandbox: None,
        };
        let answer = client.fail(fail).await.unwrap().into_inner();
        assert!(answer.success, "{}", answer.message);
        assert_eq!(answer.should_retry, retryable);
    }
    let run = h.run(&run_id).await;
    assert_eq!(run["status"], "failed");
    assert_eq!(
        run["errorInfo"],
        json!({"errorMessage": "budget.fuel", "errorDetails": "ran out after 1000 units", "retryable": false})
    );
    assert_eq!(run["result"], Value::Null);
    assert_eq!(run["timings"]["executionTimeMs"], 4);
    // Repeated reports overwrite, as in the reference, and are counted.
    assert_eq!(run["outcomes"], 2);
    // No second lease arrives for a failed run.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.message())
            .await
            .is_err()
    );
    h.plane.shutdown().await;
}

// ---- persistence and shutdown ----------------------------------------------

#[tokio::test]
async fn runs_and_their_outcomes_survive_a_restart_with_the_same_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let with_dir = || PlaneOptions {
        data_dir: Some(dir.path().to_path_buf()),
        ..options()
    };

    let h = start(with_dir()).await;
    h.register("node-a", 2).await;
    let finished = h.submit_message("first").await;
    let held = h.submit_message("second").await;
    let mut client = h.grpc().await;
    let mut stream = pull(&mut client, "node-a", 1).await;
    let first = next_lease(&mut stream).await;
    let second = next_lease(&mut stream).await;
    assert_eq!(
        (first.run_id.as_str(), second.run_id.as_str()),
        (finished.as_str(), held.as_str())
    );
    assert!(
        client
            .complete(complete_request(&first, "node-a"))
            .await
            .unwrap()
            .into_inner()
            .success
    );
    drop(stream);
    h.plane.shutdown().await;

    let h = start(with_dir()).await;
    let run = h.run(&finished).await;
    assert_eq!(run["status"], "completed");
    assert_eq!(run["result"], json!({"message": "done"}));
    assert_eq!(run["outcomes"], 1);
    // The other run is still assigned on its old lease, deadline unchanged.
    let run = h.run(&held).await;
    assert_eq!(run["status"], "assigned");
    assert_eq!(run["leaseId"], second.lease_id.as_str());
    assert_eq!(run["leaseDeadlineUnixMs"], second.deadline_unix_ms);
    // Nodes are not kept: the node learns it must register again.
    assert_eq!(h.heartbeat("node-a", "active", 2).await.status(), StatusCode::NOT_FOUND);
    h.register("node-a", 2).await;
    let mut client = h.grpc().await;
    let done = client
        .complete(complete_request(&second, "node-a"))
        .await
        .unwrap()
        .into_inner();
    assert!(done.success, "{}", done.message);
    h.plane.shutdown().await;
}

#[tokio::test]
async fn an_acknowledged_outcome_is_on_disk_before_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let with_dir = || PlaneOptions {
        data_dir: Some(dir.path().to_path_buf()),
        ..options()
    };
    let h = start(with_dir()).await;
    h.register("node-a", 1).await;
    let run_id = h.submit_message("durable").await;
    let mut client = h.grpc().await;
    let mut stream = pull(&mut client, "node-a", 1).await;
    let lease = next_lease(&mut stream).await;
    assert!(
        client
            .complete(complete_request(&lease, "node-a"))
            .await
            .unwrap()
            .into_inner()
            .success
    );

    // The data dir is the first plane's while it runs: a second one is
    // refused, with the file and what to do.
    let refused = DevPlane::start(with_dir()).await.err().expect("the data dir is in use");
    let message = refused.to_string();
    assert!(
        message.contains("runs.redb") && message.contains("another data dir"),
        "{message}"
    );
    // A copy of the database, taken while the first plane still runs and
    // has closed nothing, is what a SIGKILL would leave behind.
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("runs.redb"), copy.path().join("runs.redb")).unwrap();
    let reader = start(PlaneOptions {
        data_dir: Some(copy.path().to_path_buf()),
        ..options()
    })
    .await;
    let run = reader.run(&run_id).await;
    assert_eq!(
        (run["status"].as_str(), run["outcomes"].as_u64()),
        (Some("completed"), Some(1))
    );
    reader.plane.shutdown().await;
    drop(stream);
    h.plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_submissions_survive_a_restart_and_page_through_once_each() {
    const RUNS: usize = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let with_dir = || PlaneOptions {
        data_dir: Some(dir.path().to_path_buf()),
        ..options()
    };
    let h = start(with_dir()).await;
    let mut submitted = Vec::with_capacity(RUNS);
    for i in 0..RUNS {
        submitted.push(h.submit_message(&format!("run {i}")).await);
    }
    h.plane.shutdown().await;

    let h = start(with_dir()).await;
    // Without a limit: the first 1,000, and a link to the rest.
    let first = h.get("/v1/runs").await;
    let link = first.headers()["link"].to_str().unwrap().to_string();
    let page: Value = first.json().await.unwrap();
    assert_eq!(page.as_array().unwrap().len(), 1_000);
    assert_eq!(
        link,
        format!("</v1/runs?limit=1000&after={}>; rel=\"next\"", submitted[999])
    );
    // Pages of 300, each from the link of the one before, hold every run
    // once, in submission order; the last has no link.
    let mut listed: Vec<String> = Vec::new();
    let mut next = Some("/v1/runs?limit=300".to_string());
    for _ in 0..RUNS / 300 + 2 {
        let Some(path) = next.take() else { break };
        let response = h.get(&path).await;
        assert_eq!(response.status(), StatusCode::OK);
        next = response.headers().get("link").map(|link| {
            let link = link.to_str().unwrap();
            link[1..link.find('>').unwrap()].to_string()
        });
        let page: Value = response.json().await.unwrap();
        let page = page.as_array().unwrap();
        assert!(!page.is_empty() && page.len() <= 300, "{} runs in a page", page.len());
        listed.extend(page.iter().map(|run| run["runId"].as_str().unwrap().to_string()));
    }
    assert!(next.is_none(), "the pages did not end");
    assert_eq!(listed, submitted);
    h.plane.shutdown().await;
}

#[tokio::test]
async fn paging_parameters_out_of_bounds_get_a_400_that_names_them() {
    let h = start(options()).await;
    let id = h.submit_message("one").await;
    let cases = [
        ("/v1/runs?limit=0", "limit must be a whole number from 1 to 10000"),
        ("/v1/runs?limit=10001", "limit must be a whole number from 1 to 10000"),
        ("/v1/runs?limit=ten", "limit must be a whole number from 1 to 10000"),
        ("/v1/runs?after=no-such-run", "after: no run no-such-run"),
        ("/v1/runs?page=2", "GET /v1/runs takes limit and after"),
    ];
    for (path, error) in cases {
        let response = h.get(path).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains(error), "{path}: {body}");
    }
    let after_the_last = h.get(&format!("/v1/runs?after={id}")).await;
    assert!(after_the_last.headers().get("link").is_none());
    assert_eq!(after_the_last.json::<Value>().await.unwrap(), json!([]));
    h.plane.shutdown().await;
}

#[tokio::test]
async fn ids_over_128_bytes_or_outside_the_url_safe_set_get_a_400_that_names_the_field_and_the_bound() {
    let h = start(options()).await;
    let long = "a".repeat(129);
    let cases = [
        (
            "/v1/runs",
            json!({"agentId": long, "version": "1"}),
            "AgentId",
            "got 129 bytes",
        ),
        (
            "/v1/runs",
            json!({"agentId": "echo\nforged", "version": "1"}),
            "AgentId",
            "at byte 4",
        ),
        (
            "/v1/runs",
            json!({"agentId": "echo", "version": "../1"}),
            "Version",
            "at byte 2",
        ),
        (
            "/v1/runs",
            json!({"agentId": "..", "version": "1"}),
            "AgentId",
            "got \"..\"",
        ),
        (
            "/v1/nodes:register",
            json!({"nodeId": "a/b", "capacity": {"slots": 1}}),
            "NodeId",
            "at byte 1",
        ),
        (
            "/v1/nodes:register",
            json!({"nodeId": "n".repeat(1_000), "capacity": {"slots": 1}}),
            "NodeId",
            "got 1000 bytes",
        ),
    ];
    for (path, body, field, problem) in cases {
        let response = h.post(path, body.clone()).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let answer: Value = response.json().await.unwrap();
        let error = answer["error"].as_str().unwrap();
        assert!(
            error.starts_with(&format!("{field} must be at most 128 bytes")) && error.contains(problem),
            "{body}: {error}"
        );
    }
    assert!(h.plane.runs().is_empty() && h.plane.nodes().is_empty());
    // At the bound, with every allowed character (and `+` in a version).
    let at_bound = format!("{}-_.~", "A9".repeat(62));
    assert_eq!(at_bound.len(), 128);
    h.submit(json!({"agentId": at_bound, "version": "1.0.0-rc.1+build.7"}))
        .await;
    h.register(&at_bound, 1).await;
    h.plane.shutdown().await;
}

#[tokio::test]
async fn a_connection_that_never_completes_its_request_headers_is_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start(PlaneOptions {
        header_read_timeout: Duration::from_millis(500),
        ..options()
    })
    .await;
    let addr = h.plane.local_addr();
    // Half a request; nothing at all; a first request answered, then half
    // of a second one on the same connection.
    let half = format!("POST /v1/runs HTTP/1.1\r\nHost: {addr}\r\nContent-Type: applica");
    let whole_then_half =
        format!("GET /v1/runs HTTP/1.1\r\nHost: {addr}\r\n\r\nGET /v1/runs HTTP/1.1\r\nHost: {addr}\r\n");
    for sent in [half.as_str(), "", whole_then_half.as_str()] {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(sent.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        // Closed by the plane: read_to_end ends (or the socket is reset).
        let ended = tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut answer)).await;
        assert!(ended.is_ok(), "{sent:?}: the connection is still open after 20 s");
        let answers = String::from_utf8_lossy(&answer).matches("HTTP/1.1 200").count();
        assert_eq!(answers, usize::from(sent == whole_then_half), "{sent:?}");
    }
    // The plane still serves everyone else.
    assert_eq!(h.get("/v1/runs").await.status(), StatusCode::OK);
    h.plane.shutdown().await;
}

/// The header-read timer is for connections that never complete a
/// request: one in use (a request every 100 ms, for three times the
/// timeout) stays open and every request is answered.
#[tokio::test]
async fn a_connection_in_use_outlives_the_header_read_timeout() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let h = start(PlaneOptions {
        header_read_timeout: Duration::from_millis(500),
        ..options()
    })
    .await;
    let addr = h.plane.local_addr();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tcp = tokio::io::BufReader::new(tcp);
    for n in 0..15 {
        let request = format!("GET /v1/runs HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        tcp.get_mut().write_all(request.as_bytes()).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            let mut length = 0;
            let mut status = String::new();
            tcp.read_line(&mut status).await.ok()?;
            loop {
                let mut line = String::new();
                if tcp.read_line(&mut line).await.ok()? == 0 {
                    return None;
                }
                if line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().ok()?;
                }
            }
            let mut body = vec![0; length];
            tcp.read_exact(&mut body).await.ok()?;
            Some(status)
        })
        .await
        .expect("an answer within 10 s");
        let status = answer.unwrap_or_else(|| panic!("request {n}: the plane closed a connection in use"));
        assert!(status.starts_with("HTTP/1.1 200"), "request {n}: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.plane.shutdown().await;
}

#[tokio::test]
async fn a_runs_json_left_by_an_older_plane_is_imported_once() {
    // An older plane's file: the run as the REST API shows it.
    let memory = start(options()).await;
    let id = memory.submit_message("from the old file").await;
    let run = memory.run(&id).await;
    memory.plane.shutdown().await;
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("runs.json");
    std::fs::write(&legacy, json!({"format": 1, "runs": [run]}).to_string()).unwrap();

    let with_dir = || PlaneOptions {
        data_dir: Some(dir.path().to_path_buf()),
        ..options()
    };
    for _ in 0..2 {
        let h = start(with_dir()).await;
        assert_eq!(h.run(&id).await["inputRef"]["message"], "from the old file");
        assert_eq!(h.plane.runs().len(), 1);
        h.plane.shutdown().await;
        assert!(!legacy.exists());
        assert!(dir.path().join("runs.json.imported").exists());
    }

    // Copied back over a database that has runs: refused, not merged.
    std::fs::copy(dir.path().join("runs.json.imported"), &legacy).unwrap();
    let message = DevPlane::start(with_dir()).await.err().expect("refused").to_string();
    assert!(message.contains("runs.json") && message.contains("move"), "{message}");
}

#[tokio::test]
async fn a_second_plane_on_a_taken_port_says_which_address_and_what_to_do() {
    let h = start(options()).await;
    let taken = PlaneOptions {
        listen: h.plane.local_addr(),
        ..options()
    };
    let err = DevPlane::start(taken).await.err().expect("the port is taken");
    let message = err.to_string();
    assert!(message.contains(&h.plane.local_addr().to_string()), "{message}");
    assert!(message.contains("--listen 127.0.0.1:0"), "{message}");
    h.plane.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_open_and_waiting_pull_streams_cleanly() {
    let h = start(options()).await;
    h.register("node-a", 1).await;
    h.register("node-b", 1).await;
    h.submit_message("one").await;
    let mut client = h.grpc().await;
    let mut open = pull(&mut client, "node-a", 1).await;
    next_lease(&mut open).await;
    let mut idle_client = h.grpc().await;
    let waiting = tokio::spawn(async move {
        let request = PullRequest {
            node_id: "node-b".into(),
            max_leases: 1,
        };
        let mut stream = idle_client.pull(request).await?.into_inner();
        stream.message().await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    tokio::time::timeout(WAIT, h.plane.shutdown())
        .await
        .expect("shutdown is bounded");
    let end = tokio::time::timeout(WAIT, open.message()).await.unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
    let end = tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
}

#[tokio::test]
async fn unknown_paths_are_404_and_post_to_a_node_without_an_action_is_405() {
    let h = start(options()).await;
    h.register("node-a", 1).await;
    assert_eq!(h.get("/v1/elsewhere").await.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        h.post("/v1/nodes/node-a", json!({})).await.status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
    let bad = h
        .http
        .post(format!("{}/v1/runs", h.url))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let error: Value = bad.json().await.unwrap();
    assert!(error["error"].as_str().unwrap().contains("not valid JSON"), "{error}");
    h.plane.shutdown().await;
}

// ---- safe on a laptop: JSON only, the Host check, failed saves -------------

/// Sends `request` (a whole HTTP/1.1 request, `{addr}` replaced by the
/// plane's address) on a fresh connection; returns the status and body.
async fn raw_http(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = request
        .replace("{addr}", &addr.to_string())
        .replace("{port}", &addr.port().to_string());
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
        .await
        .expect("the plane answers and closes")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_string();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_string();
    (status, body)
}

/// A one-shot `GET path` with this `Host` header.
fn get_with_host(path: &str, host: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
}

#[tokio::test]
async fn the_lease_service_serves_no_web_page() {
    let h = start(options()).await;
    h.register("dev-node-1", 1).await;
    let run_id = h.submit_message("pending").await;
    // What a page can send without a preflight (HTTP/1.1, text/plain), and
    // a gRPC content type from a page (it carries Origin).
    for headers in [
        &[("content-type", "text/plain")][..],
        &[("content-type", "application/grpc"), ("origin", "https://evil.example")],
    ] {
        let mut request = h
            .http
            .post(format!("{}/lease.LeaseService/Pull", h.url))
            .body(b"\0\0\0\0\x0e\x0a\x0adev-node-1\x10\x01".to_vec());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = tokio::time::timeout(WAIT, request.send())
            .await
            .expect("answered at once")
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{headers:?}");
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        h.run(&run_id).await["status"],
        "pending",
        "no lease was handed to the page"
    );
    // A gRPC client is served.
    let mut stream = pull(&mut h.grpc().await, "dev-node-1", 1).await;
    assert_eq!(next_lease(&mut stream).await.run_id, run_id);
}

#[tokio::test]
async fn a_post_without_a_json_content_type_is_415_and_names_the_header_to_send() {
    let h = start(options()).await;
    let run = r#"{"agentId": "echo", "version": "1", "inputRef": {"message": "from a web page"}}"#;
    let register = r#"{"nodeId": "node-a", "capacity": {"slots": 1}}"#;
    let heartbeat = r#"{"status": {"state": "active", "activeRuns": 0, "availableSlots": 1}}"#;
    // What a web page can send without a CORS preflight, and no type at all.
    for content_type in [
        Some("text/plain"),
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/jsonp"),
        None,
    ] {
        for (path, body) in [
            ("/v1/runs", run),
            ("/v1/nodes:register", register),
            ("/v1/nodes/node-a:heartbeat", heartbeat),
        ] {
            let mut request = h.http.post(format!("{}{path}", h.url)).body(body);
            if let Some(content_type) = content_type {
                request = request.header("content-type", content_type);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "POST {path} with {content_type:?}"
            );
            let error: Value = response.json().await.unwrap();
            let message = error["error"].as_str().unwrap_or_default();
            assert!(
                message.contains("Content-Type: application/json"),
                "names the header to send: {error}"
            );
        }
    }
    assert!(h.plane.runs().is_empty(), "no run was created");
    assert!(h.plane.nodes().is_empty(), "no node was registered");

    // Parameters and any case are fine.
    for content_type in ["application/json; charset=utf-8", "Application/JSON"] {
        let response = h
            .http
            .post(format!("{}/v1/runs", h.url))
            .header("content-type", content_type)
            .body(run)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "{content_type}");
    }
    assert_eq!(h.plane.runs().len(), 2);
    h.plane.shutdown().await;
}

#[tokio::test]
async fn a_request_for_another_host_name_is_refused_so_dns_rebinding_reads_nothing() {
    let h = start(options()).await;
    h.submit_message("secret input").await;

    // A page on attacker.example whose name now resolves to 127.0.0.1.
    for host in [
        "attacker.example:{port}",
        "attacker.example",
        "localhost.attacker.example:{port}",
        "127.0.0.1.nip.io:{port}",
    ] {
        let (status, body) = raw_http(h.plane.local_addr(), &get_with_host("/v1/runs", host)).await;
        assert_eq!(status, 421, "Host {host}: {body}");
        assert!(!body.contains("secret input"), "{body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        let message = error["error"].as_str().unwrap_or_default();
        assert!(
            message.contains("attacker.example") || message.contains("nip.io"),
            "names the host: {message}"
        );
        assert!(message.contains("--allow-host"), "names the fix: {message}");
    }
    let run = r#"{"agentId": "echo", "version": "1"}"#;
    let post = format!(
        "POST /v1/runs HTTP/1.1\r\nHost: attacker.example:{{port}}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{run}",
        run.len()
    );
    assert_eq!(raw_http(h.plane.local_addr(), &post).await.0, 421);
    assert_eq!(h.plane.runs().len(), 1, "the refused POST created nothing");
    // The right name with another port is someone else's address too, and
    // a request must name a host.
    assert_eq!(
        raw_http(h.plane.local_addr(), &get_with_host("/v1/runs", "localhost:1"))
            .await
            .0,
        421
    );
    let (status, _) = raw_http(h.plane.local_addr(), "GET /v1/runs HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 421, "no Host");

    // The loopback plane's own names, as curl and browsers send them.
    for host in [
        "127.0.0.1:{port}",
        "localhost:{port}",
        "LocalHost:{port}",
        "localhost.:{port}",
        "[::1]:{port}",
    ] {
        let (status, body) = raw_http(h.plane.local_addr(), &get_with_host("/v1/runs", host)).await;
        assert_eq!(status, 200, "Host {host}: {body}");
        assert!(body.contains("secret input"), "{body}");
    }
    h.plane.shutdown().await;
}

#[tokio::test]
async fn grpc_is_served_through_localhost_and_127_0_0_1_and_refused_for_another_authority() {
    let h = start(options()).await;
    h.register("node-a", 1).await;
    let port = h.plane.local_addr().port();
    let ack = AckRequest {
        lease_id: "lease-unknown".to_string(),
        node_id: "node-a".to_string(),
        ack_timestamp_unix_ms: 1,
    };
    for url in [format!("http://localhost:{port}"), format!("http://127.0.0.1:{port}")] {
        let channel = Channel::from_shared(url.clone()).unwrap().connect().await.unwrap();
        let answer = LeaseServiceClient::new(channel).ack(ack.clone()).await;
        let answer = answer.unwrap_or_else(|status| panic!("{url}: {status:?}")).into_inner();
        assert!(!answer.success, "served (an unknown lease): {answer:?}");
    }
    let rebound = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .origin(format!("http://attacker.example:{port}").parse().unwrap())
        .connect()
        .await
        .unwrap();
    let refused = LeaseServiceClient::new(rebound).ack(ack).await.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("attacker.example"), "{refused:?}");
    h.plane.shutdown().await;
}

#[tokio::test]
async fn a_failed_save_answers_503_naming_the_file_and_queues_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(PlaneOptions {
        data_dir: Some(dir.path().to_path_buf()),
        ..options()
    })
    .await;
    h.register("node-a", 4).await;
    let kept = h.submit_message("saved").await;

    // Every write to the database fails, as on a full or failing disk.
    let runs_file = dir.path().join("runs.redb");
    h.plane.fail_disk_writes(true);

    let response = h
        .post(
            "/v1/runs",
            json!({"agentId": "echo", "version": "1", "inputRef": {"message": "lost"}}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let error: Value = response.json().await.unwrap();
    let message = error["error"].as_str().unwrap_or_default();
    assert!(
        message.contains(&runs_file.display().to_string()),
        "names the file: {message}"
    );
    assert!(message.contains("writable"), "names the fix: {message}");
    let runs: Value = h.get("/v1/runs").await.json().await.unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 1, "the refused run is not kept: {runs}");
    assert_eq!(h.plane.runs().len(), 1);

    // A lease that cannot be saved is not handed out either.
    let mut client = h.grpc().await;
    let request = PullRequest {
        node_id: "node-a".to_string(),
        max_leases: 4,
    };
    let pulled = tokio::time::timeout(WAIT, client.pull(request.clone()))
        .await
        .expect("answered at once");
    assert_eq!(pulled.err().map(|status| status.code()), Some(tonic::Code::Unavailable));
    assert_eq!(h.plane.run(&kept).unwrap().status, RunStatus::Pending);

    // Fixed: the plane goes on where it was, without the refused run.
    h.plane.fail_disk_writes(false);
    let later = h.submit_message("after the fix").await;
    let mut stream = pull(&mut client, "node-a", 4).await;
    let leased = [
        next_lease(&mut stream).await.run_id,
        next_lease(&mut stream).await.run_id,
    ];
    assert_eq!(leased, [kept.clone(), later.clone()]);
    drop(stream);
    h.plane.shutdown().await;
    // And the disk holds exactly that.
    let h = start(PlaneOptions {
        data_dir: Some(dir.path().to_path_buf()),
        ..options()
    })
    .await;
    let saved: Vec<String> = h.plane.runs().into_iter().map(|run| run.run_id).collect();
    assert_eq!(saved, [kept.clone(), later.clone()]);
    assert_eq!(h.plane.run(&kept).unwrap().status, RunStatus::Assigned);
    h.plane.shutdown().await;
}

#[tokio::test]
async fn dev_refuses_to_listen_beyond_loopback_without_tls_unless_told_and_then_warns() {
    let binary = env!("CARGO_BIN_EXE_node-runtime");
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(binary)
            .args(["dev", "--plane-only", "--listen", "0.0.0.0:0"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("refused at once")
    .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    for named in ["--listen 0.0.0.0:0", "--tls-dir", "--insecure-listen"] {
        assert!(stderr.contains(named), "names {named}: {stderr}");
    }

    // Told: it serves, says loudly what that means, and a name still
    // needs allowing (IP addresses are any of the machine's).
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("dev.log");
    let _dev = tokio::process::Command::new(binary)
        .args(["dev", "--plane-only", "--listen", "0.0.0.0:0", "--insecure-listen"])
        .args(["--allow-host", "devbox.example"])
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let url = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(url) = text
            .lines()
            .find_map(|line| line.strip_prefix("dev control plane listening on "))
            .and_then(|rest| rest.split_whitespace().next())
        {
            break url.to_string();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no URL announced: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("WARNING: --insecure-listen"), "{text}");
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    for (host, status) in [
        ("devbox.example:{port}", 200),
        ("192.0.2.7:{port}", 200),
        ("localhost:{port}", 200),
        ("attacker.example:{port}", 421),
    ] {
        assert_eq!(
            raw_http(addr, &get_with_host("/v1/runs", host)).await.0,
            status,
            "Host {host}"
        );
    }
}

// ---- the agent API -----------------------------------------------------------

/// An agent in the reference's format, valid as a version's spec.
fn agent_spec(name: &str) -> Value {
    json!({
        "name": name,
        "description": "classifies invoices",
        "instructions": "Classify the invoice.",
        "modelProfile": {"model": "stub-echo", "temperature": 0.2, "maxTokens": 300},
        "budget": {"maxTokens": 2000, "maxDurationSeconds": 30},
        "tools": ["http-post"],
        "input": {"type": "ServiceBus", "config": {"queue": "invoices"}},
        "output": {"type": "Http", "config": {"endpoint": "http://127.0.0.1:9/x", "method": "POST"}},
        "metadata": {"Owner": "finance"},
    })
}

impl Harness {
    async fn put(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .put(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Creates an agent; returns its id.
    async fn create_agent(&self, name: &str) -> String {
        let response = self.post("/v1/agents", agent_spec(name)).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let agent: Value = response.json().await.unwrap();
        agent["agentId"].as_str().unwrap().to_string()
    }

    async fn add_version(&self, agent_id: &str, version: &str, spec: Value) -> reqwest::Response {
        self.post(
            &format!("/v1/agents/{agent_id}:version"),
            json!({"version": version, "spec": spec}),
        )
        .await
    }
}

async fn error_of(response: reqwest::Response) -> Value {
    response.json().await.unwrap()
}

#[tokio::test]
async fn creating_an_agent_is_201_with_a_server_generated_id_and_a_missing_name_is_400() {
    let h = start(options()).await;
    let mut body = agent_spec("Invoice classifier");
    body["agentId"] = json!("chosen-by-the-client");
    let response = h.post("/v1/agents", body).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let agent: Value = response.json().await.unwrap();
    let agent_id = agent["agentId"].as_str().unwrap();
    assert_ne!(agent_id, "chosen-by-the-client", "agentId is ignored");
    assert_eq!(agent_id.len(), 36, "a hyphenated GUID: {agent_id}");
    assert!(uuid_like(agent_id), "{agent_id}");
    assert_eq!(location, format!("/v1/agents/{agent_id}"));
    assert_eq!(agent["name"], "Invoice classifier");
    assert_eq!(agent["modelProfile"]["temperature"], 0.2);
    assert_eq!(agent["output"]["type"], "Http");
    assert_eq!(agent["metadata"], json!({"Owner": "finance"}));

    // The reference's names, matched ignoring case; absent values are null.
    let response = h.post("/v1/agents", json!({"NAME": "minimal"})).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let minimal: Value = response.json().await.unwrap();
    assert_eq!(minimal["name"], "minimal");
    assert_eq!(minimal["instructions"], Value::Null);
    assert_eq!(minimal["tools"], json!([]));

    for nameless in [
        json!({}),
        json!({"name": ""}),
        json!({"name": "  ", "instructions": "x"}),
    ] {
        let response = h.post("/v1/agents", nameless).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.text().await.unwrap(), r#"{"error":"Name is required"}"#);
    }
    let response = h
        .post("/v1/agents", json!({"name": "x", "budget": {"maxTokens": "lots"}}))
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        error_of(response).await["error"],
        "budget.maxTokens must be a whole number"
    );

    let listed: Value = h.get("/v1/agents").await.json().await.unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    h.plane.shutdown().await;
}

fn uuid_like(id: &str) -> bool {
    let groups: Vec<usize> = id.split('-').map(str::len).collect();
    groups == [8, 4, 4, 4, 12] && id.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
}

#[tokio::test]
async fn an_agent_is_read_updated_in_part_and_deleted_and_an_unknown_id_is_404() {
    let h = start(options()).await;
    let agent_id = h.create_agent("before").await;
    let read: Value = h.get(&format!("/v1/agents/{agent_id}")).await.json().await.unwrap();
    assert_eq!(read["name"], "before");

    let response = h
        .put(
            &format!("/v1/agents/{agent_id}"),
            json!({"name": "after", "agentId": "ignored"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let updated: Value = response.json().await.unwrap();
    assert_eq!(updated["agentId"], agent_id.as_str());
    assert_eq!(updated["name"], "after");
    assert_eq!(
        updated["instructions"], "Classify the invoice.",
        "what the update leaves out is kept"
    );
    assert_eq!(updated["budget"], json!({"maxTokens": 2000, "maxDurationSeconds": 30}));
    let response = h.put(&format!("/v1/agents/{agent_id}"), json!({"name": ""})).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    for (response, what) in [
        (h.get("/v1/agents/no-such-agent").await, "GET"),
        (h.put("/v1/agents/no-such-agent", json!({"name": "x"})).await, "PUT"),
        (h.delete("/v1/agents/no-such-agent").await, "DELETE"),
        (h.get("/v1/agents/no-such-agent/versions").await, "GET versions"),
        (
            h.get(&format!("/v1/agents/{agent_id}/versions/9.9.9")).await,
            "GET version",
        ),
        (
            h.delete(&format!("/v1/agents/{agent_id}/versions/9.9.9")).await,
            "DELETE version",
        ),
    ] {
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{what}");
        assert_eq!(response.text().await.unwrap(), "", "{what}: an empty body");
    }
    // A POST to an agent without `:version` is not a route (as for nodes).
    let response = h.post(&format!("/v1/agents/{agent_id}"), json!({})).await;
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    // JSON only, as every POST.
    let response = h
        .http
        .post(format!("{}/v1/agents", h.url))
        .header("content-type", "text/plain")
        .body(r#"{"name": "x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    assert_eq!(
        h.delete(&format!("/v1/agents/{agent_id}")).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        h.get(&format!("/v1/agents/{agent_id}")).await.status(),
        StatusCode::NOT_FOUND
    );
    h.plane.shutdown().await;
}

#[tokio::test]
async fn a_version_is_201_with_its_location_and_reads_back_with_its_spec_and_created_at() {
    let h = start(options()).await;
    let agent_id = h.create_agent("classifier").await;
    let response = h.add_version(&agent_id, "1.0.0", agent_spec("classifier")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response.headers()["location"],
        format!("/v1/agents/{agent_id}/versions/1.0.0").as_str()
    );
    let created: Value = response.json().await.unwrap();
    let read: Value = h
        .get(&format!("/v1/agents/{agent_id}/versions/1.0.0"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(read, created);
    let fields: Vec<&str> = read.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(fields, ["agentId", "createdAt", "spec", "version"]);
    assert_eq!(read["agentId"], agent_id.as_str());
    assert_eq!(read["version"], "1.0.0");
    assert_eq!(read["spec"]["instructions"], "Classify the invoice.");
    assert_eq!(
        read["spec"]["input"],
        json!({"type": "ServiceBus", "config": {"queue": "invoices"}})
    );
    assert_eq!(read["spec"]["agentId"], agent_id.as_str());
    let created_at = read["createdAt"].as_str().unwrap();
    assert!(
        created_at.ends_with('Z') && humantime::parse_rfc3339(created_at).is_ok(),
        "RFC 3339 UTC: {created_at}"
    );

    // Pre-release and build metadata are semver too.
    let response = h
        .add_version(&agent_id, "1.1.0-beta.1+build.7", agent_spec("classifier"))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response.headers()["location"],
        format!("/v1/agents/{agent_id}/versions/1.1.0-beta.1+build.7").as_str()
    );
    let versions: Value = h
        .get(&format!("/v1/agents/{agent_id}/versions"))
        .await
        .json()
        .await
        .unwrap();
    let listed: Vec<&str> = versions
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["1.0.0", "1.1.0-beta.1+build.7"]);

    assert_eq!(
        h.delete(&format!("/v1/agents/{agent_id}/versions/1.0.0"))
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        h.get(&format!("/v1/agents/{agent_id}/versions/1.0.0")).await.status(),
        StatusCode::NOT_FOUND
    );
    h.plane.shutdown().await;
}

#[tokio::test]
async fn a_bad_version_or_spec_is_400_and_an_unknown_agent_or_a_taken_version_is_409() {
    let h = start(options()).await;
    let agent_id = h.create_agent("classifier").await;

    let missing = h
        .post(
            &format!("/v1/agents/{agent_id}:version"),
            json!({"spec": agent_spec("x")}),
        )
        .await;
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_of(missing).await["error"], "Version is required");
    for bad in ["1.0", "v1.0.0", "01.0.0", "1.0.0-", "1.0.0+a..b"] {
        let response = h.add_version(&agent_id, bad, agent_spec("x")).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
        let error = error_of(response).await;
        assert!(
            error["error"].as_str().unwrap().contains("not a semantic version"),
            "{bad}: {error}"
        );
    }

    let mut spec = agent_spec("");
    spec["instructions"] = json!("");
    spec["budget"] = json!({"maxTokens": 0, "maxDurationSeconds": 7200});
    spec["tools"] = json!(["http-post", "http-post", " "]);
    spec["input"] = json!({"type": "ftp"});
    let response = h.add_version(&agent_id, "1.0.0", spec).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let error = error_of(response).await;
    assert_eq!(error["error"], "Spec validation failed");
    let errors: Vec<&str> = error["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), 7, "{errors:?}");
    for named in [
        "Name is required",
        "Instructions are required",
        "Budget.MaxTokens",
        "Budget.MaxDurationSeconds",
        "Input.Type \"ftp\"",
        "more than once",
        "blank",
    ] {
        assert!(errors.iter().any(|e| e.contains(named)), "{named}: {errors:?}");
    }
    // The reference's own spellings and its validator's are both accepted.
    let mut lower = agent_spec("x");
    lower["input"]["type"] = json!("service-bus");
    lower["output"]["type"] = json!("http");
    assert_eq!(
        h.add_version(&agent_id, "0.1.0", lower).await.status(),
        StatusCode::CREATED
    );

    let unknown = h.add_version("no-such-agent", "1.0.0", agent_spec("x")).await;
    assert_eq!(unknown.status(), StatusCode::CONFLICT);
    assert!(
        error_of(unknown).await["error"]
            .as_str()
            .unwrap()
            .contains("no-such-agent")
    );
    assert_eq!(
        h.add_version(&agent_id, "1.0.0", agent_spec("x")).await.status(),
        StatusCode::CREATED
    );
    let mut changed = agent_spec("x");
    changed["instructions"] = json!("Something else.");
    let taken = h.add_version(&agent_id, "1.0.0", changed).await;
    assert_eq!(taken.status(), StatusCode::CONFLICT);
    assert!(error_of(taken).await["error"].as_str().unwrap().contains("immutable"));
    let kept: Value = h
        .get(&format!("/v1/agents/{agent_id}/versions/1.0.0"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(kept["spec"]["instructions"], "Classify the invoice.");
    h.plane.shutdown().await;
}

#[tokio::test]
async fn an_agent_body_over_the_bound_is_413_and_the_plane_keeps_nothing_of_it() {
    let h = start(options()).await;
    let mut big = agent_spec("big");
    big["instructions"] = json!("x".repeat(node_runtime::dev_plane::agents::MAX_AGENT_BODY_BYTES));
    let response = h.post("/v1/agents", big.clone()).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let error = error_of(response).await;
    assert!(error["error"].as_str().unwrap().contains("bytes"), "{error}");
    let agent_id = h.create_agent("small").await;
    let response = h.add_version(&agent_id, "1.0.0", big).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let long = format!("1.0.0-{}", "a".repeat(200));
    let response = h.add_version(&agent_id, &long, agent_spec("x")).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(
        error_of(response).await["error"]
            .as_str()
            .unwrap()
            .contains("128 bytes")
    );
    assert_eq!(h.plane.agents().len(), 1);
    h.plane.shutdown().await;
}

#[tokio::test]
async fn agents_and_versions_survive_a_restart_and_one_that_cannot_be_saved_is_503_and_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let with_dir = || PlaneOptions {
        data_dir: Some(dir.path().to_path_buf()),
        ..options()
    };
    let h = start(with_dir()).await;
    let kept = h.create_agent("kept").await;
    let deleted = h.create_agent("deleted").await;
    assert_eq!(
        h.add_version(&kept, "1.0.0", agent_spec("kept")).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        h.add_version(&kept, "1.1.0", agent_spec("kept")).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        h.add_version(&deleted, "1.0.0", agent_spec("gone")).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        h.delete(&format!("/v1/agents/{deleted}")).await.status(),
        StatusCode::NO_CONTENT
    );
    let before: Value = h
        .get(&format!("/v1/agents/{kept}/versions/1.1.0"))
        .await
        .json()
        .await
        .unwrap();

    h.plane.fail_disk_writes(true);
    let refused = h.add_version(&kept, "2.0.0", agent_spec("kept")).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let error = error_of(refused).await;
    assert!(
        error["error"].as_str().unwrap().contains("runs.redb"),
        "names the file: {error}"
    );
    assert_eq!(
        h.post("/v1/agents", agent_spec("lost")).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        h.get(&format!("/v1/agents/{kept}/versions/2.0.0")).await.status(),
        StatusCode::NOT_FOUND,
        "a version that could not be saved is not kept"
    );
    assert_eq!(h.plane.agents().len(), 1);
    h.plane.fail_disk_writes(false);
    h.plane.shutdown().await;

    let h = start(with_dir()).await;
    let agents: Value = h.get("/v1/agents").await.json().await.unwrap();
    let names: Vec<&str> = agents
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["kept"]);
    let versions: Value = h
        .get(&format!("/v1/agents/{kept}/versions"))
        .await
        .json()
        .await
        .unwrap();
    let listed: Vec<&str> = versions
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["1.0.0", "1.1.0"]);
    let after: Value = h
        .get(&format!("/v1/agents/{kept}/versions/1.1.0"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(after, before, "a version reads back the same after a restart");
    assert_eq!(
        h.get(&format!("/v1/agents/{deleted}")).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.get(&format!("/v1/agents/{deleted}/versions/1.0.0")).await.status(),
        StatusCode::NOT_FOUND
    );
    h.plane.shutdown().await;
}

// ---- definitions loaded at start-up ----------------------------------------

/// The repository's declarative samples.
fn declarative_samples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("sample-agents")
        .join("declarative")
}

#[tokio::test]
async fn the_declarative_invoice_classifier_loads_from_the_samples_and_is_served_to_nodes() {
    let h = start(PlaneOptions {
        definitions: Some(declarative_samples()),
        ..options()
    })
    .await;
    let response = h.get("/v1/agents/invoice-classifier-declarative/versions/1.0.0").await;
    assert_eq!(response.status(), StatusCode::OK);
    let version: Value = response.json().await.unwrap();
    let spec = &version["spec"];
    assert_eq!(spec["agentId"], "invoice-classifier-declarative");
    assert_eq!(spec["modelProfile"]["model"], "stub-invoice-model");
    assert_eq!(spec["tools"], json!(["http-post"]));
    assert_eq!(spec["input"]["type"], "ServiceBus");
    let output = &spec["output"];
    assert_eq!(output["type"], "Http");
    assert_eq!(output["config"]["idempotencyKeyFormat"], "{RunId}-{MessageId}");
    assert_eq!(
        output["config"]["headers"]["Authorization"],
        "Bearer ${INVOICE_API_TOKEN}"
    );
    assert!(
        spec.get("version").is_none(),
        "the file's version is the version's, not the spec's"
    );
    let instructions = spec["instructions"].as_str().unwrap();
    for field in [
        "vendorName",
        "vendorCategory",
        "invoiceNumber",
        "invoiceDate",
        "totalAmount",
        "currency",
        "routingDestination",
        "confidence",
    ] {
        assert!(instructions.contains(field), "the instructions ask for {field}");
    }
    let agent: Value = h
        .get("/v1/agents/invoice-classifier-declarative")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(agent["name"], spec["name"]);
    h.plane.shutdown().await;
}

fn write_definition(dir: &std::path::Path, file: &str, body: &Value) {
    std::fs::write(dir.join(file), serde_json::to_vec_pretty(body).unwrap()).unwrap();
}

#[tokio::test]
async fn definitions_take_their_id_and_version_from_the_file_and_a_reload_must_not_change_a_version() {
    let definitions = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut with_id = agent_spec("with id");
    with_id["agentId"] = json!("triage");
    with_id["version"] = json!("2.1.0");
    write_definition(definitions.path(), "anything.json", &with_id);
    write_definition(definitions.path(), "from-the-stem.json", &agent_spec("stem"));
    std::fs::write(definitions.path().join("notes.txt"), "not a definition").unwrap();
    let plane_options = || PlaneOptions {
        data_dir: Some(data.path().to_path_buf()),
        definitions: Some(definitions.path().to_path_buf()),
        ..options()
    };

    let h = start(plane_options()).await;
    assert_eq!(h.get("/v1/agents/triage/versions/2.1.0").await.status(), StatusCode::OK);
    assert_eq!(
        h.get("/v1/agents/from-the-stem/versions/1.0.0").await.status(),
        StatusCode::OK
    );
    h.plane.shutdown().await;

    // The same files into the same data dir: nothing to do.
    let h = start(plane_options()).await;
    let versions: Value = h.get("/v1/agents/triage/versions").await.json().await.unwrap();
    assert_eq!(versions.as_array().unwrap().len(), 1);
    h.plane.shutdown().await;

    // A changed file under the same version: versions are immutable.
    let mut changed = with_id.clone();
    changed["instructions"] = json!("Triage differently.");
    write_definition(definitions.path(), "anything.json", &changed);
    let refused = DevPlane::start(plane_options())
        .await
        .err()
        .expect("the plane refuses to start");
    let message = refused.to_string();
    assert!(message.contains("anything.json"), "names the file: {message}");
    assert!(message.contains("2.1.0") && message.contains("immutable"), "{message}");

    // Given a new version, it loads, next to the old one.
    changed["version"] = json!("2.2.0");
    write_definition(definitions.path(), "anything.json", &changed);
    let h = start(plane_options()).await;
    let versions: Value = h.get("/v1/agents/triage/versions").await.json().await.unwrap();
    assert_eq!(versions.as_array().unwrap().len(), 2);
    h.plane.shutdown().await;
}

#[tokio::test]
async fn a_definition_that_fails_validation_stops_the_plane_naming_the_file_and_the_error() {
    for (file, body, named) in [
        (
            "no-instructions.json",
            json!({"name": "x"}),
            "Instructions are required",
        ),
        (
            "bad-version.json",
            json!({"name": "x", "instructions": "y", "version": "1.0"}),
            "not a semantic version",
        ),
        (
            "bad-type.json",
            json!({"name": "x", "instructions": "y", "output": {"type": "Ftp"}}),
            "Output.Type",
        ),
        ("bad id!.json", json!({"name": "x", "instructions": "y"}), "AgentId"),
    ] {
        let definitions = tempfile::tempdir().unwrap();
        write_definition(definitions.path(), file, &body);
        let refused = DevPlane::start(PlaneOptions {
            definitions: Some(definitions.path().to_path_buf()),
            ..options()
        })
        .await
        .err()
        .expect("the plane refuses to start");
        let message = refused.to_string();
        assert!(message.contains(file), "names the file: {message}");
        assert!(message.contains(named), "names the error: {message}");
    }
    let definitions = tempfile::tempdir().unwrap();
    std::fs::write(definitions.path().join("broken.json"), "{ not json").unwrap();
    let refused = DevPlane::start(PlaneOptions {
        definitions: Some(definitions.path().to_path_buf()),
        ..options()
    })
    .await
    .err()
    .expect("the plane refuses to start");
    assert!(refused.to_string().contains("broken.json"), "{refused}");
}

#[tokio::test]
async fn dev_takes_definitions_and_stops_with_exit_2_naming_a_bad_file() {
    let definitions = tempfile::tempdir().unwrap();
    write_definition(definitions.path(), "half.json", &json!({"name": "half"}));
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
            .args(["dev", "--plane-only", "--listen", "127.0.0.1:0", "--definitions"])
            .arg(definitions.path())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("refused at once")
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("half.json") && stderr.contains("Instructions are required"),
        "{stderr}"
    );
}

/// `dev --log-format json`: its own lines (certificates generated, where
/// it listens, how to start a node) are JSON lines too, whatever the
/// paths in them hold.
#[tokio::test]
async fn dev_says_everything_in_json_lines_with_log_format_json() {
    let scratch = tempfile::tempdir().unwrap();
    let tls_dir = scratch.path().join("odd\nFORGED line\u{202e}");
    let mut dev = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args([
            "dev",
            "--plane-only",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--tls-dir",
        ])
        .arg(&tls_dir)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = tokio::io::BufReader::new(dev.stderr.take().unwrap());
    let mut lines = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        while stderr.read_line(&mut line).await.unwrap() > 0 {
            lines.push(std::mem::take(&mut line));
            if lines.last().unwrap().contains("plane only: start nodes") {
                break;
            }
        }
    })
    .await;
    dev.kill().await.unwrap();
    assert!(read.is_ok(), "no 'plane only' line within a minute: {lines:?}");
    let mut messages = Vec::new();
    for line in &lines {
        let event: Value = serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line:?}"));
        assert!(!line.contains('\u{202e}'), "raw bidi mark: {line:?}");
        messages.push(event["fields"]["message"].as_str().unwrap_or_default().to_string());
    }
    let generated = messages
        .iter()
        .find(|message| message.starts_with("generated in "))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(generated.contains(tls_dir.to_str().unwrap()), "{generated:?}");
    assert!(
        messages
            .iter()
            .any(|message| message.starts_with("dev control plane listening on https://")),
        "{lines:?}"
    );
}

// ---- the stub model and the recording target ---------------------------------

mod stub_shapes {
    use super::*;
    use node_runtime::dev_plane::stubs::{StubModel, StubModelOptions, StubTarget};

    fn client() -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder().timeout(WAIT).build().unwrap()
    }

    fn chat(model: &str, system: &str, user: &str) -> Value {
        json!({
            "model": model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": 500,
            "temperature": 0.2,
        })
    }

    /// A JSON Schema response format shapes the answer, whatever the
    /// behaviour: each property of the schema, the behaviour's own value
    /// where it has one, else a value of the property's type.
    #[tokio::test]
    async fn a_json_schema_response_format_shapes_the_answer() {
        let model = StubModel::start().await.unwrap();
        let mut body = chat(
            "stub-invoice-model",
            "Classify.",
            r#"{"vendor": "Paper Co", "number": "INV-1"}"#,
        );
        body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "c", "strict": true,
            "schema": {"type": "object", "properties": {
                "vendorCategory": {"type": "string"}, "priority": {"type": "string", "enum": ["high", "low"]},
                "score": {"type": "number"}, "flagged": {"type": "boolean"}}}}});
        let (status, _, answer) = openai(&model, body).await;
        assert_eq!(status, StatusCode::OK);
        let content: Value =
            serde_json::from_str(answer["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
        assert_eq!(
            content,
            json!({"vendorCategory": "Office Supplies", "priority": "high", "score": 0, "flagged": false})
        );
    }

    async fn openai(model: &StubModel, body: Value) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let response = client()
            .post(format!("{}/v1/chat/completions", model.url()))
            .bearer_auth("sk-test")
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        (status, headers, response.json().await.unwrap())
    }

    async fn azure(
        model: &StubModel,
        deployment: &str,
        body: Value,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let response = client()
            .post(format!(
                "{}/openai/deployments/{deployment}/chat/completions?api-version=2024-06-01",
                model.url()
            ))
            .header("api-key", "azure-key")
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        (status, headers, response.json().await.unwrap())
    }

    fn usage_adds_up(answer: &Value) {
        let usage = &answer["usage"];
        let (prompt, completion) = (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap(),
        );
        assert!(prompt > 0 && completion > 0, "{answer}");
        assert_eq!(usage["total_tokens"].as_u64(), Some(prompt + completion));
    }

    #[tokio::test]
    async fn the_invoice_model_answers_an_openai_chat_completion_with_the_classification_and_usage() {
        let model = StubModel::start().await.unwrap();
        let invoice = r#"{"vendor": "Rackmount Servers Inc", "number": "INV-7", "date": "2026-11-03", "amount": 12400.0, "currency": "USD"}"#;
        let (status, _, answer) = openai(&model, chat("stub-invoice-model", "Classify.", invoice)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(answer["model"], "stub-invoice-model");
        let choice = &answer["choices"][0];
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["refusal"], Value::Null);
        let classification: Value = serde_json::from_str(choice["message"]["content"].as_str().unwrap()).unwrap();
        assert_eq!(classification["vendorCategory"], "Technology/Hardware");
        assert_eq!(classification["routingDestination"], "IT Department");
        assert_eq!(classification["invoiceNumber"], "INV-7");
        usage_adds_up(&answer);
        assert!(
            answer.get("prompt_filter_results").is_none(),
            "Azure's fields only on Azure"
        );

        assert_eq!(model.request_count(), 1);
        let seen = &model.requests()[0];
        assert_eq!(seen.path, "/v1/chat/completions");
        assert_eq!(seen.header("authorization"), Some("Bearer sk-test"));
        assert_eq!(seen.json().unwrap()["messages"][0]["content"], "Classify.");
    }

    #[tokio::test]
    async fn the_echo_model_answers_with_the_instructions_and_input_and_max_tokens_cuts_it_with_length() {
        let model = StubModel::start().await.unwrap();
        let (_, _, answer) = openai(&model, chat("stub-echo", "Be brief.", "hello there")).await;
        let content: Value =
            serde_json::from_str(answer["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
        assert_eq!(
            content,
            json!({"instructions": "Be brief.", "input": "hello there", "model": "stub-echo"})
        );

        let mut short = chat("stub-echo", "Be brief.", &"word ".repeat(100));
        short["max_tokens"] = json!(100);
        short["max_completion_tokens"] = json!(3);
        let (_, _, answer) = openai(&model, short).await;
        let choice = &answer["choices"][0];
        assert_eq!(
            choice["finish_reason"], "length",
            "max_completion_tokens wins over max_tokens"
        );
        assert_eq!(answer["usage"]["completion_tokens"], 3);
        assert_eq!(choice["message"]["content"].as_str().unwrap().len(), 12);
    }

    #[tokio::test]
    async fn refusals_come_in_each_providers_shape() {
        let model = StubModel::start().await.unwrap();
        let (status, _, answer) = openai(&model, chat("stub-refusal", "x", "y")).await;
        assert_eq!(status, StatusCode::OK);
        let message = &answer["choices"][0]["message"];
        assert_eq!(message["content"], Value::Null);
        assert!(message["refusal"].as_str().unwrap().contains("can't help"), "{answer}");
        usage_adds_up(&answer);

        let (status, _, answer) = azure(&model, "stub-refusal", chat("ignored-on-azure", "x", "y")).await;
        assert_eq!(status, StatusCode::OK);
        let choice = &answer["choices"][0];
        assert_eq!(choice["finish_reason"], "content_filter");
        assert_eq!(choice["message"]["content"], Value::Null);
        assert_eq!(
            choice["content_filter_results"]["violence"],
            json!({"filtered": true, "severity": "high"})
        );
        assert_eq!(
            answer["prompt_filter_results"][0]["content_filter_results"]["hate"]["filtered"],
            false
        );
    }

    #[tokio::test]
    async fn azure_deployments_answer_with_filter_results_and_need_an_api_version() {
        let model = StubModel::start_with(StubModelOptions {
            api_key: Some("azure-key".to_string()),
        })
        .await
        .unwrap();
        let (status, _, answer) = azure(&model, "stub-echo", chat("some-model", "Sys.", "User.")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            answer["model"], "stub-echo",
            "the deployment chooses, not the body's model"
        );
        assert_eq!(
            answer["choices"][0]["content_filter_results"]["sexual"]["severity"],
            "safe"
        );
        assert!(answer["prompt_filter_results"].is_array(), "{answer}");
        assert!(answer["choices"][0]["message"].get("refusal").is_none());
        usage_adds_up(&answer);
        assert_eq!(model.requests()[0].header("api-key"), Some("azure-key"));

        let without_version = client()
            .post(format!("{}/openai/deployments/stub-echo/chat/completions", model.url()))
            .header("api-key", "azure-key")
            .json(&chat("m", "s", "u"))
            .send()
            .await
            .unwrap();
        assert_eq!(without_version.status(), StatusCode::NOT_FOUND);
        // The configured key is required: the OpenAI path's bearer here is not it.
        let (status, _, answer) = openai(&model, chat("stub-echo", "s", "u")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer["error"]["code"], "invalid_api_key");
        assert_eq!(model.request_count(), 3, "refused requests are recorded too");
    }

    #[tokio::test]
    async fn rate_limits_answer_429_with_retry_after_always_or_for_the_first_n_requests() {
        let model = StubModel::start().await.unwrap();
        let (status, headers, answer) = openai(&model, chat("stub-rate-limited", "s", "u")).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(answer["error"]["code"], "rate_limit_exceeded");
        let (status, headers, answer) = azure(&model, "stub-rate-limited", chat("m", "s", "u")).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(answer["error"]["code"], "429");

        let mut statuses = Vec::new();
        for _ in 0..4 {
            statuses.push(openai(&model, chat("stub-rate-limited-2", "s", "u")).await.0);
        }
        assert_eq!(
            statuses,
            [
                StatusCode::TOO_MANY_REQUESTS,
                StatusCode::TOO_MANY_REQUESTS,
                StatusCode::OK,
                StatusCode::OK
            ]
        );
    }

    #[tokio::test]
    async fn the_target_records_every_request_and_answers_as_told_before_accepting() {
        let target = StubTarget::start().await.unwrap();
        target.answer_next(1, StatusCode::SERVICE_UNAVAILABLE, None);
        target.answer_next(1, StatusCode::TOO_MANY_REQUESTS, Some(Duration::from_secs(2)));
        let http = client();
        let send = |path: &'static str| {
            http.post(format!("{}{path}", target.url()))
                .header("idempotency-key", "run-1-msg-1")
                .header("x-correlation-id", "run-1")
                .json(&json!({"vendorCategory": "Utilities"}))
                .send()
        };
        let first = send("/invoices").await.unwrap();
        assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
        let second = send("/invoices").await.unwrap();
        assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(second.headers()["retry-after"], "2");
        assert_eq!(send("/any/path?x=1").await.unwrap().status(), StatusCode::CREATED);
        assert_eq!(
            http.get(format!("{}/health", target.url()))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );

        assert_eq!((target.request_count(), target.received()), (4, 2));
        let seen = target.requests();
        let statuses: Vec<u16> = seen.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [503, 429, 201, 200]);
        let accepted = &seen[2];
        assert_eq!(
            (accepted.method.as_str(), accepted.path.as_str()),
            ("POST", "/any/path")
        );
        assert_eq!(accepted.query.as_deref(), Some("x=1"));
        assert_eq!(accepted.header("Idempotency-Key"), Some("run-1-msg-1"));
        assert_eq!(accepted.header("x-correlation-id"), Some("run-1"));
        assert_eq!(accepted.json(), Some(json!({"vendorCategory": "Utilities"})));
    }
}

#[tokio::test]
async fn a_node_reads_a_version_with_a_plain_get_over_the_same_tls_and_client_certificate() {
    use crate::certs::{TestCa, plane_tls};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = TestCa::new("agents test CA");
    let server = ca.server("127.0.0.1");
    let node = ca.client("node-1");
    let plane = DevPlane::start(PlaneOptions {
        tls: Some(plane_tls(&server, &ca, &[])),
        definitions: Some(declarative_samples()),
        ..options()
    })
    .await
    .unwrap();
    let url = format!(
        "{}/v1/agents/invoice-classifier-declarative/versions/1.0.0",
        plane.url()
    );
    let root = reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).unwrap();
    let identity = reqwest::Identity::from_pem(format!("{}{}", node.cert_pem, node.key_pem).as_bytes()).unwrap();
    let with_certificate = reqwest::Client::builder()
        .timeout(WAIT)
        .tls_certs_only([root.clone()])
        .identity(identity)
        .build()
        .unwrap();
    let response = with_certificate.get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let version: Value = response.json().await.unwrap();
    assert_eq!(version["spec"]["output"]["type"], "Http");

    let without = reqwest::Client::builder()
        .timeout(WAIT)
        .tls_certs_only([root])
        .build()
        .unwrap();
    assert!(
        without.get(&url).send().await.is_err(),
        "no client certificate, no agents"
    );
    plane.shutdown().await;
}

/// The main job: `dev --demo` classifies the invoices with the component
/// and with the declarative classifier, every other demonstration run ends
/// as it is meant to, and the target API sees each classified invoice.
#[test]
fn the_demo_classifies_with_the_component_and_the_declarative_agent_and_trips_each_budget() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args(["dev", "--demo", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("node-runtime dev --demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect())
        .collect();
    let outcome = |agent: &str| -> Vec<(String, String)> {
        rows.iter()
            .filter(|row| row.get(1) == Some(&agent))
            .map(|row| (row[2].to_string(), row[3].to_string()))
            .collect()
    };
    let completed = || ("completed".to_string(), "-".to_string());
    assert_eq!(outcome("invoice-classifier"), vec![completed(); 3], "{stdout}");
    assert_eq!(
        outcome("invoice-classifier-declarative"),
        vec![completed(); 3],
        "{stdout}"
    );
    for row in rows
        .iter()
        .filter(|row| row.get(1) == Some(&"invoice-classifier-declarative"))
    {
        let tokens: u64 = row[row.len() - 2].parse().unwrap();
        assert!(tokens > 0, "the declarative run reported no tokens: {stdout}");
    }
    let failed = |kind: &str| ("failed".to_string(), kind.to_string());
    assert_eq!(
        outcome("spin-forever"),
        vec![failed("budget.fuel"), failed("budget.deadline")]
    );
    assert_eq!(outcome("memory-bomb"), vec![failed("budget.memory")]);
    assert_eq!(outcome("no-such-agent"), vec![failed("agent.invalid")]);
    assert!(
        stderr.contains("the target API received 6 classified invoices"),
        "{stderr}"
    );
}
