//! `node-runtime dev`: a development control plane and one node in one
//! process, so anyone can submit runs over HTTP and watch them complete
//! without installing anything else.
//!
//! The plane has no authentication of its own, so it stays on loopback
//! unless it requires client certificates (`--tls-dir`) or the developer
//! says `--insecure-listen`; see `dev-plane/src/access.rs` for what keeps web
//! pages out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;

use super::serve::StopSignals;
use super::{CommandError, Exit};
use support::Secret;
use support::units::format_bytes;

use crate::agent_store::AgentStore;
use crate::app;
use crate::app::config::{self, MTlsSection, NodeConfig};
use crate::control_plane::ControlPlaneTls;
use crate::sandbox::ModelPrice;
use crate::telemetry::{AdminServer, LogFormat, ResourceIdentity, Telemetry, TelemetrySettings};
use dev_plane::tls_dir::DevCertificates;
use dev_plane::{AllowedHost, DevPlane, PlaneOptions, Reregistration, stubs, tls_dir};

/// The embedded node's id without `--tls-dir` (and the CN of the node
/// certificate generated with it).
const EMBEDDED_NODE_ID: &str = tls_dir::NODE_SUBJECT;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the control plane listens, for REST and gRPC alike. An
    /// address beyond loopback needs --tls-dir (or --insecure-listen).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5109")]
    pub listen: SocketAddr,

    /// Listen beyond loopback without --tls-dir: anyone who can reach the
    /// address may then submit runs and read every run's input and result.
    #[arg(long)]
    pub insecure_listen: bool,

    /// A host name requests may name (the Host header) besides the listen
    /// address's own; without :PORT, any port (repeatable). For reaching
    /// the plane by a name, e.g. through a proxy or from another machine.
    #[arg(long = "allow-host", value_name = "NAME[:PORT]")]
    pub allow_hosts: Vec<AllowedHost>,

    /// Answer a registration for a node id the plane already knows with
    /// 500 and a duplicate-key error, as the reference's Postgres-backed
    /// control plane does, to test nodes against it.
    #[arg(long)]
    pub reregistration_answers_500: bool,

    /// Keep the plane's runs (and the node's state) here across restarts;
    /// without it, everything is forgotten at exit.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Publish the agent definitions in DIR (`*.json`, the reference's
    /// format) through the plane's agent API at start-up: agent id = the
    /// file's `agentId` (else its stem), version = its `version` (else
    /// 1.0.0). A file that fails validation stops the plane.
    #[arg(long, value_name = "DIR")]
    pub definitions: Option<PathBuf>,

    /// Serve only the control plane, for nodes started elsewhere
    /// (`node-runtime serve` with `ControlPlaneUrl` pointing here).
    #[arg(long)]
    pub plane_only: bool,

    /// More agents, laid out `<DIR>/<agent_id>/<version>.wasm` (repeatable).
    #[arg(long = "agents", value_name = "DIR")]
    pub agents: Vec<PathBuf>,

    /// The built sample agents (`scripts/build-agents`), each offered as
    /// agent id = its name, version 1.0.0. Default: `target/agents` next to
    /// this binary's build directory, or under the current directory.
    #[arg(long, value_name = "DIR")]
    pub sample_agents: Option<PathBuf>,

    /// Runs the node takes at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub slots: u32,

    /// Serve the kit project in DIR (`node-runtime new`) as agent NAME,
    /// version `dev`: build it, submit a run of it with DIR/input.json
    /// through the plane, print its outcome; again on every save.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["demo", "plane_only"])]
    pub watch: Option<PathBuf>,

    /// Stop `--watch` after this many builds (for scripts and tests).
    #[arg(long, value_name = "N", requires = "watch", hide = true)]
    pub watch_cycles: Option<u32>,

    /// Submit a handful of demonstration runs, print how each ended, and exit.
    #[arg(long)]
    pub demo: bool,

    /// An OpenAI-compatible endpoint for the agents' `llm.chat`
    /// (`POST {URL}/v1/chat/completions`). With `--demo` and without it, a
    /// local stub model answers.
    #[arg(long, value_name = "URL")]
    pub llm_endpoint: Option<String>,

    /// The environment variable holding the endpoint's bearer key.
    #[arg(long, value_name = "VAR", requires = "llm_endpoint")]
    pub llm_key_env: Option<String>,

    /// The model of calls that name none.
    #[arg(long, value_name = "NAME", default_value = "gpt-4o-mini")]
    pub llm_model: String,

    /// Let an agent's runs reach a host over HTTP: `AGENT=HOST[:PORT]`
    /// (repeatable).
    #[arg(long = "allow-http", value_name = "AGENT=HOST", value_parser = super::parse_key_value)]
    pub allow_http: Vec<(String, String)>,

    /// How long a lease lasts before the plane gives the run to another
    /// node (the reference uses 300 s).
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = super::parse_duration)]
    pub lease_ttl: Duration,

    /// Serve HTTPS and gRPC over TLS, requiring client certificates, with
    /// the PEM files in DIR (ca-cert.pem, ca-key.pem, server-cert.pem,
    /// server-key.pem, node-cert.pem, node-key.pem); missing ones are
    /// generated. The embedded node uses node-cert.pem and trusts only the CA.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,

    /// With --tls-dir: accept only client certificates with this CN
    /// (repeatable; default: any certificate the CA issued).
    #[arg(long = "allow-subject", value_name = "CN", requires = "tls_dir")]
    pub allow_subjects: Vec<String>,
    /// Serve the node's /healthz, /readyz and /metrics on this address
    /// (e.g. 127.0.0.1:9090).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,

    /// How log lines are written to stderr.
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "human")]
    pub log_format: LogFormat,
}

