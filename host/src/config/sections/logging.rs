//! `Logging`: the log level of each category, as .NET spells it. Its
//! type, its binding, and its printed view, so that each of its keys is
//! spelt here only.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::error::ConfigError;
use crate::config::reader::{Reader, Section};

/// `Logging`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoggingSection {
    /// `LogLevel`: category -> level, categories as written. `Default` is
    /// the level of everything else; the other categories become `tracing`
    /// targets (see [`NodeConfig::log_filter`](crate::config::NodeConfig::log_filter)).
    pub log_level: BTreeMap<String, LogLevel>,
}

/// A .NET log level, as `Logging.LogLevel` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    Information,
    Warning,
    Error,
    Critical,
    None,
}

impl LogLevel {
    pub const ALL: [LogLevel; 7] = [
        LogLevel::Trace,
        LogLevel::Debug,
        LogLevel::Information,
        LogLevel::Warning,
        LogLevel::Error,
        LogLevel::Critical,
        LogLevel::None,
    ];

    /// The .NET name.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "Trace",
            LogLevel::Debug => "Debug",
            LogLevel::Information => "Information",
            LogLevel::Warning => "Warning",
            LogLevel::Error => "Error",
            LogLevel::Critical => "Critical",
            LogLevel::None => "None",
        }
    }

    /// The `tracing` level: `tracing` has nothing above error, so
    /// Critical is error.
    pub fn directive(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Information => "info",
            LogLevel::Warning => "warn",
            LogLevel::Error | LogLevel::Critical => "error",
            LogLevel::None => "off",
        }
    }
}

/// `Logging.LogLevel`; a category that cannot be a `tracing` target
/// (it has `,`, `=`, brackets or spaces in it) is ignored.
pub(in crate::config) fn bind(reader: &mut Reader<'_>, root: &mut Section) -> Result<LoggingSection, ConfigError> {
    let mut s = reader.section(root, "Logging")?;
    let mut levels = reader.section(&mut s, "LogLevel")?;
    let names: Vec<String> = levels.entries.names();
    let expected = "a log level: one of Trace, Debug, Information, Warning, Error, Critical, None";
    let mut log_level = BTreeMap::new();
    for name in names {
        if !usable_as_target(&name) {
            continue;
        }
        let level = reader.value(&mut levels, &name, None, expected, |scalar| {
            parse_log_level(&scalar.text()?).map(Some)
        })?;
        if let Some(level) = level {
            log_level.insert(name, level);
        }
    }
    reader.finish(levels);
    reader.finish(s);
    Ok(LoggingSection { log_level })
}

/// A .NET level name in any case, or its number (`"2"` is Information), as
/// the .NET binder reads an enum.
fn parse_log_level(text: &str) -> Option<LogLevel> {
    let text = text.trim();
    if let Ok(number) = text.parse::<usize>() {
        return LogLevel::ALL.get(number).copied();
    }
    LogLevel::ALL
        .into_iter()
        .find(|level| level.as_str().eq_ignore_ascii_case(text))
}

/// Whether `EnvFilter` can parse `name` as a target: it starts with a
/// letter, digit, `-`, `_` or `:`, and holds none of the directive syntax.
fn usable_as_target(name: &str) -> bool {
    let starts_well = name
        .chars()
        .next()
        .is_some_and(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ':'));
    starts_well
        && !name
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, ',' | '=' | '[' | ']' | '{' | '}'))
}

/// `Logging` as `config check` prints it.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::config) struct View<'a> {
    log_level: BTreeMap<&'a str, &'static str>,
}

impl<'a> View<'a> {
    pub(in crate::config) fn of(logging: &'a LoggingSection) -> Self {
        View {
            log_level: logging
                .log_level
                .iter()
                .map(|(category, level)| (category.as_str(), LogLevel::as_str(*level)))
                .collect(),
        }
    }
}
