//! The outbox on a disk that fails: a real full filesystem (a small tmpfs
//! mounted in a mount namespace of the node's own, filled through
//! `/proc/PID/root`), and damaged `outbox.redb` files at start-up.
//!
//! Mounting needs root and `unshare`; where either is missing the test
//! that needs them prints why and passes without running.

use crate::restart::outbox_command;
use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use node_runtime::dev_plane::{Budgets, DevPlane, NewRun, PlaneOptions, RunStatus};
use support::*;

/// Whether this machine lets a test mount a tmpfs in a mount namespace of
/// its own; the reason when not.
pub(crate) fn tmpfs_available(mount_point: &Path) -> Result<(), String> {
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

pub(crate) fn echo(message: &str) -> NewRun {
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

/// A dev plane on loopback that looks for pending runs every 200 ms.
pub(crate) async fn quick_plane() -> DevPlane {
    DevPlane::start(PlaneOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        idle_poll: Duration::from_millis(200),
        ..PlaneOptions::default()
    })
    .await
    .unwrap()
}

/// Writes zeros to `path` until the filesystem refuses more (bounded).
pub(crate) fn fill(path: &Path) {
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
    let plane = quick_plane().await;
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
    // A write that needs new room fails: the record of a lease (then it
    // waits, unacknowledged), or of its report (then the report waits,
    // unsent). redb may still fit a small write in pages it holds, so
    // runs are submitted until one write fails.
    let mut triggers = Vec::new();
    let mut unready = None;
    for attempt in 0..20 {
        triggers.push(
            plane
                .submit(echo(&format!("a write that may fail {attempt}")))
                .await
                .unwrap()
                .run_id,
        );
        let started = std::time::Instant::now();
        while unready.is_none() && started.elapsed() < Duration::from_secs(3) {
            unready = get(&http, &readyz)
                .await
                .filter(|(status, body)| *status == 503 && body.contains("outbox cannot record"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if unready.is_some() {
            break;
        }
    }
    let unready = unready.expect("readiness names the outbox once a write fails on the full disk");
    assert!(unready.1.contains("No space left on device"), "{unready:?}");
    // Scraped again and again: no made-up count of reports (an unreadable
    // outbox is said to be so), and the log is not flooded (checked below).
    for _ in 0..5 {
        let (_, body) = get(&http, &readyz).await.unwrap();
        assert!(!body.contains("18446744073709551615"), "{body}");
        assert!(!body.contains("reports, at its bound"), "{body}");
        let _ = get(&http, &metrics).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let (_, text) = get(&http, &metrics).await.unwrap();
    assert!(text.contains("outbox_writable 0\n"), "{text}");
    assert!(!text.contains("outbox_write_failures_total 0\n"), "{text}");
    // The heartbeats offer no slot meanwhile, so the plane assigns nothing
    // that would only wait here.
    eventually(Duration::from_secs(10), "a heartbeat offering no slot", || {
        let nodes = plane.nodes();
        let node = nodes.iter().find(|node| node.node_id == "full-disk-node")?;
        (node.status.available_slots == 0 && node.status.state == "active").then_some(())
    })
    .await;
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
    during.extend(triggers);

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
    eventually(Duration::from_secs(10), "a heartbeat offering slots again", || {
        let nodes = plane.nodes();
        let node = nodes.iter().find(|node| node.node_id == "full-disk-node")?;
        (node.status.available_slots > 0).then_some(())
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
    assert!(
        stderr.matches("cannot read the outbox's backlog").count() <= 1,
        "an unreadable backlog is logged once per episode, not per scrape:\n{stderr}"
    );
    assert!(!stderr.contains("running it anyway"), "{stderr}");
    plane.shutdown().await;
}

/// An outbox file with two reports in `dir`, closed.
fn outbox_with_reports(dir: &Path) -> PathBuf {
    use node_runtime::outbox::{Outbox, now_unix_ms};
    use node_runtime::proto::FailRequest;
    use node_runtime::worker::lease::Report;
    let outbox = Outbox::open(dir).unwrap();
    for lease_id in ["lease-kept-1", "lease-kept-2"] {
        let report = Report::Fail(FailRequest {
            lease_id: lease_id.to_string(),
            run_id: format!("run-of-{lease_id}"),
            retryable: true,
            ..FailRequest::default()
        });
        outbox.put(&report, now_unix_ms() + 60_000).unwrap();
    }
    outbox.path().to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_outbox_is_moved_aside_at_start_up_and_the_node_serves() {
    let plane = quick_plane().await;
    let agents = agents_layout();
    // Truncated (redb used to panic on it: a crash loop under
    // Restart=always), and random bytes.
    for damage in ["truncated", "random bytes"] {
        let data = tempfile::tempdir().unwrap();
        let file = outbox_with_reports(data.path());
        match damage {
            "truncated" => {
                let length = std::fs::metadata(&file).unwrap().len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&file)
                    .unwrap()
                    .set_len(length / 3)
                    .unwrap();
            }
            _ => std::fs::write(
                &file,
                (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect::<Vec<_>>(),
            )
            .unwrap(),
        }
        // The outbox command says what is wrong and what to do, no panic.
        let listed = outbox_command(data.path(), &["list"], None).await;
        let stderr = String::from_utf8_lossy(&listed.stderr);
        assert_eq!(listed.status.code(), Some(1), "{damage}: {listed:?}");
        assert!(
            stderr.contains("is damaged") && stderr.contains("outbox list --file"),
            "{damage}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{damage}: {stderr}");

        let log = data.path().join("serve.log");
        let mut node = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
            .arg("serve")
            .env("NodeRuntime__NodeId", format!("damaged-{}", damage.replace(' ', "-")))
            .env("NodeRuntime__ControlPlaneUrl", plane.url())
            .env("NodeRuntime__AgentsDirectory", agents.path())
            .env("NodeRuntime__DataDirectory", data.path())
            .env("NodeRuntime__HeartbeatIntervalSeconds", "1")
            .env("RUST_LOG", "warn")
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let run_id = plane
            .submit(NewRun {
                agent_id: "echo".to_string(),
                version: "1.0.0".to_string(),
                input_ref: Default::default(),
                metadata: Default::default(),
                budgets: Budgets::default(),
            })
            .await
            .unwrap()
            .run_id;
        let run = eventually(
            Duration::from_secs(60),
            "a run on the node that found its outbox damaged",
            || plane.run(&run_id).filter(|run| run.status == RunStatus::Completed),
        )
        .await;
        assert_eq!(run.outcomes, 1);
        node.kill().await.unwrap();

        let aside: Vec<PathBuf> = std::fs::read_dir(data.path())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                path.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("outbox.redb.corrupt-")
            })
            .collect();
        assert_eq!(aside.len(), 1, "{damage}: moved aside once: {aside:?}");
        let stderr = std::fs::read_to_string(&log).unwrap();
        assert!(stderr.contains("THE OUTBOX WAS DAMAGED"), "{damage}: {stderr}");
        assert!(
            stderr.contains(&file.display().to_string()) && stderr.contains(&aside[0].display().to_string()),
            "{damage}: both paths named: {stderr}"
        );
        assert!(file.exists(), "{damage}: a fresh outbox took its place");

        // What is left is read from the file moved aside, or the command
        // says plainly that nothing can be.
        let salvaged = outbox_command(data.path(), &["list", "--file", aside[0].to_str().unwrap()], None).await;
        let stdout = String::from_utf8_lossy(&salvaged.stdout);
        let stderr = String::from_utf8_lossy(&salvaged.stderr);
        assert!(
            (salvaged.status.success() && stdout.contains("report(s) read from"))
                || (salvaged.status.code() == Some(1) && stderr.contains("nothing can be read from")),
            "{damage}: {salvaged:?}"
        );
        assert!(!stderr.contains("panicked"), "{damage}: {stderr}");
    }
    plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_list_file_reads_the_reports_of_an_outbox_file_without_changing_it() {
    let data = tempfile::tempdir().unwrap();
    let file = outbox_with_reports(data.path());
    let aside = data.path().join("outbox.redb.corrupt-20261206T000000Z");
    std::fs::rename(&file, &aside).unwrap();
    let before = std::fs::read(&aside).unwrap();
    let listed = outbox_command(data.path(), &["list", "--file", aside.to_str().unwrap()], None).await;
    assert!(listed.status.success(), "{listed:?}");
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(stdout.contains("2 report(s) read from"), "{stdout}");
    assert!(
        stdout.contains("lease-kept-1") && stdout.contains("lease-kept-2"),
        "{stdout}"
    );
    assert_eq!(std::fs::read(&aside).unwrap(), before, "the file is not changed");
    assert!(!file.exists(), "no outbox is created beside it");
}
