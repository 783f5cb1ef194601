//! `node-runtime run-agent`: one run of one agent, as production runs it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tracing::Instrument;

use support::Secret;
use support::units::format_bytes;

use super::args::{parse_duration, parse_key_value, parse_size};
use super::{CommandError, Exit, read_agent_file, read_file_at_most, read_file_or_stdin_at_most};
use crate::app::{self, NodeConfig};
use crate::sandbox::declarative::{AgentSpec, SPEC_BYTES};
use crate::sandbox::grants::{check_environment_name, check_guest_path};
use crate::sandbox::{
    BudgetRequest, DirectoryGrant, Execution, FailKind, Grants, InvalidGrant, Reported, RunContext, RunOutcome,
    RunReport, RunRequest, Sandbox, SandboxError,
};
use crate::telemetry::{LogFormat, ResourceIdentity, Telemetry, TelemetrySettings};

#[derive(Debug, Args)]
pub struct RunAgentArgs {
    /// The agent: a component (.wasm) or a file from `node-runtime compile`
    /// (.cwasm). Not with `--spec` or `--watch`.
    #[arg(required_unless_present_any = ["spec", "watch"], conflicts_with_all = ["spec", "watch"])]
    pub agent: Option<PathBuf>,

    /// Build the kit project in DIR (default: the current directory) and
    /// run it, then again on every save, printing the time from the save
    /// to the result; a failed build waits for the next save. Stop with
    /// Ctrl-C.
    #[cfg(feature = "dev")]
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = ".", conflicts_with = "spec")]
    pub watch: Option<PathBuf>,

    /// Stop `--watch` after this many builds (for scripts and tests).
    #[cfg(feature = "dev")]
    #[arg(long, value_name = "N", requires = "watch", hide = true)]
    pub watch_cycles: Option<u32>,

    /// Run a declarative agent instead: a definition in the reference's
    /// format (a version document `{"agentId", "version", "spec"}`, or the
    /// spec itself) from a file, or `-` for stdin. Its output endpoint
    /// must be allowed with --allow-http; its `${NAME}` placeholders need
    /// --secret.
    #[arg(long, value_name = "FILE|-")]
    pub spec: Option<PathBuf>,

    /// Let a declarative agent's `${NAME}` placeholders use the value of the
    /// environment variable VAR (repeatable), sent only to the hosts
    /// --allow-http lists. The value itself is never a flag.
    #[arg(long = "secret", value_name = "NAME=VAR", value_parser = parse_key_value, requires = "spec")]
    pub secrets: Vec<(String, String)>,

    /// The input as JSON; shorthand for `--input-ref message=JSON`.
    #[arg(long, value_name = "JSON", conflicts_with = "input_file")]
    pub input: Option<String>,

    /// Read the input JSON from a file; also becomes `input_ref["message"]`.
    #[arg(long, value_name = "PATH")]
    pub input_file: Option<PathBuf>,

    /// An `input_ref` entry (repeatable).
    #[arg(long = "input-ref", value_name = "K=V", value_parser = parse_key_value)]
    pub input_ref: Vec<(String, String)>,

    /// A `metadata` entry (repeatable).
    #[arg(long = "metadata", value_name = "K=V", value_parser = parse_key_value)]
    pub metadata: Vec<(String, String)>,

    /// CPU fuel for the run (about one unit per WebAssembly instruction).
    #[arg(long, value_name = "N")]
    pub fuel: Option<u64>,

    /// Memory limit for the run: 32MiB, 1GiB, 64MB, or bytes.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<u64>,

    /// Wall-clock limit for the run: 1s, 500ms, 2m, or seconds.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,

    /// An OpenAI-compatible endpoint for `llm.chat` (requests go to
    /// URL/v1/chat/completions); without it the agent's LLM calls answer
    /// `not-configured`. Without --llm-key-env no key is sent (local
    /// servers: Ollama, llama.cpp).
    #[arg(long, value_name = "URL")]
    pub llm_endpoint: Option<String>,

    /// The environment variable holding the endpoint's bearer key (the key
    /// itself is never a flag: flags show up in `ps` and shell history).
    #[arg(long, value_name = "VAR", requires = "llm_endpoint")]
    pub llm_key_env: Option<String>,

    /// The model of calls that name none (default: gpt-5-mini).
    #[arg(long, value_name = "NAME", requires = "llm_endpoint")]
    pub llm_model: Option<String>,

    /// LLM tokens (input plus output) for the run.
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<u32>,

    /// Let the agent reach HOST (any port) or HOST:PORT over outbound HTTP
    /// (repeatable); without it every request is denied. Metadata
    /// `http.allow` can narrow this list, never widen it.
    #[arg(long = "allow-http", value_name = "HOST[:PORT]", value_parser = parse_allow_http)]
    pub allow_http: Vec<String>,

    /// Let the agent see the host directory HOST at the absolute guest
    /// path GUEST, read-only, or read-write with `:rw` (repeatable; `:ro`
    /// is accepted and changes nothing). As in the configuration, write
    /// access is only ever asked for. No directory may lie inside one
    /// granted `:rw`. Metadata `fs.allow` can narrow this, never widen it.
    #[arg(long = "dir", value_name = "HOST::GUEST[:rw]", value_parser = parse_dir)]
    pub dirs: Vec<DirectoryGrant>,

    /// Pass the environment variable NAME, with its value here, to the agent
    /// (repeatable); without it the agent's environment is empty. Metadata
    /// `env.allow` can narrow this, never widen it.
    #[arg(long = "env", value_name = "NAME", value_parser = parse_env)]
    pub env: Vec<String>,

    /// How the agent executes: `cranelift` (native code, the default) or
    /// `pulley` (the interpreter, as nodes whose CPU Cranelift has no
    /// backend for run it; a .cwasm then comes from `compile --target
    /// pulley64`).
    #[arg(long, value_name = "cranelift|pulley", value_parser = parse_engine)]
    pub engine: Option<Execution>,

    /// The agent id the run reports (default: the file name without its
    /// extension).
    #[arg(long, value_name = "ID")]
    pub agent_id: Option<String>,

    /// The agent version the run reports.
    #[arg(long, value_name = "VERSION", default_value = "local")]
    pub agent_version: String,

    /// Print one JSON object instead of the human-readable report.
    #[arg(long)]
    pub json: bool,

    /// How log lines (the agent's included) are written to stderr.
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "human")]
    pub log_format: LogFormat,
}

