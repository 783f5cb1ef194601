//! The on-disk compiled cache: a sandbox started again does not compile
//! what an earlier one compiled; damaged or foreign entries are detected
//! and rebuilt, never loaded; the folder stays within its size bound.

use crate::support;

use std::path::{Path, PathBuf};

use node_runtime::sandbox::{
    BudgetRequest, CompileCounts, CompiledCacheSettings, EngineSettings, Execution, RunOutcome, Sandbox, SandboxConfig,
    compiled_cache,
};
use sha2::{Digest, Sha256};
use support::*;

fn cached_sandbox(dir: &Path, max_bytes: u64) -> Sandbox {
    cached_sandbox_running(dir, max_bytes, Execution::Cranelift)
}

fn cached_sandbox_running(dir: &Path, max_bytes: u64, execution: Execution) -> Sandbox {
    Sandbox::new(SandboxConfig {
        engine: EngineSettings {
            execution,
            ..EngineSettings::default()
        },
        compiled_cache: Some(CompiledCacheSettings {
            dir: dir.to_path_buf(),
            max_bytes,
        }),
        ..SandboxConfig::default()
    })
    .unwrap()
}

/// The one engine folder under the cache directory.
fn engine_dir(dir: &Path) -> PathBuf {
    let folders: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(folders.len(), 1, "one engine, one folder: {folders:?}");
    folders[0].clone()
}

fn entry_for(dir: &Path, agent: &str) -> PathBuf {
    let digest = hex::encode(Sha256::digest(agent_bytes(agent)));
    engine_dir(dir).join(format!("{digest}.cwasm"))
}

async fn echo_completes(sandbox: &Sandbox) {
    let agent = load(sandbox, "echo").await;
    let result = sandbox
        .run(&agent, request("echo", &[("message", "hi")], BudgetRequest::default()))
        .await;
    match result.outcome {
        RunOutcome::Completed(map) => assert_eq!(map["message"], "hi"),
        other => panic!("echo should complete: {other:?}"),
    }
}

fn counts(compiled: u64, cache_hits: u64, cache_rejected: u64) -> CompileCounts {
    CompileCounts {
        compiled,
        cache_hits,
        cache_rejected,
    }
}

#[tokio::test]
async fn a_restarted_sandbox_loads_what_an_earlier_one_compiled() {
    let cache = tempfile::tempdir().unwrap();
    let first = cached_sandbox(cache.path(), 1 << 30);
    echo_completes(&first).await;
    assert_eq!(first.compile_counts(), counts(1, 0, 0));
    assert!(entry_for(cache.path(), "echo").is_file(), "the compiled echo is kept");
    drop(first);

    let second = cached_sandbox(cache.path(), 1 << 30);
    echo_completes(&second).await;
    assert_eq!(
        second.compile_counts(),
        counts(0, 1, 0),
        "nothing compiled after the restart"
    );
}

#[tokio::test]
async fn a_damaged_entry_is_detected_deleted_and_rebuilt() {
    let cache = tempfile::tempdir().unwrap();
    echo_completes(&cached_sandbox(cache.path(), 1 << 30)).await;
    let entry = entry_for(cache.path(), "echo");
    let mut bytes = std::fs::read(&entry).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&entry, &bytes).unwrap();

    let second = cached_sandbox(cache.path(), 1 << 30);
    echo_completes(&second).await;
    assert_eq!(
        second.compile_counts(),
        counts(1, 0, 1),
        "rejected, then compiled again"
    );

    let third = cached_sandbox(cache.path(), 1 << 30);
    echo_completes(&third).await;
    assert_eq!(third.compile_counts(), counts(0, 1, 0), "the rebuilt entry is sound");
}

#[tokio::test]
async fn a_truncated_entry_is_detected_deleted_and_rebuilt() {
    let cache = tempfile::tempdir().unwrap();
    echo_completes(&cached_sandbox(cache.path(), 1 << 30)).await;
    let entry = entry_for(cache.path(), "echo");
    let whole = std::fs::read(&entry).unwrap();
    // Cut in the middle of the artifact, inside the trailer, and to
    // nothing: each is refused before wasmtime maps the file.
    for cut_to in [whole.len() / 2, whole.len() - 1, 0] {
        std::fs::write(&entry, &whole[..cut_to]).unwrap();
        let sandbox = cached_sandbox(cache.path(), 1 << 30);
        echo_completes(&sandbox).await;
        assert_eq!(
            sandbox.compile_counts(),
            counts(1, 0, 1),
            "cut to {cut_to} bytes: rejected, compiled again"
        );
        assert_eq!(
            std::fs::read(&entry).unwrap().len(),
            whole.len(),
            "cut to {cut_to} bytes: rebuilt whole"
        );
    }
}

#[tokio::test]
async fn an_entry_compiled_by_another_engine_configuration_is_not_loaded() {
    let cache = tempfile::tempdir().unwrap();
    let sandbox = cached_sandbox(cache.path(), 1 << 30);
    // A sealed, intact artifact from an engine without fuel metering,
    // placed where this engine's entry for echo would be.
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    let foreign = wasmtime::Engine::new(&config).unwrap();
    let component = wasmtime::component::Component::new(&foreign, &agent_bytes("echo")[..]).unwrap();
    std::fs::write(
        entry_for(cache.path(), "echo"),
        compiled_cache::seal(component.serialize().unwrap()),
    )
    .unwrap();

    echo_completes(&sandbox).await;
    assert_eq!(
        sandbox.compile_counts(),
        counts(1, 0, 1),
        "the foreign entry was refused"
    );
}

#[tokio::test]
async fn the_cache_evicts_the_least_recently_used_to_stay_within_its_bound() {
    let measure = tempfile::tempdir().unwrap();
    echo_completes(&cached_sandbox(measure.path(), 1 << 30)).await;
    let one_entry = std::fs::metadata(entry_for(measure.path(), "echo")).unwrap().len();

    // Room for one compiled echo-sized agent and a half.
    let bound = one_entry * 3 / 2;
    let cache = tempfile::tempdir().unwrap();
    let sandbox = cached_sandbox(cache.path(), bound);
    echo_completes(&sandbox).await;
    load(&sandbox, "panic").await;
    let entries: Vec<(PathBuf, u64)> = std::fs::read_dir(engine_dir(cache.path()))
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            (entry.path(), entry.metadata().unwrap().len())
        })
        .collect();
    let total: u64 = entries.iter().map(|(_, len)| len).sum();
    assert!(total <= bound, "{total} bytes kept, bound {bound}: {entries:?}");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(
        entries[0].0,
        entry_for(cache.path(), "panic"),
        "the older echo was evicted"
    );
}

#[tokio::test]
async fn cranelift_and_pulley_engines_keep_their_compiled_code_apart() {
    let cache = tempfile::tempdir().unwrap();
    let cranelift = cached_sandbox(cache.path(), 1 << 30);
    echo_completes(&cranelift).await;
    let pulley = cached_sandbox_running(cache.path(), 1 << 30, Execution::Pulley);
    echo_completes(&pulley).await;
    assert_eq!(
        pulley.compile_counts(),
        counts(1, 0, 0),
        "Cranelift's native code is not Pulley's"
    );
    let folders = std::fs::read_dir(cache.path()).unwrap().count();
    assert_eq!(folders, 2, "one folder per engine");
}
