//! The agent kit as a developer drives it: `new` + `build` + `run-agent`
//! in an empty folder for each language, `run-agent --watch` seeing an
//! edit, a local model reached with no key, and what `build` says about a
//! project that is not one.
//!
//! Rust projects build into one shared target directory under the test's
//! (`kit-projects`), so repeated runs are incremental; the Python and
//! JavaScript toolchains come from the repository's tools directory, the
//! one `scripts/install-guest-tools` fills (`NODE_RUNTIME_TOOLS`).

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::{self, agent_path};

/// The binary, for a kit command: the shared Rust target directory and
/// the repository's tools; none of the lint wrapper `scripts/test` puts
/// around its own builds (the project is not the repository's to lint).
fn kit_command(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_node-runtime"));
    command
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env("CARGO_TARGET_DIR", support::target_dir().join("kit-projects"))
        .env("NODE_RUNTIME_TOOLS", support::target_dir().join("tools"))
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CLIPPY_ARGS");
    command
}

fn run(command: &mut Command) -> (i32, String, String) {
    let output = command.output().expect("node-runtime runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `new LANGUAGE NAME` in an empty folder, `build` in the project, then
/// `run-agent --json` on the component `build` printed, with the
/// project's example input: the run's result.
fn new_build_run(language: &str, name: &str) -> serde_json::Map<String, serde_json::Value> {
    let empty = tempfile::tempdir().unwrap();
    let (code, out, err) = run(kit_command(empty.path()).args(["new", language, name]));
    assert_eq!(code, 0, "new {language} {name}: {out}\n{err}");
    let project = empty.path().join(name);
    let manifest = std::fs::read_to_string(project.join("agent.toml")).unwrap();
    assert!(manifest.contains(&format!("language = \"{language}\"")), "{manifest}");
    assert!(manifest.contains("node-runtime:agent@0.2.0"), "{manifest}");
    assert!(project.join("wit/agent.wit").is_file() && project.join("input.json").is_file());

    let (code, out, err) = run(kit_command(&project).arg("build"));
    assert_eq!(code, 0, "build: {out}\n{err}");
    // The toolchains scripts/install-guest-tools installed (scripts/test
    // runs it first) are taken as they are: the stamps agree.
    assert!(!err.contains("installing componentize"), "a second install: {err}");
    let component = out
        .lines()
        .find_map(|line| line.strip_prefix("built "))
        .unwrap_or_else(|| panic!("build names the component: {out}"));
    assert!(Path::new(component).is_file(), "{component}");
    let digest = out
        .lines()
        .find_map(|line| line.trim().strip_prefix("agent.digest"))
        .unwrap_or_else(|| panic!("build prints the digest pin: {out}"))
        .trim()
        .to_string();
    let bytes = std::fs::read(component).unwrap();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    assert_eq!(digest, format!("sha256:{sha}"), "the pin is the component's SHA-256");

    let (code, out, err) =
        run(kit_command(&project).args(["run-agent", component, "--input-file", "input.json", "--json"]));
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("run-agent --json ({e}): {out}\n{err}"));
    assert_eq!(code, 0, "the {language} template completes: {json}\n{err}");
    assert_eq!(json["report"]["log_lines"], 1, "the template logs one line: {json}");
    json["result"].as_object().unwrap().clone()
}

#[test]
fn a_new_rust_agent_builds_and_runs_from_an_empty_folder() {
    let result = new_build_run("rust", "hello-rust");
    assert_eq!(result["greeting"], "hello from hello-rust", "{result:?}");
    assert_eq!(result["input"].as_str().unwrap().trim(), r#"{"name": "world"}"#);
}

/// Needs the Python template and SDK (`kit/python/`) in the binary, and
/// componentize-py (installed on first use).
#[test]
fn a_new_python_agent_builds_and_runs_from_an_empty_folder() {
    let result = new_build_run("python", "hello-python");
    assert!(!result.is_empty(), "the Python template answers with a result");
}

/// Needs the JavaScript template and SDK (`kit/js/`) in the binary, and
/// componentize-js (installed on first use).
#[test]
fn a_new_javascript_agent_builds_and_runs_from_an_empty_folder() {
    let result = new_build_run("js", "hello-js");
    assert!(!result.is_empty(), "the JavaScript template answers with a result");
}

/// Runs `run-agent --watch` in `project` for two cycles, calling `on_wait`
/// the first time it says it waits for a change (the test's save); returns
/// its exit status, its stdout lines and its stderr.
fn watch_two_cycles(project: &Path, mut on_wait: impl FnMut()) -> (std::process::ExitStatus, Vec<String>, String) {
    let mut child = kit_command(project)
        .args([
            "run-agent",
            "--input-file",
            "input.json",
            "--watch",
            ".",
            "--watch-cycles",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, seen) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let give_up = Instant::now() + Duration::from_secs(300);
    let mut printed = Vec::new();
    let mut saved = false;
    while let Ok(line) = seen.recv_timeout(give_up.saturating_duration_since(Instant::now())) {
        if line.starts_with("watch: waiting for a change") && !saved {
            on_wait();
            saved = true;
        }
        printed.push(line);
    }
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    reader.join().unwrap();
    (
        output.status,
        printed,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn watch_rebuilds_and_reruns_the_rust_template_when_its_source_is_saved() {
    let empty = tempfile::tempdir().unwrap();
    let (code, out, err) = run(kit_command(empty.path()).args(["new", "rust", "watched"]));
    assert_eq!(code, 0, "{out}\n{err}");
    let project = empty.path().join("watched");
    let source = project.join("src/lib.rs");
    let (status, printed, err) = watch_two_cycles(&project, || {
        let text = std::fs::read_to_string(&source).unwrap();
        std::fs::write(&source, text.replace("hello from", "goodbye from")).unwrap();
    });
    let text = printed.join("\n");
    let greetings: Vec<&str> = printed
        .iter()
        .filter_map(|line| line.trim().strip_prefix("greeting"))
        .map(str::trim)
        .collect();
    assert_eq!(greetings, ["hello from watched", "goodbye from watched"], "{text}");
    assert_eq!(
        printed
            .iter()
            .filter(|line| line.starts_with("watch: save to result in"))
            .count(),
        2,
        "each cycle prints the time from the save to the result: {text}"
    );
    assert!(
        status.success(),
        "two cycles, then a clean exit: {status}\n{text}\n{err}"
    );
}

#[test]
fn build_refuses_a_folder_that_is_no_project_and_watch_waits_out_a_failed_build() {
    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) = run(kit_command(empty.path()).arg("build"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("agent.toml") && err.contains("node-runtime new"), "{err}");

    let (code, out, err) = run(kit_command(empty.path()).args(["new", "rust", "broken"]));
    assert_eq!(code, 0, "{out}\n{err}");
    let project = empty.path().join("broken");
    let source = project.join("src/lib.rs");
    let good = std::fs::read_to_string(&source).unwrap();
    std::fs::write(&source, "this is not rust").unwrap();
    // The first build fails; once it waits, the source is mended.
    let (status, printed, err) = watch_two_cycles(&project, || std::fs::write(&source, &good).unwrap());
    let text = printed.join("\n");
    assert!(err.contains("cargo build failed"), "the failed build is told: {err}");
    assert!(
        text.contains("hello from broken"),
        "the mended project ran: {text}\n{err}"
    );
    assert!(status.success(), "{status}\n{text}\n{err}");
}

#[test]
fn new_refuses_a_bad_name_and_a_folder_with_files_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(kit_command(dir.path()).args(["new", "rust", "My Agent"]));
    assert_eq!(code, 2);
    assert!(
        err.contains("`My Agent` is not a valid agent name") && err.contains("lowercase"),
        "{err}"
    );
    std::fs::write(dir.path().join("keep.txt"), "mine").unwrap();
    let (code, _, err) = run(kit_command(dir.path()).args(["new", "rust", "ok", "--dir", "."]));
    assert_eq!(code, 2);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.path().join("keep.txt")).unwrap(), "mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_model_is_reached_with_no_key_and_a_keyed_one_with_its_key() {
    use node_runtime::dev_plane::stubs::StubModel;
    let model = StubModel::start().await.unwrap();
    let agent = agent_path("llm-chat");
    let run_with = |key: Option<&str>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runtime"));
        command
            .args([
                "run-agent",
                agent.to_str().unwrap(),
                "--json",
                "--input-ref",
                "message=hello",
            ])
            .args(["--llm-endpoint", &model.url()])
            .env("RUST_LOG", "warn");
        if let Some(key) = key {
            command
                .args(["--llm-key-env", "KIT_TEST_LLM_KEY"])
                .env("KIT_TEST_LLM_KEY", key);
        }
        command
    };
    let output = run_with(None).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(json["result"]["answer.0"].is_string(), "the model answered: {json}");
    let requests = model.requests();
    assert_eq!(requests.len(), 1);
    assert!(
        !requests[0].headers.iter().any(|(name, _)| name == "authorization"),
        "no key, no Authorization header: {:?}",
        requests[0].headers
    );

    let output = run_with(Some("sk-local")).output().await.unwrap();
    assert_eq!(output.status.code(), Some(0));
    let requests = model.requests();
    let authorization: Vec<&str> = requests[1]
        .headers
        .iter()
        .filter(|(name, _)| name == "authorization")
        .map(|(_, value)| value.as_str())
        .collect();
    assert_eq!(authorization, ["Bearer sk-local"]);
}

#[test]
fn a_plain_core_module_is_told_the_command_that_makes_it_a_component() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("core.wasm");
    std::fs::write(&module, b"\0asm\x01\0\0\0").unwrap();
    let (code, out, _) = run(kit_command(dir.path()).args(["run-agent", module.to_str().unwrap()]));
    assert_eq!(code, 5);
    assert!(
        out.contains("wasm-tools component new") && out.contains("--adapt"),
        "{out}"
    );
    assert!(out.contains("--target wasm32-wasip2"), "{out}");
}

#[test]
fn a_component_of_another_world_or_with_a_missing_import_is_told_what_the_node_serves() {
    let dir = tempfile::tempdir().unwrap();
    for (agent, names) in [("other-world", "greet"), ("missing-import", "`nope:missing/thing`")] {
        let (code, out, _) = run(kit_command(dir.path()).args(["run-agent", agent_path(agent).to_str().unwrap()]));
        assert_eq!(code, 5, "{out}");
        assert!(out.contains(names), "{agent}: {out}");
        assert!(
            out.contains("node-runtime:agent@0.2.0") && out.contains("node-runtime:agent@0.1.0"),
            "{agent}: the worlds this node serves are named: {out}"
        );
    }
}

#[test]
fn dev_watch_serves_the_project_through_the_plane_and_runs_it() {
    let empty = tempfile::tempdir().unwrap();
    let (code, out, err) = run(kit_command(empty.path()).args(["new", "rust", "served"]));
    assert_eq!(code, 0, "{out}\n{err}");
    let project = empty.path().join("served");
    let (code, out, err) = run(kit_command(empty.path()).args([
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--watch",
        project.to_str().unwrap(),
        "--watch-cycles",
        "1",
    ]));
    assert_eq!(code, 0, "{out}\n{err}");
    let outcome = out
        .lines()
        .find(|line| line.starts_with("run "))
        .unwrap_or_else(|| panic!("the run's outcome is printed: {out}\n{err}"));
    assert!(
        outcome.contains(" completed: ") && outcome.contains("hello from served"),
        "{outcome}"
    );
    assert!(out.contains("watch: save to result in"), "{out}");
}

/// A project from elsewhere may carry links in its build output: `build`
/// replaces a link at `target/NAME.wasm` with the component instead of
/// writing through it, and refuses a `target` that is a link.
#[test]
fn build_never_writes_through_a_link_the_project_carries() {
    let empty = tempfile::tempdir().unwrap();
    let (code, out, err) = run(kit_command(empty.path()).args(["new", "rust", "linked"]));
    assert_eq!(code, 0, "{out}\n{err}");
    let project = empty.path().join("linked");
    let victim = empty.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::create_dir(project.join("target")).unwrap();
    std::os::unix::fs::symlink(&victim, project.join("target/linked.wasm")).unwrap();

    let (code, out, err) = run(kit_command(&project).arg("build"));
    assert_eq!(code, 0, "build: {out}\n{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let built = std::fs::symlink_metadata(project.join("target/linked.wasm")).unwrap();
    assert!(built.is_file(), "the link was replaced by the component");

    std::fs::remove_dir_all(project.join("target")).unwrap();
    let elsewhere = empty.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, project.join("target")).unwrap();
    let (code, _, err) = run(kit_command(&project).arg("build"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not a folder (a link or a file)"), "{err}");
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "nothing written through the link"
    );
}

/// `agent.toml` is the project's text, not the node's: a world the node
/// does not serve, a language the kit does not build or a name that
/// breaks the rule is refused, and what is quoted back is escaped.
#[test]
fn a_project_file_naming_a_world_the_node_does_not_serve_is_refused_with_its_text_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let world = "node-runtime:agent@0.2.0";
    let evil = "x \u{1b}[2J\u{7}FAKE";
    for (name, language, world, refusal) in [
        (
            "evil",
            "js",
            &*format!("node-runtime:agent@9.9.9 {evil}"),
            "is not one this node serves",
        ),
        ("evil", &*format!("js{evil}"), world, "is not one the kit builds"),
        (&*format!("evil{evil}"), "js", world, "is not a valid agent name"),
    ] {
        std::fs::write(
            dir.path().join("agent.toml"),
            format!("name = \"{name}\"\nlanguage = \"{language}\"\nworld = \"{world}\"\n"),
        )
        .unwrap();
        let (code, out, err) = run(kit_command(dir.path()).arg("build"));
        assert_eq!(code, 2, "{out}\n{err}");
        assert!(err.contains(refusal), "{err}");
        assert!(
            err.contains("\\u{1b}[2J\\u{7}FAKE") && !err.contains('\u{1b}') && !err.contains('\u{7}'),
            "{err:?}"
        );
    }
}

/// The build runs what the tools directory holds: one others may write to
/// is refused, and a folder of the user's where the tools would go is
/// never deleted to make room.
#[test]
fn a_tools_directory_others_can_write_to_or_a_folder_in_the_way_is_refused_untouched() {
    use std::os::unix::fs::PermissionsExt as _;
    let empty = tempfile::tempdir().unwrap();
    let (code, out, err) = run(kit_command(empty.path()).args(["new", "python", "careful"]));
    assert_eq!(code, 0, "{out}\n{err}");
    let project = empty.path().join("careful");

    let open = empty.path().join("open-tools");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, _, err) = run(kit_command(&project).env("NODE_RUNTIME_TOOLS", &open).arg("build"));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("others cannot write to") && err.contains("remove it"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0, "nothing installed there");

    let mine = empty.path().join("my-tools");
    std::fs::create_dir_all(mine.join("py/src")).unwrap();
    std::fs::write(mine.join("py/src/notes.txt"), "precious").unwrap();
    let (code, _, err) = run(kit_command(&project).env("NODE_RUNTIME_TOOLS", &mine).arg("build"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("was not made by a tools installer"), "{err}");
    assert_eq!(
        std::fs::read_to_string(mine.join("py/src/notes.txt")).unwrap(),
        "precious"
    );
}

/// A `target/` others may write to is refused before anything is built
/// there: they could swap what the build writes for a link.
#[test]
fn build_refuses_a_target_folder_others_can_write_to() {
    use std::os::unix::fs::PermissionsExt as _;
    let empty = tempfile::tempdir().unwrap();
    let (code, out, err) = run(kit_command(empty.path()).args(["new", "rust", "shared"]));
    assert_eq!(code, 0, "{out}\n{err}");
    let target = empty.path().join("shared/target");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, _, err) = run(kit_command(&empty.path().join("shared")).arg("build"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("others cannot write to") && err.contains("remove it"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "nothing built there");
}

/// A stand-in node and npm (no network): each call logs its program and
/// working directory to `$KIT_FAKE_LOG`; `npm ci` installs a
/// componentize-js that logs the same and the mode of the folder it is
/// told to write into, and writes a file that is no component there.
fn fake_node_toolchain(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let bin = dir.join("fake-bin");
    std::fs::create_dir(&bin).unwrap();
    let componentize = r#"#!/bin/sh
out=
while [ $# -gt 0 ]; do
    if [ "$1" = --out ]; then out="$2"; fi
    shift
done
echo "componentize-js $(pwd) $(stat -c %a "$(dirname "$out")")" >> "$KIT_FAKE_LOG"
echo "not a component" > "$out"
"#;
    let scripts = [
        (
            "node",
            "#!/bin/sh\necho \"node $(pwd)\" >> \"$KIT_FAKE_LOG\"\necho v20.0.0\n".to_string(),
        ),
        (
            "npm",
            format!(
                "#!/bin/sh\necho \"npm $(pwd)\" >> \"$KIT_FAKE_LOG\"\n\
                 if [ \"$1\" = --version ]; then echo 10.0.0; exit 0; fi\n\
                 [ \"$1\" = ci ] || exit 1\n\
                 mkdir -p node_modules/.bin\n\
                 cat > node_modules/.bin/componentize-js <<'EOF'\n{componentize}EOF\n\
                 chmod +x node_modules/.bin/componentize-js\n"
            ),
        ),
    ];
    for (name, text) in scripts {
        let path = bin.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

/// `build` of a JavaScript project with the stand-in toolchain, under
/// umask 002, with `tools` as the tools directory; its exit code and
/// stderr.
fn build_with_fake_node(project: &Path, bin: &Path, tools: &Path, log: &Path) -> (i32, String) {
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut command = kit_command(project);
    let program = command.get_program().to_owned();
    command
        .env("PATH", path)
        .env("NODE_RUNTIME_TOOLS", tools)
        .env("KIT_FAKE_LOG", log);
    let mut wrapped = Command::new("sh");
    wrapped
        .args(["-c", "umask 002; exec \"$0\" build"])
        .arg(program)
        .current_dir(project);
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    let (code, _, err) = run(&mut wrapped);
    (code, err)
}

/// The tools directory: a user's own JavaScript project sitting at
/// `TOOLS/js` is refused, never deleted; an install killed before its
/// stamp (the installer's marker, no `.stamp`) is redone; `TOOLS/js`
/// others may write to is refused; under umask 002 the folders the build
/// makes are private still. And node and componentize-js run from the
/// tools, not the project, whose `.node-version` would pick their node.
#[test]
fn the_tools_directory_keeps_a_user_s_folder_redoes_a_half_install_and_runs_node_from_the_tools() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let empty = tempfile::tempdir().unwrap();
    let (code, out, err) = run(kit_command(empty.path()).args(["new", "js", "faked"]));
    assert_eq!(code, 0, "{out}\n{err}");
    let project = empty.path().join("faked");
    std::fs::write(project.join(".node-version"), "18.0.0\n").unwrap();
    let bin = fake_node_toolchain(empty.path());
    let log = empty.path().join("calls.log");
    let mode = |path: &Path| std::fs::metadata(path).unwrap().mode() & 0o777;

    // A user's JavaScript project where the tools would go.
    let mine = empty.path().join("my-tools");
    std::fs::create_dir_all(mine.join("js/src")).unwrap();
    std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(mine.join("js/package-lock.json"), "{}").unwrap();
    std::fs::write(mine.join("js/src/app.js"), "precious").unwrap();
    let (code, err) = build_with_fake_node(&project, &bin, &mine, &log);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("was not made by a tools installer"), "{err}");
    assert_eq!(std::fs::read_to_string(mine.join("js/src/app.js")).unwrap(), "precious");
    assert!(mine.join("js/package-lock.json").is_file());
    // With a `.stamp` of its own (make's empty one): not an installer's.
    std::fs::write(mine.join("js/.stamp"), "").unwrap();
    let (code, err) = build_with_fake_node(&project, &bin, &mine, &log);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("was not made by a tools installer"), "{err}");
    assert_eq!(std::fs::read_to_string(mine.join("js/src/app.js")).unwrap(), "precious");

    // The same folder, open to others: refused as the tools directory is.
    std::fs::set_permissions(mine.join("js"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, err) = build_with_fake_node(&project, &bin, &mine, &log);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("others cannot write to") && err.contains("remove it"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(mine.join("js/src/app.js")).unwrap(), "precious");

    // An install killed half way, in a tools directory not made yet.
    let tools = empty.path().join("cache/tools");
    std::fs::create_dir_all(tools.join("js")).unwrap();
    std::fs::set_permissions(&tools, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(tools.join("js/.node-runtime-tools"), "").unwrap();
    std::fs::write(tools.join("js/half-written"), "").unwrap();
    let (code, err) = build_with_fake_node(&project, &bin, &tools, &log);
    // The stand-in writes no component: the build gets that far.
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("installing componentize-js"), "{err}");
    assert!(!tools.join("js/half-written").exists(), "the half install is redone");
    assert!(tools.join("js/.stamp").is_file() && tools.join("js/.node-runtime-tools").is_file());
    assert_eq!(
        mode(&project.join("target")),
        0o755,
        "target/ is made private under umask 002"
    );

    let fresh = empty.path().join("new-cache/tools");
    let (code, err) = build_with_fake_node(&project, &bin, &fresh, &log);
    assert_eq!(code, 5, "the tools directory made under umask 002 is accepted: {err}");
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(mode(&fresh.join("js")) & 0o022, 0);
    assert_eq!(
        mode(&fresh.join("js/node_modules/.bin")) & 0o022,
        0,
        "what the install made under umask 002 is not writable by others"
    );

    let calls = std::fs::read_to_string(&log).unwrap();
    let project = std::fs::canonicalize(&project).unwrap();
    let built: Vec<&str> = calls
        .lines()
        .filter(|line| line.starts_with("componentize-js "))
        .collect();
    assert_eq!(built.len(), 2, "{calls}");
    for line in built {
        assert!(
            line.ends_with(" 700"),
            "componentize-js writes into a private folder of its own: {line}"
        );
    }
    for line in calls.lines() {
        let (_, cwd) = line.split_once(' ').unwrap();
        let cwd = cwd.split(' ').next().unwrap();
        assert!(
            !Path::new(cwd).starts_with(&project),
            "run in the project, whose .node-version would pick the node: {line}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(project.join("target"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        [std::ffi::OsString::from("faked.wasm")],
        "no build folder is left"
    );
}
