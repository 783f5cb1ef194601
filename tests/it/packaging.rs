//! The deployment files in `deploy/`, checked by what runs here: the
//! systemd unit by `systemd-analyze verify`, the Kubernetes manifest parsed
//! and its embedded `appsettings.json` loaded by the node's own loader, the
//! container recipe for what the node needs at run time.

use std::path::{Path, PathBuf};

use node_runtime::config::NodeConfig;
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo().join(relative)).unwrap_or_else(|err| panic!("{relative}: {err}"))
}

#[test]
fn the_systemd_unit_verifies_cleanly_and_runs_serve() {
    let unit = read("deploy/systemd/node-runtime.service");
    let exec = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    assert!(
        exec.starts_with("/usr/local/bin/node-runtime serve --config "),
        "{exec}"
    );
    for directive in [
        "Restart=always",
        "StateDirectory=node-runtime",
        "KillSignal=SIGTERM",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.lines().any(|line| line == directive), "missing {directive}");
    }
    // The stop timeout leaves room for the default 30 s drain.
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(stop > 30, "TimeoutStopSec={stop}");

    let Ok(version) = std::process::Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("skipped systemd-analyze verify: systemd-analyze is not installed here");
        return;
    };
    assert!(version.status.success());
    // verify checks that ExecStart's binary exists: point it at this build.
    let dir = tempfile::tempdir().unwrap();
    let checked = dir.path().join("node-runtime.service");
    std::fs::write(
        &checked,
        unit.replace("/usr/local/bin/node-runtime", env!("CARGO_BIN_EXE_node-runtime")),
    )
    .unwrap();
    let verify = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&checked)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(verify.status.success(), "{said}");
    // Unknown or misspelt directives are only warnings: none is allowed.
    let about_unit: Vec<&str> = said
        .lines()
        .filter(|line| line.contains("node-runtime.service"))
        .collect();
    assert!(about_unit.is_empty(), "{about_unit:#?}");
}

fn documents() -> Vec<Yaml> {
    YamlLoader::load_from_str(&read("deploy/kubernetes/node-runtime.yaml")).expect("the manifest is YAML")
}

fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    docs.iter()
        .find(|doc| doc["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn the_kubernetes_manifest_parses_and_its_configuration_loads_in_the_node() {
    let docs = documents();
    let kinds: Vec<&str> = docs.iter().filter_map(|doc| doc["kind"].as_str()).collect();
    assert_eq!(kinds, ["ConfigMap", "StatefulSet", "Service"]);

    let settings = of_kind(&docs, "ConfigMap")["data"]["appsettings.json"]
        .as_str()
        .expect("appsettings.json");
    let config =
        NodeConfig::from_json_str(settings, Path::new("/etc/node-runtime"), Vec::new()).expect("the node loads it");
    assert!(
        config.ignored_keys.is_empty(),
        "keys the node would ignore: {:?}",
        config.ignored_keys
    );
    let admin = config
        .node_runtime
        .admin_listen
        .expect("the probes need NodeRuntime.AdminListen");

    let pod = &of_kind(&docs, "StatefulSet")["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(args, ["serve", "--config", "/etc/node-runtime/appsettings.json"]);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    let port = container["ports"][0]["containerPort"].as_i64().unwrap();
    assert_eq!(port, i64::from(admin.port()), "the probes reach the admin endpoint");
    // SIGTERM drains: the pod must be given longer than the drain.
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(
        grace > config.node_runtime.drain_timeout.as_secs() as i64,
        "grace {grace}s"
    );
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|mount| mount["mountPath"].as_str())
        .collect();
    assert!(
        mounts.contains(&config.node_runtime.data_directory.to_str().unwrap()),
        "the data directory is a volume: {mounts:?}"
    );
}

#[test]
fn the_container_recipe_builds_the_static_binary_and_keeps_state_in_a_volume() {
    let recipe = read("deploy/container/Containerfile");
    assert!(recipe.contains("--target x86_64-unknown-linux-musl"), "a static build");
    assert!(recipe.contains("FROM scratch"), "an empty base");
    assert!(
        recipe.contains("ca-certificates.crt"),
        "CA roots for https:// control planes"
    );
    assert!(recipe.contains("VOLUME [\"/var/lib/node-runtime\"]"));
    assert!(recipe.contains("NodeRuntime__DataDirectory=/var/lib/node-runtime"));
    assert!(
        recipe
            .lines()
            .any(|line| line.starts_with("USER ") && !line.contains(" 0")),
        "not root"
    );
}

/// What the manifest allows for the outbox, which no setting bounds.
const OUTBOX_ALLOWANCE: u64 = 512 << 20;
/// The most one file-digest memo record takes: its fixed part, a path of
/// up to PATH_MAX, its checksum.
const MEMO_RECORD_BYTES: u64 = 140 + 4096;

/// `4Gi`, `512Mi`, `100G`: a Kubernetes quantity in bytes.
fn quantity(text: &str) -> u64 {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("G", 1_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<u64>().expect("a whole quantity") * factor;
        }
    }
    text.parse().expect("a quantity")
}

#[test]
fn the_data_volume_holds_the_caches_at_their_bounds_and_the_outbox() {
    let docs = documents();
    let settings = of_kind(&docs, "ConfigMap")["data"]["appsettings.json"]
        .as_str()
        .expect("appsettings.json");
    let config = NodeConfig::from_json_str(settings, Path::new("/etc/node-runtime"), Vec::new()).unwrap();
    let claim = &of_kind(&docs, "StatefulSet")["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["metadata"]["name"].as_str(), Some("data"));
    let storage = quantity(claim["spec"]["resources"]["requests"]["storage"].as_str().unwrap());
    // Both network sources keep their own downloads.
    let needed = config.sandbox.compiled_cache_max_bytes
        + 2 * config.agent_store.download_cache_max_bytes
        + node_runtime::agent_store::digest_memo::MAX_RECORDS as u64 * MEMO_RECORD_BYTES
        + OUTBOX_ALLOWANCE;
    assert!(
        storage >= needed,
        "the data volume ({storage} bytes) is smaller than the caches' bounds and the outbox ({needed} bytes)"
    );
}
