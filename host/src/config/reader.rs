//! The generic reader: layers merged into one tree, and typed reads out
//! of it, with no knowledge of any section.
//!
//! Each key is taken out of its section as it is read, so whatever is
//! left afterwards is a key the node does not know. Every value goes
//! through one conversion that is also its check: a number that is out of
//! range fails the same way as a word where a number belongs, with the
//! message saying what the key accepts. Values the .NET binder would
//! coerce are coerced: `"5"` is 5, `"False"` is false, `5` is `"5"`.
//! A null, or an empty string where a number, boolean or path belongs,
//! means "not set": the default applies.
//!
//! The sections (`sections`) say which keys there are; this file says how
//! a key is read and how a bad one is reported: its key, the value found,
//! the file or variable it came from, and what to write instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::ConfigError;
use super::tree::{self, Entries, Kind, Node, Origin, Scalar};
use support::units::parse_size;

/// One configuration file's text, and its name as messages give it.
pub(super) struct Layer {
    pub name: String,
    pub text: String,
}

/// Parses each layer, merges them in order (a later one's keys win) and
/// applies `env` over the result: the reader, and the root section for
/// the sections to take their keys from.
pub(super) fn open(
    layers: Vec<Layer>,
    base_dir: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(Reader<'_>, Section), ConfigError> {
    let mut entries = Entries::default();
    let mut files = Vec::with_capacity(layers.len());
    for (index, layer) in layers.into_iter().enumerate() {
        let mut root = tree::parse(&layer.text).map_err(|err| syntax_error(&layer.name, &err))?;
        root.set_file(index);
        match root.kind {
            Kind::Section {
                entries: layer_entries,
                list: false,
            } => {
                for (name, node) in layer_entries {
                    entries.insert(name, node);
                }
            }
            _ => {
                return Err(ConfigError::NotAnObject {
                    found: root.describe(),
                    file: layer.name,
                });
            }
        }
        files.push(layer.name);
    }
    let env: Vec<(String, String)> = env.into_iter().collect();
    tree::apply_env(&mut entries, env.iter().cloned());

    let reader = Reader {
        files,
        base_dir,
        ignored: Vec::new(),
        env: env.into_iter().collect(),
    };
    let root = Section {
        key: String::new(),
        entries,
    };
    Ok((reader, root))
}

fn syntax_error(file: &str, err: &serde_json::Error) -> ConfigError {
    let text = err.to_string();
    let position = format!(" at line {} column {}", err.line(), err.column());
    ConfigError::Syntax {
        file: file.to_string(),
        line: err.line(),
        column: err.column(),
        message: text.strip_suffix(&position).unwrap_or(&text).to_string(),
    }
}

/// A section being bound: its key path and the entries not read yet.
pub(super) struct Section {
    /// `NodeRuntime.Capacity`; empty at the root.
    pub key: String,
    pub entries: Entries,
}

impl Section {
    pub fn key(&self, name: &str) -> String {
        if self.key.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.key)
        }
    }
}

/// One scalar setting, taken out of its section.
pub(super) struct Setting {
    pub key: String,
    pub scalar: Scalar,
    pub origin: Origin,
}

/// Reads typed values out of sections, and remembers what was left unread.
pub(super) struct Reader<'a> {
    /// The configuration files in the order layered, as messages name them.
    files: Vec<String>,
    base_dir: &'a Path,
    ignored: Vec<String>,
    /// The environment, for keys that name a variable (an API key's).
    env: BTreeMap<String, String>,
}

/// What a path must be, when it exists.
#[derive(Clone, Copy)]
pub(super) enum PathKind {
    /// Anything: the path is resolved, never looked at (a certificate of
    /// a disabled `MTls` section).
    Unread,
    /// A file that exists (a certificate or a key).
    ExistingFile,
    /// A directory, or nothing yet.
    Directory,
    /// A directory that exists (one granted to an agent).
    ExistingDirectory,
}

