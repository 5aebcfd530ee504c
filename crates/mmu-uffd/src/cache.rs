//! The registration cache: registrations (an RDMA memory region, an io_uring fixed buffer,
//! a DMA mapping) cached by address range and never handed out stale.
//!
//! # The protocol
//!
//! Each cached entry owns an interval subscription on the monitor's address space and a
//! *validity flag*. The flag is set once, by the fill, under the subscription's user lock
//! after `read_retry` said no invalidation ran; it is cleared by the subscription's
//! `invalidate`, which runs under the same lock. A lookup only hands out an entry whose
//! flag it reads set.
//!
//! - **Fill (a miss).** Insert the subscription, `read_begin`, take a watch lease on the
//!   memory (the lease ends with the entry, and memory no entry covers any more is
//!   unwatched), call the user's `register`, take the user lock: if `read_retry` says an invalidation ran
//!   since `read_begin`, deregister and start again (a bounded number of times); else set
//!   the flag, unlock, and put the entry in the index. The subscription exists before
//!   the memory is examined, so an unmap that happened before the registration but whose
//!   event is applied after it invalidates the new entry: it can cost a miss, never a stale
//!   hit.
//! - **The lease's system calls.** Memory the monitor has not vouched for yet is
//!   registered (`UFFDIO_REGISTER`) and checked for holes (a registration skips holes
//!   silently; the check fails the miss with [`Error::Watch`]): two system calls. Memory
//!   it already registered and checked, with no event on it since, costs none: the
//!   monitor's *verified set* is emptied of a range *before* the invalidation of any event
//!   on it runs, so a lease that found the range verified either covers the same mapped,
//!   registered memory, or comes before an invalidation that will reach this entry (its
//!   subscription exists already). A hole in verified memory can only come from an unmap,
//!   which is such an event; memory unmapped between the lookup and the registration is
//!   the same case (see "Registering" in [`monitor`](crate::monitor)).
//! - **Invalidation in flight.** `read_begin` waits while the subscription is being
//!   invalidated; the event gate (see `gate`) makes every lookup that starts after an
//!   unmapping call returned wait until the monitor has applied that call's event.
//! - **Hit.** Pass the gate, take the index lock, find the one range that can cover the
//!   request, check the flag (Acquire, pairs with the Release clear and set), bump the
//!   entry's reference count and its LRU position; then, with the address-reuse check,
//!   wait until no event is in flight and every event read is applied, and check the flag
//!   again. An entry found invalid is dropped from the index and the lookup goes on as a
//!   miss. (A miss needs no in-flight check: it registers the memory as it is.)
//! - **Release.** A handle is a reference to the entry. When the last one goes (handles
//!   and the index's), the subscription is removed and the user's `deregister` runs, on
//!   that thread: a user thread, never the monitor thread, whose callbacks only ever
//!   clear flags and never hold a reference. Entries are never dropped with the index
//!   lock held.
//! - **Purge.** An invalidation also raises the cache's `dirty` flag. The next `get` (hit
//!   or miss: one relaxed load when clean) or [`RegCache::purge_invalid`] removes every
//!   invalid entry from the index on that user thread, so dead registrations do not keep
//!   old pages pinned, nor hold a registrar's limited slots, until LRU eviction reaches
//!   them.
//! - **Find.** [`RegCache::find`] is a hit without the miss: the same gate, index lookup,
//!   flag check and address-reuse check as `get`, and `None` where `get` would register.
//! - **Bound.** The index holds at most `capacity` entries and, with
//!   [`CacheConfig::max_bytes`], ranges adding up to at most that many bytes: a fill
//!   evicts the least recently used entries *before* it registers until the new range fits
//!   both limits, so a registrar with exactly `capacity` slots never runs out because of the
//!   cache. An evicted entry still in use stays registered until its last handle drops. A
//!   single range longer than `max_bytes` is registered and handed out but not cached
//!   ([`CacheStats::uncached`]).
//! - **Retained leases.** An entry evicted while valid and unused (no handle) hands its
//!   watch lease to the cache, which keeps the last [`CacheConfig::retained`] of them (the
//!   oldest go first; [`RegCache::clear`] drops them all). Its memory stays registered and
//!   verified, so a later miss on it makes no system call, where dropping the lease would
//!   let the monitor unregister it and make that miss register and check it again (and
//!   split and merge the kernel's mappings twice). A retained lease vouches for nothing:
//!   a miss still inserts its subscription first and takes a lease of its own, and the
//!   verified set still forgets the range before any event on it is applied. What it
//!   costs: an madvise on retained memory waits for the monitor, as on cached memory.
//! - **Keys.** An entry's key is its range *and* the caller's attributes (access flags, a
//!   device: any `K` of a [`RegCache<R, K>`], `()` by default): lookups, overlap and merging
//!   only ever consider entries with equal attributes, so registrations of one range with
//!   different attributes are distinct entries. Invalidations concern memory, not
//!   attributes: an unmap invalidates the range under every key.
//! - **Overlap.** Indexed ranges of one key are disjoint. A miss overlapping valid entries
//!   registers their union when it is watchable and registrable (so alternating overlapping
//!   requests do not thrash), else just the request; either way the overlapped entries
//!   leave the index.
//!
//! # What "never stale" means with userfaultfd
//!
//! The kernel reports munmap and mremap after the fact and madvise before the zap, and it
//! tells nobody when an madvise has finished. Guaranteed: a lookup that starts after an
//! unmapping, moving or madvise call has returned never gets an entry registered before
//! that call started. A registration created *while* an madvise of the same range is
//! running (the application uses memory it is freeing at that moment) may pin pages the
//! madvise then drops; applications with such races can bracket their madvise with
//! [`RegCache::invalidate`].
//!
//! The kernel also frees an unmapped address *before* it queues the UNMAP event: a thread
//! that maps new memory at that address while another thread's munmap of it has not yet
//! returned (an allocator handing a just-freed block's address to another thread) could,
//! until the event is applied, look up the old entry. With
//! [`CacheConfig::reuse_check`] (the default) every lookup first asks the kernel whether
//! any event is in flight and waits while one is (see [`Monitor::sync`]), which closes
//! that window for one system call per lookup.
//!
//! # Every query passes the gate
//!
//! `get`, [`CachedRegistration::is_valid`], [`RegCache::purge_invalid`], [`RegCache::len`]
//! and [`RegCache::stats`] all wait, as a lookup does, until the events of calls that
//! returned before them have been applied: right after `munmap` returns, `purge_invalid`
//! removes the entry and `is_valid` is false.