pub async fn run(args: RunAgentArgs) -> Result<Exit, CommandError> {
    Telemetry::init(TelemetrySettings {
        log_format: args.log_format,
        log_filter: "info".to_string(),
        console_spans: false,
        otlp: None,
        resource: ResourceIdentity::default(),
    })
    .map_err(|err| CommandError::usage(err.to_string()))?;
    #[cfg(feature = "dev")]
    if let Some(dir) = args.watch.clone() {
        return watch(args, dir).await;
    }
    let subject = match (&args.agent, &args.spec) {
        (Some(path), _) => Subject::Component(read_agent_file("the agent file", path)?),
        (None, Some(path)) => match AgentSpec::parse(&read_spec(path)?) {
            Ok(spec) => Subject::Spec(Box::new(spec)),
            Err(invalid) => {
                print_invalid(&args, &format!("--spec {}: {invalid}", path.display()));
                return Ok(Exit::AgentInvalid);
            }
        },
        (None, None) => return Err(CommandError::usage("name an agent file, or a definition with --spec")),
    };
    let context = context(&args, &subject)?;
    let (sandbox, budget) = node_sandbox(&args, &context.agent_id)?;

    let agent = match subject {
        Subject::Spec(spec) => Runnable::Spec(spec),
        Subject::Component(bytes) => {
            let bytes: Arc<[u8]> = Arc::from(bytes);
            match sandbox.load(bytes.clone()).await {
                Ok(agent) => Runnable::Component(agent, bytes),
                Err(invalid) => {
                    let path = args.agent.as_deref().unwrap_or(std::path::Path::new("agent"));
                    let message = format!("{}: {invalid}", path.display());
                    print_invalid(&args, &message);
                    return Ok(Exit::AgentInvalid);
                }
            }
        }
    };
    Ok(run_once(&args, &sandbox, &agent, context, budget).await)
}

