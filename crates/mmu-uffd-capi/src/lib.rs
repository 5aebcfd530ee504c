//! # mmu-uffd-capi
//!
//! The C library of `mmu-uffd`: a userfaultfd memory monitor and a registration cache that
//! never hands out a stale registration, for registration caches that live in C
//! (communication libraries registering memory with a NIC, for instance).
//!
//! The header is `include/mmu_uffd.h` (generated from this crate's documentation comments
//! with cbindgen by the `header` test, and committed); the libraries are
//! `libmmu_uffd_capi.so` and `libmmu_uffd_capi.a`; `mmu_uffd.pc.in` is the pkg-config
//! template (`@PREFIX@` and `@VERSION@` are filled in at installation).
//!
//! ## Conventions
//!
//! - Every function whose name does not say otherwise returns an `int`: zero (or a count)
//!   on success, a negative errno value on failure. After a failure,
//!   `mmu_uffd_last_error()` returns a message for it; the message belongs to the calling
//!   thread and stays valid until the next failed call on that thread (successful calls
//!   leave it alone).
//! - Objects are opaque and created through out-parameters (`mmu_uffd_monitor_new(&cfg,
//!   &monitor)`); each has a `_free` (or `_put`) function that accepts NULL.
//! - A NULL pointer where an object or out-parameter is needed, or a zero or overflowing
//!   length, is `-EINVAL`. Memory addresses passed to `watch`, `get` and so on are only
//!   used as numbers (never read or written by this library), so any value is safe; a
//!   dangling or already freed object pointer, or an object used after its `_free`, is
//!   undefined behavior, as in any C library.
//! - No panic crosses the boundary: a panic (a bug in this library) is caught and returned
//!   as `-ENOTRECOVERABLE` with its message.
//!
//! ## Errors
//!
//! | errno | meaning |
//! | --- | --- |
//! | `EINVAL` | NULL pointer argument, zero or overflowing length, invalid configuration |
//! | `ENOSYS` | userfaultfd is unavailable to this process (permissions, seccomp, kernel configuration); the message says why |
//! | `EOPNOTSUPP` | this kernel's userfaultfd lacks a feature the monitor needs |
//! | `ESHUTDOWN` | the monitor has stopped (freed, or its thread failed): caches on it fail from then on |
//! | `ECANCELED` | the registrar's `reg` callback failed (its own return value is in the message) |
//! | `EAGAIN` | every registration attempt collided with an invalidation of the range (the memory keeps changing), or a thread could not be started |
//! | `EDEADLK` | called from the monitor thread, where waiting would wait for itself |
//! | `ECHILD` | used in a forked child: the monitor belongs to the parent process |
//! | the kernel's | the memory could not be watched (Linux answers `EINVAL` both for memory that is not mapped and for a memory type userfaultfd cannot watch on this kernel; the message says `cannot watch`) |
//! | `ENOTRECOVERABLE` | a bug in this library (a caught panic) |
//! | `EIO` | any other failure |
//!
//! ## Threads
//!
//! Monitors and caches may be used from any number of threads at once. A registration
//! handle (`mmu_uffd_reg`) may be read from any thread, and put on any thread, once. The
//! registrar's `user` pointer must be usable from any thread: `reg` runs on the thread
//! whose `mmu_uffd_cache_get` missed, `dereg` on the thread that drops the last reference
//! to a registration (`mmu_uffd_reg_put`, or a cache call that evicts or removes it, or
//! `mmu_uffd_cache_free`), never on the monitor's own threads, and never with a lock of the
//! cache held (the callbacks may call into the cache).

#![deny(missing_docs)]

// Built on mmu-uffd, which watches memory with Linux's userfaultfd: Linux-only.
// `--cfg mmu_uffd_pretend_not_linux` triggers the message on Linux, to test it.
#[cfg(any(not(target_os = "linux"), mmu_uffd_pretend_not_linux))]
compile_error!(
    "mmu-uffd-capi supports Linux only: it is the C library of mmu-uffd, which watches \
     memory with Linux's userfaultfd."
);

mod cache;
mod error;
mod libfabric;
mod monitor;
mod util;

pub use cache::*;
pub use monitor::*;

use std::ffi::c_char;

/// The message of the last failed `mmu_uffd_` call on the calling thread, or an empty
/// string if none has failed on it. The string belongs to the library and stays valid
/// until the next failed call on this thread. Thread-safe (each thread has its own).
#[no_mangle]
pub extern "C" fn mmu_uffd_last_error() -> *const c_char {
    error::last_error_ptr()
}
