//! The registration cache: `mmu_uffd_cache_*`, `mmu_uffd_reg_*`.

use std::ffi::{c_int, c_void};
use std::fmt;

use mmu_uffd::{CacheConfig, CachedRegistration, KeyedRegistrar, RegCache};

use crate::error::{ffi_call, ffi_call_or, FfiError};
use crate::monitor::mmu_uffd_monitor;
use crate::util::{obj, out_slot};

/// Registers `[addr, addr + len)` (whole pages) and stores the registration's key in
/// `*key_out`; returns 0, or a negative errno value if the registration failed (the cache
/// call then fails with `-ECANCELED`, the value in its message). Runs on the thread whose
/// `mmu_uffd_cache_get` missed, without any lock of the cache held.
#[allow(non_camel_case_types)]
pub type mmu_uffd_reg_fn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        addr: *mut c_void,
        len: usize,
        key_out: *mut u64,
    ) -> c_int,
>;

/// Registers `[addr, addr + len)` (whole pages) with the attributes `*attrs` (never
/// NULL: all zeros for lookups without attributes) and stores the registration's key in
/// `*key_out`; returns 0 or a negative errno value, as `mmu_uffd_reg_fn`.
#[allow(non_camel_case_types)]
pub type mmu_uffd_reg_attrs_fn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        addr: *mut c_void,
        len: usize,
        attrs: *const mmu_uffd_attrs,
        key_out: *mut u64,
    ) -> c_int,
>;

/// Registration attributes, part of a cache entry's key with its range (as libfabric
/// keys its MR cache by access flags and device): lookups with different attributes never
/// share an entry, even for the same memory. All zeros is "no attributes" (what
/// `mmu_uffd_cache_get` uses).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct mmu_uffd_attrs {
    /// Access flags (for example `FI_READ | FI_WRITE` or `IBV_ACCESS_*`).
    pub access: u64,
    /// The device (or protection domain, or interface) the registration is for.
    pub device: u64,
}

/// Releases the registration `key`. Runs on whichever thread drops the last reference to
/// it (`mmu_uffd_reg_put`, or a cache call that evicts, purges or clears it, or
/// `mmu_uffd_cache_free`), never on the monitor's threads and without any lock of the
/// cache held.
#[allow(non_camel_case_types)]
pub type mmu_uffd_dereg_fn = Option<unsafe extern "C" fn(user: *mut c_void, key: u64)>;

/// How a cache creates and releases registrations (for example memory regions of a NIC).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mmu_uffd_registrar {
    /// Creates a registration (required unless `reg_attrs` is set; unused if it is).
    pub reg: mmu_uffd_reg_fn,
    /// Releases one (NULL if there is nothing to release).
    pub dereg: mmu_uffd_dereg_fn,
    /// Passed to every callback. It must be usable from any thread and stay valid until
    /// the cache is freed and every handle from it has been put.
    pub user: *mut c_void,
    /// Creates a registration with the lookup's attributes (NULL: `reg` is called, and
    /// the attributes only keep entries apart).
    pub reg_attrs: mmu_uffd_reg_attrs_fn,
}

/// How a cache behaves. Start from `mmu_uffd_cache_config_default()` (a NULL
/// configuration pointer means the defaults).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mmu_uffd_cache_config {
    /// Most entries kept (the least recently used are evicted); 0 means the default, 1024.
    pub capacity: usize,
    /// On a miss overlapping cached entries, register their union (default true).
    pub merge: bool,
    /// Close the address-reuse window (default true): before answering a hit, ask the
    /// kernel whether an unmap of watched memory by another thread is still in flight, and
    /// wait for it (one system call per hit). Turn it off only if no thread can map memory
    /// at an address whose munmap by another thread has not yet returned.
    pub reuse_check: bool,
    /// Registrations of one lookup that may collide with invalidations before it fails
    /// with `-EAGAIN`; 0 means the default, 64.
    pub max_attempts: u32,
    /// Most bytes the cached ranges add up to (the least recently used are evicted, as
    /// for `capacity`; a single longer range is registered but not cached); 0 means no
    /// limit (the default). libfabric's `FI_MR_CACHE_MAX_SIZE`.
    pub max_bytes: u64,
    /// Watch leases of evicted entries the cache keeps (default 1024), taken as given:
    /// 0 keeps none. An entry evicted while valid and unused leaves its memory registered
    /// with the monitor, so that the next miss on that memory makes no system call; a
    /// retained lease vouches for nothing (a miss still checks the memory as for any
    /// miss). The cost: an `madvise` that frees retained memory waits for the monitor, as
    /// on cached memory. `mmu_uffd_cache_clear` drops them.
    pub retained: usize,
}

