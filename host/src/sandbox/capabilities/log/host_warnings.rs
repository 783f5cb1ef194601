//! The node's own warnings that a run can cause, bounded per run.
//!
//! Some host log lines are written each time a guest does something: an
//! outbound request denied or failing, a metadata entry ignored. A run in
//! a loop could otherwise write thousands of them. [`HostWarnings`] lets
//! the first [`HOST_WARNINGS_PER_KIND`] of each kind through, counts the
//! rest, and at the run's end writes one summary line per kind ("N more
//! egress denials suppressed"); the run's report carries the count
//! (`RunReport::host_warnings_suppressed`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// How many warnings of each kind one run may have logged.
pub const HOST_WARNINGS_PER_KIND: u32 = 10;

/// The events' target of the summary lines.
const LOG_TARGET: &str = "node_runtime::sandbox";

/// A kind of warning a run can cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostWarning {
    /// An outbound request denied (host not granted, no host, too many in
    /// flight).
    EgressDenied,
    /// An allowed outbound request that failed, timed out or was refused.
    EgressFailed,
    /// A run metadata entry ignored (`http.allow`, `fs.allow`, `env.allow`).
    MetadataIgnored,
}

const KINDS: [HostWarning; 3] = [
    HostWarning::EgressDenied,
    HostWarning::EgressFailed,
    HostWarning::MetadataIgnored,
];

impl HostWarning {
    fn plural(self) -> &'static str {
        match self {
            HostWarning::EgressDenied => "egress denials",
            HostWarning::EgressFailed => "outbound HTTP failures",
            HostWarning::MetadataIgnored => "ignored metadata entries",
        }
    }
}

/// One run's count of each kind; clones share it (a request's own task
/// holds one).
#[derive(Debug, Clone, Default)]
pub struct HostWarnings(Arc<[AtomicU32; KINDS.len()]>);

impl HostWarnings {
    /// Counts one `kind`; true while it is to be logged.
    pub fn admit(&self, kind: HostWarning) -> bool {
        let seen = self.0[kind as usize]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_add(1)))
            .unwrap_or(u32::MAX);
        seen < HOST_WARNINGS_PER_KIND
    }

    /// Adds what `other` counted (warnings made before the run's state,
    /// which holds this one, was built).
    pub fn add(&self, other: &HostWarnings) {
        for kind in KINDS {
            let more = other.0[kind as usize].load(Ordering::Relaxed);
            let _ = self.0[kind as usize]
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_add(more)));
        }
    }

    /// Warnings counted and not logged, every kind together.
    pub fn suppressed(&self) -> u32 {
        KINDS
            .iter()
            .map(|kind| self.suppressed_of(*kind))
            .fold(0, u32::saturating_add)
    }

    fn suppressed_of(&self, kind: HostWarning) -> u32 {
        self.0[kind as usize]
            .load(Ordering::Relaxed)
            .saturating_sub(HOST_WARNINGS_PER_KIND)
    }

    /// One line per kind that had warnings suppressed.
    pub fn summarise(&self) {
        for kind in KINDS {
            let more = self.suppressed_of(kind);
            if more > 0 {
                tracing::warn!(
                    target: LOG_TARGET, suppressed = more,
                    "{more} more {} suppressed (the first {HOST_WARNINGS_PER_KIND} of this run were logged)",
                    kind.plural()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_each_kind_pass_and_the_rest_are_counted() {
        let warnings = HostWarnings::default();
        let shared = warnings.clone();
        let logged = (0..1000).filter(|_| shared.admit(HostWarning::EgressDenied)).count();
        assert_eq!(logged, HOST_WARNINGS_PER_KIND as usize);
        assert!(
            warnings.admit(HostWarning::MetadataIgnored),
            "each kind has its own count"
        );
        assert_eq!(warnings.suppressed(), 1000 - HOST_WARNINGS_PER_KIND);
        let more = HostWarnings::default();
        (0..20).for_each(|_| {
            more.admit(HostWarning::MetadataIgnored);
        });
        warnings.add(&more);
        assert_eq!(warnings.suppressed(), 1000 - HOST_WARNINGS_PER_KIND + 11);
    }
}