impl Reader<'_> {
    fn origin(&self, origin: &Origin) -> String {
        match origin {
            Origin::File(index) => match self.files.get(*index) {
                Some(file) => format!("in {file}"),
                None => "in the configuration".to_string(),
            },
            Origin::Env(name) => format!("from environment variable {name}"),
            Origin::Unset => match self.files.as_slice() {
                [] => "in the configuration".to_string(),
                [file] => format!("in {file}"),
                [files @ .., last] => format!("in neither {} nor {last}", files.join(", ")),
            },
        }
    }

    /// `found` is printed with the credentials of any URL in it redacted.
    pub fn invalid(&self, key: String, found: String, origin: &Origin, fix: String) -> ConfigError {
        ConfigError::Invalid {
            key,
            found: support::redact::urls_in(&found).into_owned(),
            origin: self.origin(origin),
            fix,
        }
    }

    /// Records what is left of a section as ignored. A whole unknown
    /// section is one entry.
    pub fn finish(&mut self, section: Section) {
        for (name, _) in section.entries.iter() {
            self.ignored.push(section.key(name));
        }
    }

    /// Every key left unread, sorted, once what is left of the root (whole
    /// unknown sections) is added.
    pub fn ignored_keys(mut self, root: Section) -> Vec<String> {
        self.finish(root);
        self.ignored.sort();
        self.ignored
    }

    /// The environment variable `name`, for a key that names one (an API
    /// key's).
    pub fn variable(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(String::as_str)
    }

    /// The subsection `name`, empty when absent or null.
    pub fn section(&self, parent: &mut Section, name: &str) -> Result<Section, ConfigError> {
        let key = parent.key(name);
        match parent.entries.take(name) {
            None => Ok(Section {
                key,
                entries: Entries::default(),
            }),
            Some(Node {
                kind: Kind::Section { entries, list: false },
                ..
            }) => Ok(Section { key, entries }),
            Some(Node {
                kind: Kind::Value(Scalar::Null),
                ..
            }) => Ok(Section {
                key,
                entries: Entries::default(),
            }),
            Some(node) => Err(self.invalid(
                key,
                node.describe(),
                &node.origin,
                format!("expected a section (a JSON object) with the {name} settings"),
            )),
        }
    }

    /// The scalar `name`, `None` when absent or null; a section or a list
    /// where a value belongs is an error.
    pub fn setting(&self, section: &mut Section, name: &str, expected: &str) -> Result<Option<Setting>, ConfigError> {
        let key = section.key(name);
        let Some(node) = section.entries.take(name) else {
            return Ok(None);
        };
        let found = node.describe();
        match node.kind {
            Kind::Value(Scalar::Null) => Ok(None),
            Kind::Value(scalar) => Ok(Some(Setting {
                key,
                scalar,
                origin: node.origin,
            })),
            Kind::Section { .. } => Err(self.invalid(key, found, &node.origin, format!("expected {expected}"))),
        }
    }

    /// A value other than a string: `convert` both reads and checks it, and
    /// `None` from it is an error that says what is `expected`. An empty
    /// string is "not set".
    pub fn value<T>(
        &self,
        section: &mut Section,
        name: &str,
        default: T,
        expected: &str,
        convert: impl FnOnce(&Scalar) -> Option<T>,
    ) -> Result<T, ConfigError> {
        let Some(setting) = self.setting(section, name, expected)? else {
            return Ok(default);
        };
        if matches!(&setting.scalar, Scalar::String(text) if text.trim().is_empty()) {
            return Ok(default);
        }
        convert(&setting.scalar).ok_or_else(|| self.rejected(setting, expected))
    }

    pub fn rejected(&self, setting: Setting, expected: &str) -> ConfigError {
        self.invalid(
            setting.key,
            setting.scalar.to_string(),
            &setting.origin,
            format!("expected {expected}"),
        )
    }

    /// A string, taken as written (numbers and booleans as their text).
    pub fn text(&self, section: &mut Section, name: &str, default: &str) -> Result<String, ConfigError> {
        Ok(self
            .setting(section, name, "a string")?
            .and_then(|setting| setting.scalar.text())
            .unwrap_or_else(|| default.to_string()))
    }

    /// A string that may be absent; empty is absent.
    pub fn optional_text(&self, section: &mut Section, name: &str) -> Result<Option<String>, ConfigError> {
        Ok(self
            .setting(section, name, "a string")?
            .and_then(|setting| setting.scalar.text())
            .filter(|text| !text.trim().is_empty()))
    }

    /// A string that must not be empty.
    pub fn required_text(
        &self,
        section: &mut Section,
        name: &str,
        default: &str,
        expected: &str,
    ) -> Result<String, ConfigError> {
        match self.setting(section, name, expected)? {
            None => Ok(default.to_string()),
            Some(setting) => match setting.scalar.text() {
                Some(text) if !text.trim().is_empty() => Ok(text),
                _ => Err(self.rejected(setting, expected)),
            },
        }
    }

    pub fn boolean(&self, section: &mut Section, name: &str, default: bool) -> Result<bool, ConfigError> {
        self.value(section, name, default, "true or false", Scalar::boolean)
    }

    /// A whole number in `range`.
    pub fn integer<T: TryFrom<i128>>(
        &self,
        section: &mut Section,
        name: &str,
        default: T,
        range: std::ops::RangeInclusive<i128>,
        expected: &str,
    ) -> Result<T, ConfigError> {
        self.value(section, name, default, expected, |scalar| {
            scalar
                .integer()
                .filter(|n| range.contains(n))
                .and_then(|n| T::try_from(n).ok())
        })
    }

    /// Whole seconds in `range`.
    pub fn seconds(
        &self,
        section: &mut Section,
        name: &str,
        default: Duration,
        range: std::ops::RangeInclusive<i128>,
        expected: &str,
    ) -> Result<Duration, ConfigError> {
        let seconds: u64 = self.integer(section, name, default.as_secs(), range, expected)?;
        Ok(Duration::from_secs(seconds))
    }

    /// A size in bytes: a number, or a string with a unit (`"256MiB"`).
    pub fn size(
        &self,
        section: &mut Section,
        name: &str,
        default: u64,
        minimum: u64,
        expected: &str,
    ) -> Result<u64, ConfigError> {
        self.value(section, name, default, expected, |scalar| {
            let bytes = match scalar {
                Scalar::Number(number) => number.as_u64(),
                Scalar::String(text) => parse_size(text).ok(),
                Scalar::Null | Scalar::Bool(_) => None,
            }?;
            (bytes >= minimum).then_some(bytes)
        })
    }

    /// An absolute `http://` or `https://` URL with a host; `Some(None)`
    /// when set to an empty string and `empty_allowed`.
    pub fn url(
        &self,
        section: &mut Section,
        name: &str,
        example: &str,
        empty_allowed: bool,
    ) -> Result<Option<Option<http::Uri>>, ConfigError> {
        let expected = format!("an absolute http:// or https:// URL with a host, e.g. {example}");
        let Some(setting) = self.setting(section, name, &expected)? else {
            return Ok(None);
        };
        let text = setting.scalar.text().unwrap_or_default();
        if text.trim().is_empty() && empty_allowed {
            return Ok(Some(None));
        }
        match http_url(text.trim()) {
            Some(uri) => Ok(Some(Some(uri))),
            None => Err(self.rejected(setting, &expected)),
        }
    }

    /// The configuration file's directory, which relative paths are
    /// resolved against.
    pub fn base_dir(&self) -> &Path {
        self.base_dir
    }

    /// A path, resolved against the configuration file's directory, and
    /// checked against what it must be.
    pub fn path(&self, section: &mut Section, name: &str, kind: PathKind) -> Result<Option<PathBuf>, ConfigError> {
        let Some(setting) = self.setting(section, name, "a path")? else {
            return Ok(None);
        };
        let text = setting.scalar.text().unwrap_or_default();
        if text.trim().is_empty() {
            return Ok(None);
        }
        let path = self.base_dir.join(&text);
        let found = format!("{} (resolved to {})", setting.scalar, path.display());
        if matches!(kind, PathKind::Unread) {
            return Ok(Some(path));
        }
        let problem = match (kind, std::fs::metadata(&path)) {
            (PathKind::ExistingFile, Ok(meta)) if meta.is_file() => None,
            (PathKind::ExistingFile, Ok(meta)) if meta.is_dir() => Some("it is a directory; expected a PEM file"),
            (PathKind::ExistingFile, Ok(_)) => Some("it is not a regular file; expected a PEM file"),
            (PathKind::ExistingFile, Err(err)) if err.kind() == std::io::ErrorKind::NotFound => {
                Some("no such file; expected an existing PEM file")
            }
            (PathKind::ExistingFile, Err(_)) => Some("it cannot be read; expected a readable PEM file"),
            (PathKind::Directory, Ok(meta)) if !meta.is_dir() => {
                Some("it exists and is not a directory; expected a directory (or a path to create one at)")
            }
            (PathKind::Directory, _) => None,
            (PathKind::ExistingDirectory, Ok(meta)) if meta.is_dir() => None,
            (PathKind::ExistingDirectory, Ok(_)) => {
                Some("it is not a directory; expected an existing directory to grant")
            }
            (PathKind::ExistingDirectory, Err(err)) if err.kind() == std::io::ErrorKind::NotFound => {
                Some("no such directory; create it, or fix the path")
            }
            (PathKind::ExistingDirectory, Err(_)) => Some("it cannot be read; expected a directory the node can open"),
            (PathKind::Unread, _) => None,
        };
        match problem {
            None => Ok(Some(path)),
            Some(problem) => Err(self.invalid(
                setting.key,
                found,
                &setting.origin,
                format!("{problem} (a relative path is resolved against the configuration file's directory)"),
            )),
        }
    }

    pub fn required_path(&self, section: &mut Section, name: &str, default: &str) -> Result<PathBuf, ConfigError> {
        match self.path(section, name, PathKind::Directory)? {
            Some(path) => Ok(path),
            None => Ok(self.base_dir.join(default)),
        }
    }
}

/// `http::Uri` accepts `localhost:5109` and `/path`; the node needs a
/// scheme it can speak and a host to speak to.
pub(super) fn http_url(text: &str) -> Option<http::Uri> {
    let uri: http::Uri = text.parse().ok()?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http") | Some("https"));
    let host_ok = uri.host().is_some_and(|host| !host.is_empty());
    (scheme_ok && host_ok).then_some(uri)
}

/// The entries of a list given as a JSON array or a comma-separated string,
/// trimmed, blanks dropped.
pub(super) fn names(node: &Node) -> Vec<String> {
    let texts: Vec<String> = match &node.kind {
        Kind::Value(scalar) => scalar
            .text()
            .unwrap_or_default()
            .split(',')
            .map(str::to_string)
            .collect(),
        Kind::Section { entries, .. } => entries
            .iter()
            .filter_map(|(_, item)| match &item.kind {
                Kind::Value(scalar) => scalar.text(),
                Kind::Section { .. } => None,
            })
            .collect(),
    };
    texts
        .into_iter()
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty())
        .collect()
}