use std::collections::VecDeque;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{Ordering::Acquire, Ordering::Release};
use std::sync::Arc;

use mmu_notifier::{
    Event, IntervalContext, IntervalSubscriber, IntervalSubscription, Range, WouldBlock,
};
use parking_lot::Mutex;

use crate::error::Error;
use crate::lru::LruIndex;
use crate::monitor::{Monitor, Shared, WatchLease};
use crate::sync::{self, AtomicBool};

/// Creates and destroys registrations of memory ranges (for example io_uring fixed
/// buffers, RDMA memory regions, DMA mappings).
pub trait Registrar: Send + Sync + 'static {
    /// What a registration is (a buffer index, a memory-region key, ...).
    type Registration: Send + Sync + 'static;
    /// Why a registration failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Registers `[ptr, ptr + len)` (whole pages).
    fn register(&self, ptr: *mut u8, len: usize) -> Result<Self::Registration, Self::Error>;

    /// Releases a registration. Called on the thread that dropped the last handle to it (or
    /// that evicted or invalidated it), never on the monitor thread and never with the
    /// cache's lock held.
    fn deregister(&self, registration: Self::Registration);
}

/// Caller attributes that are part of a cache entry's key (with its range): access flags,
/// a device, a protection domain... Implemented by every type that can be cloned, compared
/// and hashed, such as `()` (no attributes, the default), integers and tuples of them.
pub trait CacheKey: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static {}

impl<K: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static> CacheKey for K {}

/// A [`Registrar`] whose registrations depend on attributes of the request (access
/// flags, a device): the attributes `K` are part of the cache key, and reach
/// `register_with` and `deregister_with`. Every [`Registrar`] is a `KeyedRegistrar<()>`.
///
/// ```no_run
/// use mmu_uffd::{CacheConfig, KeyedRegistrar, Monitor, RegCache};
///
/// /// Registers with a device's access flags (here: just remembers them).
/// struct Nic;
/// #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
/// struct Access { write: bool, device: u32 }
///
/// impl KeyedRegistrar<Access> for Nic {
///     type Registration = (usize, Access);
///     type Error = std::io::Error;
///     fn register_with(&self, a: &Access, ptr: *mut u8, _len: usize)
///         -> std::io::Result<(usize, Access)> {
///         Ok((ptr as usize, *a)) // e.g. ibv_reg_mr(pd_of(a.device), ptr, len, flags(a))
///     }
///     fn deregister_with(&self, _: &Access, _mr: (usize, Access)) {}
/// }
///
/// let monitor = Monitor::new()?;
/// let cache = RegCache::keyed(&monitor, CacheConfig::default(), Nic);
/// let buf = vec![0u8; 1 << 16];
/// let read = Access { write: false, device: 0 };
/// let write = Access { write: true, device: 0 };
/// let r = cache.get_with(&read, buf.as_ptr(), buf.len())?;
/// let w = cache.get_with(&write, buf.as_ptr(), buf.len())?; // another entry
/// assert_eq!(r.1, read);
/// assert_eq!(w.1, write);
/// assert_eq!(cache.len(), 2);
/// # Ok::<(), mmu_uffd::Error>(())
/// ```
pub trait KeyedRegistrar<K>: Send + Sync + 'static {
    /// What a registration is (a buffer index, a memory-region key, ...).
    type Registration: Send + Sync + 'static;
    /// Why a registration failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Registers `[ptr, ptr + len)` (whole pages) with the attributes `attrs`.
    fn register_with(
        &self,
        attrs: &K,
        ptr: *mut u8,
        len: usize,
    ) -> Result<Self::Registration, Self::Error>;

    /// Releases a registration made with `attrs` (on a user thread, never with the
    /// cache's lock held, as [`Registrar::deregister`]).
    fn deregister_with(&self, attrs: &K, registration: Self::Registration);
}

impl<R: Registrar> KeyedRegistrar<()> for R {
    type Registration = R::Registration;
    type Error = R::Error;
    #[inline]
    fn register_with(&self, _: &(), ptr: *mut u8, len: usize) -> Result<R::Registration, R::Error> {
        self.register(ptr, len)
    }
    #[inline]
    fn deregister_with(&self, _: &(), registration: R::Registration) {
        self.deregister(registration)
    }
}

/// A [`KeyedRegistrar`] made of two closures (see [`RegCache::with_keyed_fns`]).
pub struct KeyedFnRegistrar<F, G> {
    register: F,
    deregister: G,
}

impl<F, G> fmt::Debug for KeyedFnRegistrar<F, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyedFnRegistrar")
    }
}

impl<K, T, E, F, G> KeyedRegistrar<K> for KeyedFnRegistrar<F, G>
where
    T: Send + Sync + 'static,
    E: std::error::Error + Send + Sync + 'static,
    F: Fn(&K, *mut u8, usize) -> Result<T, E> + Send + Sync + 'static,
    G: Fn(&K, T) + Send + Sync + 'static,
{
    type Registration = T;
    type Error = E;
    fn register_with(&self, attrs: &K, ptr: *mut u8, len: usize) -> Result<T, E> {
        (self.register)(attrs, ptr, len)
    }
    fn deregister_with(&self, attrs: &K, registration: T) {
        (self.deregister)(attrs, registration)
    }
}

/// A [`Registrar`] made of two closures (see [`RegCache::with_fns`]).
pub struct FnRegistrar<F, G> {
    register: F,
    deregister: G,
}

impl<F, G> fmt::Debug for FnRegistrar<F, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnRegistrar")
    }
}

impl<T, E, F, G> Registrar for FnRegistrar<F, G>
where
    T: Send + Sync + 'static,
    E: std::error::Error + Send + Sync + 'static,
    F: Fn(*mut u8, usize) -> Result<T, E> + Send + Sync + 'static,
    G: Fn(T) + Send + Sync + 'static,
{
    type Registration = T;
    type Error = E;
    fn register(&self, ptr: *mut u8, len: usize) -> Result<T, E> {
        (self.register)(ptr, len)
    }
    fn deregister(&self, registration: T) {
        (self.deregister)(registration)
    }
}

