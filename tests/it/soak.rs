//! The soak (opt-in: `scripts/soak`, or `cargo test --test it -- --ignored
//! soak::`): 10,000 runs of `prime-sieve` (milliseconds each) through 10
//! control-plane restarts and 20 node SIGKILLs, interleaved, bounded in
//! time; every run must end with exactly one outcome at the plane, and no
//! lease may run twice on the node.
//!
//! Too long for every CI run (minutes, not seconds), so it is ignored by
//! default; `chaos.rs` runs the same checks at a tenth of the scale on
//! every build. `SOAK_RUNS`, `SOAK_PLANE_RESTARTS` and `SOAK_NODE_KILLS`
//! scale it down for a quick look.

use crate::chaos::{finished_leases, spawn_node, wait_for_plane};
use crate::support::*;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|value| {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{name}={value} is not a count"))
        })
        .unwrap_or(default)
}

/// The runs at the plane, all pages of them (the dev plane pages its list
/// with `limit` and `after`; a plane that ignores them answers everything
/// at once, which ends the loop too). `None` while the plane is down.
async fn all_runs(http: &reqwest::Client, url: &str) -> Option<Vec<serde_json::Value>> {
    let mut runs: Vec<serde_json::Value> = Vec::new();
    let mut after: Option<String> = None;
    for _page in 0..10_000 {
        let mut request = http.get(format!("{url}/v1/runs")).query(&[("limit", "1000")]);
        if let Some(after) = &after {
            request = request.query(&[("after", after.as_str())]);
        }
        let page: serde_json::Value = request.send().await.ok()?.json().await.ok()?;
        let page = page.as_array()?.clone();
        let last = page.last().and_then(|run| run["runId"].as_str()).map(str::to_string);
        let full = page.len() >= 1000;
        runs.extend(page);
        match last {
            Some(last) if full && after.as_deref() != Some(last.as_str()) => after = Some(last),
            _ => break,
        }
    }
    // A plane that ignores the paging parameters repeats its first page.
    let mut seen = std::collections::HashSet::new();
    runs.retain(|run| seen.insert(run["runId"].as_str().unwrap_or_default().to_string()));
    Some(runs)
}

