//! The one owner of the plane's state: the state behind a lock, its store,
//! and the signal that wakes idle Pull streams.
//!
//! REST and gRPC handlers and the expiry task change state only through
//! [`Ledger::write`], which applies the change, saves the runs if they
//! changed (before the caller answers anyone), and wakes idle pullers
//! when the change may give them work. A change that cannot be saved is
//! undone, and the caller gets the error: what the plane holds in memory
//! is always what is on disk, so a run the client was told failed is not
//! leased either.

use std::sync::Arc;
use std::time::{Duration, SystemTime};
use support::sync::lock;

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use super::agents::{AgentBook, AgentChange};
use super::state::PlaneState;
use super::store::{Row, SaveError, Store};

pub struct Ledger {
    // A std mutex: no critical section awaits, and each is short (the
    // longest serializes the runs for the store).
    state: std::sync::Mutex<PlaneState>,
    /// The agent API's agents and versions; changed only through
    /// [`Ledger::change_agents`].
    agents: std::sync::Mutex<AgentBook>,
    store: Option<Store>,
    /// Held from applying a change until it is saved or undone, so no
    /// other change (a lease of a just-submitted run, say) builds on one
    /// that may yet be undone. Only with a store: in memory, nothing fails.
    writing: Arc<tokio::sync::Mutex<()>>,
    work: Notify,
    pub lease_ttl: Duration,
}

impl Ledger {
    pub fn new(state: PlaneState, agents: AgentBook, store: Option<Store>, lease_ttl: Duration) -> Ledger {
        Ledger {
            state: std::sync::Mutex::new(state),
            agents: std::sync::Mutex::new(agents),
            store,
            writing: Arc::new(tokio::sync::Mutex::new(())),
            work: Notify::new(),
            lease_ttl,
        }
    }

    /// Reads the state.
    pub fn read<R>(&self, f: impl FnOnce(&PlaneState) -> R) -> R {
        f(&self.lock())
    }

    /// Changes the state at the current time, then saves the runs if they
    /// changed. When this returns `Ok`, the change is on disk; when it
    /// returns the save's error, the change is undone.
    pub async fn write<R>(self: &Arc<Self>, f: impl FnOnce(&mut PlaneState, SystemTime) -> R) -> Result<R, SaveError> {
        if self.store.is_none() {
            let (answer, wake) = {
                let mut state = self.lock();
                let answer = f(&mut state, SystemTime::now());
                (answer, state.take_wake_pullers())
            };
            self.wake(wake);
            return Ok(answer);
        }
        let writing = Arc::clone(&self.writing).lock_owned().await;
        let (answer, rows) = {
            let mut state = self.lock();
            let before = state.revision();
            state.begin();
            let answer = f(&mut state, SystemTime::now());
            let rows: Option<Vec<Row>> = (state.revision() != before).then(|| {
                state
                    .changed_runs()
                    .into_iter()
                    .map(|(at, run)| Row::of(at, run))
                    .collect()
            });
            if rows.is_none() {
                state.commit();
            }
            (answer, rows)
        };
        if let Some(rows) = rows {
            // Saved and settled in a task of its own: a caller that goes
            // away mid-save (a client hanging up) must not leave the
            // change neither kept nor undone.
            let ledger = Arc::clone(self);
            let settled = tokio::spawn(async move {
                let _writing = writing;
                let saved = match &ledger.store {
                    Some(store) => store.save(rows).await,
                    None => Ok(()),
                };
                let mut state = ledger.lock();
                match saved {
                    Ok(()) => state.commit(),
                    Err(_) => state.roll_back(),
                }
                saved
            })
            .await;
            match settled {
                Ok(saved) => saved?,
                // The task panicked before settling: the change is in
                // memory but maybe not on disk; the next save catches up.
                Err(join) => {
                    return Err(SaveError {
                        path: self.store.as_ref().map(Store::path).unwrap_or_default(),
                        source: std::io::Error::other(join),
                    });
                }
            }
        } else {
            drop(writing);
        }
        let wake = self.lock().take_wake_pullers();
        self.wake(wake);
        Ok(answer)
    }

    /// Reads the agents.
    pub fn read_agents<R>(&self, f: impl FnOnce(&AgentBook) -> R) -> R {
        f(&lock(&self.agents))
    }

    /// Asks the agents for a change at the current time, saves it, and
    /// only then applies it: an agent or version that cannot be saved is
    /// never kept. Changes to agents are serialized with each other (and
    /// with saves of runs), so each is planned on the book as it stands.
    pub async fn change_agents<E>(
        self: &Arc<Self>,
        plan: impl FnOnce(&AgentBook, SystemTime) -> Result<AgentChange, E>,
    ) -> Result<Result<AgentChange, E>, SaveError> {
        let writing = Arc::clone(&self.writing).lock_owned().await;
        let change = match plan(&lock(&self.agents), SystemTime::now()) {
            Ok(change) => change,
            Err(refused) => return Ok(Err(refused)),
        };
        // Saved and applied in a task of its own, as in `write`: a caller
        // that goes away mid-save must not leave the change half done.
        let ledger = Arc::clone(self);
        let settled = tokio::spawn(async move {
            let _writing = writing;
            if let Some(store) = &ledger.store {
                store.save_agents(change.clone()).await?;
            }
            lock(&ledger.agents).apply(change.clone());
            Ok(change)
        })
        .await;
        match settled {
            Ok(saved) => saved.map(Ok),
            Err(join) => Err(SaveError {
                path: self.store.as_ref().map(Store::path).unwrap_or_default(),
                source: std::io::Error::other(join),
            }),
        }
    }

    /// Waits for a save in flight, then closes the store, so the data dir
    /// is free for the next plane; changes after this fail to save (and
    /// are undone).
    pub async fn close(&self) {
        let _writing = self.writing.lock().await;
        if let Some(store) = &self.store {
            store.close();
        }
    }

    /// Makes the store's writes fail, as a failing disk would (`false`:
    /// work again); for tests of what the plane does then.
    pub fn fail_disk_writes(&self, failing: bool) {
        if let Some(store) = &self.store {
            store.fail_writes(failing);
        }
    }

    /// Closes the store without waiting (a plane dropped without
    /// `shutdown`): a save in flight still completes.
    pub fn close_now(&self) {
        if let Some(store) = &self.store {
            store.close();
        }
    }

    /// A future that completes at the next wake-up for pullers. Create it
    /// (and `enable` it) before polling, so a run submitted between the
    /// poll and the wait is not missed.
    pub fn work_notified(&self) -> Notified<'_> {
        self.work.notified()
    }

    fn wake(&self, wake: bool) {
        if wake {
            self.work.notify_waiters();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PlaneState> {
        // A panic while holding the lock leaves the state as consistent as
        // each single method left it; keep serving rather than cascade.
        lock(&self.state)
    }
}
