//! The one place that chooses between `std`/`parking_lot` primitives and loom's models.
//!
//! Every other module imports its atomics, locks, condition variables, threads and
//! thread-locals from here, so that `RUSTFLAGS="--cfg loom"` swaps the whole crate onto
//! loom's model checker without a single `cfg` elsewhere. The wrappers give the two worlds
//! one shape: `lock()` returns a guard directly (no poisoning), and a condition variable
//! takes the guard and hands it back.

#[cfg(not(loom))]
mod imp {
    pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize};
    pub(crate) use std::sync::Arc;
    pub(crate) use std::thread;

    /// A mutex without poisoning.
    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T>(parking_lot::Mutex<T>);
    pub(crate) type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(parking_lot::Mutex::new(value))
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock()
        }
        pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.0.try_lock()
        }
    }

    /// A condition variable whose `wait` takes the guard and returns it re-locked.
    #[derive(Debug, Default)]
    pub(crate) struct Condvar(parking_lot::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Self {
            Self(parking_lot::Condvar::new())
        }
        pub(crate) fn wait<'a, T>(&self, mut guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
            self.0.wait(&mut guard);
            guard
        }
        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
    }

    /// Waits a little while a condition polled by a grace period is still false: spins
    /// briefly, then yields, then sleeps with a growing delay (at most 1 ms).
    pub(crate) struct Backoff(u32);

    impl Backoff {
        pub(crate) fn new() -> Self {
            Self(0)
        }
        pub(crate) fn snooze(&mut self) {
            self.0 = self.0.saturating_add(1);
            if self.0 <= 16 {
                std::hint::spin_loop();
            } else if self.0 <= 64 {
                std::thread::yield_now();
            } else {
                let micros = 1u64 << (self.0 - 64).min(10);
                std::thread::sleep(std::time::Duration::from_micros(micros));
            }
        }
    }

    pub(crate) use std::thread_local;
}

#[cfg(loom)]
mod imp {
    pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize};
    pub(crate) use loom::sync::Arc;
    pub(crate) use loom::thread;

    /// A mutex without poisoning (loom's, unwrapped).
    #[derive(Debug)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);
    pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(loom::sync::Mutex::new(value))
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap()
        }
        pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.0.try_lock().ok()
        }
    }

    impl<T: Default> Default for Mutex<T> {
        fn default() -> Self {
            Self::new(T::default())
        }
    }

    /// loom's condition variable.
    #[derive(Debug, Default)]
    pub(crate) struct Condvar(loom::sync::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Self {
            Self(loom::sync::Condvar::new())
        }
        pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
            self.0.wait(guard).unwrap()
        }
        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
    }

    /// Under loom every wait loop must yield so the scheduler can run the thread it waits for.
    pub(crate) struct Backoff;

    impl Backoff {
        pub(crate) fn new() -> Self {
            Self
        }
        pub(crate) fn snooze(&mut self) {
            loom::thread::yield_now();
        }
    }

    pub(crate) use loom::thread_local;
}

pub(crate) use imp::*;

/// Pads and aligns a value to 128 bytes so two of them never share a cache line (nor the
/// adjacent-line pair x86 prefetches together).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}
