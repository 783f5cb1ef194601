//! A kit project: a folder `node-runtime new` writes from the embedded
//! template of its language, the SDK, the agent world, and `agent.toml`,
//! the file that says what the folder is.

use std::path::{Path, PathBuf};

use support::one_line::escape;

use super::{KitError, embedded};

/// The world new projects target: the newest the node serves.
pub const WORLD: &str = "node-runtime:agent@0.2.0";

/// The worlds a project may say it targets: the ones the node serves.
pub const WORLDS: [&str; 2] = [WORLD, "node-runtime:agent@0.1.0"];

/// The project file's name.
pub const PROJECT_FILE: &str = "agent.toml";

/// The languages the kit has a template and an SDK for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Language {
    Rust,
    Python,
    Js,
}

impl Language {
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Rust => "rust",
            Language::Python => "python",
            Language::Js => "js",
        }
    }

    fn parse(text: &str) -> Option<Language> {
        [Language::Rust, Language::Python, Language::Js]
            .into_iter()
            .find(|language| language.as_str() == text)
    }
}

/// What `agent.toml` says: the agent's name, its language, its world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub dir: PathBuf,
    pub name: String,
    pub language: Language,
    pub world: String,
}

impl Project {
    /// Reads `DIR/agent.toml`.
    pub fn open(dir: &Path) -> Result<Project, KitError> {
        let file = dir.join(PROJECT_FILE);
        let text = std::fs::read_to_string(&file).map_err(|err| {
            KitError::Usage(format!(
                "{} is not a kit project: cannot read {} ({err}); create one with \
                 `node-runtime new <rust|python|js> NAME`, or name the project's folder",
                dir.display(),
                file.display()
            ))
        })?;
        let value = |key: &str| -> Result<String, KitError> {
            text.lines()
                .filter_map(|line| line.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .and_then(|(_, v)| v.trim().strip_prefix('"')?.strip_suffix('"').map(str::to_string))
                .ok_or_else(|| {
                    KitError::Usage(format!(
                        "{}: `{key} = \"...\"` is missing; it is one of name, language and world",
                        file.display()
                    ))
                })
        };
        let name = value("name")?;
        check_name(&name).map_err(|why| KitError::Usage(format!("{}: name: {why}", file.display())))?;
        let language = value("language")?;
        let language = Language::parse(&language).ok_or_else(|| {
            KitError::Usage(format!(
                "{}: language `{}` is not one the kit builds: rust, python or js",
                file.display(),
                escape(&language)
            ))
        })?;
        let world = value("world")?;
        if !WORLDS.contains(&world.as_str()) {
            return Err(KitError::Usage(format!(
                "{}: world `{}` is not one this node serves: {}; `node-runtime new` writes the \
                 newest, {WORLD}",
                file.display(),
                escape(&world),
                WORLDS.join(", ")
            )));
        }
        Ok(Project {
            dir: dir.to_path_buf(),
            name,
            language,
            world,
        })
    }

    /// `name` with `-` as `_`: a Rust crate's or a module's name.
    pub fn crate_name(&self) -> String {
        self.name.replace('-', "_")
    }
}

/// The name rule: it becomes a crate's, a module's, a file's and an agent's
/// name, so it is the narrow set all of them accept. A name that breaks it
/// is quoted back escaped: it may come from a project file from elsewhere,
/// and its control characters would reach the terminal.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with(['-', '_'])
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a valid agent name: use 1 to 64 lowercase letters, digits, `-` and `_`, \
             starting with a letter and not ending with `-` or `_` (e.g. invoice-router)",
            escape(name)
        ))
    }
}

/// Writes a new project of `language` named `name` into `dir` (created,
/// or existing and empty); returns the project.
pub fn create(language: Language, name: &str, dir: &Path) -> Result<Project, KitError> {
    check_name(name).map_err(KitError::Usage)?;
    // Without a trailing `/`, which would make the checks below follow a link.
    let dir: &Path = &dir.components().collect::<PathBuf>();
    refuse_link(dir)?;
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(KitError::Usage(format!(
                    "{} exists and is not empty: `new` never overwrites files; name a new or \
                     empty folder with --dir",
                    dir.display()
                )));
            }
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(KitError::io("cannot read", dir)(err)),
    }
    let project = Project {
        dir: dir.to_path_buf(),
        name: name.to_string(),
        language,
        world: WORLD.to_string(),
    };
    let crate_name = project.crate_name();
    let render = |bytes: &[u8]| -> Vec<u8> {
        match std::str::from_utf8(bytes) {
            Ok(text) => text
                .replace("{{name}}", name)
                .replace("{{crate_name}}", &crate_name)
                .into_bytes(),
            Err(_) => bytes.to_vec(),
        }
    };
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let lang = language.as_str();
    for (path, bytes) in embedded::under(&format!("kit/{lang}/template")) {
        files.push((path.to_string(), render(bytes)));
    }
    let (sdk, sdk_to) = match language {
        Language::Rust => ("kit/rust/sdk", "sdk/"),
        Language::Python => ("kit/python/sdk/node_runtime_agent", "node_runtime_agent/"),
        Language::Js => ("kit/js/sdk", ""),
    };
    for (path, bytes) in embedded::under(sdk) {
        files.push((format!("{sdk_to}{path}"), bytes.to_vec()));
    }
    if files.is_empty() {
        return Err(KitError::Tool(format!(
            "this node-runtime carries no {lang} template: it was built without the kit's \
             {lang} files (kit/{lang}/); build it from a complete source tree"
        )));
    }
    for (path, bytes) in embedded::under("wit") {
        files.push((format!("wit/{path}"), bytes.to_vec()));
    }
    files.push((
        PROJECT_FILE.to_string(),
        format!(
            "# A node-runtime agent project: `node-runtime build` reads this file.\n\
             name = \"{name}\"\nlanguage = \"{lang}\"\n\
             # The agent world the project targets (wit/), as the node serves it.\n\
             world = \"{WORLD}\"\n"
        )
        .into_bytes(),
    ));
    files.push((".gitignore".to_string(), b"/target/\n".to_vec()));
    write_new(dir, files)?;
    Ok(project)
}