/// The sandbox a run gets, and its budget: a configuration's defaults
/// with the flags applied, built by the same code `serve` uses.
fn node_sandbox(args: &RunAgentArgs, agent_id: &str) -> Result<(Sandbox, BudgetRequest), CommandError> {
    let budget = BudgetRequest {
        fuel: args.fuel,
        memory_bytes: args.max_memory,
        duration: args.timeout,
        tokens: args.max_tokens,
    };
    if let Some(var) = args.llm_key_env.as_ref().filter(|var| args.env.contains(var)) {
        return Err(CommandError::usage(format!(
            "--env {var}: that variable holds the LLM endpoint's key (--llm-key-env), which an \
             agent is never given; pass the agent what it needs in a variable of its own"
        )));
    }
    // The node this run gets: a configuration's defaults with the flags
    // applied, built into a sandbox by the same code `serve` uses.
    let mut node = NodeConfig::default();
    node.node_runtime.max_concurrent_leases = 1;
    node.sandbox.engine = args.engine.unwrap_or_default();
    node.sandbox.compiled_cache_max_bytes = 0;
    node.sandbox.grants = BTreeMap::from([(
        agent_id.to_string(),
        Grants {
            directories: args.dirs.clone(),
            environment: args.env.clone(),
            http_hosts: args.allow_http.clone(),
        },
    )]);
    if let Some((endpoint, key)) = llm_endpoint(args)? {
        let agent_runtime = &mut node.agent_runtime;
        agent_runtime.openai.endpoint = Some(endpoint);
        agent_runtime.openai.api_key = key;
        if let Some(model) = &args.llm_model {
            agent_runtime.default_model = model.clone();
        }
    }
    node.declarative_agents = declarative_section(args)?;
    let config = app::sandbox_config(&node);
    config.limits.check(&budget).map_err(|err| {
        CommandError::usage(format!(
            "{err} (--fuel, --max-memory, --timeout and --max-tokens can only lower the node's \
             limits)"
        ))
    })?;
    let sandbox = Sandbox::new(config).map_err(|err| match err {
        // The flags were checked as parsed; a directory removed since is
        // still the command line's problem.
        SandboxError::Grant { error, .. } => CommandError::usage(format!("--dir or --env: {error}")),
        SandboxError::Overlapping(error) => CommandError::usage(format!("--dir: {error}")),
        err => CommandError::internal(err.to_string()),
    })?;
    Ok((sandbox, budget))
}

/// One run, its report printed; the exit it maps to.
async fn run_once(
    args: &RunAgentArgs,
    sandbox: &Sandbox,
    agent: &Runnable,
    context: RunContext,
    budget: BudgetRequest,
) -> Exit {
    // As the worker's lease span: every line about the run carries its ids.
    let span = tracing::info_span!(
        "run",
        "run.id" = %context.run_id,
        "lease.id" = %context.lease_id,
        trace_id = %context.trace_id,
        "agent.id" = %context.agent_id,
        "agent.version" = %context.agent_version,
    );
    let request = RunRequest {
        context,
        budget,
        deadline: None,
    };
    let Reported { mut result, cut_off } = match agent {
        Runnable::Component(agent, _) => sandbox.run_reported(agent, request).instrument(span).await,
        Runnable::Spec(spec) => sandbox.run_spec(spec, request).instrument(span).await.into(),
    };
    let file = match agent {
        Runnable::Component(_, bytes) => Some(&bytes[..]),
        Runnable::Spec(_) => None,
    };
    if let RunOutcome::Failed(failure) = &mut result.outcome {
        failure.details = with_source_lines(file, &failure.details).await;
    }

    if args.json {
        print_json(&json_report(&result.outcome, &result.report));
    } else {
        print!("{}", human_report(&result.outcome, &result.report));
    }
    // A run cut off at its deadline is printed first, then unwound; a
    // guest cut off while computing says where it was.
    if let Some(call) = cut_off
        && let Some(backtrace) = call.unwind().await
    {
        let backtrace = with_source_lines(file, &backtrace).await;
        match args.log_format {
            // stderr stays one JSON object per line.
            LogFormat::Json => tracing::warn!(%backtrace, "where the agent was when its deadline cut it off"),
            LogFormat::Human => eprintln!("where the agent was when its deadline cut it off:\n{backtrace}"),
        }
    }
    exit_for(&result.outcome)
}

