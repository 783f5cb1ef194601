//! A node whose disk fills, on a small tmpfs that outlives it: mounted
//! in a mount namespace held by a process of its own, the nodes started
//! in it with `nsenter`, filled and freed through `/proc/PID/root`. So a
//! node stopped during the outage and started again finds what the last
//! one left. Mounting needs root and `unshare`; without them each test
//! prints why and passes without running.

use crate::disk_faults::{echo, fill, quick_plane, tmpfs_available};
use crate::support;

use std::path::PathBuf;
use std::time::Duration;

use node_runtime::dev_plane::{DevPlane, Run, RunStatus};
use support::*;

/// A tmpfs that outlives the nodes started on it, and their logs.
struct Disk {
    mount: tempfile::TempDir,
    /// Holds the mount namespace (killed when dropped).
    _holder: tokio::process::Child,
    pid: u32,
    /// Where this process sees the tmpfs.
    inside: PathBuf,
    agents: tempfile::TempDir,
    logs: tempfile::TempDir,
}

impl Disk {
    /// A tmpfs of `size`; None (having said why) where none can be mounted.
    async fn mount(size: &str) -> Option<Disk> {
        let mount = tempfile::tempdir().unwrap();
        if let Err(reason) = tmpfs_available(mount.path()) {
            println!("skipped: {reason}");
            return None;
        }
        let holder = tokio::process::Command::new("unshare")
            .args([
                "-m",
                "sh",
                "-c",
                "mount -t tmpfs -o size=\"$1\" tmpfs \"$0\" && touch \"$0/mounted\" && exec sleep 600",
            ])
            .arg(mount.path())
            .arg(size)
            .kill_on_drop(true)
            .spawn()
            .expect("unshare starts");
        let pid = holder.id().expect("the holder runs");
        let inside = PathBuf::from(format!("/proc/{pid}/root")).join(mount.path().strip_prefix("/").unwrap());
        eventually(Duration::from_secs(10), "the tmpfs to be mounted", || {
            inside.join("mounted").exists().then_some(())
        })
        .await;
        Some(Disk {
            mount,
            _holder: holder,
            pid,
            inside,
            agents: agents_layout(),
            logs: tempfile::tempdir().unwrap(),
        })
    }

    /// Starts `serve` against `plane_url` with its data directory on the
    /// tmpfs, logging to the log `name`.
    fn start(&self, plane_url: &str, name: &str) -> tokio::process::Child {
        tokio::process::Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-m", "--"])
            .arg(env!("CARGO_BIN_EXE_node-runtime"))
            .arg("serve")
            .env("NodeRuntime__NodeId", "full-disk-node")
            .env("NodeRuntime__ControlPlaneUrl", plane_url)
            .env("NodeRuntime__AgentsDirectory", self.agents.path())
            .env("NodeRuntime__DataDirectory", self.mount.path().join("data"))
            .env("NodeRuntime__HeartbeatIntervalSeconds", "1")
            .env("NodeRuntime__DrainTimeoutSeconds", "1")
            // Compiled components in memory only: the outbox alone is on the disk.
            .env("Sandbox__CompiledCacheMaxBytes", "0")
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(self.logs.path().join(name)).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("nsenter starts")
    }

    /// Fills the tmpfs, then frees `bytes` of it; returns the filler.
    fn leave_free(&self, bytes: u64) -> PathBuf {
        let filler = self.inside.join("filler");
        fill(&filler);
        let full = std::fs::metadata(&filler).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .unwrap()
            .set_len(full - bytes)
            .unwrap();
        filler
    }

    /// What the node started with the log `name` has written.
    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.path().join(name)).unwrap()
    }
}

/// The run, once it has ended.
fn ended(plane: &DevPlane, run_id: &str) -> Option<Run> {
    plane
        .run(run_id)
        .filter(|run| matches!(run.status, RunStatus::Completed | RunStatus::Failed))
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
    let Some(disk) = Disk::mount("2m").await else { return };
    let plane = quick_plane().await;
    let mut node = disk.start(&plane.url(), "first");
    let ended = |run_id: &str| ended(&plane, run_id);
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
    fill(&disk.inside.join("filler"));
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
            failed = disk.log("first").contains("the outbox cannot record:");
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
        let log = disk.log("first");
        log.lines()
            .any(|line| line.contains("run failed") && line.contains(held.as_str()))
            .then_some(())
    })
    .await;
    // Time for a report sent from memory to reach the plane.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let run = plane.run(&held).unwrap();
    let log = disk.log("first");
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
    let first = disk.log("first");
    assert!(status.success(), "{status:?}\n{first}");
    assert!(
        first.contains("exiting before the outbox could record this report, which was therefore not sent"),
        "{first}"
    );
    // Started again on the disk still full (an operator's first try),
    // then given room: the lease it finds interrupted ends with one Fail.
    let mut node = disk.start(&plane.url(), "second");
    eventually(Duration::from_secs(60), "the second node to register", || {
        let log = disk.log("second");
        log.contains("registered with the control plane").then_some(())
    })
    .await;
    std::fs::remove_file(disk.inside.join("filler")).unwrap();
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
    plane.shutdown().await;
}