/// How the cache behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheConfig {
    /// Most entries the index keeps (least recently used are evicted). Default 1024.
    pub capacity: usize,
    /// Most bytes the index's ranges add up to (least recently used are evicted, as for
    /// `capacity`); a single range longer than this is registered but not cached. Default
    /// `None`: no limit in bytes (libfabric's `FI_MR_CACHE_MAX_SIZE`).
    pub max_bytes: Option<u64>,
    /// On a miss overlapping cached entries, try to register their union. Default true.
    pub merge: bool,
    /// Fills of one request that may collide with invalidations before `get` gives up with
    /// [`Error::Contended`]. Default 64.
    pub max_attempts: u32,
    /// Close the address-reuse window (default true): before answering, every lookup and
    /// query asks the kernel whether an unmap, move or madvise of watched memory is still
    /// in flight, and waits while one is (see [`Monitor::sync`]). That costs one system
    /// call per lookup.
    ///
    /// Turn it off only if no thread of the process can map memory at an address while
    /// another thread's munmap (or mremap, or `MAP_FIXED`) of that address has not yet
    /// returned: in practice, only if each thread owns its buffers' address ranges for
    /// good. Allocators hand a just-freed address to the next thread that asks; with two
    /// threads doing that in a loop, 40-70% of lookups returned the registration of the
    /// previous mapping at the address when this check was off.
    pub reuse_check: bool,
    /// Watch leases of evicted entries kept (see "Retained leases" in the module docs):
    /// that memory stays registered with userfaultfd, so a miss on it again makes no
    /// system call, and an madvise on it waits for the monitor. Default 1024; 0 turns it
    /// off (memory no entry needs is unwatched soon after its entry goes). libfabric 1.17
    /// keeps every range it ever cached registered.
    pub retained: usize,
    /// Fault injection for testing checkers: skip the event gate on lookups (stale hits
    /// become likely). Never set it in a program that uses the registrations.
    #[cfg(feature = "fault-injection")]
    pub skip_gate: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            capacity: 1024,
            max_bytes: None,
            merge: true,
            max_attempts: 64,
            reuse_check: true,
            retained: 1024,
            #[cfg(feature = "fault-injection")]
            skip_gate: false,
        }
    }
}

impl CacheConfig {
    /// This configuration with another capacity (at least 1).
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// This configuration with a limit on the bytes the cached ranges add up to: least
    /// recently used entries are evicted to make room, as for the entry count, and a
    /// range longer than the limit is registered but not cached.
    ///
    /// ```no_run
    /// use mmu_uffd::{CacheConfig, Monitor, RegCache};
    /// let monitor = Monitor::new()?;
    /// let cache = RegCache::with_fns(
    ///     &monitor,
    ///     CacheConfig::default().with_max_bytes(1 << 20), // at most 1 MiB registered
    ///     |ptr, _len| Ok::<_, std::io::Error>(ptr as usize),
    ///     |_| {},
    /// );
    /// let a = vec![0u8; 768 << 10];
    /// let b = vec![0u8; 768 << 10];
    /// drop(cache.get(a.as_ptr(), a.len())?);
    /// drop(cache.get(b.as_ptr(), b.len())?); // evicts a's entry: 1.5 MiB would not fit
    /// assert_eq!(cache.len(), 1);
    /// assert!(cache.stats().bytes <= 1 << 20);
    /// # Ok::<(), mmu_uffd::Error>(())
    /// ```
    pub fn with_max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes.max(1));
        self
    }

    /// This configuration with merging on or off.
    pub fn with_merge(mut self, merge: bool) -> Self {
        self.merge = merge;
        self
    }

    /// This configuration with another bound on the fills of one request that may collide
    /// with invalidations before `get` gives up (at least 1).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// This configuration with the address-reuse check on or off (see
    /// [`reuse_check`](Self::reuse_check): off is only for threads that never reuse each
    /// other's addresses).
    pub fn with_reuse_check(mut self, on: bool) -> Self {
        self.reuse_check = on;
        self
    }

    /// This configuration with another number of retained watch leases of evicted entries
    /// (see [`retained`](Self::retained); 0: none).
    pub fn with_retained(mut self, leases: usize) -> Self {
        self.retained = leases;
        self
    }

    /// Fault injection: this configuration with the event gate skipped on lookups, so that
    /// a checker can show it catches the stale hits that follow.
    #[cfg(feature = "fault-injection")]
    pub fn with_gate_skipped(mut self) -> Self {
        self.skip_gate = true;
        self
    }
}

/// Counters of the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups answered from the index.
    pub hits: u64,
    /// Lookups that created a registration.
    pub misses: u64,
    /// Entries found invalidated by a lookup (each then counted as a miss).
    pub invalidated_found: u64,
    /// Fills that collided with an invalidation and started again (each dropped the
    /// registration it had made: counted in `registered` too).
    pub retries: u64,
    /// Entries evicted to respect the capacity.
    pub evictions: u64,
    /// Fills that registered the union with overlapping entries.
    pub merges: u64,
    /// Entries removed because a newer entry overlapping them was inserted (the union a
    /// merge registered, or a concurrent fill of overlapping memory).
    pub replaced: u64,
    /// Registrations created. Each one is counted exactly once more, where it went:
    /// `entries` (still cached), `evictions`, `invalidated_found`, `replaced`, `retries`
    /// (dropped by a fill that collided), `uncached`, or among the entries `clear` removed.
    pub registered: u64,
    /// [`RegCache::find`] lookups that found no valid entry (and registered nothing).
    pub not_found: u64,
    /// Registrations handed out but not cached: longer than [`CacheConfig::max_bytes`].
    pub uncached: u64,
    /// Entries currently in the index.
    pub entries: usize,
    /// Bytes the ranges of the entries currently in the index add up to.
    pub bytes: u64,
}