/// `text` with the source lines of its backtrace's frames, read from the
/// DWARF in the agent's file now that the run is over (the engine never
/// reads it, `sandbox/backtrace.rs`), by `node-runtime symbolize` in a
/// process of its own that limits its memory and CPU and is killed if it
/// takes too long: the DWARF is the agent's. Without the `guest-symbols`
/// feature, an agent file or DWARF, `text` as it is.
async fn with_source_lines(file: Option<&[u8]>, text: &str) -> String {
    #[cfg(feature = "guest-symbols")]
    if let Some(file) = file {
        return super::symbolize::in_child(file, text).await;
    }
    let _ = file;
    text.to_string()
}

/// `--watch DIR`: build, run, wait for a save, again. Never exits on a
/// failed build or run (unless `--watch-cycles` says how many).
#[cfg(feature = "dev")]
async fn watch(mut args: RunAgentArgs, dir: PathBuf) -> Result<Exit, CommandError> {
    use crate::kit::watch::{next_change, snapshot};
    let project = crate::kit::Project::open(&dir).map_err(super::kit_error)?;
    args.agent_id.get_or_insert_with(|| project.name.clone());
    let context_of = |args: &RunAgentArgs| context(args, &Subject::Component(Vec::new()));
    let (sandbox, budget) = node_sandbox(&args, &context_of(&args)?.agent_id)?;
    let mut files = snapshot(&dir);
    let mut saved = std::time::SystemTime::now();
    let mut last = Exit::Completed;
    for cycle in 1u32.. {
        let from = dir.clone();
        let built = tokio::task::spawn_blocking(move || crate::kit::build(&from))
            .await
            .map_err(|err| CommandError::internal(format!("the build stopped: {err}")))?;
        match built {
            Ok(built) => {
                let bytes = read_agent_file("the built component", &built.component)?;
                let bytes: Arc<[u8]> = Arc::from(bytes);
                last = match sandbox.load(bytes.clone()).await {
                    Ok(agent) => {
                        let runnable = Runnable::Component(agent, bytes);
                        run_once(&args, &sandbox, &runnable, context_of(&args)?, budget).await
                    }
                    Err(invalid) => {
                        print_invalid(&args, &format!("{}: {invalid}", built.component.display()));
                        Exit::AgentInvalid
                    }
                };
                let took = saved.elapsed().unwrap_or_default();
                println!("watch: save to result in {} ms", took.as_millis());
            }
            Err(err) => {
                say_err!("error: {err}");
                last = super::kit_error(err).exit;
            }
        }
        if args.watch_cycles.is_some_and(|cycles| cycle >= cycles) {
            break;
        }
        say!("watch: waiting for a change in {}", dir.display());
        (files, saved) = next_change(&dir, &files).await;
    }
    Ok(last)
}

/// What the command line names: a component's bytes, or a definition.
enum Subject {
    Component(Vec<u8>),
    Spec(Box<AgentSpec>),
}

/// What runs: a loaded component (with its bytes, for the source lines of
/// a backtrace), or a definition for the built-in agent.
enum Runnable {
    Component(Arc<crate::sandbox::Agent>, Arc<[u8]>),
    Spec(Box<AgentSpec>),
}

/// `--spec FILE|-`: the definition's bytes, at most [`SPEC_BYTES`].
fn read_spec(path: &std::path::Path) -> Result<Vec<u8>, CommandError> {
    read_file_or_stdin_at_most("--spec", path, SPEC_BYTES as u64, "a definition")
}

/// `--secret NAME=VAR` as the node's `DeclarativeAgents` section: each
/// secret bound to the hosts `--allow-http` lists.
fn declarative_section(args: &RunAgentArgs) -> Result<app::config::DeclarativeAgentsSection, CommandError> {
    let mut section = app::config::DeclarativeAgentsSection::default();
    for (name, variable) in &args.secrets {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(CommandError::usage(format!(
                "--secret {name}={variable}: a secret's name is what a spec writes inside ${{...}}: \
                 letters, digits and `_` only"
            )));
        }
        if args.allow_http.is_empty() {
            return Err(CommandError::usage(format!(
                "--secret {name}={variable}: a secret is sent only to the hosts --allow-http \
                 lists, and there are none; add --allow-http HOST for the output endpoint"
            )));
        }
        let value = match std::env::var(variable) {
            Ok(value) if !value.is_empty() => value,
            _ => {
                return Err(CommandError::usage(format!(
                    "--secret {name}={variable}: the environment variable {variable} is not set \
                     (or empty); export it with the secret's value"
                )));
            }
        };
        section.secrets.insert(
            name.clone(),
            app::config::DeclarativeSecret {
                value: Secret::new(value),
                environment_variable: Some(variable.clone()),
                hosts: args.allow_http.clone(),
            },
        );
    }
    Ok(section)
}