/// Counters of a cache (`mmu_uffd_cache_get_stats`).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct mmu_uffd_cache_stats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that created a registration.
    pub misses: u64,
    /// Entries found invalidated (each then counted as a miss).
    pub invalidated_found: u64,
    /// Registrations that collided with an invalidation and were made again (the dropped
    /// registration is counted in `registered` too).
    pub retries: u64,
    /// Entries evicted to respect the capacity.
    pub evictions: u64,
    /// Registrations of the union with overlapping entries.
    pub merges: u64,
    /// Registrations created. Each is counted once more where it went: `entries`,
    /// `evictions`, `invalidated_found`, `replaced`, `retries`, `uncached`, or among the
    /// entries `mmu_uffd_cache_clear` removed.
    pub registered: u64,
    /// Entries currently cached.
    pub entries: u64,
    /// `mmu_uffd_cache_find` calls that found nothing (and registered nothing).
    pub not_found: u64,
    /// Registrations handed out but not cached: longer than `max_bytes`.
    pub uncached: u64,
    /// Bytes the cached ranges add up to.
    pub bytes: u64,
    /// Entries removed because a newer overlapping entry (a merge's union, or a
    /// concurrent fill) was inserted.
    pub replaced: u64,
}

/// The C callbacks as a [`KeyedRegistrar`] of [`mmu_uffd_attrs`].
struct CRegistrar {
    reg: mmu_uffd_reg_fn,
    reg_attrs: mmu_uffd_reg_attrs_fn,
    dereg: mmu_uffd_dereg_fn,
    user: *mut c_void,
}

// SAFETY: the C caller promises (see `mmu_uffd_registrar::user`) that the callbacks and
// `user` may be used from any thread, at the same time.
unsafe impl Send for CRegistrar {}
// SAFETY: as above.
unsafe impl Sync for CRegistrar {}

/// A failed `reg` callback: its return value.
#[derive(Debug)]
struct RegFailed(c_int);

impl fmt::Display for RegFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < 0 {
            let os = std::io::Error::from_raw_os_error(-self.0);
            write!(f, "the registrar's reg returned {} ({os})", self.0)
        } else {
            write!(
                f,
                "the registrar's reg returned {} (not 0 or a negative errno)",
                self.0
            )
        }
    }
}

impl std::error::Error for RegFailed {}

impl KeyedRegistrar<mmu_uffd_attrs> for CRegistrar {
    type Registration = u64;
    type Error = RegFailed;

    fn register_with(
        &self,
        attrs: &mmu_uffd_attrs,
        ptr: *mut u8,
        len: usize,
    ) -> Result<u64, RegFailed> {
        let mut key = 0u64;
        // SAFETY: function pointers the C caller gave for this purpose (`mmu_uffd_cache_new`
        // checked that one of them is set), called with its own `user` pointer, a valid
        // attributes pointer and a valid out-pointer.
        let rc = unsafe {
            match (self.reg_attrs, self.reg) {
                (Some(reg_attrs), _) => reg_attrs(self.user, ptr.cast(), len, attrs, &mut key),
                (None, Some(reg)) => reg(self.user, ptr.cast(), len, &mut key),
                (None, None) => -libc::EINVAL,
            }
        };
        if rc == 0 {
            Ok(key)
        } else {
            Err(RegFailed(rc))
        }
    }

    fn deregister_with(&self, _: &mmu_uffd_attrs, key: u64) {
        if let Some(dereg) = self.dereg {
            // SAFETY: as in `register`.
            unsafe { dereg(self.user, key) };
        }
    }
}

/// A registration cache (opaque): `mmu_uffd_cache_get` returns a registration covering a
/// range, from the cache if a valid one exists, never one that an unmap, move or madvise
/// of the range (returned before the call) made stale. Thread-safe: every function taking
/// a cache may be called from any number of threads at once (except `mmu_uffd_cache_free`).
#[allow(non_camel_case_types)]
pub struct mmu_uffd_cache {
    inner: RegCache<CRegistrar, mmu_uffd_attrs>,
}

/// A handle to a cached registration (opaque). The registration stays registered while
/// the handle exists. Readable from any thread; put it (once) with `mmu_uffd_reg_put`.
#[allow(non_camel_case_types)]
pub struct mmu_uffd_reg {
    inner: CachedRegistration<CRegistrar, mmu_uffd_attrs>,
}

