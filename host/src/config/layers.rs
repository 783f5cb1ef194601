//! Which configuration files are read, in which order: the .NET hosting
//! convention.
//!
//! A .NET host reads `appsettings.json`, then `appsettings.{Environment}.json`
//! beside it when that file exists, then the environment variables; each
//! source's keys replace the earlier ones' (merging is `tree`'s). The
//! environment's name comes from `DOTNET_ENVIRONMENT`, else
//! `ASPNETCORE_ENVIRONMENT`, else it is `Production`.
//!
//! `DOTNET_ENVIRONMENT` wins when both are set because the reference node
//! is a generic host (`Host.CreateApplicationBuilder`), which reads only
//! `DOTNET_ENVIRONMENT`, and since .NET 7 `WebApplication.CreateBuilder`
//! also lets it override `ASPNETCORE_ENVIRONMENT`. The node reads
//! `ASPNETCORE_ENVIRONMENT` as well because operators of ASP.NET services
//! set it out of habit. A variable set to an empty string counts as unset.
//!
//! .NET looks for the environment's file by the name `appsettings`; this
//! node puts the environment's name before the extension of whatever file
//! `--config` names, so `node.json` is layered with `node.Development.json`.

use std::fmt;
use std::path::{Path, PathBuf};

/// The variables that name the environment, the winner first.
pub const ENVIRONMENT_VARIABLES: [&str; 2] = ["DOTNET_ENVIRONMENT", "ASPNETCORE_ENVIRONMENT"];

/// The environment when no variable names one, as in .NET.
pub const DEFAULT_ENVIRONMENT: &str = "Production";

/// The hosting environment: `Development`, `Staging`, `Production`, or any
/// name an operator gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostingEnvironment {
    /// As written: it becomes part of a file name, and Linux file names
    /// are case-sensitive (`appsettings.Development.json`).
    pub name: String,
    /// The variable that named it, as spelt; `None` for the default.
    pub variable: Option<String>,
    /// The other variable when it was set too and lost, as `NAME=value`.
    pub overridden: Option<String>,
}

impl Default for HostingEnvironment {
    fn default() -> Self {
        HostingEnvironment {
            name: DEFAULT_ENVIRONMENT.to_string(),
            variable: None,
            overridden: None,
        }
    }
}

impl HostingEnvironment {
    /// The environment `env` names. Variable names match in any case, as
    /// .NET's environment-variable provider matches them.
    pub fn from_env<'a>(env: impl IntoIterator<Item = &'a (String, String)>) -> Self {
        let mut found: [Option<(&str, &str)>; 2] = [None, None];
        for (name, value) in env {
            if value.trim().is_empty() {
                continue;
            }
            for (slot, variable) in found.iter_mut().zip(ENVIRONMENT_VARIABLES) {
                if slot.is_none() && name.eq_ignore_ascii_case(variable) {
                    *slot = Some((name, value));
                }
            }
        }
        let [dotnet, aspnetcore] = found;
        let Some((variable, value)) = dotnet.or(aspnetcore) else {
            return HostingEnvironment::default();
        };
        let overridden = match (dotnet, aspnetcore) {
            (Some((_, won)), Some((lost_name, lost))) if won.trim() != lost.trim() => {
                Some(format!("{lost_name}={lost}"))
            }
            _ => None,
        };
        HostingEnvironment {
            name: value.trim().to_string(),
            variable: Some(variable.to_string()),
            overridden,
        }
    }

    /// The environment's file for `base`: the environment's name before
    /// the extension, beside it (`appsettings.json` ->
    /// `appsettings.Development.json`).
    pub fn file_for(&self, base: &Path) -> PathBuf {
        let stem = base.file_stem().map(|stem| stem.to_string_lossy().into_owned());
        let mut name = format!("{}.{}", stem.unwrap_or_default(), self.name);
        if let Some(extension) = base.extension() {
            name.push('.');
            name.push_str(&extension.to_string_lossy());
        }
        base.with_file_name(name)
    }
}

/// Where a configuration came from: the environment and the files layered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigSources {
    pub environment: HostingEnvironment,
    /// The files read, in the order layered: the `--config` file, then its
    /// environment's file when that exists. Empty without `--config`.
    pub files: Vec<PathBuf>,
    /// The environment's file looked for beside the `--config` file,
    /// whether or not it exists; `None` without `--config`.
    pub environment_file: Option<PathBuf>,
}

impl fmt::Display for ConfigSources {
    /// One line for `config check` and the log: what was read, and why.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let environment = &self.environment;
        let why = match (&environment.variable, &environment.overridden) {
            (Some(variable), Some(overridden)) => {
                format!("from {variable}, which wins over {overridden}")
            }
            (Some(variable), None) => format!("from {variable}"),
            (None, _) => format!("the default: neither {} is set", ENVIRONMENT_VARIABLES.join(" nor ")),
        };
        let files: Vec<String> = self.files.iter().map(|file| file.display().to_string()).collect();
        match (&self.environment_file, files.as_slice()) {
            (None, _) | (_, []) => write!(
                f,
                "environment {} ({why}); no configuration file, so the defaults and the \
                 environment variables alone",
                environment.name
            ),
            (Some(_), [base, overlay, ..]) => write!(
                f,
                "environment {} ({why}); read {base}, then {overlay} over it, then the \
                 environment variables",
                environment.name
            ),
            (Some(missing), [base]) => write!(
                f,
                "environment {} ({why}); read {base}, then the environment variables \
                 (no {} beside it, which is optional)",
                environment.name,
                missing.display()
            ),
        }
    }
}