/// The subscriber state of one entry: clears its flag and marks the cache dirty. That is
/// all it may do (it runs on the monitor thread: no references to the entry, no
/// deregistration, no blocking).
struct Validity {
    valid: sync::Arc<AtomicBool>,
    dirty: sync::Arc<AtomicBool>,
}

/// Entries remove their subscription without waiting (`remove_nowait`, also what dropping
/// does): dropping the last handle never blocks on the monitor thread. That is sound
/// because `invalidate` only touches the two flags, which this state owns.
impl IntervalSubscriber for Validity {
    fn invalidate(
        &mut self,
        _: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        // Release: pairs with a lookup's Acquire; runs under the user lock, like the fill's
        // set, so set and clear are totally ordered.
        self.valid.store(false, Release);
        // Only a hint for the purge (which re-checks every flag): Release so that a purge
        // that sees it also sees the cleared flag.
        self.dirty.store(true, Release);
        Ok(())
    }
}

struct Entry<R: KeyedRegistrar<K>, K> {
    start: u64,
    end: u64,
    /// The caller's attributes, part of the entry's key.
    attrs: K,
    valid: sync::Arc<AtomicBool>,
    registration: Option<R::Registration>,
    subscription: Option<IntervalSubscription<Validity>>,
    registrar: Arc<R>,
    monitor: Arc<Shared>,
    /// How the entry's `is_valid` waits (the cache's configuration).
    gate: GateMode,
    /// Keeps the range watched while the entry exists.
    lease: Option<WatchLease>,
}

/// How lookups and queries wait for events (from [`CacheConfig`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GateMode {
    /// Events in flight and events being applied (`reuse_check`, the default).
    Sync,
    /// Events being applied only.
    Gate,
    /// Fault injection: not at all.
    #[cfg(feature = "fault-injection")]
    Skip,
}

impl GateMode {
    fn of(config: &CacheConfig) -> GateMode {
        #[cfg(feature = "fault-injection")]
        if config.skip_gate {
            return GateMode::Skip;
        }
        if config.reuse_check {
            GateMode::Sync
        } else {
            GateMode::Gate
        }
    }

    /// The first step of a lookup: the gate only (the in-flight check follows on a hit).
    #[inline]
    fn pass_lookup(self, monitor: &Shared) -> Result<(), Error> {
        match self {
            GateMode::Sync | GateMode::Gate => monitor.pass_gate(),
            #[cfg(feature = "fault-injection")]
            GateMode::Skip => monitor.check_alive(),
        }
    }

    #[inline]
    fn pass(self, monitor: &Shared) -> Result<(), Error> {
        match self {
            GateMode::Sync => monitor.sync(),
            GateMode::Gate => monitor.pass_gate(),
            #[cfg(feature = "fault-injection")]
            GateMode::Skip => monitor.check_alive(),
        }
    }
}

impl<R: KeyedRegistrar<K>, K> Drop for Entry<R, K> {
    fn drop(&mut self) {
        // First take it out of the tree (without waiting: an invalidation still running on
        // it only touches the flags it owns), then release the registration.
        if let Some(s) = self.subscription.take() {
            s.remove_nowait();
        }
        if let Some(r) = self.registration.take() {
            self.registrar.deregister_with(&self.attrs, r);
        }
        // Last: unwatch (if no other entry needs the range) only once the device no
        // longer uses the pages.
        drop(self.lease.take());
    }
}

/// A handle to a cached registration. The registration stays registered while any handle
/// to it exists; [`is_valid`](Self::is_valid) tells whether the memory has changed since.
pub struct CachedRegistration<R: KeyedRegistrar<K>, K = ()> {
    entry: Arc<Entry<R, K>>,
}

impl<R: KeyedRegistrar<K>, K> CachedRegistration<R, K> {
    /// The attributes the registration was made with (`&()` without attributes).
    pub fn attrs(&self) -> &K {
        &self.entry.attrs
    }

    /// The registered range's start (page-aligned; it covers the requested range).
    pub fn start(&self) -> *mut u8 {
        self.entry.start as *mut u8
    }

    /// The registered range's length in bytes.
    pub fn len(&self) -> usize {
        (self.entry.end - self.entry.start) as usize
    }

    /// Never true: a registration covers at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether no invalidation has hit the range since it was registered (waiting, like a
    /// lookup, for events being applied; false once the monitor has stopped). A handle
    /// that went invalid must not be used for new I/O: ask the cache again.
    pub fn is_valid(&self) -> bool {
        self.entry.gate.pass(&self.entry.monitor).is_ok() && self.entry.valid.load(Acquire)
    }

    /// The registration.
    pub fn registration(&self) -> &R::Registration {
        self.entry
            .registration
            .as_ref()
            .expect("present until the entry is dropped")
    }
}

impl<R: KeyedRegistrar<K>, K> Clone for CachedRegistration<R, K> {
    fn clone(&self) -> Self {
        CachedRegistration {
            entry: self.entry.clone(),
        }
    }
}

impl<R: KeyedRegistrar<K>, K> std::ops::Deref for CachedRegistration<R, K> {
    type Target = R::Registration;
    fn deref(&self) -> &R::Registration {
        self.registration()
    }
}

impl<R: KeyedRegistrar<K>, K: fmt::Debug> fmt::Debug for CachedRegistration<R, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedRegistration")
            .field("start", &format_args!("{:#x}", self.entry.start))
            .field("end", &format_args!("{:#x}", self.entry.end))
            .field("attrs", &self.entry.attrs)
            .field("valid", &self.is_valid())
            .finish()
    }
}

struct Index<R: KeyedRegistrar<K>, K> {
    lru: LruIndex<K, Arc<Entry<R, K>>>,
    stats: CacheStats,
    /// Watch leases of evicted entries, oldest first (see "Retained leases").
    retained: VecDeque<WatchLease>,
}