/// A report larger than the room the disk has left cannot be recorded
/// whole, before or after the outbox reopens: the lease is marked
/// answered (a small write) and the report sent from memory, and the node
/// goes on taking leases (review 1 of stop 35: it held such a report for
/// good, and its retries kept the outbox failing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_too_large_for_the_room_left_is_sent_once_the_lease_is_marked_answered() {
    let Some(disk) = Disk::mount("8m").await else { return };
    let plane = quick_plane().await;
    let mut node = disk.start(&plane.url(), "node");
    let ended = |run_id: &str| ended(&plane, run_id);
    let before = plane.submit(echo("before the disk filled")).await.unwrap().run_id;
    eventually(Duration::from_secs(60), "the first run", || ended(&before)).await;
    disk.leave_free(600 * 1024);

    let mut big = echo("");
    big.agent_id = "big-result".to_string();
    big.input_ref = [("size".to_string(), "1000000".to_string())].into_iter().collect();
    let big = plane.submit(big).await.unwrap().run_id;
    let log = || disk.log("node");
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
}

/// Removals of answered reports are committed unsynced; a commit that
/// fails on the full disk takes them back (redb reopens at the last
/// synced commit). The reopen removes them again: a restart afterwards
/// sends no answered report a second time (review 2 of stop 34 saw
/// thousands sent again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_reports_a_failed_commit_took_back_are_not_sent_again_after_a_restart() {
    // Room for the outbox to grow to what it holds after the stream (some
    // 2.2 MiB of tmpfs pages): on 2 MiB it filled the disk itself, and the
    // restarted node could not open it (CI, under load).
    let Some(disk) = Disk::mount("4m").await else { return };
    let plane = std::sync::Arc::new(quick_plane().await);
    let mut node = disk.start(&plane.url(), "first");
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
    fill(&disk.inside.join("filler"));
    let log_says = |what: &str| disk.log("first").contains(what);
    eventually(Duration::from_secs(60), "a commit to fail", || {
        log_says("the outbox cannot record:").then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    submitter.await.unwrap();
    std::fs::remove_file(disk.inside.join("filler")).unwrap();
    eventually(Duration::from_secs(60), "the outbox to record again", || {
        log_says("the outbox records again").then_some(())
    })
    .await;
    eventually(Duration::from_secs(120), "every run to end", || {
        plane.runs().iter().all(|run| run.outcomes == 1).then_some(())
    })
    .await;
    let status = stop_node(&mut node).await;
    assert!(
        status.success(),
        "{status:?}; the end of the node's log:\n{}",
        last_lines(&disk.log("first"), 40)
    );

    let mut node = disk.start(&plane.url(), "second");
    let registered = tokio::time::timeout(Duration::from_secs(60), async {
        while !disk.log("second").contains("registered") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        registered.is_ok(),
        "the restarted node did not register within 60 s; the end of its log:\n{}",
        last_lines(&disk.log("second"), 40)
    );
    // Time for reports sent again to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs = plane.runs();
    let repeated: Vec<_> = runs.iter().filter(|run| run.repeats > 0).collect();
    if let Some(first_repeated) = repeated.first() {
        // What each node logged of one of them, and the first node's
        // warnings and errors (the whole log is thousands of lines).
        let about = |log: &str| {
            log.lines()
                .filter(|line| line.contains(first_repeated.run_id.as_str()))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let first = disk.log("first");
        let troubles: Vec<_> = first
            .lines()
            .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
            .collect();
        panic!(
            "{} of {} answered reports were sent again after the restart.\n\
             The first node's warnings and errors:\n{}\n\
             What the nodes logged of run {}:\n{}\n{}",
            repeated.len(),
            runs.len(),
            last_lines(&troubles.join("\n"), 30),
            first_repeated.run_id,
            about(&first),
            about(&disk.log("second")),
        );
    }
    for run in &runs {
        assert_eq!(run.outcomes, 1, "{run:?}");
    }
    node.kill().await.unwrap();
}

/// An outbox closed while removals a failed commit took back are not yet
/// made again (its file not reopened since: the node got SIGTERM during
/// the outage) reopens the file once more as it closes, and makes them
/// again if it can, with the little room removals need; if it cannot,
/// they stay, and the next start sends those reports again (the node
/// names them as it exits). Review 1 of stop 37 saw such repeats, and no
/// line about them; review 2, a closing reopen that asked for the room
/// of a burst of leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removals_a_failed_commit_took_back_are_made_again_as_the_outbox_closes() {
    use node_runtime::control_plane::Report;
    use node_runtime::outbox::Outbox;
    use node_runtime::proto::CompleteRequest;
    let Some(disk) = Disk::mount("8m").await else { return };
    let report = |lease_id: &str, bytes: usize| {
        Report::Complete(CompleteRequest {
            lease_id: lease_id.to_string(),
            run_id: format!("run-of-{lease_id}"),
            node_id: "closing-node".to_string(),
            result: [("padding".to_string(), "x".repeat(bytes))].into_iter().collect(),
            ..CompleteRequest::default()
        })
    };
    let deadline = node_runtime::outbox::now_unix_ms() + 600_000;
    // Answered reports, removed by unsynced commits, then a commit the
    // full disk refuses: the file reopens at the last synced commit,
    // which still holds them.
    let filler = disk.inside.join("filler");
    // Each round an outbox of its own: a failed commit can leave room
    // inside the file that a later reopen finds.
    let answered_then_refused = |round: &str| {
        let outbox = Outbox::open(&disk.inside.join(round)).unwrap();
        for i in 0..20 {
            let lease_id = format!("{round}-{i}");
            outbox.put(&report(&lease_id, 512), deadline).unwrap();
        }
        for i in 0..20 {
            assert!(outbox.remove(&format!("{round}-{i}")).unwrap(), "removed");
        }
        fill(&filler);
        assert!(
            outbox
                .put(&report(&format!("{round}-refused"), 300 << 10), deadline)
                .is_err(),
            "the full disk took a 300 KiB report"
        );
        assert!(!outbox.is_writable());
        outbox
    };

    // Some room made (64 KiB: less than a reopen proves before the node
    // takes leases again, enough for removals), and the outbox closed
    // before the writer's next reopen (200 ms after the failure): the
    // closing reopen makes the removals again.
    let outbox = answered_then_refused("room");
    let full = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(full - (64 << 10))
        .unwrap();
    drop(outbox);
    std::fs::remove_file(&filler).unwrap();
    let reopened = Outbox::open(&disk.inside.join("room")).unwrap();
    assert_eq!(
        reopened.pending_count().unwrap(),
        0,
        "answered reports came back after the outbox closed: {:?}",
        reopened
            .pending()
            .unwrap()
            .iter()
            .map(|pending| pending.report.lease_id().to_string())
            .collect::<Vec<_>>()
    );
    drop(reopened);

    // Closed while its file cannot be reopened (its directory moved away:
    // a full disk can still take a removal in pages the file holds):
    // nothing can make them again, and they are there at the next start,
    // to be sent again.
    let outbox = answered_then_refused("gone");
    std::fs::rename(disk.inside.join("gone"), disk.inside.join("away")).unwrap();
    drop(outbox);
    std::fs::rename(disk.inside.join("away"), disk.inside.join("gone")).unwrap();
    std::fs::remove_file(&filler).unwrap();
    let reopened = Outbox::open(&disk.inside.join("gone")).unwrap();
    assert_eq!(reopened.pending_count().unwrap(), 20);
}

/// A node started on a disk with no room at all for its outbox says so,
/// and what to do, and exits 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_full_disk_says_to_free_space() {
    let Some(disk) = Disk::mount("1m").await else { return };
    let plane = quick_plane().await;
    fill(&disk.inside.join("filler"));
    let mut node = disk.start(&plane.url(), "node");
    let status = tokio::time::timeout(Duration::from_secs(60), node.wait())
        .await
        .expect("the node stops at once")
        .unwrap();
    let log = disk.log("node");
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("the disk next to the outbox is full: free some space there and start again"),
        "{log}"
    );
}