/// The default cache configuration: capacity 1024, merge on, reuse check on, 64 attempts,
/// no limit in bytes, 1024 retained watch leases.
#[no_mangle]
pub extern "C" fn mmu_uffd_cache_config_default() -> mmu_uffd_cache_config {
    let d = CacheConfig::default();
    mmu_uffd_cache_config {
        capacity: d.capacity,
        merge: d.merge,
        reuse_check: d.reuse_check,
        max_attempts: d.max_attempts,
        max_bytes: d.max_bytes.unwrap_or(0),
        retained: d.retained,
    }
}

/// Creates a cache on `monitor`'s address space with `registrar`'s callbacks (copied) and
/// stores it in `*cache_out` (NULL on failure). `config` may be NULL for the defaults.
/// Returns 0, or `-EINVAL` for a NULL `monitor`, `registrar` or `cache_out`, or when
/// both `registrar->reg` and `registrar->reg_attrs` are NULL. The cache may outlive the monitor (then lookups fail with `-ESHUTDOWN`).
/// Thread-safe.
///
/// # Safety
/// `monitor` is NULL or a live monitor; `config` and `registrar` are NULL or point to
/// their structures; `cache_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_cache_new(
    monitor: *const mmu_uffd_monitor,
    config: *const mmu_uffd_cache_config,
    registrar: *const mmu_uffd_registrar,
    cache_out: *mut *mut mmu_uffd_cache,
) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a writable pointer.
        let slot = unsafe { out_slot(cache_out, "cache_out")? };
        // SAFETY: the caller passes NULL or a live monitor.
        let m = unsafe { obj(monitor, "monitor")? };
        // SAFETY: the caller passes NULL or a registrar.
        let r = unsafe { obj(registrar, "registrar")? };
        if r.reg.is_none() && r.reg_attrs.is_none() {
            return Err(FfiError::null("registrar->reg (and registrar->reg_attrs)"));
        }
        // SAFETY: the caller passes NULL or a configuration.
        let c = unsafe { config.as_ref() }
            .copied()
            .unwrap_or_else(|| mmu_uffd_cache_config_default());
        let mut cfg = CacheConfig::default()
            .with_merge(c.merge)
            .with_reuse_check(c.reuse_check)
            .with_retained(c.retained);
        if c.capacity != 0 {
            cfg = cfg.with_capacity(c.capacity);
        }
        if c.max_attempts != 0 {
            cfg.max_attempts = c.max_attempts;
        }
        if c.max_bytes != 0 {
            cfg = cfg.with_max_bytes(c.max_bytes);
        }
        let registrar = CRegistrar {
            reg: r.reg,
            reg_attrs: r.reg_attrs,
            dereg: r.dereg,
            user: r.user,
        };
        let cache = RegCache::keyed(&m.inner, cfg, registrar);
        *slot = Box::into_raw(Box::new(mmu_uffd_cache { inner: cache }));
        Ok(0)
    })
}

/// Frees a cache (NULL is ignored): its entries are released (deregistered on this
/// thread unless a handle still holds them; those are deregistered when put). Must not
/// race with other calls on the same cache; handles from it stay usable.
///
/// # Safety
/// `cache` is NULL or a cache from `mmu_uffd_cache_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_cache_free(cache: *mut mmu_uffd_cache) {
    let _ = ffi_call(|| {
        if !cache.is_null() {
            // SAFETY: the caller passes a cache made by `Box::into_raw` and gives it up.
            drop(unsafe { Box::from_raw(cache) });
        }
        Ok(0)
    });
}

/// Looks up a registration covering `[addr, addr + len)`: a cached valid one (a hit), or
/// a new one from the registrar's `reg` over the whole pages (a miss; the memory is
/// watched first). Stores a new handle in `*reg_out` (NULL on failure). Returns 0, or
/// `-EINVAL` (NULL argument, zero or overflowing length), the kernel's error if the
/// memory cannot be watched (`-EINVAL` from Linux for unmapped memory), `-ECANCELED` if
/// `reg` failed, `-EAGAIN` if the memory kept changing under every attempt, `-ESHUTDOWN`
/// if the monitor has stopped. `reg` (on a miss) and `dereg` (of entries evicted or
/// invalidated meanwhile) may run on this thread during the call. Thread-safe.
///
/// # Safety
/// `cache` is NULL or a live cache; `reg_out` is NULL or writable. `addr` is only used as
/// a number.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_cache_get(
    cache: *const mmu_uffd_cache,
    addr: *const c_void,
    len: usize,
    reg_out: *mut *mut mmu_uffd_reg,
) -> c_int {
    // SAFETY: the caller's contract is `mmu_uffd_cache_get_attrs`'s, with NULL attributes.
    unsafe { mmu_uffd_cache_get_attrs(cache, addr, len, std::ptr::null(), reg_out) }
}

