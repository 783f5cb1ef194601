//! Per-run meters that wasmtime does not keep itself.
//!
//! Fuel and epochs live in the `Store`; memory and tokens are counted here.
//! [`MemoryMeter`] is the store's resource limiter: it sees every linear
//! memory and table grow (instantiation included), enforces the run's limit
//! on the *sum* of all memories (wasmtime's own `StoreLimits` caps each
//! memory separately), and remembers the peak and any refusal, so that a
//! trap that follows a refused growth is classified as `budget.memory`.

use wasmtime::ResourceLimiter;

#[derive(Debug)]
pub struct MemoryMeter {
    limit_bytes: u64,
    table_elements: usize,
    /// Sum of the current sizes of the run's linear memories.
    current_bytes: u64,
    peak_bytes: u64,
    /// Growth granted by the last `memory_growing`, undone if the growth
    /// then fails for another reason.
    last_grant: u64,
    refusal: Option<Refusal>,
}

/// The first growth the meter refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Memory { requested_total: u64 },
    Table { requested_elements: usize },
}

impl MemoryMeter {
    pub fn new(limit_bytes: u64, table_elements: usize) -> Self {
        MemoryMeter {
            limit_bytes,
            table_elements,
            current_bytes: 0,
            peak_bytes: 0,
            last_grant: 0,
            refusal: None,
        }
    }

    pub fn peak_bytes(&self) -> u64 {
        self.peak_bytes
    }

    pub fn remaining_bytes(&self) -> u64 {
        self.limit_bytes.saturating_sub(self.current_bytes)
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    pub fn refusal(&self) -> Option<&Refusal> {
        self.refusal.as_ref()
    }
}

impl ResourceLimiter for MemoryMeter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let growth = desired.saturating_sub(current) as u64;
        let total = self.current_bytes.saturating_add(growth);
        if total > self.limit_bytes {
            self.refusal.get_or_insert(Refusal::Memory {
                requested_total: total,
            });
            return Ok(false);
        }
        self.current_bytes = total;
        self.peak_bytes = self.peak_bytes.max(total);
        self.last_grant = growth;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.current_bytes -= std::mem::take(&mut self.last_grant);
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            self.refusal.get_or_insert(Refusal::Table {
                requested_elements: desired,
            });
            return Ok(false);
        }
        Ok(true)
    }
}

/// LLM tokens spent by a run, and its cost.
#[derive(Debug, Default, Clone)]
pub struct TokenMeter {
    pub limit: u32,
    pub tokens_in: u32,
    pub tokens_out: u32,
    pub usd_cost: f64,
    /// Tokens over the limit that the node let happen: the prompt of the
    /// one call that crossed the budget (its completion was capped to what
    /// remained, but a prompt's size is known only from the answer).
    pub tolerated_overrun: u32,
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

    /// Counts one call's usage. `max_tokens` is what the call was allowed
    /// to write: a call that stayed within it and crossed the budget only
    /// by its prompt is tolerated; more than that fails the run.
    pub fn record(&mut self, tokens_in: u32, tokens_out: u32, max_tokens: u32) {
        let was_over = self.used() > self.limit;
        self.tokens_in = self.tokens_in.saturating_add(tokens_in);
        self.tokens_out = self.tokens_out.saturating_add(tokens_out);
        let over = self.used().saturating_sub(self.limit);
        if !was_over && over > 0 && tokens_out <= max_tokens {
            self.tolerated_overrun = over.min(tokens_in);
        }
    }

    /// Tokens used beyond what the budget and the tolerated prompt allow.
    pub fn excess(&self) -> u32 {
        self.used()
            .saturating_sub(self.limit.saturating_add(self.tolerated_overrun))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_applies_to_the_sum_of_all_memories() {
        let mut meter = MemoryMeter::new(100, 10);
        assert!(meter.memory_growing(0, 60, None).unwrap(), "first memory");
        assert!(!meter.memory_growing(0, 60, None).unwrap(), "second memory");
        assert_eq!(
            meter.refusal(),
            Some(&Refusal::Memory {
                requested_total: 120
            })
        );
        assert_eq!(meter.peak_bytes(), 60);
        assert_eq!(meter.remaining_bytes(), 40);
    }

    #[test]
    fn only_the_prompt_of_the_crossing_call_may_overrun_the_budget() {
        let mut meter = TokenMeter::new(44);
        meter.record(12, 20, 44);
        meter.record(12, 12, 12);
        assert_eq!((meter.used(), meter.remaining(), meter.excess()), (56, 0, 0));
        let mut greedy = TokenMeter::new(40);
        greedy.record(12, 20, 40);
        greedy.record(12, 20, 8);
        assert_eq!(greedy.excess(), 24, "a provider ignoring max_tokens is not tolerated");
    }

    #[test]
    fn a_failed_growth_is_not_counted() {
        let mut meter = MemoryMeter::new(100, 10);
        assert!(meter.memory_growing(10, 50, None).unwrap());
        meter
            .memory_grow_failed(wasmtime::Error::msg("maximum exceeded"))
            .unwrap();
        assert_eq!(meter.remaining_bytes(), 100);
    }
}
