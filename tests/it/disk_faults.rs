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

/// A dev plane on loopback that looks for pending runs every 200 ms.
async fn quick_plane() -> DevPlane {
    DevPlane::start(PlaneOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        idle_poll: Duration::from_millis(200),
        ..PlaneOptions::default()
    })
    .await
    .unwrap()
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

/// A node in the mount namespace of `holder` (where its data directory is
/// a tmpfs), logging to `stderr`.
fn node_in(holder: u32, plane_url: &str, agents: &Path, data: &Path, stderr: &Path) -> tokio::process::Child {
    tokio::process::Command::new("nsenter")
        .args(["-t", &holder.to_string(), "-m", "--"])
        .arg(env!("CARGO_BIN_EXE_node-runtime"))
        .arg("serve")
        .env("NodeRuntime__NodeId", "held-report-node")
        .env("NodeRuntime__ControlPlaneUrl", plane_url)
        .env("NodeRuntime__AgentsDirectory", agents)
        .env("NodeRuntime__DataDirectory", data)
        .env("NodeRuntime__HeartbeatIntervalSeconds", "1")
        .env("NodeRuntime__DrainTimeoutSeconds", "1")
        // Compiled components in memory only: the outbox alone is on the disk.
        .env("Sandbox__CompiledCacheMaxBytes", "0")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(stderr).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("nsenter starts")
}

/// A tmpfs of `size` at `mount`, in the mount namespace of a process
/// that outlives the nodes started in it (see [`node_in`]), so a node
/// started again finds what the last one left: the process, its pid, and
/// where this process sees the tmpfs.
async fn tmpfs_holder(mount: &Path, size: &str) -> (tokio::process::Child, u32, PathBuf) {
    let holder = tokio::process::Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "mount -t tmpfs -o size=\"$1\" tmpfs \"$0\" && touch \"$0/mounted\" && exec sleep 600",
        ])
        .arg(mount)
        .arg(size)
        .kill_on_drop(true)
        .spawn()
        .expect("unshare starts");
    let pid = holder.id().expect("the holder runs");
    let inside = PathBuf::from(format!("/proc/{pid}/root")).join(mount.strip_prefix("/").unwrap());
    eventually(Duration::from_secs(10), "the tmpfs to be mounted", || {
        inside.join("mounted").exists().then_some(())
    })
    .await;
    (holder, pid, inside)
}

/// Sends SIGTERM to `node` and waits (up to a minute) for it to exit.
async fn stop_node(node: &mut tokio::process::Child) -> std::process::ExitStatus {
    let pid = node.id().expect("the node runs");
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), node.wait())
        .await
        .expect("the node stops within a minute")
        .unwrap()
}

