//! `node-runtime outbox list|retry|purge`: see and manage the reports a
//! node still owes its control plane (`{DataDirectory}/outbox.redb`).
//!
//! The outbox file is locked while a node runs with it; these commands
//! then refuse, naming the reason, rather than race the node. A damaged
//! outbox (which `serve` moves aside as `outbox.redb.corrupt-<time>`) is
//! read with `list --file`, on a copy: what can be read is listed, or the
//! command says plainly that nothing can.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use clap::{ArgGroup, Args, Subcommand};

use super::{CommandError, Exit};
use crate::app::{self, NodeConfig};
use crate::control_plane::LeaseClient;
use crate::outbox::{self, Outbox, OutboxError, PendingReport, now_unix_ms};
use crate::telemetry::LogFormat;
use crate::worker::{Delivery, Sent};

#[derive(Debug, Args)]
pub struct OutboxArgs {
    #[command(subcommand)]
    pub command: OutboxCommand,
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Show each pending report: lease id, run id, kind, age, deadline.
    List(ListArgs),
    /// Send every pending report now (to `ControlPlaneUrl`), once each, and
    /// say what was delivered; answered ones leave the outbox (a plane that
    /// refuses a report will never take it: check the URL with --dry-run).
    Retry(RetryArgs),
    /// Delete pending reports: `--all`, or one `--lease ID`.
    Purge(PurgeArgs),
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The node's configuration, as for `serve` (environment variables
    /// apply over it); the outbox is `{DataDirectory}/outbox.redb`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Read this outbox file instead of `{DataDirectory}/outbox.redb`, e.g.
    /// an `outbox.redb.corrupt-<time>` that `serve` moved aside: it is read
    /// from a copy, never changed, and what can be read is listed.
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Say what would be sent, and to which control plane; send nothing and
    /// change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["all", "lease"])))]
pub struct PurgeArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Delete every pending report.
    #[arg(long)]
    pub all: bool,
    /// Delete the report of this lease only.
    #[arg(long, value_name = "ID")]
    pub lease: Option<String>,
}

pub async fn run(args: OutboxArgs) -> Result<Exit, CommandError> {
    match args.command {
        OutboxCommand::List(args) => match &args.file {
            Some(file) => list_file(file),
            None => list(&args.config),
        },
        OutboxCommand::Retry(args) => retry(&args).await,
        OutboxCommand::Purge(args) => purge(&args),
    }
}

fn load(args: &ConfigArg) -> Result<(NodeConfig, Outbox), CommandError> {
    let config = app::load_config(args.config.as_deref(), LogFormat::Human)
        .map_err(|err| CommandError::usage(format!("invalid configuration: {err}")))?;
    let dir = &config.node_runtime.data_directory;
    // Opening creates: a mistyped directory would show an empty outbox, and
    // leave one behind.
    if !dir.is_dir() {
        return Err(CommandError::usage(format!(
            "NodeRuntime.DataDirectory {} does not exist, so it holds no outbox; point --config or \
             NodeRuntime__DataDirectory at the data directory of the node whose reports you want",
            dir.display()
        )));
    }
    if !dir.join(outbox::FILE_NAME).exists() {
        return Err(CommandError::usage(format!(
            "NodeRuntime.DataDirectory {} holds no outbox ({}): no node has run with it; point \
             --config or NodeRuntime__DataDirectory at the data directory of the node whose \
             reports you want",
            dir.display(),
            outbox::FILE_NAME
        )));
    }
    let outbox = Outbox::open_leaving_layout(dir).map_err(|err| match err {
        OutboxError::Locked(path) => CommandError::usage(format!(
            "the outbox {} is locked by a running node; stop that node first \
             (it delivers what the outbox holds by itself)",
            path.display()
        )),
        OutboxError::Damaged { path, reason } => CommandError::internal(format!(
            "the outbox {} is damaged ({reason}); `node-runtime serve` moves it aside and starts \
             with an empty one; read what is left of it with `node-runtime outbox list --file {}`",
            path.display(),
            path.display()
        )),
        other => CommandError::internal(format!("cannot open the outbox: {other}")),
    })?;
    Ok((config, outbox))
}

fn pending(outbox: &Outbox) -> Result<Vec<PendingReport>, CommandError> {
    outbox.pending().map_err(|err| CommandError::internal(err.to_string()))
}

fn list(args: &ConfigArg) -> Result<Exit, CommandError> {
    let (_, outbox) = load(args)?;
    let reports = pending(&outbox)?;
    say!("{} pending report(s) in {}", reports.len(), outbox.path().display());
    print_reports(&reports, |report| {
        outbox.expired(report.deadline_unix_ms, report.written_unix_ms, now_unix_ms())
    });
    Ok(Exit::Completed)
}