/// `--allow-http HOST[:PORT]`, checked as the sandbox will read it.
fn parse_allow_http(entry: &str) -> Result<String, String> {
    crate::sandbox::HostGrant::parse(entry)
        .map(|_| entry.trim().to_string())
        .map_err(|err| format!("{err}: expected e.g. api.example.com or 127.0.0.1:8080"))
}

/// `--dir HOST::GUEST[:rw]`: an existing host directory (made absolute),
/// an absolute guest path, read-only unless `:rw` (`:ro` says so
/// explicitly).
fn parse_dir(text: &str) -> Result<DirectoryGrant, String> {
    let form = "expected HOST::GUEST (read-only) or HOST::GUEST:rw (read-write), e.g. ./data::/data:rw";
    let Some((host, guest)) = text.split_once("::") else {
        return Err(format!(
            "`{text}` has no `::` between the host directory and the guest path: {form}"
        ));
    };
    let (guest, read_only) = if let Some(guest) = guest.strip_suffix(":rw") {
        (guest, false)
    } else if let Some(guest) = guest.strip_suffix(":ro") {
        (guest, true)
    } else {
        (guest, true)
    };
    if host.is_empty() {
        return Err(format!("`{text}` names no host directory: {form}"));
    }
    check_guest_path(guest).map_err(|err| format!("{err} ({form})"))?;
    let host_path = std::path::absolute(host).map_err(|err| format!("`{host}`: {err}"))?;
    if !host_path.is_dir() {
        return Err(InvalidGrant::NoSuchDirectory(host_path).to_string());
    }
    Ok(DirectoryGrant {
        host_path,
        guest_path: guest.to_string(),
        read_only,
    })
}

/// `--engine cranelift|pulley`.
fn parse_engine(text: &str) -> Result<Execution, String> {
    Execution::parse(text).ok_or_else(|| format!("unknown engine `{text}`: use cranelift or pulley"))
}

/// `--env NAME`: a variable's name, never its value.
fn parse_env(name: &str) -> Result<String, String> {
    check_environment_name(name)
        .map(|()| name.to_string())
        .map_err(|err| err.to_string())
}

/// `--llm-endpoint` and the key `--llm-key-env` names, if it names one
/// (a local server needs none; clap makes the key require the endpoint).
fn llm_endpoint(args: &RunAgentArgs) -> Result<Option<(http::Uri, Option<Secret>)>, CommandError> {
    let Some(endpoint) = &args.llm_endpoint else {
        return Ok(None);
    };
    let uri = match endpoint.parse::<http::Uri>() {
        Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => uri,
        _ => {
            return Err(CommandError::usage(format!(
                "--llm-endpoint `{endpoint}` is not an http:// or https:// URL with a host, \
                 e.g. https://api.openai.com"
            )));
        }
    };
    let Some(var) = &args.llm_key_env else {
        return Ok(Some((uri, None)));
    };
    let key = match std::env::var(var) {
        Ok(key) if !key.is_empty() => key,
        _ => {
            return Err(CommandError::usage(format!(
                "--llm-key-env {var}: the environment variable {var} is not set (or empty); \
                 export it with the endpoint's API key"
            )));
        }
    };
    Ok(Some((uri, Some(Secret::new(key)))))
}

