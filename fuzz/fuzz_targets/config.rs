//! Configuration loading: `NodeConfig::from_json_str` with arbitrary text
//! (usually not JSON at all, sometimes close to `appsettings.json`) and a
//! few arbitrary environment variables over it. Errors are fine; a panic
//! is a bug.
#![no_main]

use std::path::Path;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use node_runtime::config::NodeConfig;

#[derive(Debug, Arbitrary)]
struct Input {
    text: String,
    env: Vec<(EnvKey, String)>,
}

/// An environment variable name: often one the node reads, so the
/// overrides are exercised, else anything.
#[derive(Debug, Arbitrary)]
enum EnvKey {
    Known(u8),
    Any(String),
}

const KNOWN: &[&str] = &[
    "NodeRuntime__ControlPlaneUrl",
    "NodeRuntime__NodeId",
    "NodeRuntime__HeartbeatIntervalSeconds",
    "NodeRuntime__MaxConcurrentLeases",
    "NodeRuntime__DrainTimeoutSeconds",
    "NodeRuntime__AgentsDirectory",
    "NodeRuntime__DataDirectory",
    "NodeRuntime__Capacity__Slots",
    "NodeRuntime__Capacity__Gpu",
    "NodeRuntime__Metadata__Zone",
    "Sandbox__MaxFuel",
    "Sandbox__MaxMemoryBytes",
    "Sandbox__Allocator",
    "Sandbox__AllowedHosts__echo__0",
    "AgentRuntime__OpenAI__ApiKeyEnvironmentVariable",
    "AgentRuntime__AzureAIFoundry__Endpoint",
    "AgentRuntime__Prices__gpt-4o-mini__Input",
];

fuzz_target!(|input: Input| {
    let env = input.env.into_iter().take(8).map(|(key, value)| {
        let key = match key {
            EnvKey::Known(i) => KNOWN[usize::from(i) % KNOWN.len()].to_string(),
            EnvKey::Any(key) => key,
        };
        (key, value)
    });
    let _ = NodeConfig::from_json_str(&input.text, Path::new("/etc/node-runtime"), env);
});
