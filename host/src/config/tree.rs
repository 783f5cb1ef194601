//! The configuration as .NET's `IConfiguration` sees it, before binding.
//!
//! The files (`appsettings.json`, then its environment's file, see
//! `layers`) and the environment are merged into one tree of sections and
//! scalar values, with names compared case-insensitively, so that binding
//! (`reader`) reads one source and every value remembers where it came from
//! for error messages.
//!
//! Merging follows .NET, which flattens every source into keys such as
//! `NodeRuntime:Capacity:Slots` and lets a later source replace a key an
//! earlier one set: a section merges key by key, and a JSON array is a
//! section whose keys are `0`, `1`, ..., so a shorter array replaces only
//! the first entries of a longer one and an empty array replaces nothing.
//!
//! The file is read in the dialect of .NET's JSON configuration provider:
//! `//` and `/* */` comments, trailing commas and a UTF-8 byte-order mark
//! are accepted, since hand-edited `appsettings.json` files have them.

use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

/// The top-level sections the node reads; environment variables whose
/// first segment is not one of these are none of its business.
pub(super) const SECTIONS: [&str; 8] = [
    "NodeRuntime",
    "MTls",
    "AgentRuntime",
    "OpenTelemetry",
    "Logging",
    "Sandbox",
    "AgentStore",
    "DeclarativeAgents",
];

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Origin {
    /// The configuration file at this index in the order layered: 0 is the
    /// base file, 1 its environment's file.
    File(usize),
    /// Nowhere: a required key no source sets.
    Unset,
    /// The environment variable's name, as it was spelt.
    Env(String),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Node {
    pub kind: Kind,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Kind {
    Value(Scalar),
    /// A JSON object, or a JSON array (`list`), whose entries .NET names
    /// `0`, `1`, ...
    Section {
        entries: Entries,
        list: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Scalar {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
}

/// Named children in document order; at most one per name, ignoring case.
///
/// Found through an index of case-folded names, so merging or reading a
/// section of n keys is n lookups: a linear search per key made loading
/// quadratic (40,000 keys took 43 s).
#[derive(Debug, Clone, Default)]
pub(super) struct Entries {
    /// Document order; a taken entry leaves a hole, so that the others
    /// keep their place in `index`.
    slots: Vec<Option<(String, Node)>>,
    /// Each name, case-folded, and its slot.
    index: HashMap<String, usize>,
}

/// Configuration keys compare case-insensitively, as in .NET.
pub(super) fn same_key(a: &str, b: &str) -> bool {
    a.chars()
        .flat_map(char::to_lowercase)
        .eq(b.chars().flat_map(char::to_lowercase))
}

/// The form under which a key is indexed: equal for two keys exactly when
/// `same_key` says they are the same.
fn folded(name: &str) -> String {
    name.chars().flat_map(char::to_lowercase).collect()
}

impl PartialEq for Entries {
    fn eq(&self, other: &Entries) -> bool {
        self.iter().eq(other.iter())
    }
}

impl IntoIterator for Entries {
    type Item = (String, Node);
    type IntoIter = std::iter::Flatten<std::vec::IntoIter<Option<(String, Node)>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.slots.into_iter().flatten()
    }
}

impl Entries {
    /// The children, in document order.
    pub fn iter(&self) -> impl Iterator<Item = &(String, Node)> {
        self.slots.iter().flatten()
    }

    /// Each child's name as first spelt, in document order.
    pub fn names(&self) -> Vec<String> {
        self.iter().map(|(name, _)| name.clone()).collect()
    }

    /// Adds a child; a name already present (in any case) keeps its first
    /// spelling and takes the new value, sections merging key by key, as
    /// when .NET flattens a file into one case-insensitive dictionary.
    pub fn insert(&mut self, name: String, node: Node) {
        match self.index.get(&folded(&name)) {
            Some(&at) => self.entry_at(at).merge(node),
            None => {
                self.push(name, node);
            }
        }
    }

    /// Removes and returns the child called `name` (in any case).
    pub fn take(&mut self, name: &str) -> Option<Node> {
        let at = self.index.remove(&folded(name))?;
        self.slots[at].take().map(|(_, node)| node)
    }

    /// Sets the value at `path` (one name per level), creating sections on
    /// the way and replacing a value that stands where a section is needed.
    pub fn set(&mut self, path: &[&str], value: Node) {
        let Some((name, rest)) = path.split_first() else {
            return;
        };
        if rest.is_empty() {
            self.insert((*name).to_string(), value);
            return;
        }
        let at = match self.index.get(&folded(name)) {
            Some(&at) => at,
            None => self.push((*name).to_string(), Node::section(value.origin.clone())),
        };
        let child = self.entry_at(at);
        // `List__0` replaces the first entry of a list, as in .NET.
        if !matches!(child.kind, Kind::Section { .. }) {
            *child = Node::section(value.origin.clone());
        }
        if let Kind::Section { entries, .. } = &mut child.kind {
            entries.set(rest, value);
        }
    }

    /// Appends a child the index does not hold yet; returns its slot.
    fn push(&mut self, name: String, node: Node) -> usize {
        let at = self.slots.len();
        self.index.insert(folded(&name), at);
        self.slots.push(Some((name, node)));
        at
    }

    /// The child in slot `at`, which the index points at.
    fn entry_at(&mut self, at: usize) -> &mut Node {
        match &mut self.slots[at] {
            Some((_, node)) => node,
            None => unreachable!("the index points only at slots that hold an entry"),
        }
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut (String, Node)> {
        self.slots.iter_mut().flatten()
    }
}

impl Node {
    fn section(origin: Origin) -> Node {
        Node {
            kind: Kind::Section {
                entries: Entries::default(),
                list: false,
            },
            origin,
        }
    }

    /// Takes `other`'s keys over this node's, as a later source does in
    /// .NET: sections (objects or arrays alike) merge key by key; a value
    /// replaces a section, and a section a value.
    fn merge(&mut self, other: Node) {
        match (&mut self.kind, other.kind) {
            (
                Kind::Section {
                    entries: mine,
                    list: my_list,
                },
                Kind::Section {
                    entries: theirs,
                    list: their_list,
                },
            ) => {
                *my_list = *my_list && their_list;
                for (name, node) in theirs {
                    mine.insert(name, node);
                }
            }
            (_, kind) => {
                self.kind = kind;
                self.origin = other.origin;
            }
        }
    }

    /// Marks this node and everything under it as read from the file at
    /// `index` (the parser marks everything as the base file's).
    pub fn set_file(&mut self, index: usize) {
        self.origin = Origin::File(index);
        if let Kind::Section { entries, .. } = &mut self.kind {
            for (_, child) in entries.iter_mut() {
                child.set_file(index);
            }
        }
    }

    /// How the node reads in a message: the value itself, or what it is.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Value(scalar) => scalar.to_string(),
            Kind::Section { list: true, .. } => "a list".to_string(),
            Kind::Section { list: false, .. } => "a section".to_string(),
        }
    }
}

impl Scalar {
    /// The value as configuration text: .NET stores every value as a
    /// string, so a number or a boolean is text too.
    pub fn text(&self) -> Option<String> {
        match self {
            Scalar::Null => None,
            Scalar::Bool(value) => Some(value.to_string()),
            Scalar::Number(number) => Some(number.to_string()),
            Scalar::String(text) => Some(text.clone()),
        }
    }

    /// A whole number, from a JSON integer or a string such as `"5"`.
    pub fn integer(&self) -> Option<i128> {
        match self {
            Scalar::Number(number) => number
                .as_i64()
                .map(i128::from)
                .or_else(|| number.as_u64().map(i128::from)),
            Scalar::String(text) => text.trim().parse().ok(),
            Scalar::Null | Scalar::Bool(_) => None,
        }
    }

    /// A finite number, from JSON or a string such as `"0.5"`.
    pub fn float(&self) -> Option<f64> {
        let value = match self {
            Scalar::Number(number) => number.as_f64(),
            Scalar::String(text) => text.trim().parse().ok(),
            Scalar::Null | Scalar::Bool(_) => None,
        }?;
        value.is_finite().then_some(value)
    }

    /// `true`/`false` from JSON, or from a string in any case (`"False"`),
    /// as .NET's `bool.Parse` reads it.
    pub fn boolean(&self) -> Option<bool> {
        match self {
            Scalar::Bool(value) => Some(*value),
            Scalar::String(text) => {
                let text = text.trim();
                if text.eq_ignore_ascii_case("true") {
                    Some(true)
                } else if text.eq_ignore_ascii_case("false") {
                    Some(false)
                } else {
                    None
                }
            }
            Scalar::Null | Scalar::Number(_) => None,
        }
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Null => f.write_str("null"),
            Scalar::Bool(value) => write!(f, "{value}"),
            Scalar::Number(number) => write!(f, "{number}"),
            // Quoted and escaped, so that `""` and `" 5"` read as what they are.
            Scalar::String(text) => f.write_str(&serde_json::to_string(text).map_err(|_| fmt::Error)?),
        }
    }
}

/// Reads the file's JSON into a tree. Comments, trailing commas and a
/// byte-order mark are blanked out byte for byte first, so serde_json's
/// line and column still point into the file as the user sees it.
pub(super) fn parse(text: &str) -> Result<Node, serde_json::Error> {
    serde_json::from_str(&blank_dotnet_extensions(text))
}

/// Replaces what .NET's JSON reader skips (comments, trailing commas, a
/// leading BOM) with spaces, keeping newlines and every byte offset.
fn blank_dotnet_extensions(text: &str) -> String {
    let mut bytes = text.as_bytes().to_vec();
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        bytes[..3].fill(b' ');
    }
    blank_comments(&mut bytes);
    blank_trailing_commas(&mut bytes);
    // Only whole comments and ASCII commas were replaced, by ASCII spaces:
    // the text is still UTF-8.
    String::from_utf8(bytes).expect("blanking keeps UTF-8 intact")
}