impl<R: KeyedRegistrar<K>, K: CacheKey> Index<R, K> {
    /// Evicts the least recently used entry into `out`, keeping its watch lease if the
    /// entry is valid and nobody else holds it (see "Retained leases"); leases pushed out
    /// of the retained set go to `old`, to be dropped outside the lock.
    fn evict_one(
        &mut self,
        keep: usize,
        out: &mut Vec<Arc<Entry<R, K>>>,
        old: &mut Vec<WatchLease>,
    ) -> bool {
        let Some(mut evicted) = self.lru.pop_lru() else {
            return false;
        };
        self.stats.evictions += 1;
        if keep > 0 {
            // The index held the only reference: no handle, so no registration in use.
            if let Some(entry) = Arc::get_mut(&mut evicted) {
                // Acquire, as a lookup's: an entry invalidated since is not kept.
                if entry.valid.load(Acquire) {
                    if let Some(lease) = entry.lease.take() {
                        self.retained.push_back(lease);
                        while self.retained.len() > keep {
                            old.extend(self.retained.pop_front());
                        }
                    }
                }
            }
        }
        out.push(evicted);
        true
    }
}

/// A cache of registrations of this process's memory, kept coherent by a [`Monitor`].
///
/// ```no_run
/// use mmu_uffd::{CacheConfig, Monitor, RegCache};
/// let monitor = Monitor::new()?;
/// // A registration here is just the address; a real one would be an RDMA key, an
/// // io_uring buffer index, a DMA mapping...
/// let cache = RegCache::with_fns(
///     &monitor,
///     CacheConfig::default(),
///     |ptr, _len| Ok::<_, std::io::Error>(ptr as usize),
///     |_reg| {},
/// );
/// let buf = vec![1u8; 1 << 16];
/// let a = cache.get(buf.as_ptr(), buf.len())?;   // miss: registers
/// let b = cache.get(buf.as_ptr(), 4096)?;        // hit
/// assert_eq!(*a, *b);
/// assert!(cache.find(buf.as_ptr(), 8192)?.is_some()); // a hit; a miss would be None
/// # Ok::<(), mmu_uffd::Error>(())
/// ```
///
/// With registration attributes in the key (`RegCache<R, K>`), see [`KeyedRegistrar`] and
/// [`RegCache::with_keyed_fns`].
///
/// Dropping the cache is [`clear`](Self::clear): it forgets every entry, and a
/// registration is deregistered when its last handle drops, so a handle still held keeps
/// its registration (and its validity tracking) after the cache is gone. Once the monitor
/// stops, every handle reads as invalid.
pub struct RegCache<R: KeyedRegistrar<K>, K: CacheKey = ()> {
    monitor: Arc<Shared>,
    registrar: Arc<R>,
    config: CacheConfig,
    gate: GateMode,
    index: Mutex<Index<R, K>>,
    /// Raised by invalidations of entries (see "Purge").
    dirty: sync::Arc<AtomicBool>,
}

impl<R: KeyedRegistrar<K>, K: CacheKey> fmt::Debug for RegCache<R, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegCache")
            .field("config", &self.config)
            .field("stats", &self.stats_now())
            .finish()
    }
}

impl<F, G, T, E> RegCache<FnRegistrar<F, G>>
where
    T: Send + Sync + 'static,
    E: std::error::Error + Send + Sync + 'static,
    F: Fn(*mut u8, usize) -> Result<T, E> + Send + Sync + 'static,
    G: Fn(T) + Send + Sync + 'static,
{
    /// A cache whose registrations are made by `register` and released by `deregister`.
    pub fn with_fns(monitor: &Monitor, config: CacheConfig, register: F, deregister: G) -> Self {
        RegCache::new(
            monitor,
            config,
            FnRegistrar {
                register,
                deregister,
            },
        )
    }
}

impl<F, G, K, T, E> RegCache<KeyedFnRegistrar<F, G>, K>
where
    K: CacheKey,
    T: Send + Sync + 'static,
    E: std::error::Error + Send + Sync + 'static,
    F: Fn(&K, *mut u8, usize) -> Result<T, E> + Send + Sync + 'static,
    G: Fn(&K, T) + Send + Sync + 'static,
{
    /// A cache whose entries are keyed by range and attributes `K`, registered by
    /// `register(attrs, ptr, len)` and released by `deregister(attrs, registration)`.
    ///
    /// ```no_run
    /// use mmu_uffd::{CacheConfig, Monitor, RegCache};
    /// const READ: u32 = 1;
    /// const WRITE: u32 = 2;
    /// let monitor = Monitor::new()?;
    /// // (access flags, device index): e.g. ibv_reg_mr(pd[device], ptr, len, access)
    /// let cache = RegCache::with_keyed_fns(
    ///     &monitor,
    ///     CacheConfig::default(),
    ///     |&(access, device): &(u32, u8), ptr, _len| {
    ///         Ok::<_, std::io::Error>((ptr as usize, access, device))
    ///     },
    ///     |_attrs, _mr| {},
    /// );
    /// let buf = vec![0u8; 1 << 16];
    /// let ro = cache.get_with(&(READ, 0), buf.as_ptr(), buf.len())?;
    /// let rw = cache.get_with(&(READ | WRITE, 0), buf.as_ptr(), buf.len())?;
    /// assert_ne!(*ro, *rw); // two registrations of one range
    /// assert!(cache.find_with(&(READ, 1), buf.as_ptr(), buf.len())?.is_none()); // device 1: none
    /// # Ok::<(), mmu_uffd::Error>(())
    /// ```
    pub fn with_keyed_fns(
        monitor: &Monitor,
        config: CacheConfig,
        register: F,
        deregister: G,
    ) -> Self {
        RegCache::keyed(
            monitor,
            config,
            KeyedFnRegistrar {
                register,
                deregister,
            },
        )
    }
}

impl<R: Registrar> RegCache<R> {
    /// A cache on `monitor`'s address space. The cache works as long as the monitor runs;
    /// once the monitor is dropped every entry is invalid and `get` fails with
    /// [`Error::Stopped`].
    pub fn new(monitor: &Monitor, config: CacheConfig, registrar: R) -> Self {
        RegCache::keyed(monitor, config, registrar)
    }
}

impl<R: KeyedRegistrar<()>> RegCache<R, ()> {
    /// A registration covering `[ptr, ptr + len)`: a cached one if a valid one exists, else
    /// a new one (the memory is watched first). Never one that an unmap, move or madvise
    /// of the range, returned before this call started, has made stale.
    pub fn get(&self, ptr: *const u8, len: usize) -> Result<CachedRegistration<R>, Error> {
        self.get_with(&(), ptr, len)
    }

