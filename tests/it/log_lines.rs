//! What the node prints is safe to print: one line per log event whatever
//! the ids a control plane sends hold, a Fail message on one line, no
//! credential of a URL in any log line, error or `config check` output,
//! and no header of the HTTP client crates even at `trace`, even asked for
//! by module. Each test
//! drives the built binary.

use crate::support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use support::scripted;

/// A log line an id would forge if it reached the log raw.
const FORGED: &str = "2026-12-06T00:00:00.000000Z  INFO node_runtime::worker: FORGED run completed";

/// Runs `serve` with `env` until `done` says so (or 60 s pass), then
/// stops it; returns its stderr.
async fn serve_until(env: &[(&str, &str)], mut done: impl FnMut(&str) -> bool) -> String {
    let data = tempfile::tempdir().unwrap();
    let agents = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"));
    command
        .arg("serve")
        .env("NodeRuntime__NodeId", "log-lines-node")
        .env("NodeRuntime__AgentsDirectory", agents.path())
        .env("NodeRuntime__DataDirectory", data.path())
        .env("NodeRuntime__HeartbeatIntervalSeconds", "1")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("node-runtime serve starts");
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let started = Instant::now();
    let mut buffer = [0u8; 8192];
    while started.elapsed() < Duration::from_secs(60) && !done(&String::from_utf8_lossy(&seen)) {
        match tokio::time::timeout(Duration::from_millis(200), stderr.read(&mut buffer)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => seen.extend_from_slice(&buffer[..n]),
            Ok(Err(_)) => break,
            Err(_timeout) => {}
        }
    }
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), stderr.read_to_end(&mut seen)).await;
    let _ = child.wait().await;
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_with_control_characters_forge_no_log_line_and_the_fail_message_stays_one_line() {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut lease = scripted::lease(
        &format!("lease-ctl\n{FORGED}"),
        &format!("ghost\n{FORGED}"),
        now_ms + 60_000,
    );
    if let Some(spec) = lease.run_spec.as_mut() {
        spec.version = "1.0.0\u{1b}[2J\u{1b}]0;owned\u{7}".to_string();
    }
    let (url, recorded) = scripted::serve(vec![lease]).await;
    let stderr = serve_until(&[("NodeRuntime__ControlPlaneUrl", &url)], |_| {
        !recorded.lock().unwrap().fails.is_empty()
    })
    .await;

    let recorded = recorded.lock().unwrap();
    assert_eq!(recorded.fails.len(), 1, "{stderr}");
    let message = &recorded.fails[0].error_message;
    assert!(
        !message.contains(['\n', '\r', '\u{1b}', '\u{7}']),
        "the Fail message is not one line: {message:?}"
    );
    assert!(message.contains("ghost\\n2026-12-06T00:00:00"), "{message}");

    assert!(
        stderr.contains("ghost\\n2026-12-06T00:00:00"),
        "the id was logged, escaped: {stderr}"
    );
    for line in stderr.lines() {
        assert!(
            !line.starts_with("2026-12-06T00:00:00.000000Z"),
            "a forged line: {line:?}\n{stderr}"
        );
        assert!(!line.contains('\u{1b}'), "an escape sequence reached the log: {line:?}");
    }
}

/// A report sent three times: each failed attempt's warning names its
/// attempt and the lease's span, and no line repeats the report span's `report.attempts`
/// (a formatter appends each recording of a span field to the span).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_retried_says_each_attempt_once() {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let answers = scripted::Answers {
        unavailable_first: 2,
        ..scripted::Answers::default()
    };
    // No such agent: the lease fails at once, and its Fail is the report.
    let (url, recorded) = scripted::serve_with(
        vec![scripted::lease("lease-retried", "ghost", now_ms + 60_000)],
        answers,
    )
    .await;
    let stderr = serve_until(&[("NodeRuntime__ControlPlaneUrl", &url)], |_| {
        !recorded.lock().unwrap().fails.is_empty()
    })
    .await;
    assert_eq!(recorded.lock().unwrap().fails.len(), 1, "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("report not delivered"))
        .collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        warnings[0].contains("attempt=1") && warnings[1].contains("attempt=2"),
        "{warnings:#?}"
    );
    // Sent in the background, each still names its lease and run (the
    // review of 4ee6738: with the report span not built, they lost both).
    for warning in &warnings {
        assert!(
            warning.contains("lease{lease.id=lease-retried") && warning.contains("run.id="),
            "{warning}"
        );
    }
    for line in stderr.lines() {
        assert!(line.matches("report.attempts").count() <= 1, "a field repeated: {line}");
    }
}

