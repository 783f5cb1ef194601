//! The four meters' limits: the node's ceilings and a run's budget.
//!
//! The node is configured with [`NodeLimits`]. A lease (or `run-agent`'s
//! flags) may ask for less through a [`BudgetRequest`]; the effective
//! [`Budget`] is built only by [`NodeLimits::budget`], which takes the lower
//! of each pair, so a run can lower a node limit but never raise it.

use std::time::Duration;

use thiserror::Error;

use support::units::format_bytes;

/// The node's ceilings for one run, and the caps on what a run may emit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLimits {
    /// CPU fuel per run (about one unit per WebAssembly instruction).
    pub fuel: u64,
    /// Sum of all linear memories of one run, in bytes.
    pub memory_bytes: u64,
    /// Elements per table (each costs a pointer of host memory).
    pub table_elements: u32,
    /// Wall-clock time per run.
    pub duration: Duration,
    /// LLM tokens (input plus output) per run.
    pub tokens: u32,
    /// Bytes of a run's result map (keys plus values), or of a command
    /// agent's stdout.
    pub result_bytes: usize,
    /// Log lines passed on per run; later lines are dropped and counted.
    pub log_lines: u32,
    /// Log bytes passed on per run (messages plus fields).
    pub log_bytes: usize,
    /// Longest single log message; longer ones are truncated.
    pub log_line_bytes: usize,
}

impl Default for NodeLimits {
    fn default() -> Self {
        NodeLimits {
            // About ten seconds of a tight loop on a current x86 core.
            fuel: 100_000_000_000,
            memory_bytes: 256 * 1024 * 1024,
            table_elements: 100_000,
            duration: Duration::from_secs(60),
            tokens: 4000,
            result_bytes: 1024 * 1024,
            log_lines: 1000,
            log_bytes: 1024 * 1024,
            log_line_bytes: 8 * 1024,
        }
    }
}

/// What a run asks for. `None` means "the node's limit"; so does 0, as on
/// the wire, where `max_tokens = 0` means "use the node default".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BudgetRequest {
    pub fuel: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub duration: Option<Duration>,
    pub tokens: Option<u32>,
}

/// A request above a node limit, refused where the caller asked explicitly
/// (the CLI) rather than silently lowered.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{meter} {requested} is above the node's limit of {limit}: a run may lower a limit, never raise it")]
pub struct AboveNodeLimit {
    pub meter: &'static str,
    pub requested: String,
    pub limit: String,
}

/// The effective limits of one run. Only [`NodeLimits::budget`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    fuel: u64,
    memory_bytes: u64,
    duration: Duration,
    tokens: u32,
}

impl Budget {
    pub fn fuel(&self) -> u64 {
        self.fuel
    }
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }
    pub fn duration(&self) -> Duration {
        self.duration
    }
    pub fn tokens(&self) -> u32 {
        self.tokens
    }
}

fn lower<T: Ord + Copy + Default>(limit: T, requested: Option<T>) -> T {
    match requested {
        Some(value) if value != T::default() => value.min(limit),
        _ => limit,
    }
}

impl NodeLimits {
    /// The budget of a run that asked for `request`: each meter's limit is
    /// the lower of the node's and the request's.
    pub fn budget(&self, request: &BudgetRequest) -> Budget {
        Budget {
            fuel: lower(self.fuel, request.fuel),
            memory_bytes: lower(self.memory_bytes, request.memory_bytes),
            duration: lower(self.duration, request.duration),
            tokens: lower(self.tokens, request.tokens),
        }
    }

    /// Refuses a request that would raise a limit. Leases are lowered
    /// silently by [`NodeLimits::budget`]; a person who typed a number gets
    /// told.
    pub fn check(&self, request: &BudgetRequest) -> Result<(), AboveNodeLimit> {
        fn above<T: PartialOrd>(
            meter: &'static str,
            requested: Option<T>,
            limit: T,
            show: impl Fn(&T) -> String,
        ) -> Result<(), AboveNodeLimit> {
            match requested {
                Some(value) if value > limit => Err(AboveNodeLimit {
                    meter,
                    requested: show(&value),
                    limit: show(&limit),
                }),
                _ => Ok(()),
            }
        }
        above("fuel", request.fuel, self.fuel, u64::to_string)?;
        above("memory", request.memory_bytes, self.memory_bytes, |b| format_bytes(*b))?;
        above("duration", request.duration, self.duration, |d| {
            humantime::format_duration(*d).to_string()
        })?;
        above("tokens", request.tokens, self.tokens, u32::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_lowers_limits_and_never_raises_them() {
        let limits = NodeLimits::default();
        let budget = limits.budget(&BudgetRequest {
            fuel: Some(1_000),
            memory_bytes: Some(u64::MAX),
            duration: Some(Duration::ZERO),
            tokens: Some(limits.tokens + 1),
        });
        assert_eq!(budget.fuel(), 1_000);
        assert_eq!(budget.memory_bytes(), limits.memory_bytes);
        assert_eq!(budget.duration(), limits.duration, "zero means the node default");
        assert_eq!(budget.tokens(), limits.tokens);
    }

    #[test]
    fn check_names_the_meter_that_would_be_raised() {
        let limits = NodeLimits::default();
        let err = limits
            .check(&BudgetRequest {
                memory_bytes: Some(limits.memory_bytes * 2),
                ..BudgetRequest::default()
            })
            .unwrap_err();
        assert_eq!(err.meter, "memory");
        assert_eq!(err.limit, "256 MiB");
        assert!(limits.check(&BudgetRequest::default()).is_ok());
    }
}