/// An upgrade from a node before 2026-12-07 on a disk without room for
/// a copy of its accepted ids: the node serves, with the ids where they
/// are, and moves them at a start with room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_without_room_to_move_the_accepted_ids_serves_and_still_knows_them() {
    const OLD_IDS: redb::TableDefinition<&str, (i64, i64)> = redb::TableDefinition::new("accepted");
    const NEW_IDS: redb::TableDefinition<(i64, &str), i64> = redb::TableDefinition::new("accepted_in_order");
    let Some(disk) = Disk::mount("8m").await else { return };
    let now = node_runtime::outbox::now_unix_ms();
    let (url, recorded) = support::scripted::serve(vec![
        support::scripted::lease("lease-old-7", "echo", now + 600_000),
        support::scripted::lease("lease-fresh", "echo", now + 600_000),
    ])
    .await;
    let file = disk.inside.join("data").join("outbox.redb");
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
    let filler = disk.leave_free(256 * 1024);

    let mut node = disk.start(&url, "first");
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
        disk.log("first")
    );
    let status = stop_node(&mut node).await;
    let log = disk.log("first");
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
    let mut node = disk.start(&url, "second");
    eventually(Duration::from_secs(60), "the restarted node to pull", || {
        (recorded.lock().unwrap().pulls >= 2).then_some(())
    })
    .await;
    let status = stop_node(&mut node).await;
    let log = disk.log("second");
    assert!(status.success(), "{status:?}\n{log}");
    assert!(!log.contains("were not moved"), "{log}");
    assert_eq!(count("old"), None, "moved at the start with room");
    assert_eq!(count("new"), Some(ids + 1));
}
