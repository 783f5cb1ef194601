//! The `node-runtime` binary, driven the way a developer drives it: flags
//! in, report and exit code out.

use crate::support;

use std::os::unix::fs::FileTypeExt;
use std::process::Command;

use support::{agent_path, node_runtime, run_agent_json};

#[test]
fn run_agent_json_reports_a_completed_echo() {
    let (code, json) = run_agent_json(
        &agent_path("echo"),
        &[
            "--input",
            r#"{"invoice": 7}"#,
            "--metadata",
            "tenant=acme",
            "--input-ref",
            "extra=1",
        ],
    );
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["outcome"], "completed");
    assert_eq!(json["kind"], serde_json::Value::Null);
    assert_eq!(json["retryable"], false);
    assert_eq!(json["result"]["message"], r#"{"invoice": 7}"#);
    assert_eq!(json["result"]["extra"], "1");
    assert_eq!(json["result"]["metadata.tenant"], "acme");
    assert_eq!(json["result"]["agent_id"], "echo");
    let report = &json["report"];
    for field in [
        "fuel_consumed",
        "peak_memory_bytes",
        "wall_ms",
        "instantiate_us",
        "tokens_in",
        "tokens_out",
        "usd_cost",
    ] {
        assert!(report[field].is_number(), "report.{field} in {report}");
    }
    assert!(report["fuel_consumed"].as_u64().unwrap() > 0);
}

#[test]
fn run_agent_prints_a_readable_report() {
    let echo = agent_path("echo");
    let output = node_runtime(&["run-agent", echo.to_str().unwrap(), "--input", "\"hello\""]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.starts_with("completed"), "{stdout}");
    assert!(stdout.contains("\"hello\""), "{stdout}");
    assert!(stdout.contains("fuel consumed"), "{stdout}");
    assert!(stdout.contains("peak memory"), "{stdout}");
}

#[test]
fn each_failure_class_has_its_own_exit_code() {
    let cases: [(&str, &[&str], i32, &str); 5] = [
        ("agent-error", &[], 3, "agent.error"),
        ("panic", &[], 4, "agent.trap"),
        ("other-world", &[], 5, "agent.invalid"),
        ("spin-forever", &["--fuel", "1000000"], 6, "budget.fuel"),
        ("memory-bomb", &["--max-memory", "32MiB"], 6, "budget.memory"),
    ];
    for (agent, flags, expected_code, kind) in cases {
        let (code, json) = run_agent_json(&agent_path(agent), flags);
        assert_eq!(code, expected_code, "{agent}: {json}");
        assert_eq!(json["outcome"], "failed", "{agent}");
        assert_eq!(json["kind"], kind, "{agent}: {json}");
        assert!(json["message"].as_str().unwrap().len() > 10, "{agent}: {json}");
    }
    let (_, json) = run_agent_json(&agent_path("agent-error"), &[]);
    assert_eq!(json["retryable"], true);
}

#[test]
fn spin_forever_with_a_timeout_fails_budget_deadline() {
    let (code, json) = run_agent_json(&agent_path("spin-forever"), &["--timeout", "1s"]);
    assert_eq!(code, 6, "{json}");
    assert_eq!(json["kind"], "budget.deadline");
    // Where the guest was comes after the result, once its call is unwound.
    let backtrace = cut_off_backtrace("spin-forever", &[]);
    assert!(backtrace.contains("SpinForever"), "{backtrace}");

    // With JSON log lines, it is one of them: stderr stays JSON lines.
    let agent = agent_path("spin-forever");
    let output = node_runtime(&[
        "run-agent",
        agent.to_str().unwrap(),
        "--timeout",
        "300ms",
        "--json",
        "--log-format",
        "json",
    ]);
    assert_eq!(output.status.code(), Some(6));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line:?}")))
        .collect();
    assert!(
        events.iter().any(|event| event["fields"]["backtrace"]
            .as_str()
            .is_some_and(|backtrace| backtrace.contains("SpinForever"))),
        "{stderr}"
    );
}

/// `run-agent AGENT --timeout 300ms` with `extra` flags, for an agent that
/// computes past it: what it printed after the result, where the agent was.
fn cut_off_backtrace(agent: &str, extra: &[&str]) -> String {
    let agent = agent_path(agent);
    let mut args = vec!["run-agent", agent.to_str().unwrap(), "--timeout", "300ms"];
    args.extend_from_slice(extra);
    let output = node_runtime(&args);
    assert_eq!(output.status.code(), Some(6));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let (_, backtrace) = stderr
        .split_once("where the agent was when its deadline cut it off:")
        .unwrap_or_else(|| panic!("no backtrace after the result: {stderr}"));
    backtrace.to_string()
}