pub async fn run(args: DevArgs) -> Result<Exit, CommandError> {
    // From here on a SIGTERM or Ctrl-C stops the plane and the node
    // cleanly, whenever it comes.
    let mut signals = StopSignals::listen();
    if args.slots == 0 {
        return Err(CommandError::usage("--slots must be at least 1"));
    }
    check_listen(&args)?;
    let certificates = match &args.tls_dir {
        Some(dir) => {
            let certificates = tls_dir::prepare(dir).map_err(|err| CommandError::usage(err.to_string()))?;
            if !certificates.generated.is_empty() {
                say(
                    args.log_format,
                    &format!("generated in {}: {}", dir.display(), certificates.generated.join(", ")),
                );
            }
            Some(certificates)
        }
        None => None,
    };
    // The plane binds node ids to certificates: the embedded node is who
    // its certificate says.
    let node_id = match &certificates {
        Some(certificates) => certificates
            .node_subject()
            .map_err(|err| CommandError::usage(err.to_string()))?,
        None => EMBEDDED_NODE_ID.to_string(),
    };
    // The demo's table is its output; its logs would only bury it.
    let telemetry = Telemetry::init(TelemetrySettings {
        log_format: args.log_format,
        log_filter: if args.demo { "warn" } else { "info" }.to_string(),
        console_spans: false,
        otlp: None,
        resource: ResourceIdentity {
            node_id: node_id.clone(),
            region: Some("local".to_string()),
            environment: Some("dev".to_string()),
        },
    })
    .map_err(|err| CommandError::usage(err.to_string()))?;
    let result = run_with(args, certificates, node_id, &telemetry, &mut signals).await;
    telemetry.shutdown().await;
    result
}

/// Says `message` on stderr as the log would (see [`super::say`]).
fn say(format: LogFormat, message: &str) {
    super::say(format, tracing::Level::INFO, module_path!(), message);
}

/// Refuses to serve beyond loopback without client certificates, unless
/// told `--insecure-listen`; then says loudly what that means.
fn check_listen(args: &DevArgs) -> Result<(), CommandError> {
    if args.listen.ip().is_loopback() || args.tls_dir.is_some() {
        return Ok(());
    }
    let risk = "anyone who can reach it can submit runs (spending the LLM key) and read every run's input and result";
    if !args.insecure_listen {
        return Err(CommandError::usage(format!(
            "--listen {} is beyond loopback, and the dev plane has no authentication of its own: {risk}. \
             Serve it with --tls-dir DIR (client certificates required), keep --listen on 127.0.0.1, \
             or pass --insecure-listen to accept the risk",
            args.listen
        )));
    }
    say(
        args.log_format,
        &format!(
            "WARNING: --insecure-listen: the dev plane listens on {} without TLS or authentication; {risk}",
            args.listen
        ),
    );
    Ok(())
}

