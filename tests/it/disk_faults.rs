//! The outbox on a disk that fails: a real full filesystem (a small tmpfs
//! mounted in a mount namespace of the node's own, filled through
//! `/proc/PID/root`), and damaged `outbox.redb` files at start-up.
//!
//! Mounting needs root and `unshare`; where either is missing the test
//! that needs them prints why and passes without running.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use node_runtime::dev_plane::{Budgets, DevPlane, NewRun, PlaneOptions, RunStatus};
use support::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether this machine lets a test mount a tmpfs in a mount namespace of
/// its own; the reason when not.
fn tmpfs_available(mount_point: &Path) -> Result<(), String> {
    let probe = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs \"$0\""])
        .arg(mount_point)
        .output()
        .map_err(|err| format!("`unshare` cannot be run: {err}"))?;
    if probe.status.success() {
        Ok(())
    } else {
        Err(format!(
            "mounting a tmpfs with `unshare -m` failed (root is needed): {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        ))
    }
}

fn echo(message: &str) -> NewRun {
    NewRun {
        agent_id: "echo".to_string(),
        version: "1.0.0".to_string(),
        input_ref: [("message".to_string(), message.to_string())].into_iter().collect(),
        metadata: Default::default(),
        budgets: Budgets::default(),
    }
}

async fn get(http: &reqwest::Client, url: &str) -> Option<(u16, String)> {
    let response = http.get(url).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// Writes zeros to `path` until the filesystem refuses more (bounded).
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("the filler file can be created");
    let chunk = vec![0u8; 16 * 1024];
    for _ in 0..10_000 {
        if file.write_all(&chunk).and_then(|()| file.sync_all()).is_err() {
            return;
        }
    }
    panic!("{} never filled up", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_node_taking_leases_until_space_returns_and_every_run_ends_once() {
    let mount = tempfile::tempdir().unwrap();
    if let Err(reason) = tmpfs_available(mount.path()) {
        println!("skipped: {reason}");
        return;
    }
    let plane = DevPlane::start(PlaneOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        idle_poll: Duration::from_millis(200),
        ..PlaneOptions::default()
    })
    .await
    .unwrap();
    let agents = agents_layout();
    let admin = format!("127.0.0.1:{}", free_port());
    let logs = tempfile::tempdir().unwrap();
    let stderr_path = logs.path().join("stderr.log");
    let data = mount.path().join("data");
    // The node sees the tmpfs at `mount`; this process, outside its mount
    // namespace, sees the plain directory there, and the tmpfs through
    // /proc/PID/root.
    let mut node = tokio::process::Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "mount -t tmpfs -o size=2m tmpfs \"$0\" && exec \"$1\" serve",
        ])
        .arg(mount.path())
        .arg(env!("CARGO_BIN_EXE_node-runtime"))
        .env("NodeRuntime__NodeId", "full-disk-node")
        .env("NodeRuntime__ControlPlaneUrl", plane.url())
        .env("NodeRuntime__AgentsDirectory", agents.path())
        .env("NodeRuntime__DataDirectory", &data)
        .env("NodeRuntime__HeartbeatIntervalSeconds", "1")
        .env("NodeRuntime__AdminListen", &admin)
        // Compiled components in memory only: the outbox alone is on the disk.
        .env("Sandbox__CompiledCacheMaxBytes", "0")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("unshare starts");
    let pid = node.id().expect("the node runs");
    let inside: PathBuf = PathBuf::from(format!("/proc/{pid}/root")).join(mount.path().strip_prefix("/").unwrap());
    node_runtime::support::tls::install_crypto_provider();
    let http = reqwest::Client::new();
    let readyz = format!("http://{admin}/readyz");
    let metrics = format!("http://{admin}/metrics");
    eventually_async(Duration::from_secs(60), "the node to be ready", || async {
        get(&http, &readyz).await.filter(|(status, _)| *status == 200)
    })
    .await;
    assert!(inside.join("data/outbox.redb").exists(), "the outbox is on the tmpfs");

    let ended = |run_id: &str| {
        plane
            .run(run_id)
            .filter(|run| matches!(run.status, RunStatus::Completed | RunStatus::Failed))
    };
    let before = plane.submit(echo("before the disk filled")).await.unwrap().run_id;
    eventually(Duration::from_secs(60), "the first run", || ended(&before)).await;

    fill(&inside.join("filler"));
    // The next write fails: the Ack's record of this lease, or, if redb
    // still had room for that, the record of its report (then it is sent
    // from memory).
    let trigger = plane.submit(echo("the write that fails")).await.unwrap().run_id;
    let unready = eventually_async(Duration::from_secs(60), "readiness to name the outbox", || async {
        get(&http, &readyz)
            .await
            .filter(|(status, body)| *status == 503 && body.contains("outbox cannot record"))
    })
    .await;
    assert!(unready.1.contains("No space left on device"), "{unready:?}");
    let (_, text) = get(&http, &metrics).await.unwrap();
    assert!(text.contains("outbox_writable 0\n"), "{text}");
    assert!(!text.contains("outbox_write_failures_total 0\n"), "{text}");
    let mut during = Vec::new();
    for i in 0..3 {
        during.push(
            plane
                .submit(echo(&format!("while the disk is full {i}")))
                .await
                .unwrap()
                .run_id,
        );
    }
    // Time for a wrong Ack or run to show: none may happen unrecorded.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for run_id in &during {
        let run = plane.run(run_id).unwrap();
        assert!(
            run.acked_at.is_none(),
            "acknowledged while the outbox cannot record: {run:?}"
        );
        assert!(
            !matches!(run.status, RunStatus::Completed | RunStatus::Failed),
            "{run:?}"
        );
    }
    during.push(trigger);

    std::fs::remove_file(inside.join("filler")).unwrap();
    for run_id in &during {
        let run = eventually(Duration::from_secs(60), "each run after space returned", || {
            ended(run_id)
        })
        .await;
        assert_eq!(run.status, RunStatus::Completed, "{run:?}");
    }
    eventually_async(Duration::from_secs(30), "the node to be ready again", || async {
        get(&http, &readyz).await.filter(|(status, _)| *status == 200)
    })
    .await;
    let (_, text) = get(&http, &metrics).await.unwrap();
    assert!(text.contains("outbox_writable 1\n"), "{text}");
    // Time for a repeated outcome to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for run in plane.runs() {
        assert_eq!(run.outcomes, 1, "exactly one outcome: {run:?}");
    }
    node.kill().await.unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(
        stderr.matches("the outbox cannot record:").count(),
        1,
        "the fault is logged once per episode:\n{stderr}"
    );
    assert!(stderr.contains("the outbox records again"), "{stderr}");
    assert!(!stderr.contains("running it anyway"), "{stderr}");
    plane.shutdown().await;
}