#[test]
fn credentials_in_urls_appear_in_neither_config_check_nor_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("appsettings.json");
    std::fs::write(&config, "{}").unwrap();
    let check = |env: &[(&str, &str)]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
            .args(["config", "check", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.code(), text)
    };
    let (code, text) = check(&[
        (
            "NodeRuntime__ControlPlaneUrl",
            "https://node:hunter2-plane@127.0.0.1:9/?access_token=hunter2-query",
        ),
        (
            "OpenTelemetry__OtlpExporter__Endpoint",
            "http://otel:hunter2-otlp@127.0.0.1:4317",
        ),
        (
            "AgentStore__HttpUrlTemplate",
            "https://store:hunter2-store@127.0.0.1:9/{agent_id}/{version}.wasm?sig=hunter2-sig",
        ),
    ]);
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("https://***@127.0.0.1:9/?access_token=***"), "{text}");
    // Characters RFC 3986 allows in a password, and secrets under other
    // parameter names.
    let (code, text) = check(&[(
        "AgentStore__HttpUrlTemplate",
        "https://deploy:hunter2(pw)'!*;@127.0.0.1:9/{agent_id}/{version}.wasm\
         ?pass=hunter2-pass&jwt=hunter2-jwt&bearer=hunter2-bearer&passphrase=hunter2-phrase",
    )]);
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!text.contains("(pw)"), "{text}");

    // A value refused is quoted in the error, redacted.
    let (code, text) = check(&[("NodeRuntime__ControlPlaneUrl", "ftp://node:hunter2-bad@127.0.0.1/")]);
    assert_ne!(code, Some(0), "{text}");
    assert!(
        text.contains("NodeRuntime.ControlPlaneUrl") && text.contains("ftp://***@127.0.0.1/"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_message_quoting_an_agent_url_carries_no_password_whatever_its_characters() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let template = format!(
        "http://deploy:hunter2(et)PW@127.0.0.1:{closed}/agents/{{agent_id}}/{{version}}.wasm\
         ?pass=hunter2-pass&jwt=hunter2-jwt"
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let (url, recorded) = scripted::serve(vec![scripted::lease("lease-url", "fetched", now_ms + 60_000)]).await;
    let stderr = serve_until(
        &[
            ("NodeRuntime__ControlPlaneUrl", &url),
            ("AgentStore__Sources", "http"),
            ("AgentStore__HttpUrlTemplate", &template),
        ],
        |_| !recorded.lock().unwrap().fails.is_empty(),
    )
    .await;
    let recorded = recorded.lock().unwrap();
    assert_eq!(recorded.fails.len(), 1, "{stderr}");
    let message = &recorded.fails[0].error_message;
    assert!(
        message.contains(&format!("***@127.0.0.1:{closed}")),
        "the URL is named: {message}"
    );
    assert!(!message.contains("hunter2") && !message.contains("(et)"), "{message}");
    assert!(stderr.contains(&format!("127.0.0.1:{closed}")), "{stderr}");
    assert!(!stderr.contains("hunter2") && !stderr.contains("(et)"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_against_a_closed_port_logs_its_url_without_credentials() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://node:hunter2-serve@127.0.0.1:{port}/?token=hunter2-token");
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap();
    let stderr = serve_until(
        &[
            ("NodeRuntime__ControlPlaneUrl", &url),
            ("NodeRuntime__DataDirectory", data_dir),
        ],
        |seen| seen.lines().filter(|line| line.contains(&port.to_string())).count() >= 2,
    )
    .await;
    assert!(
        stderr.lines().any(|line| line.contains(&format!("127.0.0.1:{port}"))),
        "the plane's address is logged: {stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");

    // `outbox retry` names the plane in what it prints, redacted too.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .args(["outbox", "retry", "--dry-run"])
        .env("NodeRuntime__DataDirectory", data_dir)
        .env("NodeRuntime__ControlPlaneUrl", &url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(0), "{printed}");
    assert!(printed.contains(&format!("http://***@127.0.0.1:{port}")), "{printed}");
    assert!(!printed.contains("hunter2"), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_trace_level_the_http_client_crates_print_nothing_and_the_key_never_appears() {
    const KEY: &str = "sk-trace-level-4711-secret";
    let completions = axum::routing::post(|| async {
        axum::Json(serde_json::json!({
            "id": "c1", "model": "gpt-5-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        }))
    });
    let app = axum::Router::new().route("/v1/chat/completions", completions);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let agent = support::agent_path("llm-chat");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .arg("run-agent")
        .arg(&agent)
        .args([
            "--json",
            "--llm-endpoint",
            &format!("http://{addr}"),
            "--llm-key-env",
            "LOG_LINES_LLM_KEY",
        ])
        // Everything at trace but the compiler's own (millions of lines),
        // the client crates' modules asked for by name too: a more specific
        // directive does not lift the cap.
        .env(
            "RUST_LOG",
            "trace,cranelift_codegen=off,cranelift_frontend=off,wasmtime_internal_cranelift=off,\
             hyper_util::client::legacy=trace,hyper_util::client=trace,hyper::proto=trace,\
             hyper::proto::h1::io=trace,reqwest::connect=trace,reqwest::async_impl=trace,\
             h2::codec=trace,tonic::transport=trace,tower::buffer=trace",
        )
        .env("LOG_LINES_LLM_KEY", KEY)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["outcome"], "completed", "the call was made: {json}");
    assert!(stderr.contains(" TRACE wasmtime"), "trace was on: {stderr}");
    assert!(!stderr.contains(KEY), "the key was printed");
    for line in stderr.lines() {
        let below_info = line.contains(" TRACE ") || line.contains(" DEBUG ");
        let client = ["reqwest", "hyper", "h2::", "tonic", "tower"]
            .iter()
            .any(|name| line.contains(&format!(" {name}")) || line.contains(&format!(": {name}")));
        assert!(!(below_info && client), "a client crate below info: {line}");
    }
}

#[test]
fn json_log_lines_stay_json_whatever_the_ids_hold() {
    let agent_id = "evil\n2026 FORGED\u{85}\u{2028}\u{1b}[2J\u{9b}2J\u{202e}";
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
        .arg("run-agent")
        .arg(support::agent_path("echo"))
        .args([
            "--log-format",
            "json",
            "--json",
            "--agent-id",
            agent_id,
            "--input",
            "{}",
        ])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let mut seen_id = false;
    for line in stderr.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line:?}"));
        seen_id |= event["spans"][0]["agent.id"] == agent_id;
    }
    assert!(seen_id, "the id round-trips: {stderr}");
    // `--json` on stdout: the echo agent returns the id; it parses back to
    // itself, and what a terminal would act on is written as `\uXXXX`.
    let stdout = String::from_utf8(output.stdout).unwrap();
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["result"]["agent_id"], agent_id, "{stdout}");
    for raw in ['\u{85}', '\u{2028}', '\u{9b}', '\u{202e}', '\u{1b}'] {
        assert!(!stdout.contains(raw), "{raw:?} raw on stdout: {stdout:?}");
        assert!(!stderr.contains(raw), "{raw:?} raw on stderr: {stderr:?}");
    }
    assert!(stdout.contains(r"\u009b2J\u202e"), "{stdout}");
}

/// The `log` crate's records (wasmtime's) reach the log at the level the
/// filter asks for, and no further: its own level follows the filter.
#[test]
fn wasmtime_records_of_the_log_crate_follow_the_filter() {
    let wasmtime_lines = |filter: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"))
            .arg("run-agent")
            .arg(support::agent_path("echo"))
            .args(["--input", "{}"])
            .env("RUST_LOG", filter)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(0));
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let debug = stderr.lines().filter(|line| line.contains("DEBUG wasmtime")).count();
        let trace = stderr.lines().filter(|line| line.contains("TRACE wasmtime")).count();
        (debug, trace)
    };
    assert_eq!(wasmtime_lines("info"), (0, 0));
    let (debug, trace) = wasmtime_lines("info,wasmtime=debug");
    assert!(debug > 0 && trace == 0, "{debug} debug, {trace} trace lines");
    let (_, trace) = wasmtime_lines("info,wasmtime=trace");
    assert!(trace > 0, "no trace line");
}

/// What a terminal acts on and a line cannot show, in the characters an
/// operator's configuration or an agent can put in the node's output.
const UNSHOWN: [char; 6] = ['\u{9b}', '\u{85}', '\u{202e}', '\u{2028}', '\u{ad}', '\u{e0041}'];

/// `node-runtime ARGS` (warnings logged): its exit code, stdout and stderr.
fn node_runtime_text(args: &[&str]) -> (Option<i32>, String, String) {
    let output = support::node_runtime(args);
    (
        output.status.code(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// Fails if `text` (`what` it is) holds one of [`UNSHOWN`] raw.
fn assert_none_raw(what: &str, text: &str) {
    for raw in UNSHOWN {
        assert!(!text.contains(raw), "{raw:?} raw in {what}: {text:?}");
    }
}

#[test]
fn serve_warns_of_configuration_keys_in_its_log_format_safely_and_the_report_escapes_bidi_marks() {
    // `serve --log-format json`: the warning written while the configuration
    // loads is a JSON line like the rest, quoting the key safely. The admin
    // address is taken, so the node stops at once after loading.
    let dir = tempfile::tempdir().unwrap();
    let key = "Foo\u{202e}\u{2028}X\u{9b}\u{ad}\u{e0041}";
    let config = dir.path().join("node.json");
    let config_arg = config.to_str().unwrap();
    let body = serde_json::json!({"NodeRuntime": {
        "NodeId": "n1",
        "ControlPlaneUrl": "http://127.0.0.1:9",
        "DataDirectory": dir.path().join("data"),
        key: 1,
    }});
    std::fs::write(&config, body.to_string()).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let (code, _, stderr) = node_runtime_text(&[
        "serve",
        "--config",
        config_arg,
        "--log-format",
        "json",
        "--admin-listen",
        &taken,
    ]);
    assert_eq!(code, Some(2), "the admin address is taken: {stderr}");
    let warning = stderr
        .lines()
        .find(|line| line.contains("ignoring configuration keys"))
        .unwrap_or_else(|| panic!("no warning: {stderr}"));
    let event: serde_json::Value = serde_json::from_str(warning).unwrap_or_else(|err| panic!("{err}: {warning}"));
    let message = event["fields"]["message"].as_str().unwrap();
    assert!(message.ends_with(&format!("NodeRuntime.{key}")), "{message}");
    // Every line is JSON, the closing error included.
    for line in stderr.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line:?}"));
        assert!(event["fields"]["message"].is_string(), "{line}");
    }
    assert!(
        stderr
            .lines()
            .last()
            .is_some_and(|line| line.contains(r#""level":"ERROR""#)),
        "{stderr}"
    );
    assert_none_raw("serve's stderr", &stderr);

    // An invalid value: the error quotes it, escaped.
    let body = serde_json::json!({"NodeRuntime": {"NodeId": "n\u{202e}\u{9b}\u{2028}1"}});
    std::fs::write(&config, body.to_string()).unwrap();
    let (code, _, stderr) = node_runtime_text(&["serve", "--config", config_arg]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("NodeRuntime.NodeId"), "{stderr}");
    assert_none_raw("serve's error", &stderr);

    // `run-agent`'s human report: the echo agent returns the id.
    let agent_id = "a\u{202e}b\u{9b}c\u{e0041}d";
    let echo = support::agent_path("echo");
    let (code, stdout, _) = node_runtime_text(&[
        "run-agent",
        echo.to_str().unwrap(),
        "--agent-id",
        agent_id,
        "--input",
        "{}",
    ]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains(r"a\u{202e}b\u{9b}c\u{e0041}d"), "{stdout}");
    assert_none_raw("the report", &stdout);
}

#[test]
fn the_commands_quote_paths_safely_on_stdout_and_stderr() {
    // A folder an operator named badly: `config check` prints the
    // configuration (JSON) and the files it read, `outbox list` the
    // outbox's path, `run-agent` an invalid agent's path.
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("d\u{202e}\u{9b}\u{ad}\u{e0041}x");
    std::fs::create_dir(&dir).unwrap();
    let config = dir.join("node.json");
    std::fs::write(&config, r#"{"NodeRuntime": {"NodeId": "n1"}}"#).unwrap();
    let agent = dir.join("agent.wasm");
    std::fs::write(&agent, b"\0asm\x0d\0\x01\0").unwrap();
    let (config, agent) = (config.to_str().unwrap(), agent.to_str().unwrap());

    // An argument the command line cannot take is quoted in the usage
    // error.
    let (code, _, stderr) = node_runtime_text(&[
        "run-agent",
        agent,
        "--input-ref",
        "novalue\u{202e}\u{9b}\u{2028}\u{e0041}",
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(r"novalue\u{202e}"), "{stderr}");
    assert_none_raw("the usage error", &stderr);

    let runs: [&[&str]; 3] = [
        &["config", "check", "--config", config],
        &["outbox", "list", "--config", config],
        &["run-agent", agent],
    ];
    for args in runs {
        let (_, stdout, stderr) = node_runtime_text(args);
        assert!(
            stdout.contains(r"d\u") || stderr.contains(r"d\u"),
            "{args:?}: the path is shown: {stdout}{stderr}"
        );
        assert_none_raw(&format!("{args:?}'s stdout"), &stdout);
        assert_none_raw(&format!("{args:?}'s stderr"), &stderr);
    }
}
