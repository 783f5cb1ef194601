//! The one place wasmtime is configured.
//!
//! Every component this process compiles or loads goes through the
//! [`Engine`] built here, so fuel, epochs, the allocator and the compiler
//! settings are the same for all of them, and a precompiled `.cwasm` is
//! accepted only if it was produced under this exact configuration.
//!
//! Guests run as native code from Cranelift, or as Pulley bytecode under
//! wasmtime's interpreter: slower, but it needs no code generator for the
//! host's CPU and no executable memory, so it serves where Cranelift has no
//! backend (wasmtime then picks it by itself). Compiling for another
//! machine (`node-runtime compile --target`) uses the same settings with
//! another target, so that machine's node accepts the result.
//!
//! The pooling allocator reserves its whole pool of virtual address space
//! up front (several GiB per linear memory). That fails where the address
//! space is small (39-bit ARM boards) or `ulimit -v` is set; the engine then
//! falls back to on-demand allocation and says so, instead of refusing to
//! start.

use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, WasmBacktraceDetails};

use super::budget::NodeLimits;
use super::meters::InstanceShape;

/// How instances get their memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AllocatorChoice {
    /// Pooling, falling back to on-demand when the pool cannot be reserved.
    #[default]
    Auto,
    /// Pooling only: fail when the pool cannot be reserved.
    Pooling,
    /// Allocate each instance's memory when it is created.
    OnDemand,
}

/// The allocator the engine actually uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocator {
    Pooling { slots: u32 },
    OnDemand { reason: String },
}

/// Whether guests are metered. Production engines always are, with fuel:
/// fuel is the CPU budget, and a computing guest yields every
/// [`fuel_per_yield`] units, where the run loop enforces its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Metering {
    /// Fuel only: one check at each guest loop header. The node's mode.
    #[default]
    Fuel,
    /// Fuel, and epoch interruption for the deadline: a second check at
    /// each loop header. The node's mode until issue 22; kept so that
    /// benchmarks can measure what it cost. Code compiled this way (a
    /// `.cwasm` from an older node) is refused by a [`Metering::Fuel`]
    /// engine, and the reverse.
    FuelAndEpochs,
    /// Epochs only: for an engine without fuel, where the epoch callback
    /// makes guests yield and enforces the deadline. No CPU budget.
    EpochsOnly,
    /// Neither: for benchmarks that measure what metering costs, nothing
    /// else. A guest then has no CPU budget, never yields, and its deadline
    /// is enforced only when it returns from a host call or after it ends.
    /// Code compiled this way is refused by a metered engine, and the
    /// reverse.
    Off,
}

impl Metering {
    pub fn fuel(self) -> bool {
        matches!(self, Metering::Fuel | Metering::FuelAndEpochs)
    }

    pub fn epochs(self) -> bool {
        matches!(self, Metering::FuelAndEpochs | Metering::EpochsOnly)
    }
}

/// Fuel a computing guest burns between two yields to the async runtime,
/// where its deadline is checked (`Store::fuel_async_yield_interval`).
/// A quarter of a millisecond of a tight loop in native code here
/// (`spin-forever` burns 6.5-9.5 units a nanosecond), more for code with
/// calls and memory traffic; Pulley runs an order of magnitude fewer units
/// a second, so it yields after fewer. A yield costs a fiber switch and a
/// poll (a few microseconds), about 1% at worst at this interval, and
/// bounds how late a computing guest is stopped.
pub fn fuel_per_yield(engine: &Engine) -> u64 {
    if engine.is_pulley() { 200_000 } else { 2_000_000 }
}

/// How guests execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Execution {
    /// Native code compiled by Cranelift for this host's CPU.
    #[default]
    Cranelift,
    /// Pulley bytecode run by wasmtime's interpreter: for hosts Cranelift
    /// has no backend for. Computing is an order of magnitude slower.
    Pulley,
}

impl Execution {
    pub fn as_str(self) -> &'static str {
        match self {
            Execution::Cranelift => "cranelift",
            Execution::Pulley => "pulley",
        }
    }

    /// `cranelift` or `pulley`, in any case; `None` for anything else.
    pub fn parse(text: &str) -> Option<Execution> {
        match text.trim().to_ascii_lowercase().as_str() {
            "cranelift" => Some(Execution::Cranelift),
            "pulley" => Some(Execution::Pulley),
            _ => None,
        }
    }
}

