//! Per-run meters that wasmtime does not keep itself.
//!
//! Fuel lives in the `Store`; memory and tokens are counted here.
//! [`MemoryMeter`] is the store's resource limiter: it sees every linear
//! memory and table grow (instantiation included) and every instance,
//! table and memory created, and it is told what the host holds for the
//! run ([`super::host_memory`]). It enforces the run's limit on the *sum*
//! of all three (wasmtime's own `StoreLimits` caps each memory
//! separately), bounds the count of instances, tables and memories as the
//! instance pool does (so the on-demand allocator holds a run to the same
//! shape), and remembers the peak and any refusal, so that a trap that
//! follows a refused growth is classified as `budget.memory`.

use wasmtime::ResourceLimiter;

/// Bytes of host memory one table element takes (a pointer), as the pool
/// sizes its tables.
pub const TABLE_ELEMENT_BYTES: u64 = 8;

/// How many core instances, tables and linear memories one run may
/// create: the instance pool's per-component limits, applied to the
/// on-demand allocator too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceShape {
    pub core_instances: usize,
    pub tables: usize,
    pub memories: usize,
}

#[derive(Debug)]
pub struct MemoryMeter {
    limit_bytes: u64,
    /// Elements of all the run's tables together.
    table_elements: usize,
    shape: InstanceShape,
    /// Sum of the current sizes of the run's linear memories.
    linear_bytes: u64,
    /// Sum of the current elements of the run's tables.
    current_elements: usize,
    /// What the host holds on the run's behalf (resources it created), as
    /// last audited.
    host_bytes: u64,
    peak_bytes: u64,
    peak_host_bytes: u64,
    /// Growth granted by the last `memory_growing` / `table_growing`,
    /// undone if the growth then fails for another reason.
    last_memory_grant: u64,
    last_table_grant: usize,
    refusal: Option<Refusal>,
}

/// The first growth the meter refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Linear memory would have grown the run's total to this.
    Memory { requested_total: u64 },
    /// The run's tables would have grown to this many elements in all.
    Table { requested_elements: usize },
    /// The host held this much for the run (its resources) on top of its
    /// linear memories and tables: `total` in all.
    Host { host_bytes: u64, total: u64 },
    /// The run asked for more host resources (`what`: table entries,
    /// handles) than a run may hold at once.
    HostResources { what: &'static str, limit: usize },
    /// The run handed the host more data in one call than a call may carry.
    HostcallData { limit: usize },
    /// The run grew a `wasi:http` header map past the size one may have.
    HeaderMap { limit: usize },
    /// The run asked for more random bytes at once than a call may return.
    RandomBytes { limit: u64 },
}

impl MemoryMeter {
    pub fn new(limit_bytes: u64, table_elements: usize, shape: InstanceShape) -> Self {
        MemoryMeter {
            limit_bytes,
            table_elements,
            shape,
            linear_bytes: 0,
            current_elements: 0,
            host_bytes: 0,
            peak_bytes: 0,
            peak_host_bytes: 0,
            last_memory_grant: 0,
            last_table_grant: 0,
            refusal: None,
        }
    }

    /// The largest the run's total (linear memories, tables, host
    /// resources) has been.
    pub fn peak_bytes(&self) -> u64 {
        self.peak_bytes
    }

    /// The largest the host's part of it has been.
    pub fn peak_host_bytes(&self) -> u64 {
        self.peak_host_bytes
    }