    /// A cached registration covering `[ptr, ptr + len)` if a valid one exists, else
    /// `None`: never registers (libfabric's `ofi_mr_cache_find`). The same guarantee as
    /// [`get`](Self::get): never an entry that an unmap, move or madvise of the range,
    /// returned before this call started, has made stale.
    ///
    /// ```no_run
    /// use mmu_uffd::{CacheConfig, Monitor, RegCache};
    /// let monitor = Monitor::new()?;
    /// let cache = RegCache::with_fns(
    ///     &monitor,
    ///     CacheConfig::default(),
    ///     |ptr, _len| Ok::<_, std::io::Error>(ptr as usize),
    ///     |_| {},
    /// );
    /// let buf = vec![0u8; 1 << 16];
    /// assert!(cache.find(buf.as_ptr(), buf.len())?.is_none()); // nothing registered
    /// let reg = cache.get(buf.as_ptr(), buf.len())?;
    /// assert_eq!(*cache.find(buf.as_ptr(), 4096)?.unwrap(), *reg);
    /// # Ok::<(), mmu_uffd::Error>(())
    /// ```
    pub fn find(&self, ptr: *const u8, len: usize) -> Result<Option<CachedRegistration<R>>, Error> {
        self.find_with(&(), ptr, len)
    }
}

impl<R: KeyedRegistrar<K>, K: CacheKey> RegCache<R, K> {
    /// A cache on `monitor`'s address space whose entries are keyed by range and
    /// attributes `K` (see [`KeyedRegistrar`]; [`RegCache::new`] is this with `K = ()`).
    pub fn keyed(monitor: &Monitor, config: CacheConfig, registrar: R) -> Self {
        RegCache {
            monitor: monitor.shared().clone(),
            registrar: Arc::new(registrar),
            config: CacheConfig {
                capacity: config.capacity.max(1),
                max_attempts: config.max_attempts.max(1),
                max_bytes: config.max_bytes.map(|b| b.max(1)),
                ..config
            },
            gate: GateMode::of(&config),
            index: Mutex::new(Index {
                lru: LruIndex::default(),
                stats: CacheStats::default(),
                retained: VecDeque::new(),
            }),
            dirty: sync::Arc::new(AtomicBool::new(false)),
        }
    }

    /// [`get`](RegCache::get) with attributes: a registration covering `[ptr, ptr + len)`
    /// made with `attrs`, cached if a valid one exists, else new.
    pub fn get_with(
        &self,
        attrs: &K,
        ptr: *const u8,
        len: usize,
    ) -> Result<CachedRegistration<R, K>, Error> {
        let (start, end) = byte_range(ptr, len)?;
        match self.lookup(attrs, start, end, false)? {
            Some(handle) => Ok(handle),
            None => self.fill(attrs, start, end),
        }
    }

    /// [`find`](RegCache::find) with attributes: a cached valid registration covering
    /// `[ptr, ptr + len)` made with `attrs`, or `None`; never registers.
    pub fn find_with(
        &self,
        attrs: &K,
        ptr: *const u8,
        len: usize,
    ) -> Result<Option<CachedRegistration<R, K>>, Error> {
        let (start, end) = byte_range(ptr, len)?;
        self.lookup(attrs, start, end, true)
    }

    /// The hit path of `get` and `find`: `None` where `get` goes on to fill.
    #[inline]
    fn lookup(
        &self,
        attrs: &K,
        start: u64,
        end: u64,
        find: bool,
    ) -> Result<Option<CachedRegistration<R, K>>, Error> {
        // The gate now; the in-flight check only on a hit (see `confirm_hit`): a miss
        // registers the memory as it is now, which no event in flight can make stale
        // (such an event invalidates the new entry: a later miss, never a stale hit).
        self.gate.pass_lookup(&self.monitor)?;
        if self.dirty.load(std::sync::atomic::Ordering::Relaxed) {
            self.purge_dirty();
        }
        let (hit, dead) = {
            let mut ix = self.index.lock();
            match ix.lru.find_covering(attrs, start, end) {
                Some(id) => {
                    let entry = ix.lru.value(id);
                    // Acquire: pairs with the Release clear in `Validity::invalidate`
                    // (and, through the gate, with every invalidation applied before).
                    if entry.valid.load(Acquire) {
                        let handle = CachedRegistration {
                            entry: entry.clone(),
                        };
                        ix.lru.touch(id);
                        ix.stats.hits += 1;
                        (Some(handle), None)
                    } else {
                        ix.stats.invalidated_found += 1;
                        (None, Some(ix.lru.remove(id)))
                    }
                }
                None => (None, None),
            }
        };
        drop(dead); // outside the lock: may deregister
        if let Some(handle) = hit {
            if self.confirm_hit(&handle)? {
                return Ok(Some(handle));
            }
            drop(handle);
            // Not a hit after all. The entry is counted in `invalidated_found` by
            // whichever purge removes it (it may still be valid: its event may be in
            // flight, not applied), never here as well.
            self.index.lock().stats.hits -= 1;
            self.purge_dirty();
        }
        if find {
            self.index.lock().stats.not_found += 1;
        }
        Ok(None)
    }

    /// With the address-reuse check: waits until no event is in flight and every event
    /// read is applied ([`Monitor::sync`]), then reads the entry's flag again. The entry
    /// may have been registered before an unmap by another thread that freed the address
    /// (which the caller then mapped again) and whose event had not reached the monitor
    /// when the gate was passed; after `sync` that event is applied and the flag is clear.
    #[inline]
    fn confirm_hit(&self, handle: &CachedRegistration<R, K>) -> Result<bool, Error> {
        if self.gate != GateMode::Sync {
            return Ok(true);
        }
        self.monitor.sync()?;
        Ok(handle.entry.valid.load(Acquire))
    }

    /// Every lookup and query starts here: waits until every event of calls that returned
    /// before it has been applied (and, with `reuse_check`, every unmap in flight).
    #[inline]
    fn pass_gate(&self) -> Result<(), Error> {
        self.gate.pass(&self.monitor)
    }