/// A link where the project goes is refused, naming it: `new` writes into
/// a folder of the user's choosing, not wherever a link points.
fn refuse_link(dir: &Path) -> Result<(), KitError> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_symlink() => Err(KitError::Usage(format!(
            "{} is a link: `new` never writes through one; name the folder itself (or a new one) \
             with --dir",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Writes `files` (paths relative to `dir`) into `dir`, new or empty,
/// creating every folder and file afresh: a folder or file that appears in
/// the meantime (a link planted by someone racing the command in a shared
/// parent folder) is an error, never written through.
fn write_new(dir: &Path, files: Vec<(String, Vec<u8>)>) -> Result<(), KitError> {
    use std::io::Write as _;
    if let Some(parent) = dir.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(KitError::io("cannot create", parent))?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        // Checked empty by the caller; a link (planted since) is refused,
        // not followed.
        Err(err)
            if err.kind() == std::io::ErrorKind::AlreadyExists
                && std::fs::symlink_metadata(dir).is_ok_and(|meta| meta.is_dir()) => {}
        Err(err) => {
            refuse_link(dir)?;
            return Err(KitError::io("cannot create", dir)(err));
        }
    }
    let mut folders: Vec<PathBuf> = files
        .iter()
        .flat_map(|(path, _)| {
            Path::new(path)
                .ancestors()
                .skip(1)
                .map(Path::to_path_buf)
                .collect::<Vec<_>>()
        })
        .filter(|folder| !folder.as_os_str().is_empty())
        .collect();
    folders.sort();
    folders.dedup();
    for folder in folders {
        let at = dir.join(folder);
        std::fs::create_dir(&at).map_err(KitError::io("cannot create", &at))?;
    }
    for (path, bytes) in files {
        let to = dir.join(&path);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&to)
            .and_then(|mut file| file.write_all(&bytes))
            .map_err(KitError::io("cannot write", &to))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule_every_language_accepts() {
        for good in ["a", "invoice-router", "agent_2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Agent", "2agent", "agent-", "my agent", "../x", &"a".repeat(65)] {
            let err = check_name(bad).unwrap_err();
            assert!(err.contains("lowercase letters"), "{err}");
        }
    }

    #[test]
    fn a_rust_project_carries_its_sdk_world_and_project_file_and_refuses_a_second_write() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("hello");
        let project = create(Language::Rust, "hello-agent", &at).unwrap();
        assert_eq!(Project::open(&at).unwrap(), project);
        let manifest = std::fs::read_to_string(at.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("name = \"hello-agent\""), "{manifest}");
        assert!(at.join("sdk/src/lib.rs").is_file());
        assert!(at.join("wit/agent.wit").is_file() && at.join("wit/deps/http.wit").is_file());
        let err = create(Language::Rust, "hello-agent", &at).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
    }

    /// `--dir` naming a link to an empty folder: refused, naming the link,
    /// and nothing is written where it points.
    #[cfg(unix)]
    #[test]
    fn a_link_where_the_project_goes_is_refused_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        for named in [link.clone(), dir.path().join("link/")] {
            let err = create(Language::Rust, "hello", &named).unwrap_err().to_string();
            assert!(
                err.contains("is a link") && err.contains(&*link.to_string_lossy()),
                "{err}"
            );
            assert_eq!(
                std::fs::read_dir(&elsewhere).unwrap().count(),
                0,
                "nothing written through"
            );
        }
    }

    #[test]
    fn a_bad_name_is_quoted_back_escaped() {
        let err = check_name("evil\u{1b}[2J\u{7}").unwrap_err();
        assert!(
            err.contains("`evil\\u{1b}[2J\\u{7}`") && !err.contains('\u{1b}'),
            "{err:?}"
        );
    }
}