    pub fn remaining_bytes(&self) -> u64 {
        self.limit_bytes.saturating_sub(self.total())
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    pub fn refusal(&self) -> Option<&Refusal> {
        self.refusal.as_ref()
    }

    /// Records a refusal decided elsewhere (a full resource table, a host
    /// call carrying too much), unless an earlier one explains the run's
    /// end better.
    pub fn refuse(&mut self, refusal: Refusal) {
        self.refusal.get_or_insert(refusal);
    }

    fn table_bytes(&self) -> u64 {
        self.current_elements as u64 * TABLE_ELEMENT_BYTES
    }

    fn total(&self) -> u64 {
        self.linear_bytes
            .saturating_add(self.table_bytes())
            .saturating_add(self.host_bytes)
    }

    fn note_peak(&mut self) {
        self.peak_bytes = self.peak_bytes.max(self.total());
    }

    /// What the host holds for the run now. False when that takes the run
    /// over its limit: the refusal is recorded, and the caller stops
    /// serving the run's host calls.
    pub fn set_host_bytes(&mut self, bytes: u64) -> bool {
        self.host_bytes = bytes;
        self.peak_host_bytes = self.peak_host_bytes.max(bytes);
        self.note_peak();
        let total = self.total();
        if total > self.limit_bytes {
            self.refuse(Refusal::Host {
                host_bytes: bytes,
                total,
            });
            return false;
        }
        true
    }
}

impl ResourceLimiter for MemoryMeter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let growth = desired.saturating_sub(current) as u64;
        let total = self.total().saturating_add(growth);
        if total > self.limit_bytes {
            self.refuse(Refusal::Memory { requested_total: total });
            return Ok(false);
        }
        self.linear_bytes += growth;
        self.note_peak();
        self.last_memory_grant = growth;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.linear_bytes -= std::mem::take(&mut self.last_memory_grant);
        Ok(())
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let growth = desired.saturating_sub(current);
        let elements = self.current_elements.saturating_add(growth);
        let total = self.total().saturating_add(growth as u64 * TABLE_ELEMENT_BYTES);
        if elements > self.table_elements || total > self.limit_bytes {
            self.refuse(Refusal::Table {
                requested_elements: elements,
            });
            return Ok(false);
        }
        self.current_elements = elements;
        self.note_peak();
        self.last_table_grant = growth;
        Ok(true)
    }

    fn table_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.current_elements -= std::mem::take(&mut self.last_table_grant);
        Ok(())
    }

    fn instances(&self) -> usize {
        self.shape.core_instances
    }

    fn tables(&self) -> usize {
        self.shape.tables
    }

    fn memories(&self) -> usize {
        self.shape.memories
    }
}

/// How far a run may end over its token budget without failing: 10% of
/// the budget, and at least this many tokens. The node refuses a call
/// whose estimated prompt plus its output cap does not fit what remains,
/// so a run goes over only by what the prompt estimate missed on the one
/// call that crossed the budget (the provider's tokenizer is not the
/// node's); this is how much of a miss is accepted.
pub const TOKEN_TOLERANCE_FLOOR: u32 = 32;

/// LLM tokens spent by a run, and its cost.
#[derive(Debug, Default, Clone)]
pub struct TokenMeter {
    pub limit: u32,
    pub tokens_in: u32,
    pub tokens_out: u32,
    pub usd_cost: f64,
    /// Output tokens a provider reported beyond the `max_tokens` the node
    /// gave it, summed over the run's calls: never tolerated.
    pub output_past_cap: u32,
}

/// Why a run that ended over its token budget fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOverrun {
    /// The provider wrote more than it was allowed to.
    OutputPastCap { tokens: u32 },
    /// The prompts took the run further over than the tolerance allows.
    BeyondTolerance { tolerance: u32 },
}

impl TokenMeter {
    pub fn new(limit: u32) -> Self {
        TokenMeter {
            limit,
            ..TokenMeter::default()
        }
    }

    pub fn used(&self) -> u32 {
        self.tokens_in.saturating_add(self.tokens_out)
    }

    pub fn remaining(&self) -> u32 {
        self.limit.saturating_sub(self.used())
    }

    /// Tokens used beyond the budget.
    pub fn over(&self) -> u32 {
        self.used().saturating_sub(self.limit)
    }

    /// How far past the budget a run may end: 10% of it, at least
    /// [`TOKEN_TOLERANCE_FLOOR`].
    pub fn tolerance(&self) -> u32 {
        (self.limit / 10).max(TOKEN_TOLERANCE_FLOOR)
    }

    /// Counts one call's usage. `max_tokens` is what the call was allowed
    /// to write; more than that is the provider's fault and fails the run.
    pub fn record(&mut self, tokens_in: u32, tokens_out: u32, max_tokens: u32) {
        self.tokens_in = self.tokens_in.saturating_add(tokens_in);
        self.tokens_out = self.tokens_out.saturating_add(tokens_out);
        self.output_past_cap = self
            .output_past_cap
            .saturating_add(tokens_out.saturating_sub(max_tokens));
    }