    /// Whether a range of `len` bytes may enter the index ([`CacheConfig::max_bytes`]).
    fn cacheable(&self, len: u64) -> bool {
        self.config.max_bytes.map_or(true, |max| len <= max)
    }

    /// Whether the index would be over its limits with `entries` more entries of `bytes`
    /// more bytes: `(1, len)` before a fill makes room, `(0, 0)` after its insert.
    fn over_limits(&self, ix: &Index<R, K>, entries: usize, bytes: u64) -> bool {
        ix.lru.len() + entries > self.config.capacity
            || self
                .config
                .max_bytes
                .is_some_and(|max| ix.lru.bytes().saturating_add(bytes) > max)
    }

    /// A miss: the collision-retry loop of the fill (the module docs), at most
    /// `max_attempts` attempts, each trying the union with the overlapping valid entries
    /// first (when merging), then the request alone.
    #[cold]
    fn fill(&self, attrs: &K, start: u64, end: u64) -> Result<CachedRegistration<R, K>, Error> {
        let (ps, pe) = self.monitor.page_range(start, end - start)?;
        let mut budget = mmu_notifier::RetryBudget::attempts(self.config.max_attempts).map_err(
            |lost: mmu_notifier::RetryExhausted| Error::Contended {
                start: ps,
                end: pe,
                attempts: lost.attempts,
            },
        );
        mmu_notifier::interval::retry(&mut budget, |budget| {
            let mut union = if self.config.merge {
                self.union_with_overlaps(attrs, ps, pe)
            } else {
                (ps, pe)
            };
            // An overlapping entry may belong to memory whose unmap is still in flight (the
            // miss path skipped that check): settle it before merging with it.
            if union != (ps, pe) && self.gate == GateMode::Sync {
                self.monitor.sync()?;
                self.purge_dirty();
                union = self.union_with_overlaps(attrs, ps, pe);
            }
            // A union too long to cache would only pin more memory for nothing.
            if union != (ps, pe) && self.cacheable(union.1 - union.0) {
                let (s, e) = union;
                match self.try_fill(budget, attrs, s, e, true) {
                    Ok(filled) => return Ok(filled), // `None`: collided with an invalidation
                    Err(err) => tracing::debug!(
                        "union {s:#x}..{e:#x} not registrable ({err}); registering the request alone"
                    ),
                }
            }
            self.try_fill(budget, attrs, ps, pe, false)
        })
    }

    fn union_with_overlaps(&self, attrs: &K, s: u64, e: u64) -> (u64, u64) {
        let ix = self.index.lock();
        ix.lru
            .overlapping(attrs, s, e)
            .into_iter()
            .filter(|&id| ix.lru.value(id).valid.load(Acquire))
            .map(|id| ix.lru.range(id))
            .fold((s, e), |(a, b), (c, d)| (a.min(c), b.max(d)))
    }

    /// The gather step of a fill attempt of `[s, e)`: a watch lease on the memory, room
    /// made in the index, the user's registration; the entry, not valid yet.
    fn register_entry(
        &self,
        attrs: &K,
        s: u64,
        e: u64,
        valid: sync::Arc<AtomicBool>,
        cacheable: bool,
    ) -> Result<Arc<Entry<R, K>>, Error> {
        let lease = self.monitor.lease(s, e - s)?;
        // Make room before registering, so a registrar with `capacity` slots has one free
        // (and the registered bytes stay within `max_bytes`). A range too long to cache
        // evicts nothing.
        let mut evicted = Vec::new();
        let mut old = Vec::new();
        {
            let mut ix = self.index.lock();
            while cacheable
                && self.over_limits(&ix, 1, e - s)
                && ix.evict_one(self.config.retained, &mut evicted, &mut old)
            {}
        }
        drop(evicted); // outside the lock: may deregister
        drop(old);
        let registration = self
            .registrar
            .register_with(attrs, s as *mut u8, (e - s) as usize)
            .map_err(|source| Error::Register {
                start: s,
                end: e,
                source: Box::new(source),
            })?;
        Ok(Arc::new(Entry {
            start: s,
            end: e,
            attrs: attrs.clone(),
            valid,
            registration: Some(registration),
            subscription: None,
            registrar: self.registrar.clone(),
            monitor: self.monitor.clone(),
            gate: self.gate,
            lease: Some(lease),
        }))
    }

    /// One fill attempt of `[s, e)` (the fill helper's: `read_begin`, register without
    /// the lock, `read_retry` under it): `Ok(None)` if it collided with an invalidation.
    fn try_fill(
        &self,
        policy: &mut impl mmu_notifier::RetryPolicy<Error = Error>,
        attrs: &K,
        s: u64,
        e: u64,
        merged: bool,
    ) -> Result<Option<CachedRegistration<R, K>>, Error> {
        let valid = sync::Arc::new(AtomicBool::new(false));
        let subscription = self
            .monitor
            .subscriptions()
            .insert_interval(
                s..e,
                Validity {
                    valid: valid.clone(),
                    dirty: self.dirty.clone(),
                },
            )
            .map_err(|e| match e {
                mmu_notifier::IntervalError::Released => self.monitor.stopped_error(),
                other => Error::Subscription(other),
            })?;
        let cacheable = self.cacheable(e - s);
        let gather = || self.register_entry(attrs, s, e, valid, cacheable);
        // On a collision the fill drops the entry after unlocking: it deregisters, on this
        // thread.
        let filled = subscription.try_fill(policy, gather, |_, entry| {
            // Under the user lock, after read_retry: an invalidation either ran before (and
            // read_retry saw it) or runs after and clears this.
            entry.valid.store(true, Release);
            Ok(mmu_notifier::Install::Done(entry))
        })?;
        let Some(entry) = filled else {
            drop(subscription);
            // The attempt registered, and its registration was dropped (deregistered).
            let mut ix = self.index.lock();
            ix.stats.retries += 1;
            ix.stats.registered += 1;
            return Ok(None);
        };
        // The entry is not shared yet: attach its subscription.
        let mut entry = entry;
        Arc::get_mut(&mut entry)
            .expect("the entry has not been shared yet")
            .subscription = Some(subscription);
        let handle = CachedRegistration {
            entry: entry.clone(),
        };
        let mut old = Vec::new();
        let removed = {
            let mut ix = self.index.lock();
            ix.stats.misses += 1;
            ix.stats.registered += 1;
            if merged {
                ix.stats.merges += 1;
            }
            if cacheable {
                let mut removed = ix.lru.insert(attrs.clone(), s, e, entry);
                ix.stats.replaced += removed.len() as u64;
                // Other fills may have filled the room made above. The new entry is the
                // most recently used and fits alone: it is never the one evicted.
                while self.over_limits(&ix, 0, 0)
                    && ix.evict_one(self.config.retained, &mut removed, &mut old)
                {}
                removed
            } else {
                ix.stats.uncached += 1;
                // The handle is the only reference: the entry is deregistered when it drops.
                vec![entry]
            }
        };
        drop(removed); // outside the lock: may deregister
        drop(old);
        Ok(Some(handle))
    }

