//! The node's own CPU per lease, and the plane's, with each in its own
//! process: what running a lease costs beyond the run itself.
//!
//! `bench lease-cost [RUNS] [--node BINARY] [--plane BINARY] [--slots N]
//! [--connections N]`, after `scripts/build-agents` (the `bench/lease-cost`
//! script builds everything and runs it). Defaults: 20,000 runs, slots 64,
//! 8 connections, both binaries `$CARGO_TARGET_DIR/release/node-runtime`.
//!
//! It starts `PLANE dev --plane-only` (in memory) and `NODE serve` (slots
//! and `MaxConcurrentLeases` N, a fresh data directory on the machine's
//! disk, the default log level, its log to a file) on loopback, waits
//! for the node to register, warms `echo` up with one run (compiling it),
//! waits until the node has run for 7 s (past its first OTLP export),
//! then submits RUNS `echo` runs over REST as fast as its connections
//! allow (HTTP/1.1 keep-alive, a small load generator of its own) and
//! waits until the plane has every outcome (`GET /v1/runs:counts`, polled
//! every 2 ms). Over that window it reads utime + stime of both processes
//! (`/proc/<pid>/stat`) and prints each one's CPU per lease, the runs/s
//! from the first submission to the last outcome, and the load average.
//! `--rate R` paces the submissions at R runs/s in all, so that the node's
//! cost per lease is measured without the two cores saturated (at
//! saturation, contention between the node, the plane and the load
//! generator moves CPU per lease by 15-30% between identical runs).
//! `LEASE_COST_KEEP=1` keeps the scratch folder with both logs.
//! A different `--node` or `--plane` binary (say, the commit before a
//! change) measures a before/after in the same session.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bench::wait_for_quiet_machine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long after its start the node is first measured.
const SETTLE: Duration = Duration::from_secs(7);

struct Options {
    runs: usize,
    node: PathBuf,
    plane: PathBuf,
    slots: u32,
    connections: usize,
    /// Submissions per second in all (None: as fast as the plane takes them).
    rate: Option<f64>,
}

const USAGE: &str =
    "usage: bench lease-cost [RUNS] [--node BINARY] [--plane BINARY] [--slots N] [--connections N] [--rate RUNS_PER_S]";

/// A usage error: said with the usage, exit status 2, no backtrace.
fn refuse(why: &str) -> ! {
    eprintln!("bench lease-cost: {why}\n{USAGE}");
    std::process::exit(2)
}

fn number<T: std::str::FromStr>(name: &str, text: &str) -> T {
    text.parse()
        .unwrap_or_else(|_| refuse(&format!("{name} takes a number, not {text:?}")))
}

fn options(args: Vec<String>) -> Options {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let built = Path::new(&target).join("release/node-runtime");
    let mut options = Options {
        runs: 20_000,
        node: built.clone(),
        plane: built,
        slots: 64,
        connections: 8,
        rate: None,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().unwrap_or_else(|| refuse(&format!("{name} needs a value")));
        match arg.as_str() {
            "--node" => options.node = value("--node").into(),
            "--plane" => options.plane = value("--plane").into(),
            "--slots" => options.slots = number("--slots", &value("--slots")),
            "--connections" => options.connections = number("--connections", &value("--connections")),
            "--rate" => options.rate = Some(number("--rate", &value("--rate"))),
            runs => options.runs = number("RUNS", runs),
        }
    }
    for binary in [&options.node, &options.plane] {
        if !binary.is_file() {
            refuse(&format!(
                "{} does not exist: build it (cargo build --release -p node-runtime) or pass --node/--plane",
                binary.display()
            ));
        }
    }
    options
}