fn blank_comments(bytes: &mut [u8]) {
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        match (in_string, bytes[i]) {
            (true, b'\\') => i += 1,
            (_, b'"') => in_string = !in_string,
            (false, b'/') if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    bytes[i] = b' ';
                    i += 1;
                }
                continue;
            }
            (false, b'/') if bytes.get(i + 1) == Some(&b'*') => {
                let end = bytes[i + 2..]
                    .windows(2)
                    .position(|pair| pair == b"*/")
                    // An unterminated comment is left for serde_json to reject.
                    .map(|at| i + 2 + at + 2);
                let Some(end) = end else { return };
                for byte in &mut bytes[i..end] {
                    if *byte != b'\n' {
                        *byte = b' ';
                    }
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
}

fn blank_trailing_commas(bytes: &mut [u8]) {
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        match (in_string, bytes[i]) {
            (true, b'\\') => i += 1,
            (_, b'"') => in_string = !in_string,
            (false, b',') => {
                let next = bytes[i + 1..].iter().find(|byte| !byte.is_ascii_whitespace());
                if matches!(next, Some(b'}') | Some(b']')) {
                    bytes[i] = b' ';
                }
            }
            _ => {}
        }
        i += 1;
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

fn value<E>(scalar: Scalar) -> Result<Node, E> {
    Ok(Node {
        kind: Kind::Value(scalar),
        origin: Origin::File(0),
    })
}

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        value(Scalar::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        value(Scalar::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        value(Scalar::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        value(serde_json::Number::from_f64(v).map_or(Scalar::Null, Scalar::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        value(Scalar::String(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        value(Scalar::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        value(Scalar::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        value(Scalar::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut entries = Entries::default();
        while let Some(node) = seq.next_element::<Node>()? {
            entries.push(entries.slots.len().to_string(), node);
        }
        Ok(Node {
            kind: Kind::Section { entries, list: true },
            origin: Origin::File(0),
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Entries::default();
        while let Some((name, node)) = map.next_entry::<String, Node>()? {
            entries.insert(name, node);
        }
        Ok(Node {
            kind: Kind::Section { entries, list: false },
            origin: Origin::File(0),
        })
    }
}

/// Applies `Section__Key__Sub=value` variables (or `Section:Key`, which
/// .NET also reads) over `root`, for the node's sections only. A variable
/// with a single segment (`SANDBOX=1`) is not a setting and is skipped.
pub(super) fn apply_env(root: &mut Entries, env: impl IntoIterator<Item = (String, String)>) {
    for (name, text) in env {
        let normalised = name.replace("__", ":");
        let path: Vec<&str> = normalised.split(':').collect();
        if path.len() < 2 || !SECTIONS.iter().any(|section| same_key(section, path[0])) {
            continue;
        }
        root.set(
            &path,
            Node {
                kind: Kind::Value(Scalar::String(text)),
                origin: Origin::Env(name.clone()),
            },
        );
    }
}