    /// Removes every invalidated entry from the index now, on this thread (deregistering
    /// those no handle holds); `get` does this by itself when an invalidation happened
    /// since. Waits first, like a lookup, for the events of calls that returned before it
    /// (if the monitor has stopped, every entry is invalid and all are removed). Returns
    /// how many were removed.
    pub fn purge_invalid(&self) -> usize {
        // An error means the monitor stopped (every entry was released: purge them all)
        // or this is the monitor's own thread (purge what is known).
        let _ = self.pass_gate();
        let n = self.purge_dirty();
        self.monitor.unwatch_idle();
        n
    }

    fn purge_dirty(&self) -> usize {
        if !self.dirty.swap(false, Acquire) {
            return 0;
        }
        let dead = {
            let mut ix = self.index.lock();
            let dead = ix.lru.remove_where(|e| !e.valid.load(Acquire));
            ix.stats.invalidated_found += dead.len() as u64;
            dead
        };
        let n = dead.len();
        drop(dead); // outside the lock: may deregister
        n
    }

    /// Invalidates every entry overlapping `[ptr, ptr + len)` now, on this thread (for
    /// changes the kernel does not report, such as mprotect, or to bracket an madvise the
    /// application races with its own use of the memory).
    pub fn invalidate(&self, ptr: *const u8, len: usize) -> Result<(), Error> {
        let (start, end) = byte_range(ptr, len)?;
        if let Ok(range) = Range::new(start, end, Event::Clear) {
            drop(self.monitor.subscriptions().invalidate_range_start(range));
        }
        Ok(())
    }

    /// Removes every entry from the index (entries in use stay registered until their
    /// handles drop), drops the retained watch leases, and stops watching the memory that
    /// no remaining entry needs.
    pub fn clear(&self) {
        let (removed, retained) = {
            let mut ix = self.index.lock();
            (ix.lru.drain(), std::mem::take(&mut ix.retained))
        };
        drop(removed);
        drop(retained);
        self.monitor.unwatch_idle();
    }

    /// Entries in the index, after waiting (like a lookup) for the events of calls that
    /// returned before it and removing the entries they invalidated.
    pub fn len(&self) -> usize {
        self.purge_invalid();
        self.index.lock().lru.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters, after waiting (like a lookup) for the events of calls that returned
    /// before it and removing the entries they invalidated.
    pub fn stats(&self) -> CacheStats {
        self.purge_invalid();
        self.stats_now()
    }

    /// The counters as they are, without waiting.
    fn stats_now(&self) -> CacheStats {
        let ix = self.index.lock();
        CacheStats {
            entries: ix.lru.len(),
            bytes: ix.lru.bytes(),
            ..ix.stats
        }
    }
}

/// `[ptr, ptr + len)` as addresses, refusing an empty or overflowing range.
fn byte_range(ptr: *const u8, len: usize) -> Result<(u64, u64), Error> {
    let start = ptr as u64;
    let end = start
        .checked_add(len as u64)
        .filter(|_| len > 0)
        .ok_or(Error::InvalidRange {
            start,
            len: len as u64,
            reason: "the length is zero or the range overflows",
        })?;
    Ok((start, end))
}

impl<R: KeyedRegistrar<K>, K: CacheKey> Drop for RegCache<R, K> {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(all(test, loom))]
mod loom_model {
    //! The fill protocol against an invalidation, with the library's real interval
    //! subscription and this module's `Validity`. The primary's "pages" are a version
    //! number; an UNMAP-style event changes them first and invalidates after (as the kernel
    //! reports munmap after the fact). Whatever the interleaving, an entry left valid must
    //! have registered the current pages.
    use super::Validity;
    use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Release};
    use loom::sync::Arc;
    use mmu_notifier::{Event, Range, Subscriptions};

    #[test]
    fn a_valid_entry_never_holds_old_pages() {
        loom::model(|| {
            let mm = Subscriptions::new();
            let pages = Arc::new(AtomicU64::new(1));
            let primary = {
                let (mm, pages) = (mm.clone(), pages.clone());
                loom::thread::spawn(move || {
                    pages.store(2, Release); // munmap + new mmap at the same address
                    let range = Range::new(0x1000, 0x2000, Event::Unmap).unwrap();
                    drop(mm.invalidate_range_start(range)); // the event, applied
                })
            };
            // The fill.
            let valid = Arc::new(AtomicBool::new(false));
            let dirty = Arc::new(AtomicBool::new(false));
            let validity = Validity {
                valid: valid.clone(),
                dirty: dirty.clone(),
            };
            let sub = mm.insert_interval(0x1000..0x2000, validity).unwrap();
            let mut registered = 0;
            // The fill helper the cache's fill runs, with two attempts (a lost one
            // deregisters and starts again).
            let mut budget = mmu_notifier::RetryBudget::attempts(2);
            let _ = sub.fill(
                &mut budget,
                || Ok(pages.load(Acquire)), // register: pin what is mapped now
                |_, pinned| {
                    registered = pinned;
                    valid.store(true, Release);
                    Ok(mmu_notifier::Install::Done(()))
                },
            );
            primary.join().unwrap();
            if valid.load(Acquire) {
                assert_eq!(
                    registered,
                    pages.load(Acquire),
                    "a valid entry pins old pages"
                );
            } else {
                assert!(dirty.load(Acquire), "an invalidated entry was not reported");
            }
            drop(sub);
        });
    }
}