async fn run_with(
    args: DevArgs,
    certificates: Option<DevCertificates>,
    node_id: String,
    telemetry: &Telemetry,
    signals: &mut StopSignals,
) -> Result<Exit, CommandError> {
    let plane_tls = match &certificates {
        Some(certificates) => Some(
            certificates
                .plane_tls(args.allow_subjects.clone())
                .map_err(|err| CommandError::usage(err.to_string()))?,
        ),
        None => None,
    };
    // The demo's target API, started first: the declarative classifier's
    // definition names it as its output endpoint.
    let target = if args.demo && !args.plane_only {
        Some(
            stubs::StubTarget::start()
                .await
                .map_err(|err| CommandError::internal(format!("cannot start the stub target API: {err}")))?,
        )
    } else {
        None
    };
    let demo_definitions = match &target {
        Some(target) => Some(demo_definitions(
            &target.addr.to_string(),
            args.llm_endpoint.is_some(),
            args.definitions.as_deref(),
        )?),
        None => None,
    };
    let plane = DevPlane::start(PlaneOptions {
        listen: args.listen,
        data_dir: args.data_dir.as_ref().map(|dir| dir.join("plane")),
        lease_ttl: args.lease_ttl,
        tls: plane_tls,
        allowed_hosts: args.allow_hosts.clone(),
        definitions: match &demo_definitions {
            Some(dir) => Some(dir.path().to_path_buf()),
            None => args.definitions.clone(),
        },
        reregistration: if args.reregistration_answers_500 {
            Reregistration::DuplicateKey
        } else {
            Reregistration::Replace
        },
        ..PlaneOptions::default()
    })
    .await
    .map_err(|err| CommandError::usage(err.to_string()))?;
    let url = plane.url();
    // With TLS, clients (curl included) need the node certificate and the CA.
    let curl_tls = match &certificates {
        Some(c) => format!(
            "--cacert {} --cert {} --key {} ",
            c.path(tls_dir::CA_CERT).display(),
            c.path(tls_dir::NODE_CERT).display(),
            c.path(tls_dir::NODE_KEY).display()
        ),
        None => String::new(),
    };
    // The embedded node, described as a configuration would describe it;
    // the parts below fill in its agents and the outside world.
    let mut config = NodeConfig::default();
    config.node_runtime.control_plane_url = url
        .parse()
        .map_err(|err| CommandError::internal(format!("the dev plane's URL {url}: {err}")))?;
    if let Some(c) = &certificates {
        config.mtls = MTlsSection {
            enabled: true,
            client_certificate_path: Some(c.path(tls_dir::NODE_CERT)),
            client_key_path: Some(c.path(tls_dir::NODE_KEY)),
            server_ca_certificate_path: Some(c.path(tls_dir::CA_CERT)),
            expected_server_certificate_subject: None,
            validate_certificate_chain: true,
        };
    }
    let node_tls = app::control_plane_tls(&config).map_err(|err| CommandError::usage(err.to_string()))?;
    match &certificates {
        Some(_) => say(
            args.log_format,
            &format!("dev control plane listening on {url} (REST and gRPC over TLS, client certificates required)"),
        ),
        None => say(
            args.log_format,
            &format!("dev control plane listening on {url} (REST and gRPC)"),
        ),
    }

    if args.plane_only {
        match &certificates {
            // The plane binds node ids to certificates: a node presenting
            // node-cert.pem must use its CN as its id.
            Some(c) => say(
                args.log_format,
                &format!(
                    "plane only: start nodes with NodeRuntime__ControlPlaneUrl={url} NodeRuntime__NodeId={node_id} \\\n  \
                 MTls__Enabled=true MTls__ClientCertificatePath={} MTls__ClientKeyPath={} MTls__ServerCaCertificatePath={}\n\
                 (a node's id must be its client certificate's CN: issue each further node its own from {})",
                    c.path(tls_dir::NODE_CERT).display(),
                    c.path(tls_dir::NODE_KEY).display(),
                    c.path(tls_dir::CA_CERT).display(),
                    c.path(tls_dir::CA_KEY).display()
                ),
            ),
            None => say(
                args.log_format,
                &format!("plane only: start nodes with NodeRuntime__ControlPlaneUrl={url}"),
            ),
        }
        signals.received().await;
        plane.shutdown().await;
        return Ok(Exit::Completed);
    }

    // The node's agents: the sample agents, laid out as the store expects,
    // plus whatever --agents names.
    let layout = tempfile::Builder::new()
        .prefix("node-runtime-dev-agents-")
        .tempdir()
        .map_err(|err| CommandError::internal(format!("cannot create a temporary directory: {err}")))?;
    let samples = sample_agents_dir(args.sample_agents.as_deref())?;
    let offered = lay_out_samples(samples.as_deref(), layout.path())?;
    let mut dirs = vec![layout.path().to_path_buf()];
    dirs.extend(args.agents.iter().cloned());
    if offered.is_empty() && args.agents.is_empty() && args.watch.is_none() {
        return Err(CommandError::usage(
            "no agents to run: build the samples with scripts/build-agents, \
             or pass --agents DIR (layout DIR/<agent_id>/<version>.wasm)",
        ));
    }

    // The outside world: a real LLM endpoint if given; for the demo, a
    // stub model and a target API on loopback.
    let mut allowed_hosts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (agent, host) in &args.allow_http {
        allowed_hosts.entry(agent.clone()).or_default().push(host.clone());
    }
    let agent_runtime = &mut config.agent_runtime;
    if let Some(endpoint) = &args.llm_endpoint {
        let key = match &args.llm_key_env {
            Some(var) => std::env::var(var)
                .map_err(|_| CommandError::usage(format!("--llm-key-env {var}: the variable is not set")))?,
            None => String::new(),
        };
        agent_runtime.openai.endpoint = Some(endpoint.parse().map_err(|err| {
            CommandError::usage(format!(
                "--llm-endpoint {endpoint}: not a URL ({err}); give the endpoint's base, e.g. https://api.openai.com"
            ))
        })?);
        agent_runtime.openai.api_key = Some(Secret::new(key));
        agent_runtime.default_model = args.llm_model.clone();
    }
    if let Some(target) = &target {
        if agent_runtime.openai.endpoint.is_none() {
            let url = stubs::start_stub_model()
                .await
                .map_err(|err| CommandError::internal(format!("cannot start the stub model: {err}")))?;
            agent_runtime.openai.endpoint = Some(
                url.parse()
                    .map_err(|err| CommandError::internal(format!("the stub model's URL {url}: {err}")))?,
            );
            agent_runtime.default_model = stubs::STUB_MODEL.to_string();
            agent_runtime.prices = BTreeMap::from([(
                stubs::STUB_MODEL.to_string(),
                ModelPrice {
                    input_per_1k: 0.15,
                    output_per_1k: 0.6,
                },
            )]);
        }
        allowed_hosts
            .entry("invoice-classifier".to_string())
            .or_default()
            .push(target.addr.to_string());
        // The declarative classifier posts there, with a token the
        // operator (here, the demo) gives it for that host only.
        let declarative = &mut config.declarative_agents;
        declarative.allowed_hosts.push(target.addr.to_string());
        declarative.secrets.insert(
            DEMO_TOKEN_SECRET.to_string(),
            config::DeclarativeSecret {
                value: Secret::new("demo-invoice-api-token"),
                environment_variable: None,
                hosts: vec![target.addr.to_string()],
            },
        );
    }

    // The node's outbox: under --data-dir/node, else in a temporary
    // directory that lives as long as this command.
    let scratch = match &args.data_dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("node-runtime-dev-node-")
                .tempdir()
                .map_err(|err| CommandError::internal(format!("cannot create a temporary directory: {err}")))?,
        ),
    };
    let node_dir = match (&args.data_dir, &scratch) {
        (Some(dir), _) => dir.join("node"),
        (None, Some(scratch)) => scratch.path().to_path_buf(),
        (None, None) => unreachable!("a scratch directory exists without --data-dir"),
    };
    let node_runtime = &mut config.node_runtime;
    node_runtime.node_id = node_id.clone();
    node_runtime.max_concurrent_leases = args.slots;
    node_runtime.heartbeat_interval = Duration::from_secs(5);
    node_runtime.capacity = config::CapacitySection {
        slots: args.slots,
        cpu: std::thread::available_parallelism().map_or(1, |n| n.get()).to_string(),
        memory: "1Gi".to_string(),
    };
    node_runtime.metadata = [("Region", "local"), ("Environment", "dev")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    node_runtime.data_directory = node_dir;
    node_runtime.drain_timeout = Duration::from_secs(10);
    config.sandbox.allowed_hosts = allowed_hosts;
    // With --data-dir, compiled agents survive a restart too.
    config.sandbox.compiled_cache_max_bytes = if args.data_dir.is_some() { 1 << 30 } else { 0 };
    let node = app::NodeBuild::new(&config)
        .agent_store(AgentStore::new(dirs))
        .metrics(telemetry.metrics())
        .start()?;
    let admin = match args.admin_listen {
        Some(addr) => match AdminServer::start(addr, node.readiness_probe(), node.metrics()).await {
            Ok(admin) => {
                say(
                    args.log_format,
                    &format!(
                        "admin endpoint on http://{} (/healthz, /readyz, /metrics)",
                        admin.addr()
                    ),
                );
                Some(admin)
            }
            Err(err) => {
                node.shutdown().await;
                plane.shutdown().await;
                return Err(CommandError::usage(err.to_string()));
            }
        },
        None => None,
    };

    let result = if let Some(dir) = &args.watch {
        watch_project(
            &url,
            &node_tls,
            dir,
            layout.path(),
            args.watch_cycles,
            args.log_format,
            signals,
        )
        .await
    } else if let Some(target) = &target {
        let result = demo(&url, &target.addr.to_string(), &node_tls, args.log_format).await;
        say(
            args.log_format,
            &format!("the target API received {} classified invoices", target.received()),
        );
        result
    } else {
        say(
            args.log_format,
            &format!(
                "node {node_id} joined with {} slots; agents: {}",
                args.slots,
                offered.join(", ")
            ),
        );
        say(
            args.log_format,
            &format!(
                "submit a run:\n  curl -s {curl_tls}-X POST {url}/v1/runs -H 'content-type: application/json' \\\n    \
             -d '{{\"agentId\": \"echo\", \"version\": \"1.0.0\", \"inputRef\": {{\"message\": \"{{\\\"invoice\\\": 1}}\"}}}}'\n\
             see it:\n  curl -s {curl_tls}{url}/v1/runs\nCtrl-C stops."
            ),
        );
        signals.received().await;
        Ok(())
    };
    node.shutdown().await;
    if let Some(admin) = admin {
        admin.shutdown().await;
    }
    plane.shutdown().await;
    result.map(|()| Exit::Completed)
}