    /// Why the run's token use fails it, if it does: over the budget with
    /// output past a call's cap, or by more than the tolerance.
    pub fn overrun(&self) -> Option<TokenOverrun> {
        let over = self.over();
        if over == 0 {
            None
        } else if self.output_past_cap > 0 {
            Some(TokenOverrun::OutputPastCap {
                tokens: self.output_past_cap,
            })
        } else if over > self.tolerance() {
            Some(TokenOverrun::BeyondTolerance {
                tolerance: self.tolerance(),
            })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: InstanceShape = InstanceShape {
        core_instances: 4,
        tables: 4,
        memories: 2,
    };

    #[test]
    fn tables_are_summed_and_count_toward_the_memory_limit() {
        let mut meter = MemoryMeter::new(1000, 100, SHAPE);
        assert!(meter.table_growing(0, 60, None).unwrap(), "first table");
        assert!(
            !meter.table_growing(0, 60, None).unwrap(),
            "a second table past the sum"
        );
        assert_eq!(
            meter.refusal(),
            Some(&Refusal::Table {
                requested_elements: 120
            })
        );
        assert_eq!(meter.peak_bytes(), 60 * TABLE_ELEMENT_BYTES);
        assert!(
            !meter.memory_growing(0, 600, None).unwrap(),
            "480 bytes of table leave 520"
        );
        assert!(meter.memory_growing(0, 520, None).unwrap());
        assert_eq!(meter.remaining_bytes(), 0);
    }

    #[test]
    fn host_bytes_count_toward_the_limit_and_their_peak_is_kept() {
        let mut meter = MemoryMeter::new(100, 10, SHAPE);
        assert!(meter.memory_growing(0, 60, None).unwrap());
        assert!(meter.set_host_bytes(40));
        assert!(
            !meter.memory_growing(60, 61, None).unwrap(),
            "the host's 40 bytes count"
        );
        assert!(meter.set_host_bytes(10));
        assert!(!meter.set_host_bytes(41));
        assert_eq!(
            meter.refusal(),
            Some(&Refusal::Memory { requested_total: 101 }),
            "the first refusal is kept"
        );
        assert_eq!((meter.peak_bytes(), meter.peak_host_bytes()), (101, 41));
        let mut fresh = MemoryMeter::new(100, 10, SHAPE);
        assert!(!fresh.set_host_bytes(101));
        assert_eq!(
            fresh.refusal(),
            Some(&Refusal::Host {
                host_bytes: 101,
                total: 101
            })
        );
    }

    #[test]
    fn the_limit_applies_to_the_sum_of_all_memories() {
        let mut meter = MemoryMeter::new(100, 10, SHAPE);
        assert!(meter.memory_growing(0, 60, None).unwrap(), "first memory");
        assert!(!meter.memory_growing(0, 60, None).unwrap(), "second memory");
        assert_eq!(meter.refusal(), Some(&Refusal::Memory { requested_total: 120 }));
        assert_eq!(meter.peak_bytes(), 60);
        assert_eq!(meter.remaining_bytes(), 40);
    }

    #[test]
    fn a_run_over_its_budget_fails_past_the_tolerance_or_past_a_cap() {
        // 4000 tokens: a tolerance of 400.
        let mut within = TokenMeter::new(4000);
        within.record(3000, 500, 900);
        within.record(800, 100, 100);
        assert_eq!((within.used(), within.over(), within.tolerance()), (4400, 400, 400));
        assert_eq!(within.overrun(), None);
        within.record(1, 0, 0);
        assert_eq!(within.overrun(), Some(TokenOverrun::BeyondTolerance { tolerance: 400 }));
        // A small budget still tolerates the floor.
        let mut small = TokenMeter::new(44);
        small.record(12, 20, 39);
        small.record(12, 12, 12);
        assert_eq!((small.over(), small.overrun()), (12, None));
        // A provider ignoring max_tokens is not tolerated at all.
        let mut greedy = TokenMeter::new(40);
        greedy.record(12, 20, 28);
        greedy.record(12, 20, 8);
        assert_eq!(greedy.overrun(), Some(TokenOverrun::OutputPastCap { tokens: 12 }));
    }

    #[test]
    fn a_failed_growth_is_not_counted() {
        let mut meter = MemoryMeter::new(100, 10, SHAPE);
        assert!(meter.memory_growing(10, 50, None).unwrap());
        meter
            .memory_grow_failed(wasmtime::Error::msg("maximum exceeded"))
            .unwrap();
        assert_eq!(meter.remaining_bytes(), 100);
    }
}
