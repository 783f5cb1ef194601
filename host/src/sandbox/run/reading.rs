//! A run cut off at its deadline is reported before its call is unwound.
//!
//! While the guest's call is suspended in the host, its store is out of
//! reach: the suspended call holds it. Unwinding that call is a trap, whose
//! backtrace wasmtime symbolicates against the agent's DWARF (for an agent
//! built with debug info, milliseconds per frame: it parses the DWARF anew
//! for each). So the run's meters are read every time the guest calls into
//! the host ([`LastReading::take`]): fuel cannot move until the call
//! returns, and the host work a waiting call charges is added as it is
//! charged ([`LastReading::refresh`]). A computing guest that the call hook
//! finds past its deadline is read there, whole, and parked
//! ([`LastReading::park`]). A run cut off either way is reported from that
//! reading, and its call is unwound afterwards ([`CutOffCall::unwind`]),
//! off the report's path.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::super::meters::TokenMeter;
use super::super::outcome::RunReport;
use super::super::state::RunState;

/// What a run's meters read at one moment, but for the wall time and the
/// host's suppressed warnings (the caller's, at the end).
#[derive(Debug, Clone, Default)]
pub(crate) struct Reading {
    /// Fuel left in the store; `None` for an engine without fuel.
    fuel_left: Option<u64>,
    host_work_fuel: u64,
    peak_memory_bytes: u64,
    peak_host_bytes: u64,
    instantiate_us: u64,
    pub(super) tokens: TokenMeter,
    log_lines: u32,
    log_lines_dropped: u32,
    http_requests: u32,
    http_denied: u32,
    /// Taken by the call hook as it parked a computing guest past its
    /// deadline, not as the guest entered a host call.
    pub(super) computing: bool,
}

impl Reading {
    /// Reads `state`'s meters; `fuel_left` is the store's.
    pub(super) fn of(state: &RunState, fuel_left: Option<u64>) -> Self {
        let mut reading = Reading {
            fuel_left,
            ..Reading::default()
        };
        reading.read_host_side(state);
        reading
    }

    /// Everything but the store's fuel, which the host cannot change.
    fn read_host_side(&mut self, state: &RunState) {
        self.host_work_fuel = state.host_work_fuel;
        self.peak_memory_bytes = state.memory.peak_bytes();
        self.peak_host_bytes = state.memory.peak_host_bytes();
        self.instantiate_us = state.instantiate_us;
        self.tokens.clone_from(&state.tokens);
        self.log_lines = state.log.lines();
        self.log_lines_dropped = state.log.dropped();
        self.http_requests = state.egress.requests + state.egress.denied;
        self.http_denied = state.egress.denied;
    }

    /// The report of a run whose budget was `budget_fuel` units of fuel,
    /// `wall` from its start to its end.
    pub(super) fn report(&self, budget_fuel: u64, wall: Duration, host_warnings_suppressed: u32) -> RunReport {
        RunReport {
            // Exact for a run that returned, ran out of fuel, or was
            // stopped at its deadline by the call hook or in a host call:
            // compiled code stores its fuel count before every call out of
            // the guest, fuel yields included. (Under epochs only there is
            // no fuel to report.)
            fuel_consumed: (budget_fuel - self.fuel_left.unwrap_or(0))
                .saturating_add(self.host_work_fuel)
                .min(budget_fuel),
            peak_memory_bytes: self.peak_memory_bytes,
            peak_host_bytes: self.peak_host_bytes,
            wall_ms: wall.as_millis() as u64,
            instantiate_us: self.instantiate_us,
            tokens_in: self.tokens.tokens_in,
            tokens_out: self.tokens.tokens_out,
            usd_cost: self.tokens.usd_cost,
            log_lines: self.log_lines,
            log_lines_dropped: self.log_lines_dropped,
            http_requests: self.http_requests,
            http_denied: self.http_denied,
            host_warnings_suppressed,
        }
    }
}

/// The reading taken when the guest last called into the host, shared by
/// the run's state (which takes it) and the run loop (which reports from
/// it if the run is cut off in that call).
#[derive(Debug, Clone, Default)]
pub(crate) struct LastReading(Arc<Mutex<Reading>>);

impl LastReading {
    /// As the guest calls into the host: every meter, `fuel_left` the
    /// store's.
    pub(crate) fn take(&self, state: &RunState, fuel_left: Option<u64>) {
        let mut last = self.lock();
        last.fuel_left = fuel_left;
        last.read_host_side(state);
    }

    /// As the call hook parks a computing guest past its deadline: the
    /// whole `reading`, which nothing changes until the call is unwound.
    pub(super) fn park(&self, reading: Reading) {
        *self.lock() = Reading {
            computing: true,
            ..reading
        };
    }

    /// From within a host call that charged the run (host work, tokens)
    /// and may yet wait: the host's meters again, the fuel as it was.
    pub(crate) fn refresh(&self, state: &RunState) {
        self.lock().read_host_side(state);
    }

    /// [`refresh`](Self::refresh), with `tokens` for the run's tokens: what
    /// a call that is about to wait would cost at most.
    pub(crate) fn refresh_charging(&self, state: &RunState, tokens: TokenMeter) {
        let mut last = self.lock();
        last.read_host_side(state);
        last.tokens = tokens;
    }

    /// The tokens as last read.
    pub(crate) fn tokens(&self) -> TokenMeter {
        self.lock().tokens.clone()
    }

    pub(super) fn get(&self) -> Reading {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Reading> {
        // A reading is plain numbers: one a panicking writer left is still
        // the best there is.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The call of a run cut off at its deadline, reported and not yet
/// unwound: suspended in a host call, or parked by the call hook. Dropping
/// it unwinds it where it is dropped; [`unwind`](Self::unwind) does so on
/// a blocking thread. Until then the run still holds its store and its
/// instance's slot in the pool, so a caller that bounds concurrent runs
/// keeps the run's slot until this is unwound.
pub struct CutOffCall {
    pub(super) calling: Option<super::Calling>,
    /// Cancelled before the call is unwound: a parked call hook then traps
    /// the guest, and one called while the call is torn down returns at once.
    pub(super) unwinding: CancellationToken,
    /// Parked in the call hook: unwinding it runs the guest's trap to its
    /// end, and gives its backtrace.
    pub(super) computing: bool,
}

impl CutOffCall {
    /// Unwinds the call off the async runtime's threads: a trap through the
    /// guest's frames, symbolicated if the agent carries DWARF. Returns the
    /// backtrace of a guest that was computing when it was cut off (where
    /// it was), `None` for one waiting in a host call.
    pub async fn unwind(mut self) -> Option<String> {
        self.unwinding.cancel();
        let calling = self.calling.take()?;
        let computing = self.computing;
        let runtime = tokio::runtime::Handle::current();
        // A panic there (a bug) has nothing left to report to.
        tokio::task::spawn_blocking(move || {
            if !computing {
                // Dropping a call suspended in the host unwinds it.
                drop(calling);
                return None;
            }
            // The parked hook returns the deadline's trap: the call ends at once.
            let (ended, store) = runtime.block_on(calling);
            drop(store);
            match ended {
                Err((_, err)) => crate::sandbox::backtrace::write(&err),
                Ok(_) => None,
            }
        })
        .await
        .ok()
        .flatten()
    }
}

impl Drop for CutOffCall {
    fn drop(&mut self) {
        // Before the call itself is dropped (a field, dropped after this).
        self.unwinding.cancel();
    }
}

impl std::fmt::Debug for CutOffCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CutOffCall")
            .field("computing", &self.computing)
            .finish_non_exhaustive()
    }
}
