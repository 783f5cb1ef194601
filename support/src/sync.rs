//! Locks that outlive a panic.
//!
//! Every mutex in the node guards data that stays consistent between
//! statements (a map, a counter, a cached value), so a holder that
//! panicked leaves nothing half-done: the next caller takes the data as it
//! is instead of panicking in turn.

use std::sync::{Mutex, MutexGuard};

/// `mutex.lock()`, recovering the guard from a poisoned lock.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_hands_out_its_data() {
        let mutex = std::sync::Arc::new(Mutex::new(1));
        let held = std::sync::Arc::clone(&mutex);
        let _ = std::thread::spawn(move || {
            let _guard = held.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(mutex.is_poisoned());
        *lock(&mutex) += 1;
        assert_eq!(*lock(&mutex), 2);
    }
}