/// `--watch DIR`: the project built into the agents layout as NAME/dev.wasm
/// (replaced whole, so a lease never reads half a file; the store sees the
/// new file by its stamp), a run of it submitted, its outcome printed;
/// again on every save, until Ctrl-C (or `--watch-cycles`).
async fn watch_project(
    url: &str,
    tls: &ControlPlaneTls,
    dir: &Path,
    layout: &Path,
    cycles: Option<u32>,
    format: LogFormat,
    signals: &mut StopSignals,
) -> Result<(), CommandError> {
    use crate::kit::watch::{next_change, snapshot};
    let project = crate::kit::Project::open(dir).map_err(super::kit_error)?;
    let folder = layout.join(&project.name);
    std::fs::create_dir_all(&folder)
        .map_err(|err| CommandError::internal(format!("cannot create {}: {err}", folder.display())))?;
    let http = crate::control_plane::registration::http_client_with(Duration::from_secs(30), tls)
        .map_err(|err| CommandError::internal(format!("cannot build the HTTP client: {err}")))?;
    say(
        format,
        &format!(
            "serving {} as agent `{}` version `dev` on {url}; saving a file rebuilds and reruns it",
            dir.display(),
            project.name
        ),
    );
    let mut files = snapshot(dir);
    let mut saved = std::time::SystemTime::now();
    for cycle in 1u32.. {
        let from = dir.to_path_buf();
        let built = tokio::task::spawn_blocking(move || crate::kit::build(&from))
            .await
            .map_err(|err| CommandError::internal(format!("the build stopped: {err}")))?;
        match built {
            Ok(built) => {
                // A failure to stage or run this build is this cycle's: it
                // is printed, and the next save is waited for.
                let staged = folder.join(".dev.wasm.part");
                let ran = match std::fs::copy(&built.component, &staged)
                    .and_then(|_| std::fs::rename(&staged, folder.join("dev.wasm")))
                {
                    Ok(()) => {
                        let input =
                            std::fs::read_to_string(dir.join("input.json")).unwrap_or_else(|_| "{}".to_string());
                        submit_and_wait(&http, url, &project.name, &input).await
                    }
                    Err(err) => Err(CommandError::internal(format!(
                        "cannot stage {}: {err}",
                        staged.display()
                    ))),
                };
                match ran {
                    Ok(run) => {
                        println!("{}", watched_outcome(&run));
                        println!(
                            "watch: save to result in {} ms",
                            saved.elapsed().unwrap_or_default().as_millis()
                        );
                    }
                    Err(err) => say_err!("error: {}", err.message),
                }
            }
            Err(err) => say_err!("error: {err}"),
        }
        if cycles.is_some_and(|cycles| cycle >= cycles) {
            break;
        }
        say!("watch: waiting for a change in {}", dir.display());
        tokio::select! {
            change = next_change(dir, &files) => (files, saved) = change,
            () = signals.received() => break,
        }
    }
    Ok(())
}