/// The review's case: a run that ends while the disk is full has a report
/// the outbox cannot record. Sent from memory, it reached the plane, and a
/// node stopped before the disk was freed then failed the lease as
/// interrupted at its next start: a second outcome overwriting the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_the_full_disk_cannot_record_waits_so_a_restart_leaves_its_lease_one_outcome() {
    let mount = tempfile::tempdir().unwrap();
    if let Err(reason) = tmpfs_available(mount.path()) {
        println!("skipped: {reason}");
        return;
    }
    let plane = quick_plane().await;
    let (mut holder, holder_pid, inside) = tmpfs_holder(mount.path(), "2m").await;
    let agents = agents_layout();
    let logs = tempfile::tempdir().unwrap();
    let data = mount.path().join("data");
    let first_log = logs.path().join("first.log");
    let mut node = node_in(holder_pid, &plane.url(), agents.path(), &data, &first_log);
    let ended = |run_id: &str| {
        plane
            .run(run_id)
            .filter(|run| matches!(run.status, RunStatus::Completed | RunStatus::Failed))
    };
    let before = plane.submit(echo("before the disk filled")).await.unwrap().run_id;
    eventually(Duration::from_secs(60), "the first run", || ended(&before)).await;

    // Running (acknowledged, so recorded) when the disk fills; its time
    // budget ends it while the outbox cannot record.
    let mut held = echo("");
    held.agent_id = "sleep-forever".to_string();
    held.budgets.max_duration_seconds = Some(8);
    let held = plane.submit(held).await.unwrap().run_id;
    eventually(Duration::from_secs(60), "the sleeping run to be acknowledged", || {
        plane.run(&held).filter(|run| run.acked_at.is_some())
    })
    .await;
    fill(&inside.join("filler"));
    // Leases submitted until a write fails (redb may fit a small one in
    // pages it holds); from then on the outbox records nothing.
    let mut failed = false;
    for attempt in 0..20 {
        plane
            .submit(echo(&format!("a write that may fail {attempt}")))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        while !failed && started.elapsed() < Duration::from_secs(2) {
            failed = std::fs::read_to_string(&first_log)
                .unwrap()
                .contains("the outbox cannot record:");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if failed {
            break;
        }
    }
    assert!(failed, "no write failed on the full disk");
    assert!(
        ended(&held).is_none(),
        "the sleeping run ended before the outbox failed: the test proves nothing"
    );
    eventually(Duration::from_secs(60), "the sleeping run to end", || {
        let log = std::fs::read_to_string(&first_log).unwrap();
        log.lines()
            .any(|line| line.contains("run failed") && line.contains(held.as_str()))
            .then_some(())
    })
    .await;
    // Time for a report sent from memory to reach the plane.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let run = plane.run(&held).unwrap();
    let log = std::fs::read_to_string(&first_log).unwrap();
    assert_eq!(
        run.outcomes, 0,
        "a report the outbox could not record was sent: {run:?}\n{log}"
    );
    assert!(
        log.contains("the outbox cannot record this report: it waits, unsent"),
        "{log}"
    );

    // Stopped before the disk is freed: the report is lost with the
    // process, and the next start fails the lease, its one outcome.
    let status = stop_node(&mut node).await;
    let first = std::fs::read_to_string(&first_log).unwrap();
    assert!(status.success(), "{status:?}\n{first}");
    assert!(
        first.contains("exiting before the outbox could record this report, which was therefore not sent"),
        "{first}"
    );
    // Started again on the disk still full (an operator's first try),
    // then given room: the lease it finds interrupted ends with one Fail.
    let second_log = logs.path().join("second.log");
    let mut node = node_in(holder_pid, &plane.url(), agents.path(), &data, &second_log);
    eventually(Duration::from_secs(60), "the second node to register", || {
        let log = std::fs::read_to_string(&second_log).unwrap();
        log.contains("registered with the control plane").then_some(())
    })
    .await;
    std::fs::remove_file(inside.join("filler")).unwrap();
    let run = eventually(Duration::from_secs(60), "the held lease to be failed", || ended(&held)).await;
    assert_eq!(run.status, RunStatus::Failed, "{run:?}");
    let error = run.error_info.as_ref().unwrap();
    assert!(error.error_message.contains("restarted"), "{run:?}");
    assert!(error.retryable, "{run:?}");
    // Time for a second outcome to show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for run in plane.runs() {
        assert!(run.outcomes <= 1, "one outcome at most: {run:?}");
        assert_eq!(
            run.repeats, 0,
            "a report answered before the restart was sent again: {run:?}"
        );
    }
    node.kill().await.unwrap();
    holder.kill().await.unwrap();
    plane.shutdown().await;
}

/// A report larger than the room the disk has left cannot be recorded
/// whole, before or after the outbox reopens: the lease is marked
/// answered (a small write) and the report sent from memory, and the node
/// goes on taking leases (review 1 of stop 35: it held such a report for
/// good, and its retries kept the outbox failing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_too_large_for_the_room_left_is_sent_once_the_lease_is_marked_answered() {
    let mount = tempfile::tempdir().unwrap();
    if let Err(reason) = tmpfs_available(mount.path()) {
        println!("skipped: {reason}");
        return;
    }
    let plane = quick_plane().await;
    let (mut holder, holder_pid, inside) = tmpfs_holder(mount.path(), "8m").await;
    let agents = agents_layout();
    let logs = tempfile::tempdir().unwrap();
    let data = mount.path().join("data");
    let log_path = logs.path().join("node.log");
    let mut node = node_in(holder_pid, &plane.url(), agents.path(), &data, &log_path);
    let ended = |run_id: &str| {
        plane
            .run(run_id)
            .filter(|run| matches!(run.status, RunStatus::Completed | RunStatus::Failed))
    };
    let before = plane.submit(echo("before the disk filled")).await.unwrap().run_id;
    eventually(Duration::from_secs(60), "the first run", || ended(&before)).await;
    let filler = inside.join("filler");
    fill(&filler);
    let full = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(full - 600 * 1024)
        .unwrap();

    let mut big = echo("");
    big.agent_id = "big-result".to_string();
    big.input_ref = [("size".to_string(), "1000000".to_string())].into_iter().collect();
    let big = plane.submit(big).await.unwrap().run_id;
    let log = || std::fs::read_to_string(&log_path).unwrap();
    let run = eventually(Duration::from_secs(60), "the large report", || ended(&big)).await;
    assert_eq!(run.status, RunStatus::Completed, "{run:?}\n{}", log());
    assert!(
        log().contains("the report does not fit in the room the outbox has"),
        "{}",
        log()
    );
    for i in 0..3 {
        let run_id = plane.submit(echo(&format!("after {i}"))).await.unwrap().run_id;
        let started = std::time::Instant::now();
        while ended(&run_id).is_none() && started.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            ended(&run_id).is_some(),
            "run {i} after the large report did not end:\n{}",
            log()
        );
    }
    for run in plane.runs() {
        assert_eq!(run.outcomes, 1, "{run:?}");
    }
    node.kill().await.unwrap();
    holder.kill().await.unwrap();
}

