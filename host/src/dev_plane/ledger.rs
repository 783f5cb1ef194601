//! The one owner of the plane's state: the state behind a lock, its store,
//! and the signal that wakes idle Pull streams.
//!
//! REST and gRPC handlers and the expiry task change state only through
//! [`Ledger::write`], which applies the change, saves the runs if they
//! changed (before the caller answers anyone), and wakes idle pullers
//! when the change may give them work.

use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use super::state::PlaneState;
use super::store::{SaveError, Snapshot, Store};

pub struct Ledger {
    // A std mutex: no critical section awaits, and each is short (the
    // longest serializes the runs for the store).
    state: std::sync::Mutex<PlaneState>,
    store: Option<Store>,
    work: Notify,
    pub lease_ttl: Duration,
}

impl Ledger {
    pub fn new(state: PlaneState, store: Option<Store>, lease_ttl: Duration) -> Ledger {
        Ledger {
            state: std::sync::Mutex::new(state),
            store,
            work: Notify::new(),
            lease_ttl,
        }
    }

    /// Reads the state.
    pub fn read<R>(&self, f: impl FnOnce(&PlaneState) -> R) -> R {
        f(&self.lock())
    }

    /// Changes the state at the current time, then saves the runs if they
    /// changed. When this returns `Ok`, the change is on disk.
    pub async fn write<R>(
        &self,
        f: impl FnOnce(&mut PlaneState, SystemTime) -> R,
    ) -> Result<R, SaveError> {
        let (answer, snapshot, wake) = {
            let mut state = self.lock();
            let before = state.revision();
            let answer = f(&mut state, SystemTime::now());
            let changed = state.revision() != before;
            let snapshot = (changed && self.store.is_some())
                .then(|| Snapshot::of(state.revision(), state.runs()));
            (answer, snapshot, state.take_wake_pullers())
        };
        if let (Some(store), Some(snapshot)) = (&self.store, snapshot) {
            store.save(snapshot).await?;
        }
        if wake {
            self.work.notify_waiters();
        }
        Ok(answer)
    }

    /// Saves the current runs (used at shutdown; normally a no-op since
    /// every change was saved when it happened).
    pub async fn flush(&self) -> Result<(), SaveError> {
        let snapshot = {
            let state = self.lock();
            Snapshot::of(state.revision(), state.runs())
        };
        match &self.store {
            Some(store) => store.save(snapshot).await,
            None => Ok(()),
        }
    }

    /// A future that completes at the next wake-up for pullers. Create it
    /// (and `enable` it) before polling, so a run submitted between the
    /// poll and the wait is not missed.
    pub fn work_notified(&self) -> Notified<'_> {
        self.work.notified()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PlaneState> {
        // A panic while holding the lock leaves the state as consistent as
        // each single method left it; keep serving rather than cascade.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