fn context(args: &RunAgentArgs, subject: &Subject) -> Result<RunContext, CommandError> {
    let mut input_ref: BTreeMap<String, String> = args.input_ref.iter().cloned().collect();
    let message = match (&args.input, &args.input_file) {
        (Some(json), _) => Some(("--input", json.clone())),
        (None, Some(path)) => {
            let bytes = read_file_at_most("--input-file", path, MAX_INPUT_FILE_BYTES, "an input")?;
            let text = String::from_utf8(bytes)
                .map_err(|_| CommandError::usage(format!("--input-file {} is not UTF-8 text", path.display())))?;
            Some(("--input-file", text))
        }
        (None, None) => None,
    };
    if let Some((flag, json)) = message {
        if let Err(err) = serde_json::from_str::<serde_json::Value>(&json) {
            return Err(CommandError::usage(format!(
                "{flag} is not valid JSON ({err}); for plain text use --input-ref message=TEXT"
            )));
        }
        if input_ref.contains_key("message") {
            return Err(CommandError::usage(format!(
                "{flag} sets input_ref[\"message\"], which --input-ref message=... also sets; \
                 use one of them"
            )));
        }
        input_ref.insert("message".to_string(), json);
    }
    let from_spec = match subject {
        Subject::Spec(spec) => spec.agent_id.clone(),
        Subject::Component(_) => None,
    };
    let from_file = || {
        args.agent
            .as_ref()
            .or(args.spec.as_ref())
            .filter(|path| path.as_os_str() != "-")
            .and_then(|path| path.file_stem())
            .map(|stem| stem.to_string_lossy().into_owned())
    };
    let agent_id = args
        .agent_id
        .clone()
        .or(from_spec)
        .or_else(from_file)
        .unwrap_or_else(|| "agent".to_string());
    let run = uuid::Uuid::new_v4().simple().to_string();
    Ok(RunContext {
        run_id: format!("local-{run}"),
        lease_id: format!("lease-local-{run}"),
        agent_id,
        agent_version: args.agent_version.clone(),
        trace_id: uuid::Uuid::new_v4().simple().to_string(),
        input_ref,
        metadata: args.metadata.iter().cloned().collect(),
    })
}

fn exit_for(outcome: &RunOutcome) -> Exit {
    match outcome.failure().map(|failure| failure.kind) {
        None => Exit::Completed,
        Some(FailKind::AgentError) => Exit::AgentError,
        Some(FailKind::AgentTrap) => Exit::AgentTrap,
        Some(FailKind::AgentInvalid) => Exit::AgentInvalid,
        Some(FailKind::NodeUnavailable) => Exit::Internal,
        Some(_budget) => Exit::BudgetExceeded,
    }
}

fn print_invalid(args: &RunAgentArgs, message: &str) {
    if args.json {
        let outcome = RunOutcome::Failed(crate::sandbox::RunFailure::new(FailKind::AgentInvalid, message));
        print_json(&json_report(&outcome, &RunReport::default()));
    } else {
        say!("failed: agent.invalid: {message}");
    }
}

/// Prints `--json`'s object on one line: what the agent wrote in it (a
/// result, a message) may hold characters JSON leaves raw that a terminal
/// acts on (U+009B starts an escape sequence, U+202E reverses the text):
/// they are written as `\uXXXX`, which parses to the same value.
fn print_json(value: &serde_json::Value) {
    println!("{}", support::one_line::escape_json(&value.to_string()));
}

/// The `--json` form: one object, stable field names.
pub fn json_report(outcome: &RunOutcome, report: &RunReport) -> serde_json::Value {
    match outcome {
        RunOutcome::Completed(result) => serde_json::json!({
            "outcome": "completed",
            "kind": null,
            "message": null,
            "retryable": false,
            "result": result,
            "details": null,
            "report": report,
        }),
        RunOutcome::Failed(failure) => serde_json::json!({
            "outcome": "failed",
            "kind": failure.kind,
            "message": failure.message,
            "retryable": failure.retryable,
            "result": null,
            "details": failure.details,
            "report": report,
        }),
    }
}

/// Shows a result key or value on one line: what `one_line::escape`
/// escapes (newlines, escape sequences, bidirectional marks, invisible
/// characters) escaped, so an agent's result cannot forge lines, drive
/// the terminal or reorder the report; long text cut.
fn one_line(value: &str, max_chars: usize) -> String {
    let cut = value
        .char_indices()
        .nth(max_chars)
        .map_or(value, |(end, _)| &value[..end]);
    let mut shown = support::one_line::escape(cut).into_owned();
    if cut.len() < value.len() {
        let _ = write!(shown, "... ({} bytes)", value.len());
    }
    shown
}

/// The most `--input-file` may hold: a lease's input arrives in one gRPC
/// message, 4 MiB by default; this leaves room for larger planes.
const MAX_INPUT_FILE_BYTES: u64 = 32 << 20;

/// Characters of a result key the human report shows.
const RESULT_KEY_CHARS: usize = 64;