/// `mmu_uffd_cache_get` with registration attributes: a registration covering
/// `[addr, addr + len)` made with `*attrs` (NULL: all zeros, as `mmu_uffd_cache_get`),
/// cached if a valid one with equal attributes exists, else new (through the registrar's
/// `reg_attrs`, or `reg`). Returns as `mmu_uffd_cache_get`. Thread-safe.
///
/// # Safety
/// As `mmu_uffd_cache_get`; `attrs` is NULL or points to attributes.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_cache_get_attrs(
    cache: *const mmu_uffd_cache,
    addr: *const c_void,
    len: usize,
    attrs: *const mmu_uffd_attrs,
    reg_out: *mut *mut mmu_uffd_reg,
) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a writable pointer.
        let slot = unsafe { out_slot(reg_out, "reg_out")? };
        // SAFETY: the caller passes NULL or a live cache.
        let c = unsafe { obj(cache, "cache")? };
        // SAFETY: the caller passes NULL or attributes.
        let a = unsafe { attrs.as_ref() }.copied().unwrap_or_default();
        let handle = c.inner.get_with(&a, addr.cast(), len)?;
        *slot = Box::into_raw(Box::new(mmu_uffd_reg { inner: handle }));
        Ok(0)
    })
}

/// Looks up a cached valid registration covering `[addr, addr + len)` made with `*attrs`
/// (NULL: all zeros) without ever registering (libfabric's `ofi_mr_cache_find`): never
/// one that an unmap, move or madvise of the range, returned before this call, made
/// stale. Returns 1 with a new handle in `*reg_out`, 0 with NULL there if no such entry
/// is cached, or a negative errno value as `mmu_uffd_cache_get` (no `-ECANCELED` nor
/// `-EAGAIN`: nothing is registered). Thread-safe.
///
/// # Safety
/// As `mmu_uffd_cache_get`; `attrs` is NULL or points to attributes.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_cache_find(
    cache: *const mmu_uffd_cache,
    addr: *const c_void,
    len: usize,
    attrs: *const mmu_uffd_attrs,
    reg_out: *mut *mut mmu_uffd_reg,
) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a writable pointer.
        let slot = unsafe { out_slot(reg_out, "reg_out")? };
        // SAFETY: the caller passes NULL or a live cache.
        let c = unsafe { obj(cache, "cache")? };
        // SAFETY: the caller passes NULL or attributes.
        let a = unsafe { attrs.as_ref() }.copied().unwrap_or_default();
        Ok(match c.inner.find_with(&a, addr.cast(), len)? {
            Some(handle) => {
                *slot = Box::into_raw(Box::new(mmu_uffd_reg { inner: handle }));
                1
            }
            None => 0,
        })
    })
}

/// Invalidates every entry overlapping `[addr, addr + len)` now (for changes the kernel
/// does not report, such as mprotect). Returns 0 or `-EINVAL`. Thread-safe.
///
/// # Safety
/// `cache` is NULL or a live cache. `addr` is only used as a number.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_cache_invalidate(
    cache: *const mmu_uffd_cache,
    addr: *const c_void,
    len: usize,
) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a live cache.
        let c = unsafe { obj(cache, "cache")? };
        c.inner.invalidate(addr.cast(), len)?;
        Ok(0)
    })
}

/// Removes the invalidated entries now (lookups do it by themselves), deregistering those
/// no handle holds, on this thread. Returns how many were removed (at most `INT_MAX`), or
/// `-EINVAL` for NULL. Thread-safe.
///
/// # Safety
/// `cache` is NULL or a live cache.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_cache_purge(cache: *const mmu_uffd_cache) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a live cache.
        let c = unsafe { obj(cache, "cache")? };
        Ok(c_int::try_from(c.inner.purge_invalid()).unwrap_or(c_int::MAX))
    })
}

/// Removes every entry (those a handle holds stay registered until put). Returns 0 or
/// `-EINVAL` for NULL. Thread-safe.
///
/// # Safety
/// `cache` is NULL or a live cache.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_cache_clear(cache: *const mmu_uffd_cache) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a live cache.
        let c = unsafe { obj(cache, "cache")? };
        c.inner.clear();
        Ok(0)
    })
}

/// The number of entries (after removing those invalidated by the calls that returned
/// before this one), at most `INT_MAX`, or `-EINVAL` for NULL. Thread-safe.
///
/// # Safety
/// `cache` is NULL or a live cache.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_cache_len(cache: *const mmu_uffd_cache) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a live cache.
        let c = unsafe { obj(cache, "cache")? };
        Ok(c_int::try_from(c.inner.len()).unwrap_or(c_int::MAX))
    })
}