impl std::fmt::Display for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The Pulley target for this host: its pointer width and byte order.
pub fn pulley_host_target() -> &'static str {
    match (cfg!(target_pointer_width = "64"), cfg!(target_endian = "big")) {
        (true, false) => "pulley64",
        (true, true) => "pulley64be",
        (false, false) => "pulley32",
        (false, true) => "pulley32be",
    }
}

/// The architecture of the code `engine` runs, named as
/// [`super::precompiled::artifact_architecture`] names a `.cwasm`'s:
/// this host's (`x86_64`, `aarch64`, ...) or its Pulley target.
pub fn engine_architecture(engine: &Engine) -> &'static str {
    if engine.is_pulley() {
        pulley_host_target()
    } else {
        std::env::consts::ARCH
    }
}

/// The `compile --target` value that produces code `engine` runs.
pub fn host_precompile_target(engine: &Engine) -> String {
    match (engine.is_pulley(), std::env::consts::OS) {
        (true, _) => pulley_host_target().to_string(),
        (false, "linux") => format!("{}-unknown-linux-gnu", std::env::consts::ARCH),
        (false, os) => format!("{}-unknown-{os}", std::env::consts::ARCH),
    }
}

/// Settings that shape the engine. Everything that affects compiled code
/// lives in [`compiler_config`], so both allocators accept the same
/// `.cwasm` files.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub allocator: AllocatorChoice,
    /// Runs that may be instantiated at once; sizes the pool.
    pub max_concurrent_runs: u32,
    /// How often the epoch advances, for an engine with epochs: the
    /// granularity of its deadlines and of guest yields. (A fuel-only
    /// engine, the default, has no epoch ticker.)
    pub epoch_tick: Duration,
    /// Always [`Metering::Fuel`] outside benchmarks.
    pub metering: Metering,
    /// Cranelift unless asked otherwise; Pulley regardless where Cranelift
    /// has no backend for the host.
    pub execution: Execution,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            allocator: AllocatorChoice::Auto,
            max_concurrent_runs: 16,
            epoch_tick: Duration::from_millis(10),
            metering: Metering::Fuel,
            execution: Execution::Cranelift,
        }
    }
}

/// Core instances one component may contain. Rust components have a
/// handful; interpreters built with componentize-py or jco have dozens.
const CORE_INSTANCES_PER_COMPONENT: u32 = 64;
const MEMORIES_PER_COMPONENT: u32 = 8;
const TABLES_PER_COMPONENT: u32 = 64;

/// The pool's per-component limits, which the store limiter applies to
/// every run, so a run on the on-demand allocator has the same shape.
pub(crate) const RUN_SHAPE: InstanceShape = InstanceShape {
    core_instances: CORE_INSTANCES_PER_COMPONENT as usize,
    tables: TABLES_PER_COMPONENT as usize,
    memories: MEMORIES_PER_COMPONENT as usize,
};

/// Settings that change generated code. A `.cwasm` records them and is
/// refused by an engine whose settings differ. `target` is `None` for this
/// host, whose CPU features Cranelift then uses.
pub(super) fn compiler_config(metering: Metering, target: Option<&str>) -> wasmtime::Result<Config> {
    let mut config = Config::new();
    if let Some(target) = target {
        config.target(target)?;
    }
    config.wasm_component_model(true);
    config.consume_fuel(metering.fuel());
    config.epoch_interruption(metering.epochs());
    // A trap's frames are named, not symbolicated: wasmtime would read
    // the agent's DWARF for each frame on the runtime thread, before the
    // run is reported (`backtrace.rs`). The `.cwasm` then keeps no DWARF.
    config.wasm_backtrace_details(WasmBacktraceDetails::Disable);
    Ok(config)
}

/// Targets `node-runtime compile --target` is known to produce code for
/// (the `-musl` forms give the same code; Linux is what the node is built
/// and tested for).
pub const PRECOMPILE_TARGETS: [&str; 4] = [
    "x86_64-unknown-linux-gnu",
    "aarch64-unknown-linux-gnu",
    "pulley64",
    "pulley32",
];

/// A target this build cannot compile for.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot compile for target `{target}`: {reason}; supported targets: {}",
    PRECOMPILE_TARGETS.join(", ")
)]
pub struct UnsupportedTarget {
    pub target: String,
    pub reason: String,
}