/// The human form: the outcome, the result or the failure's evidence, and
/// the meters.
pub fn human_report(outcome: &RunOutcome, report: &RunReport) -> String {
    let mut out = String::new();
    match outcome {
        RunOutcome::Completed(result) => {
            out.push_str("completed\n\nresult:\n");
            // Keys come from the agent: shown cut, so that one long key can
            // neither widen every line nor overflow the padding.
            let keys: Vec<String> = result.keys().map(|key| one_line(key, RESULT_KEY_CHARS)).collect();
            let width = keys.iter().map(|key| key.chars().count()).max().unwrap_or(0);
            for (key, value) in keys.iter().zip(result.values()) {
                let value = one_line(value, 200);
                let _ = writeln!(out, "  {key:width$}  {value}");
            }
            if result.is_empty() {
                out.push_str("  (empty)\n");
            }
        }
        RunOutcome::Failed(failure) => {
            let retry = if failure.retryable { " (retryable)" } else { "" };
            let _ = writeln!(out, "failed: {}{retry}\n  {}", failure.kind, failure.message);
            if !failure.details.is_empty() {
                out.push_str("\ndetails:\n");
                // The agent's stderr and its frames' names: a control
                // character there must not drive the terminal.
                for line in failure.details.lines() {
                    let _ = writeln!(out, "  {}", support::one_line::escape(line));
                }
            }
        }
    }
    let rows = [
        ("fuel consumed", report.fuel_consumed.to_string()),
        (
            "peak memory",
            format!(
                "{} ({} held by the host)",
                format_bytes(report.peak_memory_bytes),
                format_bytes(report.peak_host_bytes)
            ),
        ),
        ("wall time", format!("{} ms", report.wall_ms)),
        ("instantiate", format!("{} us", report.instantiate_us)),
        ("tokens in/out", format!("{} / {}", report.tokens_in, report.tokens_out)),
        ("cost", format!("${:.6}", report.usd_cost)),
        (
            "log lines",
            format!("{} ({} dropped)", report.log_lines, report.log_lines_dropped),
        ),
        (
            "http requests",
            format!("{} ({} denied)", report.http_requests, report.http_denied),
        ),
        (
            "host warnings",
            format!("{} suppressed", report.host_warnings_suppressed),
        ),
    ];
    out.push_str("\nreport:\n");
    for (name, value) in rows {
        let _ = writeln!(out, "  {name:<14} {value}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_with_huge_or_control_character_keys_prints_one_bounded_line_per_entry() {
        // A key of 65,536 characters or more once made the padding panic
        // ("Formatting argument out of range"): an agent could crash the CLI.
        let huge = "k".repeat(70_000);
        let result = crate::sandbox::ResultMap::from([
            (huge.clone(), "v".to_string()),
            (
                "forged\nfailed: agent.trap\x1b[2J".to_string(),
                "two\nlines\r".to_string(),
            ),
            ("short".to_string(), "ok".to_string()),
        ]);
        let text = human_report(&RunOutcome::Completed(result), &RunReport::default());
        let entries: Vec<&str> = text
            .lines()
            .skip_while(|line| *line != "result:")
            .skip(1)
            .take_while(|line| !line.is_empty())
            .collect();
        assert_eq!(entries.len(), 3, "{text}");
        assert!(entries.iter().all(|line| line.len() < 300), "{entries:?}");
        assert!(!text.contains('\x1b') && !text.contains('\r'), "{text}");
        assert!(text.contains("forged\\nfailed: agent.trap\\u{1b}[2J"), "{text}");
        assert!(text.contains(&format!("... ({} bytes)", huge.len())), "{text}");
    }

    #[test]
    fn a_failure_s_details_are_printed_a_line_each_with_control_characters_escaped() {
        let failure = crate::sandbox::RunFailure::new(crate::sandbox::FailKind::AgentTrap, "trapped")
            .with_details("stderr:\n\x1b]0;owned\x07title\x1b[2J\rforged");
        let text = human_report(&RunOutcome::Failed(failure), &RunReport::default());
        assert!(
            !text.contains('\x1b') && !text.contains('\r') && !text.contains('\x07'),
            "{text}"
        );
        assert!(text.contains("\n  stderr:\n  \\u{1b}]0;owned"), "{text}");
    }
}