/// A child process killed (and reaped) when dropped.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// utime + stime so far, in clock ticks (`/proc/<pid>/stat` fields 14
    /// and 15, counted after the command name, which may hold spaces).
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("/proc/<pid>/stat");
        let after_name = &stat[stat.rfind(')').expect("a stat line") + 2..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // fields[0] is field 3 (state): utime is field 14, stime 15.
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks_per_second() -> f64 {
    // The kernel's USER_HZ, which /proc reports in: `getconf CLK_TCK`.
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The plane: listening on a port it picks, which its log says.
fn start_plane(binary: &Path, scratch: &Path) -> (Process, String) {
    let log = scratch.join("plane.log");
    let child = Command::new(binary)
        .args(["dev", "--plane-only", "--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
    let mut plane = Process { child, log };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let file = std::fs::File::open(&plane.log).unwrap();
        for line in BufReader::new(file).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("dev control plane listening on ")
                && let Some(url) = rest.split_whitespace().next()
            {
                let address = url.trim_start_matches("http://").to_string();
                return (plane, address);
            }
        }
        assert!(
            plane.exited().is_none() && Instant::now() < deadline,
            "the plane did not start:\n{}",
            plane.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_node(binary: &Path, scratch: &Path, address: &str, slots: u32) -> Process {
    let agents = scratch.join("agents");
    std::fs::create_dir_all(agents.join("echo")).unwrap();
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let echo = std::fs::canonicalize(Path::new(&target).join("agents/echo.wasm"))
        .expect("$CARGO_TARGET_DIR/agents/echo.wasm (run scripts/build-agents)");
    std::os::unix::fs::symlink(echo, agents.join("echo/1.0.0.wasm")).unwrap();
    let log = scratch.join("node.log");
    let child = Command::new(binary)
        .arg("serve")
        .env_remove("RUST_LOG")
        .env("NodeRuntime__NodeId", "lease-cost")
        .env("NodeRuntime__ControlPlaneUrl", format!("http://{address}"))
        .env("NodeRuntime__Capacity__Slots", slots.to_string())
        .env("NodeRuntime__MaxConcurrentLeases", slots.to_string())
        .env("NodeRuntime__DataDirectory", scratch.join("data"))
        .env("NodeRuntime__AgentsDirectory", &agents)
        .env("NodeRuntime__HeartbeatIntervalSeconds", "2")
        .current_dir(scratch)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(scratch.join("node.out")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
    Process { child, log }
}

/// One keep-alive HTTP/1.1 connection, speaking just enough of it for
/// the plane's JSON answers (Content-Length bodies).
struct Connection {
    stream: TcpStream,
    host: String,
    buffer: Vec<u8>,
}

impl Connection {
    async fn open(address: &str) -> Connection {
        let stream = TcpStream::connect(address).await.expect("connect to the plane");
        stream.set_nodelay(true).unwrap();
        Connection {
            stream,
            host: address.to_string(),
            buffer: Vec::with_capacity(4096),
        }
    }

    /// Sends one request and returns the status and body of its answer.
    async fn request(&mut self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if !body.is_empty() {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        request.push_str(body);
        self.stream.write_all(request.as_bytes()).await.expect("send a request");
        self.buffer.clear();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(at) = find(&self.buffer, b"\r\n\r\n") {
                break at + 4;
            }
            let read = self.stream.read(&mut chunk).await.expect("read an answer");
            assert!(read > 0, "the plane closed the connection");
            self.buffer.extend_from_slice(&chunk[..read]);
        };
        let head = String::from_utf8_lossy(&self.buffer[..head_end]).to_string();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("a status line");
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        while self.buffer.len() < head_end + length {
            let read = self.stream.read(&mut chunk).await.expect("read a body");
            assert!(read > 0, "the plane closed the connection");
            self.buffer.extend_from_slice(&chunk[..read]);
        }
        let body = String::from_utf8_lossy(&self.buffer[head_end..head_end + length]).to_string();
        (status, body)
    }

    async fn get_json(&mut self, path: &str) -> (u16, serde_json::Value) {
        let (status, body) = self.request("GET", path, "").await;
        (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
    }

    async fn submit(&mut self, i: usize) {
        let body = format!(r#"{{"agentId":"echo","version":"1.0.0","inputRef":{{"message":"run {i}"}}}}"#);
        let (status, answer) = self.request("POST", "/v1/runs", &body).await;
        assert_eq!(status, 201, "submission {i} answered {status}: {answer}");
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// The plane's `{submitted, pending, finished}`.
async fn counts(connection: &mut Connection) -> (u64, u64) {
    let (status, counts) = connection.get_json("/v1/runs:counts").await;
    assert_eq!(
        status, 200,
        "GET /v1/runs:counts answered {status}: is the plane this build's?"
    );
    let field = |name: &str| counts[name].as_u64().expect("a count");
    (field("submitted"), field("finished"))
}

/// Polls until `finished` reaches `want`, or `limit` passes (None).
async fn finished_at(
    connection: &mut Connection,
    want: u64,
    limit: Duration,
    processes: &mut [&mut Process],
) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        let (_, finished) = counts(connection).await;
        if finished >= want {
            return Some(Instant::now());
        }
        for process in processes.iter_mut() {
            if let Some(status) = process.exited() {
                panic!("{} exited ({status}):\n{}", process.log.display(), process.log_tail());
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub async fn main(args: Vec<String>) {
    let options = options(args);
    let scratch = tempfile_dir();
    let (mut plane, address) = start_plane(&options.plane, &scratch);
    let mut node = start_node(&options.node, &scratch, &address, options.slots);
    let node_started = Instant::now();
    let mut control = Connection::open(&address).await;

    // Registered and active: then the warm-up run (compiles `echo`).
    let registered = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, answer) = control.get_json("/v1/nodes/lease-cost").await;
        if status == 200 && answer["status"]["state"] == "active" {
            break;
        }
        assert!(
            node.exited().is_none() && Instant::now() < registered,
            "the node did not register within 60 s:\n{}",
            node.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    control.submit(0).await;
    let warmed = finished_at(&mut control, 1, Duration::from_secs(180), &mut [&mut plane, &mut node]).await;
    assert!(warmed.is_some(), "the warm-up run did not end:\n{}", node.log_tail());

    // The node in its steady state: past its first OTLP export (5 s after
    // start by default), after which a node with no collector listening
    // stops building spans.
    tokio::time::sleep_until((node_started + SETTLE).into()).await;
    let load = wait_for_quiet_machine("lease-cost");
    // A fresh connection: the plane may close one left idle meanwhile.
    let mut control = Connection::open(&address).await;
    println!(
        "lease-cost: {} echo runs, slots {}, {} connections, {}; node {}, plane {}; load {load:.2}",
        options.runs,
        options.slots,
        options.connections,
        options
            .rate
            .map_or("unpaced".to_string(), |rate| format!("paced at {rate} runs/s")),
        options.node.display(),
        options.plane.display()
    );
    let ticks = clock_ticks_per_second();
    let profilers = profile_window(&node, &plane);
    let (node_before, plane_before) = (node.cpu_ticks(), plane.cpu_ticks());
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(1));
    let mut submitters = Vec::new();
    let connections = options.connections.max(1);
    for _ in 0..connections {
        let (next, address, runs) = (next.clone(), address.clone(), options.runs);
        // Paced: each connection submits its share of the rate.
        let mut pace = options.rate.map(|rate| {
            let mut interval = tokio::time::interval(Duration::from_secs_f64(connections as f64 / rate));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            interval
        });
        submitters.push(tokio::spawn(async move {
            let mut connection = Connection::open(&address).await;
            loop {
                if let Some(pace) = &mut pace {
                    pace.tick().await;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i > runs {
                    return;
                }
                connection.submit(i).await;
            }
        }));
    }
    for submitter in submitters {
        submitter.await.expect("a submitter panicked");
    }
    let submitted = started.elapsed();
    let want = options.runs as u64 + 1;
    let Some(ended) = finished_at(
        &mut control,
        want,
        Duration::from_secs(600),
        &mut [&mut plane, &mut node],
    )
    .await
    else {
        let (_, finished) = counts(&mut control).await;
        panic!(
            "only {} of {} runs ended within 600 s:\n{}",
            finished - 1,
            options.runs,
            node.log_tail()
        );
    };
    let (node_after, plane_after) = (node.cpu_ticks(), plane.cpu_ticks());
    stop_profiling(profilers);
    let elapsed = ended - started;
    let per_lease = |ticks_used: u64| ticks_used as f64 / ticks * 1e6 / options.runs as f64;
    let node_us = per_lease(node_after - node_before);
    let plane_us = per_lease(plane_after - plane_before);
    println!(
        "  submitted in {:.2} s ({:.0}/s); all {} outcomes in {:.2} s: {:.0} runs/s end to end",
        submitted.as_secs_f64(),
        options.runs as f64 / submitted.as_secs_f64(),
        options.runs,
        elapsed.as_secs_f64(),
        options.runs as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  CPU per lease: node {node_us:.1} us, plane {plane_us:.1} us (utime+stime over the window; node {:.2} s, plane {:.2} s of {:.2} s)",
        (node_after - node_before) as f64 / ticks,
        (plane_after - plane_before) as f64 / ticks,
        elapsed.as_secs_f64()
    );
    println!("  load after: {:.2}", bench::load_average());
    drop(node);
    drop(plane);
    if std::env::var_os("LEASE_COST_KEEP").is_some() {
        println!("  logs kept in {}", scratch.display());
    } else {
        let _ = std::fs::remove_dir_all(&scratch);
    }
}

/// With `LEASE_COST_PERF=DIR`: `perf record` of each process over the
/// measured window, into `DIR/node.perf.data` and `DIR/plane.perf.data`
/// (`LEASE_COST_PERF_ARGS`, default `-F 999 --call-graph dwarf,16384`).
/// The numbers of a profiled run are not the benchmark's: perf takes
/// CPU from the same two cores.
fn profile_window(node: &Process, plane: &Process) -> Vec<Child> {
    let Ok(dir) = std::env::var("LEASE_COST_PERF") else {
        return Vec::new();
    };
    std::fs::create_dir_all(&dir).unwrap();
    let args = std::env::var("LEASE_COST_PERF_ARGS").unwrap_or_else(|_| "-F 999 --call-graph dwarf,16384".into());
    let mut profilers = Vec::new();
    for (name, process) in [("node", node), ("plane", plane)] {
        let output = Path::new(&dir).join(format!("{name}.perf.data"));
        let profiler = Command::new("perf")
            .arg("record")
            .args(args.split_whitespace())
            .arg("-o")
            .arg(&output)
            .arg("-p")
            .arg(process.pid().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("perf (LEASE_COST_PERF is set)");
        profilers.push(profiler);
    }
    // Let perf attach before the window opens.
    std::thread::sleep(Duration::from_secs(1));
    profilers
}

fn stop_profiling(profilers: Vec<Child>) {
    for mut profiler in profilers {
        let _ = Command::new("kill").args(["-INT", &profiler.id().to_string()]).status();
        let _ = profiler.wait();
    }
}

/// A fresh directory under the system's temporary directory (on the
/// machine's disk here, so the outbox's fsyncs are real).
fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lease-cost-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