/// An engine that compiles, but never runs, code for `target` (a target
/// triple such as `aarch64-unknown-linux-gnu`, or `pulley64`), with the
/// node's compiler settings, so that a node on that target accepts it.
/// Only a build with a compiler has one.
#[cfg(feature = "cranelift")]
pub fn build_precompile_engine(target: &str, metering: Metering) -> Result<Engine, UnsupportedTarget> {
    let unsupported = |err: wasmtime::Error| UnsupportedTarget {
        target: target.to_string(),
        reason: super::agent::error_chain(&err),
    };
    let mut config = compiler_config(metering, Some(target)).map_err(unsupported)?;
    // Nothing is instantiated: no pool to reserve.
    config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
    Engine::new(&config).map_err(unsupported)
}

/// Builds the process's engine, with the pool when it can be reserved.
pub fn build_engine(settings: &EngineSettings, limits: &NodeLimits) -> wasmtime::Result<(Engine, Allocator)> {
    no_transparent_huge_pages();
    let target = match settings.execution {
        Execution::Cranelift => None,
        Execution::Pulley => Some(pulley_host_target()),
    };
    let on_demand = |reason: String| -> wasmtime::Result<(Engine, Allocator)> {
        let mut config = compiler_config(settings.metering, target)?;
        config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
        let engine = Engine::new(&config)?;
        warn_if_too_few_mappings(settings.max_concurrent_runs, read_max_map_count());
        Ok((engine, Allocator::OnDemand { reason }))
    };
    match settings.allocator {
        AllocatorChoice::OnDemand => on_demand("configured".to_string()),
        choice => {
            let slots = settings.max_concurrent_runs.max(1);
            let mut config = compiler_config(settings.metering, target)?;
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool_config(slots, limits)));
            match Engine::new(&config) {
                Ok(engine) => {
                    let reset = if pagemap_scan_available() {
                        "dirty pages rewritten (PAGEMAP_SCAN)"
                    } else {
                        "pages discarded (madvise)"
                    };
                    tracing::info!(slots, reset, "instance pool reserved");
                    Ok((engine, Allocator::Pooling { slots }))
                }
                Err(err) if choice == AllocatorChoice::Auto => {
                    let reason = format!("the instance pool could not be reserved: {err}");
                    tracing::warn!(%reason, "falling back to on-demand instance allocation");
                    on_demand(reason)
                }
                Err(err) => Err(err.context(format!(
                    "could not reserve the instance pool for {slots} concurrent runs \
                     (set the allocator to auto or on-demand, or lower the slot count)"
                ))),
            }
        }
    }
}

/// Turns transparent huge pages off for this process.
///
/// mimalloc, the node's allocator, asks the kernel for huge pages on its
/// heaps (`MADV_HUGEPAGE`), so each fresh 2 MiB of heap (every new thread,
/// every heap regrown after a purge) is zeroed whole on its first touch: a
/// fifth of the node's CPU time at full lease throughput went to
/// `clear_page_erms`. The node's heap is many small, short-lived
/// allocations spread over threads, where huge pages buy little; guest
/// memories are not asked for huge pages either way. Process-wide (it
/// is the process's allocator), idempotent, and on other systems nothing.
/// `main` calls it first of all: a heap touched before it (the
/// configuration, the outbox) keeps its huge pages, 24 MiB of an idle
/// node's 38 MiB resident.
pub fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes integers only and changes no
        // memory the program can see, only how the kernel backs it.
        let set = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if set != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "could not turn transparent huge pages off");
        }
    }
}

fn pool_config(slots: u32, limits: &NodeLimits) -> PoolingAllocationConfig {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(slots)
        .total_core_instances(slots * CORE_INSTANCES_PER_COMPONENT)
        .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .total_memories(slots * MEMORIES_PER_COMPONENT)
        .max_memories_per_component(MEMORIES_PER_COMPONENT)
        .total_tables(slots * TABLES_PER_COMPONENT)
        .max_tables_per_component(TABLES_PER_COMPONENT)
        .table_elements(limits.table_elements as usize)
        .total_stacks(slots)
        // A pooled memory never needs to be larger than the whole run may
        // use; the store limiter enforces the sum across memories. 32-bit
        // memories cannot exceed 4 GiB, the default reservation.
        .max_memory_size(limits.memory_bytes.min(4 << 30) as usize);
    if pagemap_scan_available() {
        // Reset a slot by rewriting only the pages the last run dirtied,
        // found with PAGEMAP_SCAN, instead of discarding them (madvise)
        // and taking a page fault for each again in the next run: echo
        // went from 79 to 44 us per run. Costs up to this much resident
        // memory per used slot. Without the ioctl, wasmtime would memset
        // the whole kept region on every reset, which measured slower
        // (107 us) than discarding: keep nothing then.
        pool.linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            .pagemap_scan(wasmtime::Enabled::Auto);
    }
    pool
}