/// Removals of answered reports are committed unsynced; a commit that
/// fails on the full disk takes them back (redb reopens at the last
/// synced commit). The reopen removes them again: a restart afterwards
/// sends no answered report a second time (review 2 of stop 34 saw
/// thousands sent again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_reports_a_failed_commit_took_back_are_not_sent_again_after_a_restart() {
    let mount = tempfile::tempdir().unwrap();
    if let Err(reason) = tmpfs_available(mount.path()) {
        println!("skipped: {reason}");
        return;
    }
    let plane = std::sync::Arc::new(quick_plane().await);
    let (mut holder, holder_pid, inside) = tmpfs_holder(mount.path(), "2m").await;
    let agents = agents_layout();
    let logs = tempfile::tempdir().unwrap();
    let data = mount.path().join("data");
    let first_log = logs.path().join("first.log");
    let mut node = node_in(holder_pid, &plane.url(), agents.path(), &data, &first_log);
    let first = plane.submit(echo("first")).await.unwrap().run_id;
    eventually(Duration::from_secs(60), "the first run", || {
        plane.run(&first).filter(|run| run.outcomes == 1)
    })
    .await;
    // A steady stream of runs, so that removals are always in flight
    // when a commit fails.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let submitter = {
        let (plane, stop) = (plane.clone(), stop.clone());
        tokio::spawn(async move {
            for i in 0..3_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let _ = plane.submit(echo(&format!("stream {i}"))).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    fill(&inside.join("filler"));
    let log_says = |what: &str| std::fs::read_to_string(&first_log).unwrap().contains(what);
    eventually(Duration::from_secs(60), "a commit to fail", || {
        log_says("the outbox cannot record:").then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    submitter.await.unwrap();
    std::fs::remove_file(inside.join("filler")).unwrap();
    eventually(Duration::from_secs(60), "the outbox to record again", || {
        log_says("the outbox records again").then_some(())
    })
    .await;
    eventually(Duration::from_secs(120), "every run to end", || {
        plane.runs().iter().all(|run| run.outcomes == 1).then_some(())
    })
    .await;
    let status = stop_node(&mut node).await;
    assert!(status.success(), "{status:?}");

    let second_log = logs.path().join("second.log");
    let mut node = node_in(holder_pid, &plane.url(), agents.path(), &data, &second_log);
    eventually(Duration::from_secs(60), "the restarted node to register", || {
        std::fs::read_to_string(&second_log)
            .unwrap()
            .contains("registered")
            .then_some(())
    })
    .await;
    // Time for reports sent again to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs = plane.runs();
    let repeated: Vec<_> = runs.iter().filter(|run| run.repeats > 0).collect();
    assert!(
        repeated.is_empty(),
        "{} of {} answered reports were sent again after the restart:\n{}",
        repeated.len(),
        runs.len(),
        std::fs::read_to_string(&first_log).unwrap()
    );
    for run in &runs {
        assert_eq!(run.outcomes, 1, "{run:?}");
    }
    node.kill().await.unwrap();
    holder.kill().await.unwrap();
}

/// A node started on a disk with no room at all for its outbox says so,
/// and what to do, and exits 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_full_disk_says_to_free_space() {
    let mount = tempfile::tempdir().unwrap();
    if let Err(reason) = tmpfs_available(mount.path()) {
        println!("skipped: {reason}");
        return;
    }
    let plane = quick_plane().await;
    let (mut holder, holder_pid, inside) = tmpfs_holder(mount.path(), "1m").await;
    fill(&inside.join("filler"));
    let agents = agents_layout();
    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("node.log");
    let mut node = node_in(
        holder_pid,
        &plane.url(),
        agents.path(),
        &mount.path().join("data"),
        &log_path,
    );
    let status = tokio::time::timeout(Duration::from_secs(60), node.wait())
        .await
        .expect("the node stops at once")
        .unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("the disk next to the outbox is full: free some space there and start again"),
        "{log}"
    );
    holder.kill().await.unwrap();
}

/// An upgrade from a node before 2026-12-07 on a disk without room for
/// a copy of its accepted ids: the node serves, with the ids where they
/// are, and moves them at a start with room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_without_room_to_move_the_accepted_ids_serves_and_still_knows_them() {
    const OLD_IDS: redb::TableDefinition<&str, (i64, i64)> = redb::TableDefinition::new("accepted");
    const NEW_IDS: redb::TableDefinition<(i64, &str), i64> = redb::TableDefinition::new("accepted_in_order");
    let mount = tempfile::tempdir().unwrap();
    if let Err(reason) = tmpfs_available(mount.path()) {
        println!("skipped: {reason}");
        return;
    }
    let now = node_runtime::outbox::now_unix_ms();
    let (url, recorded) = support::scripted::serve(vec![
        support::scripted::lease("lease-old-7", "echo", now + 600_000),
        support::scripted::lease("lease-fresh", "echo", now + 600_000),
    ])
    .await;
    let (mut holder, holder_pid, inside) = tmpfs_holder(mount.path(), "8m").await;
    let file = inside.join("data").join("outbox.redb");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let ids = 20_000;
    {
        // As an older node leaves it: its tables, and pages its reports
        // used and gave back, where the next writes go.
        const CHURN: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("pending");
        let db = redb::Database::create(&file).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut old = txn.open_table(OLD_IDS).unwrap();
            for i in 0..ids {
                old.insert(format!("lease-old-{i}").as_str(), (now, now + 3_600_000))
                    .unwrap();
            }
            let mut reports = txn.open_table(CHURN).unwrap();
            for i in 0..64 {
                reports
                    .insert(format!("report-{i}").as_str(), [7u8; 8 * 1024].as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(CHURN).unwrap().retain(|_, _| false).unwrap();
        txn.commit().unwrap();
    }
    // Room for the node's own writes, not for a copy of the ids.
    let filler = inside.join("filler");
    fill(&filler);
    let full = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(full - 256 * 1024)
        .unwrap();

    let agents = agents_layout();
    let logs = tempfile::tempdir().unwrap();
    let first_log = logs.path().join("first.log");
    let data = mount.path().join("data");
    let mut node = node_in(holder_pid, &url, agents.path(), &data, &first_log);
    let completed = || {
        let recorded = recorded.lock().unwrap();
        recorded
            .completes
            .iter()
            .any(|complete| complete.lease_id == "lease-fresh")
    };
    let started = std::time::Instant::now();
    while !completed() && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        completed(),
        "the fresh lease did not complete within 60 s:\n{}",
        std::fs::read_to_string(&first_log).unwrap()
    );
    let status = stop_node(&mut node).await;
    let log = std::fs::read_to_string(&first_log).unwrap();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        log.contains("were not moved to today's layout: the move needs room"),
        "{log}"
    );
    {
        let recorded = recorded.lock().unwrap();
        let ran = |lease_id: &str| {
            recorded.completes.iter().any(|report| report.lease_id == lease_id)
                || recorded.fails.iter().any(|report| report.lease_id == lease_id)
                || recorded.acks.iter().any(|(ack, _)| ack.lease_id == lease_id)
        };
        assert!(!ran("lease-old-7"), "a lease the older node accepted ran again\n{log}");
    }
    assert!(log.contains("lease received twice"), "{log}");
    let count = |table: &str| {
        let db = redb::Database::create(&file).unwrap();
        let txn = db.begin_read().unwrap();
        match table {
            "old" => txn
                .open_table(OLD_IDS)
                .map(|t| redb::ReadableTableMetadata::len(&t).unwrap())
                .ok(),
            _ => txn
                .open_table(NEW_IDS)
                .map(|t| redb::ReadableTableMetadata::len(&t).unwrap())
                .ok(),
        }
    };
    assert_eq!(count("old"), Some(ids), "the older ids stay where they were");

    // With room, the next start moves them.
    std::fs::remove_file(&filler).unwrap();
    let second_log = logs.path().join("second.log");
    let mut node = node_in(holder_pid, &url, agents.path(), &data, &second_log);
    eventually(Duration::from_secs(60), "the restarted node to pull", || {
        (recorded.lock().unwrap().pulls >= 2).then_some(())
    })
    .await;
    let status = stop_node(&mut node).await;
    let log = std::fs::read_to_string(&second_log).unwrap();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(!log.contains("were not moved"), "{log}");
    assert_eq!(count("old"), None, "moved at the start with room");
    assert_eq!(count("new"), Some(ids + 1));
    holder.kill().await.unwrap();
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
