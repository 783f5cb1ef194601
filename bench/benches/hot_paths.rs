//! Criterion micro-benchmarks of the node's per-run hot paths, each alone:
//!
//! - `sandbox/echo pooled` and `sandbox/echo on-demand`: one run of `echo`
//!   in a fresh store (instantiate, call, drop), as `Sandbox::run` does it
//!   for every lease;
//! - `agent store/resolve, loaded`: resolving an agent already loaded (a
//!   file stamp compared), which every lease does before it runs;
//! - `outbox/report put + remove`: storing a report (synced) and removing
//!   it once answered, the outbox's share of every run;
//! - `outbox/accept 64 leases`: recording a burst of 64 accepted leases in
//!   one commit, as the lease stream does.
//!
//! `cargo bench -p bench --bench hot_paths`, after `scripts/build-agents`.
//! The end-to-end load generators are the binaries in `src/`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bench::echo_request;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use node_runtime::agent_store::AgentStore;
use node_runtime::outbox::Outbox;
use node_runtime::proto::CompleteRequest;
use node_runtime::sandbox::{AllocatorChoice, EngineSettings, RunOutcome, Sandbox, SandboxConfig};
use node_runtime::worker::lease::Report;

/// The workspace's target directory (benches run from the package's own).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

fn echo_path() -> PathBuf {
    let path = target_dir().join("agents/echo.wasm");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-agents",
        path.display()
    );
    path
}

fn sandbox(allocator: AllocatorChoice) -> Sandbox {
    Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            allocator,
            max_concurrent_runs: 8,
            ..EngineSettings::default()
        },
        ..SandboxConfig::default()
    })
    .expect("sandbox")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn sandbox_runs(c: &mut Criterion) {
    let rt = runtime();
    let wasm: Arc<[u8]> = std::fs::read(echo_path()).expect("echo.wasm").into();
    let mut group = c.benchmark_group("sandbox");
    for (name, allocator) in [
        ("echo pooled", AllocatorChoice::Pooling),
        ("echo on-demand", AllocatorChoice::OnDemand),
    ] {
        let sandbox = sandbox(allocator);
        let agent = rt.block_on(sandbox.load(wasm.clone())).expect("echo loads");
        group.bench_function(name, |b| {
            b.iter(|| {
                let result = rt.block_on(sandbox.run(&agent, echo_request()));
                match result.outcome {
                    RunOutcome::Completed(map) => assert_eq!(map["message"], "hello"),
                    other => panic!("echo did not complete: {other:?}"),
                }
            })
        });
    }
    group.finish();
}

fn agent_store(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let folder = dir.path().join("echo");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(echo_path(), folder.join("1.0.0.wasm")).unwrap();
    let sandbox = sandbox(AllocatorChoice::Pooling);
    let store = AgentStore::new(vec![dir.path().to_path_buf()]);
    rt.block_on(store.resolve(&sandbox, "echo", "1.0.0"))
        .expect("echo resolves");
    c.bench_function("agent store/resolve, loaded", |b| {
        b.iter(|| rt.block_on(store.resolve(&sandbox, "echo", "1.0.0")).expect("resolves"))
    });
}

fn report(lease_id: &str) -> Report {
    Report::Complete(CompleteRequest {
        lease_id: lease_id.to_string(),
        run_id: format!("run-of-{lease_id}"),
        node_id: "bench-node".to_string(),
        result: [("message".to_string(), "hello".to_string())].into_iter().collect(),
        ..CompleteRequest::default()
    })
}

fn outbox(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let outbox = Outbox::open(dir.path()).expect("outbox");
    let deadline = node_runtime::outbox::now_unix_ms() + 3_600_000;
    let mut group = c.benchmark_group("outbox");
    let mut n = 0u64;
    group.bench_function("report put + remove", |b| {
        b.iter(|| {
            n += 1;
            let lease_id = format!("lease-{n}");
            outbox.put(&report(&lease_id), deadline).expect("put");
            assert!(outbox.remove(&lease_id).expect("remove"));
        })
    });
    let mut burst = 0u64;
    group.bench_function("accept 64 leases", |b| {
        b.iter_batched(
            || {
                burst += 1;
                (0..64).map(|i| format!("burst-{burst}-{i}")).collect::<Vec<_>>()
            },
            |ids| {
                let leases: Vec<(&str, i64)> = ids.iter().map(|id| (id.as_str(), deadline)).collect();
                let answers = outbox.accept_all(&leases);
                assert!(answers.into_iter().all(|fresh| fresh.expect("accept")));
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, sandbox_runs, agent_store, outbox);
criterion_main!(benches);