/// Bytes of each pooled memory and table kept resident between runs.
const KEEP_RESIDENT: usize = 1 << 20;

/// Linux 6.7 added the PAGEMAP_SCAN ioctl that tells which pages a run
/// dirtied.
fn pagemap_scan_available() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").is_ok_and(|release| kernel_at_least(&release, (6, 7)))
}

/// Whether a kernel release string (`6.18.44-fc`) is at least `wanted`.
fn kernel_at_least(release: &str, wanted: (u32, u32)) -> bool {
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= wanted,
        _ => false,
    }
}

/// Memory mappings one on-demand run holds (linear memory, guard regions,
/// the fiber stack and its guard page, instance data): 6.9 measured per
/// suspended `llm-chat` run, rounded up.
const MAPPINGS_PER_ON_DEMAND_RUN: u64 = 8;
/// Mappings the process holds besides its runs (libraries, heap, threads).
const MAPPINGS_BESIDES_RUNS: u64 = 2_000;

/// Linux's per-process limit on memory mappings, if this is Linux.
fn read_max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Past `vm.max_map_count` mappings, every new run fails to instantiate
/// (the kernel refuses the mapping). The default (65,530) holds about
/// 8,000 on-demand runs: say so at start, with the fix, rather than let a
/// busy node fail runs later.
fn warn_if_too_few_mappings(runs: u32, max_map_count: Option<u64>) -> bool {
    let Some(limit) = max_map_count else { return false };
    let needed = u64::from(runs) * MAPPINGS_PER_ON_DEMAND_RUN + MAPPINGS_BESIDES_RUNS;
    if needed <= limit {
        return false;
    }
    tracing::warn!(
        max_concurrent_runs = runs,
        vm.max_map_count = limit,
        needed,
        "{runs} concurrent runs need about {needed} memory mappings, more than the kernel's \
         vm.max_map_count ({limit}) allows: runs past that fail to start. Raise it \
         (sysctl -w vm.max_map_count={}) or lower the slot count",
        needed.next_power_of_two().max(262_144)
    );
    true
}

/// Advances the engine's epoch every `tick` on a dedicated thread, so
/// deadlines fire even when the async runtime is busy. The thread ends
/// when the engine is dropped.
pub fn start_epoch_ticker(engine: &Engine, tick: Duration) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("epoch-ticker".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(tick);
            }
        })
        .expect("spawning the epoch ticker thread");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_limit_warning_fires_only_past_the_limit() {
        assert!(!warn_if_too_few_mappings(16, Some(65_530)));
        assert!(!warn_if_too_few_mappings(7_000, Some(65_530)));
        assert!(warn_if_too_few_mappings(10_000, Some(65_530)));
        assert!(!warn_if_too_few_mappings(10_000, Some(262_144)));
        assert!(!warn_if_too_few_mappings(10_000, None), "not Linux: nothing to check");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn building_an_engine_turns_transparent_huge_pages_off() {
        let (_engine, _) = build_engine(
            &EngineSettings {
                allocator: AllocatorChoice::OnDemand,
                ..EngineSettings::default()
            },
            &NodeLimits::default(),
        )
        .expect("engine");
        // SAFETY: PR_GET_THP_DISABLE takes integers only.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(disabled, 1);
    }

    #[test]
    fn kernel_releases_are_compared_by_major_and_minor() {
        assert!(kernel_at_least("6.18.44-fc-v657\n", (6, 7)));
        assert!(kernel_at_least("6.7.0", (6, 7)));
        assert!(kernel_at_least("7.0", (6, 7)));
        assert!(!kernel_at_least("6.6.30-generic", (6, 7)));
        assert!(!kernel_at_least("5.15.0-91-generic", (6, 7)));
        assert!(!kernel_at_least("garbage", (6, 7)));
    }
}
