//! The monitor: `mmu_uffd_monitor_*`.

use std::ffi::{c_int, c_void};
use std::time::Duration;

use mmu_uffd::{Monitor, MonitorConfig};

use crate::error::{ffi_call, FfiError};
use crate::util::{obj, out_slot};

/// A userfaultfd monitor of this process's memory (opaque). Create it with
/// `mmu_uffd_monitor_new`, free it with `mmu_uffd_monitor_free`. Thread-safe: every
/// function taking a monitor may be called from any number of threads at once.
#[allow(non_camel_case_types)]
pub struct mmu_uffd_monitor {
    pub(crate) inner: Monitor,
}

/// How a monitor is set up. All zeros is the default configuration (a NULL configuration
/// pointer means the same).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct mmu_uffd_monitor_config {
    /// Ask for FORK events (needs `CAP_SYS_PTRACE`): each fork then waits until the
    /// monitor has closed the child's userfaultfd. Off by default: a child then simply
    /// inherits no watched memory.
    pub fork_events: bool,
    /// Keep polling for this many nanoseconds after the last event before the monitor
    /// thread sleeps again (trades CPU time for unmap latency during bursts); 0 always
    /// sleeps, `UINT64_MAX` never sleeps (a dedicated core).
    pub busy_poll_ns: u64,
}

/// Counters of a monitor (`mmu_uffd_monitor_get_stats`).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct mmu_uffd_monitor_stats {
    /// Busy periods (one wake-up, one or more reads).
    pub batches: u64,
    /// UNMAP events (munmap, `MAP_FIXED` over watched memory).
    pub unmaps: u64,
    /// REMOVE events (madvise `DONTNEED`/`FREE`/`REMOVE`).
    pub removes: u64,
    /// REMAP events (mremap moves).
    pub remaps: u64,
    /// FORK events (each child's descriptor closed).
    pub forks: u64,
    /// Page-fault messages (never expected; each was answered so the thread went on).
    pub unexpected_faults: u64,
    /// Messages of an unknown event type.
    pub unknown: u64,
    /// Invalidations delivered to the caches (counted when applied: call
    /// `mmu_uffd_monitor_sync` first to include every one).
    pub invalidations: u64,
    /// Kernel registrations made to watch memory.
    pub watch_registrations: u64,
    /// Invalidations merged into a covering range while the monitor's queue was full.
    pub merged: u64,
    /// Reads that backed off for lack of a descriptor slot (fork events).
    pub read_backoffs: u64,
    /// Ranges no longer watched because no cache entry needed them any more.
    pub unwatched: u64,
}

/// Starts a monitor (one userfaultfd and two threads) and stores it in `*monitor_out`
/// (NULL on failure). `config` may be NULL for the defaults. Returns 0, or `-ENOSYS`
/// where userfaultfd is unavailable to this process and `-EOPNOTSUPP` where the kernel
/// lacks a needed feature (`mmu_uffd_last_error()` says why), `-EINVAL` for a NULL
/// `monitor_out`. Thread-safe.
///
/// # Safety
/// `config` is NULL or points to a configuration; `monitor_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_monitor_new(
    config: *const mmu_uffd_monitor_config,
    monitor_out: *mut *mut mmu_uffd_monitor,
) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a writable pointer.
        let slot = unsafe { out_slot(monitor_out, "monitor_out")? };
        // SAFETY: the caller passes NULL or a valid configuration.
        let config = unsafe { config.as_ref() }.copied().unwrap_or_default();
        let busy_poll = match config.busy_poll_ns {
            u64::MAX => Duration::MAX,
            ns => Duration::from_nanos(ns),
        };
        let monitor = Monitor::with_config(
            MonitorConfig::default()
                .with_fork_events(config.fork_events)
                .with_busy_poll(busy_poll),
        )?;
        *slot = Box::into_raw(Box::new(mmu_uffd_monitor { inner: monitor }));
        Ok(0)
    })
}

/// Stops and frees a monitor (NULL is ignored). Caches created on it stay usable as
/// objects (they keep the state they share with it alive) but every lookup on them then
/// fails with `-ESHUTDOWN` and every registration handle reads as invalid; free them as
/// usual. Must not race with other calls on the same monitor.
///
/// # Safety
/// `monitor` is NULL or a monitor from `mmu_uffd_monitor_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_monitor_free(monitor: *mut mmu_uffd_monitor) {
    let _ = ffi_call(|| {
        if !monitor.is_null() {
            // SAFETY: the caller passes a monitor made by `Box::into_raw` and gives it up.
            drop(unsafe { Box::from_raw(monitor) });
        }
        Ok(0)
    });
}