fn has_ended(run: &serde_json::Value) -> bool {
    run["status"] == "completed" || run["status"] == "failed"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: run with scripts/soak"]
async fn ten_thousand_runs_through_plane_restarts_and_node_kills_each_end_exactly_once() {
    let runs_wanted = setting("SOAK_RUNS", 10_000);
    let plane_restarts = setting("SOAK_PLANE_RESTARTS", 10);
    let node_kills = setting("SOAK_NODE_KILLS", 20);
    let whole = Duration::from_secs(60 * 60);
    let started = Instant::now();

    node_runtime::support::tls::install_crypto_provider();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let plane_data = tempfile::tempdir().unwrap();
    let node_data = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let mut plane = spawn_plane_process(port, plane_data.path(), "30s");
    wait_for_plane(&http, &url).await;
    let agents = agents_layout();

    // The runs go in batches, one event (a plane restart or a node kill)
    // per batch, fired once the runs before the batch and half of it have
    // ended: so
    // every event strikes with runs in flight, however fast the node is.
    let events = plane_restarts + node_kills;
    let plan: Vec<bool> = (0..events)
        .map(|at| plane_restarts > 0 && (at * plane_restarts) / events != ((at + 1) * plane_restarts) / events)
        .collect();
    let batches = events + 1;
    let log_of = |life: usize| logs.path().join(format!("node-{life}.log"));
    let mut life = 0;
    let mut node = spawn_node(&url, agents.path(), node_data.path(), &log_of(life));
    let mut submitted = 0;
    let mut submitting = Duration::ZERO;
    for batch in 0..batches {
        let until = (batch + 1) * runs_wanted / batches;
        let began = Instant::now();
        let mut batch_ids = Vec::new();
        while submitted < until {
            // A little work per run (primes below 2,000,000: about 15 ms), so that
            // runs are in flight whenever an event strikes.
            let body = serde_json::json!({
                "agentId": "prime-sieve", "version": "1.0.0",
                "inputRef": {"soak": submitted.to_string()}
            });
            // The plane may be restarting: retry, bounded.
            let mut answer = None;
            for _ in 0..600 {
                let sent = http.post(format!("{url}/v1/runs")).json(&body).send().await;
                if let Ok(sent) = sent
                    && let Ok(json) = sent.json::<serde_json::Value>().await
                {
                    answer = Some(json);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let answer = answer.expect("the plane takes a submission within 30 s");
            let run_id = answer["runId"].as_str().unwrap_or_else(|| panic!("{answer}"));
            batch_ids.push(run_id.to_string());
            submitted += 1;
        }
        submitting += began.elapsed();
        let Some(&restart_the_plane) = plan.get(batch) else {
            break;
        };
        // Runs are leased in submission order: once the batch's middle run
        // has ended, about half the batch is done and the rest in flight.
        let middle = &batch_ids[batch_ids.len() / 2];
        loop {
            assert!(
                started.elapsed() < whole,
                "the soak ran past {whole:?} before event {batch}"
            );
            let run = async {
                http.get(format!("{url}/v1/runs/{middle}"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()
            };
            let run: Option<serde_json::Value> = run.await;
            if run.is_some_and(|run| has_ended(&run)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let in_flight = async {
            let runs = all_runs(&http, &url).await?;
            Some(runs.iter().filter(|run| !has_ended(run)).count())
        };
        let done = in_flight.await.map_or("?".to_string(), |n| format!("{n} not ended"));
        if restart_the_plane {
            plane.kill().await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            plane = spawn_plane_process(port, plane_data.path(), "30s");
            wait_for_plane(&http, &url).await;
            eprintln!("event {batch}: plane restarted ({submitted} submitted, {done})");
        } else {
            node.kill().await.unwrap(); // SIGKILL
            life += 1;
            node = spawn_node(&url, agents.path(), node_data.path(), &log_of(life));
            eprintln!("event {batch}: node SIGKILLed and restarted ({submitted} submitted, {done})");
        }
    }

    let runs = loop {
        assert!(
            started.elapsed() < whole,
            "the soak ran past {whole:?} waiting for the last runs"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(runs) = all_runs(&http, &url).await
            && runs.len() == runs_wanted
            && runs.iter().all(has_ended)
        {
            break runs;
        }
    };
    // Time for a wrong late report to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs = all_runs(&http, &url)
        .await
        .filter(|runs| runs.len() == runs_wanted)
        .unwrap_or(runs);
    let elapsed = started.elapsed();
    node.kill().await.unwrap();
    plane.kill().await.unwrap();

    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let (mut re_leased, mut repeats) = (0, 0);
    for run in &runs {
        assert_eq!(run["outcomes"], 1, "exactly one outcome: {run}");
        let status = match run["status"].as_str().unwrap() {
            "failed" => format!("failed: {}", run["errorInfo"]["errorMessage"].as_str().unwrap_or("?")),
            other => other.to_string(),
        };
        if status != "completed" {
            assert!(
                run["errorInfo"]["retryable"] == true,
                "only a run cut short by a kill may fail, and retryably: {run}"
            );
        }
        *by_status.entry(status).or_default() += 1;
        re_leased += usize::from(run["attempts"].as_u64() > Some(1));
        repeats += run["repeats"].as_u64().unwrap_or(0);
    }
    // What a kill may cut short: the node's 4 slots, its queue (twice the
    // slots) and the one lease its dispatcher holds; a finished run's
    // report is on disk before its slot frees, so nothing more.
    let interrupted: usize = by_status
        .iter()
        .filter(|(status, _)| status.starts_with("failed"))
        .map(|(_, count)| count)
        .sum();
    assert!(
        interrupted <= node_kills * (4 + 8 + 1),
        "{interrupted} runs failed over {node_kills} kills: more than was in flight ({by_status:?})"
    );
    let mut finished = Vec::new();
    for life in 0..=life {
        finished.extend(finished_leases(&std::fs::read_to_string(log_of(life)).unwrap()));
    }
    let mut unique = finished.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), finished.len(), "no lease ran twice on this node");
    eprintln!(
        "soak: {runs_wanted} runs, {plane_restarts} plane restarts, {node_kills} node SIGKILLs in {elapsed:.1?} \
         (submitting took {submitting:.1?}); every run ended with exactly one outcome: {by_status:?}; \
         {re_leased} re-leased, {repeats} identical report(s) resent"
    );
}