/// `list --file`: what can be read of an outbox file, damaged or not.
fn list_file(path: &std::path::Path) -> Result<Exit, CommandError> {
    if !path.is_file() {
        return Err(CommandError::usage(format!(
            "{} is not a file: give the path of an outbox file, e.g. an outbox.redb.corrupt-<time> \
             that serve moved aside in the DataDirectory",
            path.display()
        )));
    }
    let salvaged = outbox::salvage(path).map_err(|err| match err {
        OutboxError::Damaged { reason, .. } => {
            CommandError::internal(format!("nothing can be read from {}: {reason}", path.display()))
        }
        other => CommandError::internal(other.to_string()),
    })?;
    say!("{} report(s) read from {}", salvaged.reports.len(), path.display());
    if salvaged.unreadable > 0 || salvaged.stopped.is_some() {
        say!(
            "{} entr(y/ies) could not be read{}",
            salvaged.unreadable,
            salvaged
                .stopped
                .as_deref()
                .map(|why| format!("; reading stopped early: {why}"))
                .unwrap_or_default()
        );
    }
    let limits = outbox::OutboxLimits::default();
    let grace = i64::try_from(limits.grace.as_millis()).unwrap_or(i64::MAX);
    print_reports(&salvaged.reports, |report| {
        let from = if report.deadline_unix_ms > 0 {
            report.deadline_unix_ms
        } else {
            report.written_unix_ms
        };
        now_unix_ms() > from.saturating_add(grace)
    });
    Ok(Exit::Completed)
}

fn print_reports(reports: &[PendingReport], expired: impl Fn(&PendingReport) -> bool) {
    if reports.is_empty() {
        return;
    }
    let now = now_unix_ms();
    say!("{:<40}  {:<40}  {:<8}  {:>10}  DEADLINE", "LEASE", "RUN", "KIND", "AGE");
    for report in reports {
        let age = Duration::from_secs(u64::try_from((now - report.written_unix_ms) / 1000).unwrap_or(0));
        let deadline = match u64::try_from(report.deadline_unix_ms) {
            Ok(ms) if ms > 0 => humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string(),
            _ => "none".to_string(),
        };
        let expired = if expired(report) {
            " (expired: will be dropped)"
        } else {
            ""
        };
        say!(
            "{:<40}  {:<40}  {:<8}  {:>10}  {deadline}{expired}",
            report.lease_id(),
            report.run_id(),
            report.kind(),
            humantime::format_duration(age).to_string(),
        );
    }
}

async fn retry(args: &RetryArgs) -> Result<Exit, CommandError> {
    let (config, outbox) = load(&args.config)?;
    support::tls::install_crypto_provider();
    let url = config
        .node_runtime
        .control_plane_url
        .to_string()
        .trim_end_matches('/')
        .to_string();
    let tls =
        app::control_plane_tls(&config).map_err(|err| CommandError::usage(format!("invalid configuration: {err}")))?;
    let client = LeaseClient::connect_lazy_with(&url, Duration::from_secs(10), &tls)
        .map_err(|err| CommandError::usage(err.to_string()))?
        .calls_stream(config.node_runtime.calls_stream);
    // Printed from here on: without the URL's credentials.
    let url = support::redact::url(&url);
    let reports = pending(&outbox)?;
    if args.dry_run {
        say!(
            "would send {} pending report(s) to {url}; sending nothing (--dry-run)",
            reports.len()
        );
        for report in &reports {
            say!("would send {}", report.lease_id());
        }
        return Ok(Exit::Completed);
    }
    say!("sending {} pending report(s) to {url}", reports.len());
    let (mut delivered, mut refused, mut failed) = (0, 0, 0);
    for report in reports {
        let lease_id = report.lease_id().to_string();
        // The node's own send, shrinking once for a plane that refuses the
        // size: sent once, and once more if it had to shrink.
        let mut delivery = Delivery::new(report.report);
        loop {
            match delivery.send(&client).await {
                Sent::Shrunk { .. } => {
                    say!("shrunk     {lease_id}: the control plane refused its size; sending it without its details");
                    continue;
                }
                Sent::Delivered => {
                    delivered += 1;
                    say!("delivered  {lease_id}");
                }
                Sent::Refused(message) => {
                    refused += 1;
                    say!("refused    {lease_id}: {url} answered: {message} (removed: it would never be taken)");
                }
                Sent::TooLarge(err) => {
                    refused += 1;
                    say!(
                        "refused    {lease_id}: {url}: {} (removed: it would never be taken)",
                        support::redact::urls_in(&err.to_string())
                    );
                }
                Sent::Failed(err) => {
                    failed += 1;
                    say!(
                        "failed     {lease_id}: {url}: {} (kept)",
                        support::redact::urls_in(&err.to_string())
                    );
                    break;
                }
            }
            outbox
                .remove(&lease_id)
                .map_err(|err| CommandError::internal(err.to_string()))?;
            break;
        }
    }
    say!("{delivered} delivered, {refused} refused by the control plane, {failed} not delivered");
    Ok(if failed == 0 { Exit::Completed } else { Exit::Internal })
}

fn purge(args: &PurgeArgs) -> Result<Exit, CommandError> {
    let (_, outbox) = load(&args.config)?;
    let internal = |err: OutboxError| CommandError::internal(err.to_string());
    match &args.lease {
        Some(lease_id) => {
            if outbox.remove(lease_id).map_err(internal)? {
                say!("purged the report of lease {lease_id}");
            } else {
                return Err(CommandError::usage(format!("no pending report for lease {lease_id}")));
            }
        }
        None => {
            let count = outbox.purge_all().map_err(internal)?;
            say!("purged {count} report(s)");
        }
    }
    Ok(Exit::Completed)
}