/// Stores the cache's counters in `*stats_out` (after removing the entries invalidated by
/// the calls that returned before this one). Returns 0 or `-EINVAL`. Thread-safe.
///
/// # Safety
/// `cache` is NULL or a live cache; `stats_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_cache_get_stats(
    cache: *const mmu_uffd_cache,
    stats_out: *mut mmu_uffd_cache_stats,
) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a live cache.
        let c = unsafe { obj(cache, "cache")? };
        if stats_out.is_null() {
            return Err(FfiError::null("stats_out"));
        }
        let s = c.inner.stats();
        let out = mmu_uffd_cache_stats {
            hits: s.hits,
            misses: s.misses,
            invalidated_found: s.invalidated_found,
            retries: s.retries,
            evictions: s.evictions,
            merges: s.merges,
            registered: s.registered,
            entries: s.entries as u64,
            not_found: s.not_found,
            uncached: s.uncached,
            bytes: s.bytes,
            replaced: s.replaced,
        };
        // SAFETY: non-null and writable by the caller's promise.
        unsafe { stats_out.write(out) };
        Ok(0)
    })
}

/// The registration's key (what `reg` stored), or 0 for NULL. Thread-safe.
///
/// # Safety
/// `reg` is NULL or a handle not yet put.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_reg_key(reg: *const mmu_uffd_reg) -> u64 {
    ffi_call_or(0, || {
        // SAFETY: the caller passes NULL or a live handle.
        Ok(*unsafe { obj(reg, "reg")? }.inner.registration())
    })
}

/// Stores the attributes the registration was made with in `*attrs_out`. Returns 0 or
/// `-EINVAL` for NULL. Thread-safe.
///
/// # Safety
/// `reg` is NULL or a handle not yet put; `attrs_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_reg_attrs(
    reg: *const mmu_uffd_reg,
    attrs_out: *mut mmu_uffd_attrs,
) -> c_int {
    ffi_call(|| {
        // SAFETY: the caller passes NULL or a live handle.
        let r = unsafe { obj(reg, "reg")? };
        if attrs_out.is_null() {
            return Err(FfiError::null("attrs_out"));
        }
        // SAFETY: non-null and writable by the caller's promise.
        unsafe { attrs_out.write(*r.inner.attrs()) };
        Ok(0)
    })
}

/// The registered range's start (page-aligned, at or below the address asked for), or
/// NULL for NULL. Thread-safe.
///
/// # Safety
/// `reg` is NULL or a handle not yet put.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_reg_start(reg: *const mmu_uffd_reg) -> *mut c_void {
    ffi_call_or(std::ptr::null_mut(), || {
        // SAFETY: the caller passes NULL or a live handle.
        Ok(unsafe { obj(reg, "reg")? }.inner.start().cast())
    })
}

/// The registered range's length in bytes (whole pages, covering the range asked for),
/// or 0 for NULL. Thread-safe.
///
/// # Safety
/// `reg` is NULL or a handle not yet put.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_reg_len(reg: *const mmu_uffd_reg) -> usize {
    ffi_call_or(0, || {
        // SAFETY: the caller passes NULL or a live handle.
        Ok(unsafe { obj(reg, "reg")? }.inner.len())
    })
}

/// Whether no invalidation has hit the registered range since it was registered (after
/// waiting, like a lookup, for the events of calls that returned before this one; false
/// once the monitor has stopped, and for NULL). A handle that went invalid must not be
/// used for new I/O: put it and ask the cache again. Thread-safe.
///
/// # Safety
/// `reg` is NULL or a handle not yet put.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_reg_is_valid(reg: *const mmu_uffd_reg) -> bool {
    ffi_call_or(false, || {
        // SAFETY: the caller passes NULL or a live handle.
        Ok(unsafe { obj(reg, "reg")? }.inner.is_valid())
    })
}

/// Puts a handle (NULL is ignored). If it was the last reference to a registration that
/// is no longer cached (invalidated, evicted, cleared, or its cache freed), the
/// registrar's `dereg` runs now, on this thread. Must not race with other calls on the
/// same handle.
///
/// # Safety
/// `reg` is NULL or a handle from `mmu_uffd_cache_get` not yet put.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_reg_put(reg: *mut mmu_uffd_reg) {
    let _ = ffi_call(|| {
        if !reg.is_null() {
            // SAFETY: the caller passes a handle made by `Box::into_raw` and gives it up.
            drop(unsafe { Box::from_raw(reg) });
        }
        Ok(0)
    });
}