/// Starts watching `[addr, addr + len)` (widened to whole pages): its unmaps, moves and
/// madvise then invalidate the caches' entries over it. Caches watch the memory they
/// register by themselves; this is for callers of the monitor alone. Returns 0, `-EINVAL`
/// for NULL `monitor` or a zero or overflowing length, the kernel's error (negative) if
/// the memory cannot be watched, `-ESHUTDOWN` if the monitor has stopped. Thread-safe.
///
/// # Safety
/// `monitor` is NULL or a live monitor. `addr` is only used as a number.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_monitor_watch(
    monitor: *const mmu_uffd_monitor,
    addr: *const c_void,
    len: usize,
) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a live monitor.
        let m = unsafe { obj(monitor, "monitor")? };
        m.inner.watch(addr.cast(), len)?;
        Ok(0)
    })
}

/// Stops watching `[addr, addr + len)` and invalidates it (its later changes would go
/// unseen). Returns 0 or a negative errno as `mmu_uffd_monitor_watch`. Thread-safe.
///
/// # Safety
/// `monitor` is NULL or a live monitor. `addr` is only used as a number.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_monitor_unwatch(
    monitor: *const mmu_uffd_monitor,
    addr: *const c_void,
    len: usize,
) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a live monitor.
        let m = unsafe { obj(monitor, "monitor")? };
        m.inner.unwatch(addr.cast(), len)?;
        Ok(0)
    })
}

/// Waits until every event of the calls that returned before this one (munmap, mremap,
/// madvise of watched memory, by any thread) has been applied to the caches. Returns 0,
/// `-ESHUTDOWN` if the monitor has stopped, `-EDEADLK` on the monitor's own thread,
/// `-EINVAL` for NULL. Thread-safe.
///
/// # Safety
/// `monitor` is NULL or a live monitor.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_monitor_sync(monitor: *const mmu_uffd_monitor) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a live monitor.
        let m = unsafe { obj(monitor, "monitor")? };
        m.inner.sync()?;
        Ok(0)
    })
}

/// Like `mmu_uffd_monitor_sync` without waiting: 1 if every such event has been applied
/// now, 0 if one is still in flight, or a negative errno. Thread-safe.
///
/// # Safety
/// `monitor` is NULL or a live monitor.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_monitor_try_sync(monitor: *const mmu_uffd_monitor) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a live monitor.
        let m = unsafe { obj(monitor, "monitor")? };
        Ok(c_int::from(m.inner.try_sync()?))
    })
}

/// 0 while the monitor runs; `-ESHUTDOWN` once it has stopped (its thread failed), with
/// the reason in `mmu_uffd_last_error()`; `-EINVAL` for NULL. Thread-safe.
///
/// # Safety
/// `monitor` is NULL or a live monitor.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_monitor_stopped(monitor: *const mmu_uffd_monitor) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a live monitor.
        let m = unsafe { obj(monitor, "monitor")? };
        match m.inner.state() {
            mmu_uffd::MonitorState::Running => Ok(0),
            mmu_uffd::MonitorState::Failed(why) => {
                Err(FfiError::from(mmu_uffd::Error::Stopped { why: Some(why) }))
            }
            _ => Err(FfiError::from(mmu_uffd::Error::Stopped { why: None })),
        }
    })
}

/// Stores the monitor's counters in `*stats_out`, including every event of the calls
/// that returned before this one. Returns 0 or `-EINVAL` (NULL argument). Thread-safe.
///
/// # Safety
/// `monitor` is NULL or a live monitor; `stats_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_monitor_get_stats(
    monitor: *const mmu_uffd_monitor,
    stats_out: *mut mmu_uffd_monitor_stats,
) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a live monitor.
        let m = unsafe { obj(monitor, "monitor")? };
        if stats_out.is_null() {
            return Err(FfiError::null("stats_out"));
        }
        let s = m.inner.stats();
        let c = mmu_uffd_monitor_stats {
            batches: s.batches,
            unmaps: s.unmaps,
            removes: s.removes,
            remaps: s.remaps,
            forks: s.forks,
            unexpected_faults: s.unexpected_faults,
            unknown: s.unknown,
            invalidations: s.invalidations,
            watch_registrations: s.watch_registrations,
            merged: s.merged,
            read_backoffs: s.read_backoffs,
            unwatched: s.unwatched,
        };
        // SAFETY: non-null and, by the caller's promise, writable (`write`: no read of the
        // old, possibly uninitialized, contents).
        unsafe { stats_out.write(c) };
        Ok(0)
    })
}