/// A node reports positions only; `symbolize`, given the agent's file,
/// writes the details again with the source lines, from stdin or a file,
/// indented as `run-agent` prints them or not.
/// The frames in a file of their own, kept until the test ends.
fn dir_file_for(frames: &[&str]) -> std::path::PathBuf {
    let file = std::env::temp_dir().join(format!("symbolize-{}.txt", std::process::id()));
    std::fs::write(&file, frames.join("\n")).unwrap();
    file
}

#[test]
fn symbolize_adds_the_source_lines_to_a_backtrace_a_node_reported() {
    let (_, json) = run_agent_json(&agent_path("panic"), &[]);
    // The backtrace as a node reports it: the frames, no source lines.
    let reported: Vec<&str> = json["details"]
        .as_str()
        .unwrap()
        .lines()
        .filter(|line| line.starts_with("error while") || line.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert!(
        reported.len() > 5 && !reported.join("\n").contains(".rs:"),
        "{reported:?}"
    );
    let panic = agent_path("panic");
    let symbolize = |details: String, extra: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_node-runtime"))
            .arg("symbolize")
            .arg(&panic)
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(details.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let indented: String = reported.iter().map(|line| format!("  {line}\n")).collect();
    for details in [reported.join("\n"), indented] {
        let output = symbolize(details, &[]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let (_, run) = stdout.split_once(" - panic.wasm!run\n").expect(&stdout);
        assert!(
            run.trim_start().starts_with("at ") && run.contains("panic/src/lib.rs:17:9"),
            "{stdout}"
        );
    }
    // On a machine with many cores: the limit counts from what the
    // process holds when it sets it, threads' reservations included.
    let output = Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args(["symbolize", "--details"])
        .arg(dir_file_for(&reported))
        .arg("--")
        .arg(&panic)
        .env("TOKIO_WORKER_THREADS", "64")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("panic/src/lib.rs:17:9"),
        "{output:?}"
    );
    // From a file too.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("details.txt");
    std::fs::write(&file, reported.join("\n")).unwrap();
    let output = node_runtime(&[
        "symbolize",
        panic.to_str().unwrap(),
        "--details",
        file.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("panic/src/lib.rs:17:9"));
    // Text without a backtrace, and a .cwasm, are usage errors naming why.
    let output = symbolize("stderr:\nerror while executing at wasm backtrace:".to_string(), &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no backtrace"));
    let cwasm = dir.path().join("panic.cwasm");
    let compiled = node_runtime(&["compile", panic.to_str().unwrap(), "-o", cwasm.to_str().unwrap()]);
    assert!(compiled.status.success());
    let output = node_runtime(&[
        "symbolize",
        cwasm.to_str().unwrap(),
        "--details",
        file.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("a .cwasm keeps no DWARF"));
}

/// DWARF within every bound that still makes the reader's work grow past
/// its size: 10,000 compile units all naming one list of 100,000 ranges
/// (addr2line would hold 10^9 of them). `symbolize` limits its own
/// address space (2 GiB) and gives up at 2 s: it ends with the frames as
/// they were, and never holds more than its limit.
#[test]
fn symbolize_stays_within_its_memory_however_the_dwarf_multiplies_the_work() {
    fn section(id: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![id];
        let mut n = contents.len();
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            out.push(if n == 0 { byte } else { byte | 0x80 });
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(contents);
        out
    }
    fn custom(name: &str, data: &[u8]) -> Vec<u8> {
        let mut contents = vec![name.len() as u8];
        contents.extend_from_slice(name.as_bytes());
        contents.extend_from_slice(data);
        section(0, &contents)
    }
    // Abbreviation 1: a compile unit with DW_AT_ranges (sec_offset).
    let abbrev = [1u8, 0x11, 0, 0x55, 0x17, 0, 0, 0];
    let mut info = Vec::new();
    for _ in 0..10_000 {
        // DWARF 4, 32-bit, address size 4; the entry: code 1, ranges at 0.
        info.extend_from_slice(&12u32.to_le_bytes());
        info.extend_from_slice(&[4, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0]);
    }
    let mut ranges = Vec::new();
    for i in 0..100_000u32 {
        ranges.extend_from_slice(&(i * 2).to_le_bytes());
        ranges.extend_from_slice(&(i * 2 + 1).to_le_bytes());
    }
    ranges.extend_from_slice(&[0; 8]);
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    module.extend(section(1, &[1, 0x60, 0, 0]));
    module.extend(section(3, &[1, 0]));
    let code = module.len() + 2;
    module.extend(section(10, &[1, 2, 0, 0x0b]));
    module.extend(custom(".debug_abbrev", &abbrev));
    module.extend(custom(".debug_info", &info));
    module.extend(custom(".debug_ranges", &ranges));
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("shared-ranges.wasm");
    std::fs::write(&agent, &module).unwrap();
    let details = dir.path().join("details.txt");
    let backtrace = format!(
        "error while executing at wasm backtrace:\n    0: {:#8x} - <unknown>!f",
        code + 1
    );
    std::fs::write(&details, &backtrace).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args([
            "symbolize",
            agent.to_str().unwrap(),
            "--details",
            details.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (mut peak_kib, mut limit, mut no_core, mut status) = (0u64, None::<u64>, false, None);
    for _ in 0..1200 {
        if let Some(ended) = child.try_wait().unwrap() {
            status = Some(ended);
            break;
        }
        // The limits it set itself, as the kernel holds them.
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
        for line in limits.lines() {
            let soft = line.split_whitespace().rev().nth(2).unwrap_or_default();
            if line.starts_with("Max address space") {
                limit = limit.or(soft.parse().ok());
            }
            no_core |= line.starts_with("Max core file size") && soft == "0";
        }
        let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if let Some(kib) = proc_status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        {
            peak_kib = peak_kib.max(kib);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let Some(status) = status else {
        let _ = child.kill();
        panic!("symbolize did not end within a minute");
    };
    let stdout = std::io::read_to_string(child.stdout.take().unwrap()).unwrap();
    let limit = limit.expect("symbolize limits its address space");
    assert!(no_core, "symbolize writes no core dump");
    assert!(peak_kib * 1024 <= limit, "it held {peak_kib} KiB, over its {limit} B");
    // It gave up (the frames as they were, and why), or its allocator
    // refused past the limit; never source lines it could not have read.
    assert!(
        (status.success() && stdout.starts_with(&backtrace) && stdout.contains("[no source lines"))
            || !status.success(),
        "{status}: {stdout}"
    );
}

/// A guest chooses how long the source lines of its backtrace are (every
/// inlined call is two lines in each frame): `run-agent` adds 16 KiB of
/// them at most.
#[test]
fn the_backtrace_of_a_guest_cut_off_while_computing_is_bounded() {
    let backtrace = cut_off_backtrace("hostile", &["--input-ref", "attack=inline-spin"]);
    assert!(backtrace.contains("hostile.wasm!hostile::recurse"), "{backtrace}");
    assert!(backtrace.contains("sample-agents/hostile/src/lib.rs:"), "{backtrace}");
    assert!(backtrace.contains("\n[source lines cut at 16 KiB]\n"), "{backtrace}");
    // Every frame is still there, past the cut.
    assert!(backtrace.contains("  19: "), "{backtrace}");
    // 20 frames of a line each, and the source lines.
    assert!(
        backtrace.len() <= 20 * 100 + 16 * 1024 + 64,
        "{} bytes",
        backtrace.len()
    );
}

/// The engine reports a trap without reading the agent's DWARF;
/// `run-agent`, which has the file, puts the source lines under the
/// frames after the run, as wasmtime would have.
#[test]
fn a_trap_s_backtrace_in_run_agent_has_the_source_lines_of_the_agent_s_file() {
    let (code, json) = run_agent_json(&agent_path("panic"), &[]);
    assert_eq!(code, 4, "{json}");
    let details = json["details"].as_str().unwrap();
    let (_, run) = details
        .split_once(" - panic.wasm!run\n")
        .unwrap_or_else(|| panic!("no frame of `run`: {details}"));
    assert!(
        run.trim_start().starts_with("at ") && run.contains("sample-agents/panic/src/lib.rs:17:9"),
        "the panic's line under the frame: {details}"
    );
    // The human form too, and the stderr after it is left as it was.
    let output = node_runtime(&["run-agent", agent_path("panic").to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("panic/src/lib.rs:17:9\n"), "{stdout}");
    assert!(stdout.contains("stderr:"), "{stdout}");
    // A stack overflow's innermost frame has no position; the frames
    // after it still get their lines.
    let (code, json) = run_agent_json(&agent_path("stack-overflow"), &[]);
    assert_eq!(code, 4, "{json}");
    let details = json["details"].as_str().unwrap();
    assert!(details.contains("stack-overflow/src/lib.rs:"), "{details}");
}

#[test]
fn usage_errors_exit_2_and_name_the_problem() {
    let echo = agent_path("echo");
    let echo = echo.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["run-agent", echo, "--max-memory", "lots"], "invalid size `lots`"),
        (&["run-agent", echo, "--timeout", "soon"], "invalid duration `soon`"),
        (
            &["run-agent", echo, "--input", "{not json"],
            "--input is not valid JSON",
        ),
        (
            &["run-agent", echo, "--fuel", "99999999999999"],
            "above the node's limit",
        ),
        (
            &["run-agent", "/nonexistent/agent.wasm"],
            "cannot read the agent file /nonexistent/agent.wasm",
        ),
        (&["run-agent", echo, "--input-ref", "novalue"], "expected KEY=VALUE"),
    ];
    for (args, expected) in cases {
        let output = node_runtime(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in {stderr}");
    }
}

#[test]
fn a_file_that_is_not_wasm_is_refused_as_agent_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("agent.wasm");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let (code, json) = run_agent_json(&script, &[]);
    assert_eq!(code, 5);
    assert_eq!(json["kind"], "agent.invalid");
    assert!(json["message"].as_str().unwrap().contains("not WebAssembly"), "{json}");
}

#[test]
fn compile_produces_a_cwasm_that_runs_and_a_tampered_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cwasm = dir.path().join("echo.cwasm");
    let echo = agent_path("echo");
    let output = node_runtime(&["compile", echo.to_str().unwrap(), "-o", cwasm.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("compiled"));

    let (code, json) = run_agent_json(&cwasm, &["--input", "1"]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["result"]["message"], "1");

    let mut bytes = std::fs::read(&cwasm).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    let tampered = dir.path().join("tampered.cwasm");
    std::fs::write(&tampered, bytes).unwrap();
    let (code, json) = run_agent_json(&tampered, &[]);
    assert_eq!(code, 5, "{json}");
    assert!(json["message"].as_str().unwrap().contains("damaged"), "{json}");

    // Cut short, or with bytes appended: the trailer is no longer at the
    // end, and the file is said to be damaged, not "not WebAssembly nor a
    // .cwasm" (which told the user to run the compile they just ran).
    let whole = std::fs::read(&cwasm).unwrap();
    for (name, bytes) in [
        ("truncated.cwasm", whole[..whole.len() - 100].to_vec()),
        ("extended.cwasm", [whole.as_slice(), b"appended"].concat()),
    ] {
        let damaged = dir.path().join(name);
        std::fs::write(&damaged, bytes).unwrap();
        let (code, json) = run_agent_json(&damaged, &[]);
        assert_eq!(code, 5, "{name}: {json}");
        let message = json["message"].as_str().unwrap();
        assert!(message.contains("damaged"), "{name}: {message}");
        assert!(!message.contains("not WebAssembly"), "{name}: {message}");
    }
}

#[test]
fn compile_refuses_what_could_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let output_path = dir.path().join("other.cwasm");
    let other = agent_path("other-world");
    let output = node_runtime(&["compile", other.to_str().unwrap(), "-o", output_path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&output.stderr).contains("another world"));
    assert!(!output_path.exists(), "nothing is written");
}

#[test]
fn compile_refuses_an_output_that_is_the_input_or_not_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("echo.wasm");
    std::fs::copy(agent_path("echo"), &input).unwrap();
    let original = std::fs::read(&input).unwrap();

    // The input as its own output: once, the .cwasm replaced the source.
    let same = node_runtime(&["compile", input.to_str().unwrap(), "-o", input.to_str().unwrap()]);
    assert_eq!(same.status.code(), Some(2), "{}", String::from_utf8_lossy(&same.stderr));
    assert!(String::from_utf8_lossy(&same.stderr).contains("is the input file itself"));
    assert_eq!(std::fs::read(&input).unwrap(), original, "the source is untouched");

    // A FIFO (as a device would be) is not replaced by a regular file.
    let fifo = dir.path().join("pipe");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let piped = node_runtime(&["compile", input.to_str().unwrap(), "-o", fifo.to_str().unwrap()]);
    assert_eq!(
        piped.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    assert!(String::from_utf8_lossy(&piped.stderr).contains("not a regular file"));
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo(), "still a FIFO");

    // A directory neither.
    let folder = dir.path().join("out");
    std::fs::create_dir(&folder).unwrap();
    let into = node_runtime(&["compile", input.to_str().unwrap(), "-o", folder.to_str().unwrap()]);
    assert_eq!(into.status.code(), Some(2));
    assert!(folder.is_dir());

    // A regular file is replaced, as before.
    let old = dir.path().join("old.cwasm");
    std::fs::write(&old, b"stale").unwrap();
    let replaced = node_runtime(&["compile", input.to_str().unwrap(), "-o", old.to_str().unwrap()]);
    assert_eq!(
        replaced.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&replaced.stderr)
    );
    assert_ne!(std::fs::read(&old).unwrap(), b"stale");
}

#[test]
fn run_agent_reads_no_more_of_an_agent_or_input_file_than_it_may_hold() {
    // Once, run-agent read any file whole before checking it: a 500 MB
    // file peaked at 1.05 GB, and /dev/zero grew without bound.
    let (code, json) = run_agent_json(std::path::Path::new("/dev/zero"), &[]);
    assert_eq!(code, 5, "{json}");
    assert!(json["message"].as_str().unwrap().contains("not WebAssembly"), "{json}");

    // Starts as WebAssembly, but larger than an agent may be (sparse: no
    // disk is written).
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.wasm");
    let file = std::fs::File::create(&big).unwrap();
    std::io::Write::write_all(&mut &file, b"\0asm\x0d\0\x01\0").unwrap();
    file.set_len(300 << 20).unwrap();
    let output = node_runtime(&["run-agent", big.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("larger than the 256 MiB an agent may be"), "{stderr}");

    let echo = agent_path("echo");
    let output = node_runtime(&["run-agent", echo.to_str().unwrap(), "--input-file", "/dev/zero"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--input-file /dev/zero is larger than the 32 MiB"),
        "{stderr}"
    );
}

/// The `Authorization` header and JSON body of each request a stub saw.
type SeenRequests = std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;

/// A one-route OpenAI-compatible stub on a runtime of its own (the binary
/// under test is a child process); returns its base URL and the
/// `Authorization` headers and bodies it saw.
fn llm_stub() -> (tokio::runtime::Runtime, String, SeenRequests) {
    use std::sync::Arc;
    let seen: SeenRequests = Arc::default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let recorder = seen.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<serde_json::Value>| {
                let recorder = recorder.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    recorder.lock().unwrap().push((auth, body.clone()));
                    axum::Json(serde_json::json!({
                        "model": body["model"],
                        "choices": [{"message": {"role": "assistant", "content": "stub answer"},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 9, "completion_tokens": 5},
                    }))
                }
            },
        ),
    );
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (runtime, url, seen)
}

#[test]
fn run_agent_calls_the_llm_endpoint_with_the_key_from_the_environment() {
    let (_runtime, url, seen) = llm_stub();
    let output = Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args(["run-agent", agent_path("llm-chat").to_str().unwrap(), "--json"])
        .args(["--llm-endpoint", &url, "--llm-key-env", "CLI_TEST_LLM_KEY"])
        .args(["--llm-model", "cli-model", "--max-tokens", "100"])
        .args(["--input-ref", "message=hello"])
        .env("CLI_TEST_LLM_KEY", "sk-cli-secret")
        .env("RUST_LOG", "debug")
        .output()
        .expect("the node-runtime binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["result"]["answer.0"], "stub answer");
    assert_eq!(json["report"]["tokens_in"], 9);
    assert_eq!(json["report"]["tokens_out"], 5);
    assert!(!stdout.contains("sk-cli-secret") && !stderr.contains("sk-cli-secret"));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, "Bearer sk-cli-secret");
    assert_eq!(seen[0].1["model"], "cli-model");
    // The budget less the prompt's estimate: 4 for the request, 4 for the
    // message, 2 for "hello".
    assert_eq!(
        seen[0].1["max_tokens"],
        100 - 10,
        "--max-tokens is the run's budget, the estimated prompt taken from it"
    );
}

#[test]
fn run_agent_names_an_unset_key_variable_and_a_raised_token_limit() {
    let output = node_runtime(&[
        "run-agent",
        agent_path("llm-chat").to_str().unwrap(),
        "--llm-endpoint",
        "http://127.0.0.1:9",
        "--llm-key-env",
        "CLI_TEST_NO_SUCH_VARIABLE",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("CLI_TEST_NO_SUCH_VARIABLE"), "{stderr}");

    let output = node_runtime(&[
        "run-agent",
        agent_path("llm-chat").to_str().unwrap(),
        "--max-tokens",
        "999999",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("tokens") && stderr.contains("--max-tokens"), "{stderr}");
}

/// The text of `tests/fixtures/NAME`.
fn fixture_text(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The reference node's own `appsettings.json` (as it ships: mTLS off, its
/// certificates under /etc/bpa/certs) in a fresh directory, with `overlay`
/// beside it as `appsettings.Development.json` when given.
fn reference_config_dir(overlay: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("appsettings.json"),
        fixture_text("reference-appsettings.json"),
    )
    .unwrap();
    if let Some(overlay) = overlay {
        std::fs::write(dir.path().join("appsettings.Development.json"), overlay).unwrap();
    }
    dir
}

/// The reference's file with the Development overlay of
/// `tests/fixtures`, which sets `NodeRuntime.NodeId`,
/// `NodeRuntime.Capacity.Slots` and `Logging.LogLevel.Default` only.
fn reference_config_dir_with_overlay() -> tempfile::TempDir {
    reference_config_dir(Some(&fixture_text("reference-appsettings.Development.json")))
}

/// The node binary with `args`, the hosting-environment variables of the
/// machine running the tests removed and `env` set.
fn node_in(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_node-runtime"));
    command
        .args(args)
        .env_remove("DOTNET_ENVIRONMENT")
        .env_remove("ASPNETCORE_ENVIRONMENT")
        .env("RUST_LOG", "warn");
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

/// `config check --config DIR/appsettings.json`: the exit code, the
/// effective configuration it printed (Null when none) and its stderr.
fn config_check(dir: &std::path::Path, env: &[(&str, &str)]) -> (i32, serde_json::Value, String) {
    let config = dir.join("appsettings.json");
    let output = node_in(&["config", "check", "--config", config.to_str().unwrap()], env)
        .output()
        .expect("the node-runtime binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let json = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    (output.status.code().expect("exited"), json, stderr)
}

#[test]
fn config_check_accepts_the_reference_nodes_own_appsettings_with_its_certificates_absent() {
    assert!(!std::path::Path::new("/etc/bpa/certs/node-cert.pem").exists());
    let dir = reference_config_dir(None);
    let (code, json, stderr) = config_check(dir.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json["NodeRuntime"]["NodeId"], "node-1");
    assert_eq!(json["NodeRuntime"]["ControlPlaneUrl"], "http://localhost:5109/");
    assert_eq!(json["MTls"]["Enabled"], false);
    assert_eq!(json["MTls"]["ClientCertificatePath"], "/etc/bpa/certs/node-cert.pem");
    assert_eq!(
        json["AgentRuntime"]["AzureAIFoundry"]["Endpoint"],
        serde_json::Value::Null
    );
    assert!(
        stderr.contains(
            "note: MTls.Enabled is false, so the files MTls.ClientCertificatePath, \
                         MTls.ClientKeyPath, MTls.ServerCaCertificatePath name are not read"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("environment Production (the default"), "{stderr}");
    assert!(
        stderr.contains("appsettings.Production.json beside it, which is optional"),
        "{stderr}"
    );

    // With mTLS on, the same file stops start-up naming the key.
    let (code, _, stderr) = config_check(dir.path(), &[("MTls__Enabled", "true")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("MTls.ClientCertificatePath"), "{stderr}");
    assert!(stderr.contains("/etc/bpa/certs/node-cert.pem"), "{stderr}");
}

#[test]
fn the_environments_appsettings_file_is_layered_over_the_base_key_by_key() {
    let dir = reference_config_dir_with_overlay();
    for variable in ["DOTNET_ENVIRONMENT", "ASPNETCORE_ENVIRONMENT"] {
        let (code, json, stderr) = config_check(dir.path(), &[(variable, "Development")]);
        assert_eq!(code, 0, "{variable}: {stderr}");
        let node = &json["NodeRuntime"];
        // The overlay's keys win...
        assert_eq!(node["NodeId"], "node-dev", "{variable}");
        assert_eq!(node["Capacity"]["Slots"], 2, "{variable}");
        assert_eq!(json["Logging"]["LogLevel"]["Default"], "Debug", "{variable}");
        // ...and the base's other keys remain, in the same sections too.
        assert_eq!(node["Capacity"]["Cpu"], "4", "{variable}");
        assert_eq!(node["Capacity"]["Memory"], "8Gi", "{variable}");
        assert_eq!(node["ControlPlaneUrl"], "http://localhost:5109/", "{variable}");
        assert_eq!(node["Metadata"]["Region"], "us-east-1", "{variable}");
        assert_eq!(
            json["Logging"]["LogLevel"]["Microsoft.AspNetCore"], "Warning",
            "{variable}"
        );
        assert_eq!(json["OpenTelemetry"]["ServiceName"], "Node.Runtime", "{variable}");
        assert!(
            stderr.contains(&format!("environment Development (from {variable})")),
            "{variable}: {stderr}"
        );
        assert!(
            stderr.contains("appsettings.Development.json over it"),
            "{variable}: {stderr}"
        );
    }

    // Both set: DOTNET_ENVIRONMENT wins, and the note says so.
    let (code, json, stderr) = config_check(
        dir.path(),
        &[
            ("DOTNET_ENVIRONMENT", "Production"),
            ("ASPNETCORE_ENVIRONMENT", "Development"),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json["NodeRuntime"]["NodeId"], "node-1");
    assert!(
        stderr.contains("from DOTNET_ENVIRONMENT, which wins over ASPNETCORE_ENVIRONMENT=Development"),
        "{stderr}"
    );

    // Neither: Production, whose file does not exist; Development's is not read.
    let (code, json, stderr) = config_check(dir.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json["NodeRuntime"]["NodeId"], "node-1");
    assert_eq!(json["NodeRuntime"]["Capacity"]["Slots"], 8);
}

#[test]
fn an_environment_variable_wins_over_both_appsettings_files() {
    let dir = reference_config_dir_with_overlay();
    let (code, json, stderr) = config_check(
        dir.path(),
        &[
            ("DOTNET_ENVIRONMENT", "Development"),
            ("NodeRuntime__NodeId", "node-env"),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json["NodeRuntime"]["NodeId"], "node-env");
    assert_eq!(json["NodeRuntime"]["Capacity"]["Slots"], 2, "the overlay's");
    assert_eq!(json["NodeRuntime"]["Capacity"]["Cpu"], "4", "the base's");
}

#[test]
fn an_invalid_environments_file_stops_config_check_and_serve_naming_that_file() {
    let dir = reference_config_dir(Some("{\n  \"NodeRuntime\": {\n"));
    let overlay = dir.path().join("appsettings.Development.json");
    let (code, _, stderr) = config_check(dir.path(), &[("DOTNET_ENVIRONMENT", "Development")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!("{} is not valid JSON", overlay.display())),
        "{stderr}"
    );

    // A bad value in it: the message says it came from that file.
    std::fs::write(&overlay, r#"{"NodeRuntime": {"Capacity": {"Slots": 0}}}"#).unwrap();
    let (code, _, stderr) = config_check(dir.path(), &[("ASPNETCORE_ENVIRONMENT", "Development")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!("NodeRuntime.Capacity.Slots is 0 (in {})", overlay.display())),
        "{stderr}"
    );

    let config = dir.path().join("appsettings.json");
    let output = node_in(
        &["serve", "--config", config.to_str().unwrap()],
        &[("DOTNET_ENVIRONMENT", "Development")],
    )
    .output()
    .expect("the node-runtime binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("(in {})", overlay.display())), "{stderr}");
}

#[test]
fn serve_starts_with_the_reference_nodes_own_appsettings_and_registers() {
    use node_runtime::dev_plane::{DevPlane, PlaneOptions};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let plane = runtime
        .block_on(DevPlane::start(PlaneOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..PlaneOptions::default()
        }))
        .unwrap();
    let dir = reference_config_dir(None);
    let config = dir.path().join("appsettings.json");
    let log = dir.path().join("serve.log");
    // The file as shipped; only the control plane's address is this test's.
    let mut child = node_in(
        &["serve", "--config", config.to_str().unwrap()],
        &[("NodeRuntime__ControlPlaneUrl", &plane.url())],
    )
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .expect("node-runtime serve starts");

    let started = std::time::Instant::now();
    let registered = loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("serve exited with {status}: {}", std::fs::read_to_string(&log).unwrap());
        }
        let nodes = plane.nodes();
        if let Some(node) = nodes.iter().find(|node| node.node_id == "node-1") {
            break node.clone();
        }
        if started.elapsed() > std::time::Duration::from_secs(60) {
            panic!("node-1 never registered: {}", std::fs::read_to_string(&log).unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(registered.capacity.slots, 8);
    assert_eq!(registered.metadata["Region"], "us-east-1");
    assert!(child.try_wait().unwrap().is_none(), "still serving");
    child.kill().unwrap();
    child.wait().unwrap();
    runtime.block_on(plane.shutdown());
}

/// `run-agent --spec -`: a definition from stdin runs with the built-in
/// agent, its placeholder filled from `--secret` for the `--allow-http`
/// host only, its answer in the result; without the grant it is refused
/// before the model is called.
#[test]
fn run_agent_runs_a_definition_from_stdin_and_refuses_what_the_flags_do_not_grant() {
    use std::io::Write as _;
    let (runtime, url, seen) = llm_stub();
    let target_seen: SeenRequests = std::sync::Arc::default();
    let recorder = target_seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<serde_json::Value>| {
                let recorder = recorder.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    recorder.lock().unwrap().push((auth, body));
                    axum::http::StatusCode::NO_CONTENT
                }
            },
        ),
    );
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let target = listener.local_addr().unwrap().to_string();
    runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let spec = serde_json::json!({
        "agentId": "hook-agent", "version": "2.0.0",
        "spec": {"name": "Hook", "instructions": "Say something.", "tools": ["http-post"],
                 "budget": {"maxTokens": 500},
                 "output": {"type": "Http", "config": {"endpoint": format!("http://{target}/hook"),
                            "headers": {"Authorization": "Token ${HOOK_TOKEN}"}}}}
    })
    .to_string();
    let run = |extra: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_node-runtime"))
            .args(["run-agent", "--spec", "-", "--json", "--input-ref", "message=hi"])
            .args(["--llm-endpoint", &url, "--llm-key-env", "CLI_SPEC_LLM_KEY"])
            .args(extra)
            .env("CLI_SPEC_LLM_KEY", "sk-spec")
            .env("HOOK_TOKEN_VAR", "hook-s3cret")
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(spec.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(
            !stdout.contains("hook-s3cret") && !stderr.contains("hook-s3cret"),
            "{stdout}{stderr}"
        );
        (output.status.code(), stdout, stderr)
    };

    let (code, stdout, stderr) = run(&["--allow-http", &target, "--secret", "HOOK_TOKEN=HOOK_TOKEN_VAR"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["result"]["output"], "stub answer");
    assert_eq!(json["report"]["tokens_in"], 9);
    assert_eq!(json["report"]["http_requests"], 1);
    assert_eq!(json["report"]["fuel_consumed"], 0);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].1["messages"][0]["content"], "Say something.");
        assert_eq!(seen[0].1["messages"][1]["content"], "hi");
        let posted = target_seen.lock().unwrap();
        assert_eq!(posted.len(), 1);
        assert_eq!(posted[0].0, "Token hook-s3cret");
        assert_eq!(posted[0].1, serde_json::json!({"output": "stub answer"}));
    }

    // No --allow-http: refused before the model is called (exit 4, agent.invalid).
    let (code, stdout, _) = run(&[]);
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["kind"], "agent.invalid", "{stdout}");
    assert!(json["message"].as_str().unwrap().contains("allow-list"), "{stdout}");
    assert_ne!(code, Some(0));
    // Allowed, but no secret: the placeholder is refused by name.
    let (_, stdout, _) = run(&["--allow-http", &target]);
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(json["message"].as_str().unwrap().contains("${HOOK_TOKEN}"), "{stdout}");
    // A lease (here the flag) may lower the spec's budget, never raise it.
    let (_, stdout, _) = run(&[
        "--allow-http",
        &target,
        "--secret",
        "HOOK_TOKEN=HOOK_TOKEN_VAR",
        "--max-tokens",
        "900",
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        json["message"].as_str().unwrap().contains("budget.maxTokens"),
        "{stdout}"
    );
    assert_eq!(seen.lock().unwrap().len(), 1, "a refused run called the model");
    assert_eq!(target_seen.lock().unwrap().len(), 1, "a refused run posted");

    // Flags that cannot work are usage errors naming the fix.
    let (code, _, stderr) = run(&["--secret", "HOOK_TOKEN=HOOK_TOKEN_VAR"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--allow-http"), "{stderr}");
    let (code, _, stderr) = run(&["--allow-http", &target, "--secret", "HOOK_TOKEN=NO_SUCH_VAR_X"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("NO_SUCH_VAR_X is not set"), "{stderr}");
}

#[test]
fn run_agent_spec_names_what_is_wrong_with_a_definition() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.json");
    std::fs::write(&path, r#"{"name": "x", "budget": {"maxTokens": 0}}"#).unwrap();
    let output = node_runtime(&["run-agent", "--spec", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("agent.invalid") && stdout.contains("instructions is required"),
        "{stdout}"
    );
    assert_ne!(output.status.code(), Some(0));
    let both = node_runtime(&["run-agent", "a.wasm", "--spec", path.to_str().unwrap()]);
    assert_eq!(both.status.code(), Some(2));
}
