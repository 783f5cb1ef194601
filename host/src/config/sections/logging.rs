//! `Logging`: the log level of each category, as .NET spells it.

use std::collections::BTreeMap;

use crate::config::error::ConfigError;
use crate::config::reader::{Reader, Section};
use crate::config::{LogLevel, LoggingSection};

/// `Logging.LogLevel`; a category that cannot be a `tracing` target
/// (it has `,`, `=`, brackets or spaces in it) is ignored.
pub(in crate::config) fn bind(reader: &mut Reader<'_>, root: &mut Section) -> Result<LoggingSection, ConfigError> {
    let mut s = reader.section(root, "Logging")?;
    let mut levels = reader.section(&mut s, "LogLevel")?;
    let names: Vec<String> = levels.entries.0.iter().map(|(name, _)| name.clone()).collect();
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