/// Submits a run of `agent` version `dev` and polls it (at most a
/// minute) until it ends; the plane's view of the run.
async fn submit_and_wait(
    http: &reqwest::Client,
    url: &str,
    agent: &str,
    input: &str,
) -> Result<serde_json::Value, CommandError> {
    let fail = |err: reqwest::Error| CommandError::internal(format!("the dev plane at {url}: {err}"));
    let body = serde_json::json!({"agentId": agent, "version": "dev", "inputRef": {"message": input}});
    let answered = http
        .post(format!("{url}/v1/runs"))
        .json(&body)
        .send()
        .await
        .map_err(fail)?;
    let status = answered.status();
    let answer: serde_json::Value = answered.json().await.unwrap_or_default();
    let id = match answer["runId"].as_str() {
        Some(id) if status.is_success() && !id.is_empty() => id.to_string(),
        _ => {
            return Err(CommandError::internal(format!(
                "the dev plane at {url} refused the run ({status}): {}",
                support::one_line::escape(&answer.to_string())
            )));
        }
    };
    let started = Instant::now();
    loop {
        let run: serde_json::Value = http
            .get(format!("{url}/v1/runs/{id}"))
            .send()
            .await
            .map_err(fail)?
            .json()
            .await
            .map_err(fail)?;
        if matches!(run["status"].as_str(), Some("completed" | "failed")) || started.elapsed() > Duration::from_secs(60)
        {
            return Ok(run);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One run's outcome for `--watch`: its status and its result (or error).
fn watched_outcome(run: &serde_json::Value) -> String {
    let status = run["status"].as_str().unwrap_or("unknown");
    let detail = if status == "completed" {
        run["result"].to_string()
    } else {
        run["errorInfo"].to_string()
    };
    format!("run {} {status}: {detail}", run["runId"].as_str().unwrap_or("?"))
}

fn sample_agents_dir(given: Option<&Path>) -> Result<Option<PathBuf>, CommandError> {
    if let Some(dir) = given {
        if !dir.is_dir() {
            return Err(CommandError::usage(format!(
                "--sample-agents {}: not a directory",
                dir.display()
            )));
        }
        return Ok(Some(dir.to_path_buf()));
    }
    let mut candidates = Vec::new();
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(target).join("agents"));
    }
    // target/debug/node-runtime -> target/agents
    if let Ok(exe) = std::env::current_exe()
        && let Some(profile_dir) = exe.parent()
        && let Some(target) = profile_dir.parent()
    {
        candidates.push(target.join("agents"));
    }
    candidates.push(PathBuf::from("target/agents"));
    Ok(candidates.into_iter().find(|dir| dir.is_dir()))
}

/// Offers each `<name>.wasm` in `samples` as agent `<name>`, version 1.0.0.
fn lay_out_samples(samples: Option<&Path>, layout: &Path) -> Result<Vec<String>, CommandError> {
    let Some(samples) = samples else {
        return Ok(Vec::new());
    };
    let fail = |path: &Path, err: std::io::Error| CommandError::internal(format!("{}: {err}", path.display()));
    let mut names = Vec::new();
    for entry in std::fs::read_dir(samples).map_err(|err| fail(samples, err))? {
        let path = entry.map_err(|err| fail(samples, err))?.path();
        if path.extension().is_some_and(|ext| ext == "wasm")
            && let Some(name) = path.file_stem().and_then(|stem| stem.to_str())
        {
            let folder = layout.join(name);
            std::fs::create_dir_all(&folder).map_err(|err| fail(&folder, err))?;
            let absolute = std::fs::canonicalize(&path).map_err(|err| fail(&path, err))?;
            std::os::unix::fs::symlink(&absolute, folder.join("1.0.0.wasm")).map_err(|err| fail(&folder, err))?;
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// The declarative invoice classifier, in the reference's format.
const DEMO_DEFINITION: &str = include_str!("../../../sample-agents/declarative/invoice-classifier.json");
/// Its agent id (the file's `agentId`) and the secret its output's
/// `Authorization` header names.
const DEMO_DECLARATIVE_AGENT: &str = "invoice-classifier-declarative";
const DEMO_TOKEN_SECRET: &str = "INVOICE_API_TOKEN";

/// The demo's definitions: the declarative classifier, its output pointed
/// at the demo's target API (and, with a real model, its model left to
/// `--llm-model`), plus the files of `--definitions` if given.
fn demo_definitions(target: &str, real_model: bool, more: Option<&Path>) -> Result<tempfile::TempDir, CommandError> {
    let internal = |what: String| CommandError::internal(what);
    let dir = tempfile::Builder::new()
        .prefix("node-runtime-dev-definitions-")
        .tempdir()
        .map_err(|err| internal(format!("cannot create a temporary directory: {err}")))?;
    let mut definition: serde_json::Value =
        serde_json::from_str(DEMO_DEFINITION).map_err(|err| internal(format!("the demo's definition: {err}")))?;
    definition["output"]["config"]["endpoint"] = serde_json::Value::String(format!("http://{target}/invoices"));
    if real_model && let Some(profile) = definition["modelProfile"].as_object_mut() {
        profile.remove("model");
    }
    let path = dir.path().join("invoice-classifier.json");
    std::fs::write(&path, definition.to_string()).map_err(|err| internal(format!("{}: {err}", path.display())))?;
    if let Some(more) = more {
        let fail = |err: std::io::Error| CommandError::usage(format!("--definitions {}: {err}", more.display()));
        for entry in std::fs::read_dir(more).map_err(fail)? {
            let from = entry.map_err(fail)?.path();
            if from.extension().is_some_and(|ext| ext == "json")
                && let Some(name) = from.file_name()
            {
                std::fs::copy(&from, dir.path().join(format!("user-{}", name.to_string_lossy()))).map_err(fail)?;
            }
        }
    }
    Ok(dir)
}

/// One demonstration run: what to submit, and the budgets that trip.
struct DemoRun {
    agent: &'static str,
    input: &'static str,
    budgets: serde_json::Value,
}

/// Invoices for the demo's classifier: the stub model knows these vendors.
const DEMO_INVOICES: [&str; 3] = [
    r#"{"vendor": "Paper & Pens Ltd", "number": "INV-2001", "date": "2026-11-02", "amount": 84.5, "currency": "EUR"}"#,
    r#"{"vendor": "Rackmount Servers Inc", "number": "INV-2002", "date": "2026-11-03", "amount": 12400.0, "currency": "USD"}"#,
    r#"{"vendor": "City Water Works", "number": "INV-2003", "date": "2026-11-04", "amount": 310.2, "currency": "EUR"}"#,
];

async fn demo(url: &str, target: &str, tls: &ControlPlaneTls, format: LogFormat) -> Result<(), CommandError> {
    let runs = [
        DemoRun {
            agent: "echo",
            input: r#"{"invoice": "INV-1001", "amount": 1250.0}"#,
            budgets: serde_json::json!({}),
        },
        DemoRun {
            agent: "wasi-command-echo",
            input: r#"{"invoice": "INV-1002"}"#,
            budgets: serde_json::json!({}),
        },
        DemoRun {
            agent: "spin-forever",
            input: "{}",
            budgets: serde_json::json!({"maxFuel": 50_000_000}),
        },
        DemoRun {
            agent: "spin-forever",
            input: "{}",
            budgets: serde_json::json!({"maxDurationSeconds": 1}),
        },
        DemoRun {
            agent: "memory-bomb",
            input: "{}",
            budgets: serde_json::json!({"maxMemoryBytes": 32 << 20}),
        },
        DemoRun {
            agent: "panic",
            input: "{}",
            budgets: serde_json::json!({}),
        },
        DemoRun {
            agent: "agent-error",
            input: "{}",
            budgets: serde_json::json!({}),
        },
        DemoRun {
            agent: "no-such-agent",
            input: "{}",
            budgets: serde_json::json!({}),
        },
    ];
    let http = crate::control_plane::registration::http_client_with(Duration::from_secs(30), tls)
        .map_err(|err| CommandError::internal(format!("cannot build the HTTP client: {err}")))?;
    let fetch = |request: reqwest::RequestBuilder| async move {
        let fail = |err: reqwest::Error| CommandError::internal(format!("the dev plane at {url}: {err}"));
        request
            .send()
            .await
            .map_err(fail)?
            .json::<serde_json::Value>()
            .await
            .map_err(fail)
    };
    let invoices = DEMO_INVOICES.iter().enumerate().map(|(i, invoice)| {
        serde_json::json!({
            "agentId": "invoice-classifier",
            "version": "1.0.0",
            "inputRef": {"message": invoice, "messageId": format!("demo-{i}")},
            "metadata": {"target_url": format!("http://{target}/invoices")},
        })
    });
    // The same invoices through the declarative classifier: a definition,
    // no code, run by the node's built-in agent.
    let declarative = DEMO_INVOICES.iter().enumerate().map(|(i, invoice)| {
        serde_json::json!({
            "agentId": DEMO_DECLARATIVE_AGENT,
            "version": "1.0.0",
            "inputRef": {"message": invoice, "messageId": format!("demo-declarative-{i}")},
        })
    });
    let others = runs.iter().map(|run| {
        serde_json::json!({
            "agentId": run.agent,
            "version": "1.0.0",
            "inputRef": {"message": run.input},
            "budgets": run.budgets,
        })
    });
    let mut ids = Vec::new();
    for body in invoices.chain(declarative).chain(others) {
        let answer = fetch(http.post(format!("{url}/v1/runs")).json(&body)).await?;
        ids.push(answer["runId"].as_str().unwrap_or_default().to_string());
    }
    say(
        format,
        &format!("submitted {} runs; waiting for their outcomes", ids.len()),
    );

    let started = Instant::now();
    let mut finished: Vec<serde_json::Value>;
    loop {
        // Each run by its id: with --data-dir, the list's first page may
        // hold only older runs.
        finished = Vec::with_capacity(ids.len());
        for id in &ids {
            finished.push(fetch(http.get(format!("{url}/v1/runs/{id}"))).await?);
        }
        let done = finished.len() == ids.len()
            && finished
                .iter()
                .all(|run| matches!(run["status"].as_str(), Some("completed" | "failed")));
        if done || started.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    print!("{}", demo_table(&finished));
    Ok(())
}

fn demo_table(runs: &[serde_json::Value]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<38} {:<30} {:<10} {:<16} {:>9} {:>12} {:>11} {:>7} {:>9}",
        "run", "agent", "outcome", "kind", "time (ms)", "fuel", "peak memory", "tokens", "cost ($)"
    );
    for run in runs {
        let details: serde_json::Value = run["errorInfo"]["errorDetails"]
            .as_str()
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or_default();
        let report = if run["sandbox"].is_object() {
            &run["sandbox"]
        } else {
            &details["report"]
        };
        let kind = details["kind"].as_str().unwrap_or("-");
        let fuel = report["fuel_consumed"]
            .as_u64()
            .or_else(|| report["fuelConsumed"].as_u64())
            .map_or("-".to_string(), |f| f.to_string());
        let peak = report["peak_memory_bytes"]
            .as_u64()
            .or_else(|| report["peakMemoryBytes"].as_u64())
            .map_or("-".to_string(), format_bytes);
        let costs = &run["costs"];
        let tokens = costs["tokensIn"].as_i64().unwrap_or(0) + costs["tokensOut"].as_i64().unwrap_or(0);
        let _ = writeln!(
            out,
            "{:<38} {:<30} {:<10} {:<16} {:>9} {:>12} {:>11} {:>7} {:>9}",
            run["runId"].as_str().unwrap_or("?"),
            run["agentId"].as_str().unwrap_or("?"),
            run["status"].as_str().unwrap_or("?"),
            kind,
            run["timings"]["durationMs"]
                .as_i64()
                .map_or("-".to_string(), |ms| ms.to_string()),
            fuel,
            peak,
            tokens,
            format!("{:.6}", costs["usdCost"].as_f64().unwrap_or(0.0)),
        );
    }
    out
}
