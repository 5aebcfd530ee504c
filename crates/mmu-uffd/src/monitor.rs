//! The monitor: one userfaultfd and one thread that turn the kernel's non-cooperative events
//! for this process's own memory into interval invalidations.
//!
//! # Registration
//!
//! Watched memory is registered in *write-protect* mode with nothing write-protected: the
//! VMAs then deliver UNMAP, REMOVE and REMAP events, and no page fault is ever routed to
//! the monitor (MISSING mode, which older monitors use, would make the monitor thread
//! resolve every first touch). With the kernel's `WP_ASYNC` feature a WP-only registration
//! is allowed on any memory type, so regular file mappings can be watched too; shmem
//! (memfd, `MAP_SHARED | MAP_ANONYMOUS`) needs `WP_HUGETLBFS_SHMEM`. One descriptor serves
//! every watched range.
//!
//! # Events and what they become
//!
//! | kernel event | when the monitor reads it | invalidation |
//! |---|---|---|
//! | UNMAP (munmap, `MAP_FIXED` over, mremap shrink) | after the pages are gone | `Unmap` of the unmapped range |
//! | REMOVE (madvise `DONTNEED`/`FREE`/`REMOVE`) | before the zap | `Clear` of the range |
//! | REMAP (mremap move) | after the move | `Unmap` of the old range |
//! | FORK (only with [`MonitorConfig::fork_events`]) | during fork | none: the child's descriptor is closed |
//!
//! An UNMAP event covers the whole `munmap` call, also the parts that were not watched;
//! invalidating those touches only subscriptions that overlap them. The kernel blocks the
//! thread that caused an event until the monitor has *read* it; [`gate`](crate::gate)
//! extends that to "until it has been applied", for lookups that start afterwards.
//!
//! # The monitor's threads
//!
//! Two threads that do the same work (see `reader`, `queue` and `applier` for their
//! protocols); both block every signal:
//!
//! - **Reading.** The kernel wakes one of them per event (the one asleep, not one busy
//!   applying). It reads the events into a fixed buffer, closes forked children's
//!   descriptors and queues the invalidations. Reading never allocates, never runs user
//!   code and never takes a lock a user thread may hold, so the threads it must release
//!   can never be waiting for it: an allocator trimming watched heap memory, a fork
//!   holding the allocator's locks, a callback that unmaps.
//! - **Applying.** Then it takes the *applying role*, if the other thread does not hold
//!   it, and runs the queued invalidations on [`Monitor::subscriptions`] (the user
//!   callbacks run there; they may allocate, block, unmap). The role is never waited for,
//!   so while one thread runs user code the other is always free to read. Lookups wait at
//!   the gate until every event of calls that returned has been applied. On one CPU the
//!   callback runs right after the read, in the thread the unmap woke.
//! - Fork: without `fork_events` (the default) the child inherits no registration, so no
//!   descriptor ever appears. With it, each FORK event brings the child's descriptor into
//!   this process; the thread that reads it closes it at once, which releases the child's
//!   registrations. If no descriptor slot is free (EMFILE), it backs off and reads again.
//! - Stop (drop, a failed read, or a panicking callback): lookups fail from then on; every
//!   subscription gets a `Release` invalidation (nothing can be trusted once events stop);
//!   every mapping of the process is unregistered (a forked child may hold a copy of the
//!   descriptor, so closing ours would not end the registrations); what is still queued is
//!   read, which lets blocked unmappers continue; the descriptor is closed.
//! - Lookups from inside a callback (on a monitor thread, mid-batch) fail with
//!   [`Error::OnMonitorThread`] instead of waiting for themselves.
//!
//! # Scheduling
//!
//! The `read()` that takes an unmap's event is what lets the kernel return from that
//! `munmap`: it wakes the unmapper. On the monitor thread's own CPU, the woken unmapper may
//! preempt the monitor between the read and the callback; the unmapper then finds the
//! event not yet applied and has to wait for the monitor to run again (two more context
//! switches). Both threads therefore ask the scheduler for its shortest time slice
//! (0.1 ms, Linux 6.12 and later; older kernels ignore the request, and a thread whose
//! policy is not the normal one is left alone), which gives them an early virtual
//! deadline: the unmapper they wake waits until they sleep again. Measured on one CPU
//! (unmapper, monitor and a bare userfaultfd reader, alternating; medians of 8 runs of
//! 2000 unmaps each way): the callback ran 1.22 times as long after the `munmap` call as
//! the bare reader's `read()` returned, instead of 1.33 times on a quiet machine (1.24
//! instead of 1.73 on a loaded one). The cache bench's latency part measures it so (each
//! placement in processes of its own): 1.29 on a machine shared with builds, of which
//! waiting in epoll and reading as the monitor does, without its work, is 1.18 (its
//! floor part; see `reader` for why the threads do not block in `read()`).
//!
//! # Which memory is safe to watch
//!
//! - Anonymous memory, private or shared, memfd, and (with `WP_ASYNC`, Linux 6.7) file
//!   mappings; see [`Capabilities`].
//! - Heap memory from the allocator: the reader never allocates, so an allocator that
//!   trims watched memory (on any thread, the applier included) or a fork that holds the
//!   allocator's locks cannot hang the process. Note that an allocator keeps most freed
//!   blocks mapped: a registration of a freed block stays valid (it still names the same
//!   pages) until the allocator really unmaps or trims them.
//! - Not seen by the kernel's events, so not safe to rely on: SysV shared memory
//!   (`shmdt` sends no event), mprotect, `MADV_GUARD_INSTALL` (Linux 6.13; it zaps the
//!   pages without a REMOVE event), `fallocate(PUNCH_HOLE)` on a memfd or file whose pages
//!   are mapped, and unmaps made by the kernel itself; use
//!   [`RegCache::invalidate`](crate::RegCache::invalidate) for changes it cannot see.
//! - Watching part of a mapping splits it in the kernel (the watched part has other flags),
//!   and `mremap` refuses a range that spans two mappings (`EFAULT`): a program that looks
//!   up a sub-range of a buffer and then resizes or moves the whole buffer with `mremap`
//!   should watch the whole buffer first ([`Monitor::watch`]) or look up all of it. (glibc's
//!   `realloc` copies instead when its `mremap` fails.) The split heals when the part is
//!   unwatched.
//! - With [`MonitorConfig::fork_events`], a fork in a process that has no free descriptor
//!   waits until one frees up (the child's context needs one), and so do lookups meanwhile
//!   (the fork is an event in flight).
//!
//! # Watch leases
//!
//! A registered range makes every madvise on it wait for the monitor, so memory should
//! stay registered only while something needs it. [`Monitor::watch`] is explicit: the
//! range stays watched until [`Monitor::unwatch`] or its unmap. The cache instead takes a
//! *lease* per entry: the range is registered when the entry is filled, and when the last
//! lease over a range ends (its entry evicted, purged or cleared, and its last handle
//! dropped, after the registration was released) the range becomes *idle*. Idle ranges are
//! unregistered in batches: once 32 have gathered, or when the cache is cleared, purged,
//! or asked for its length or counters; a range leased again before that is simply still
//! registered (a miss then costs no kernel work on it). Only the parts that no lease and
//! no explicit watch cover at that moment are unregistered. One lock is held across each
//! count change and its system calls, so an unregister cannot undo a register made
//! meanwhile for a new lease.
//!
//! # Registering
//!
//! `watch` always makes the registration system call (idempotent on memory already
//! registered) and then checks the range for holes: `UFFDIO_REGISTER` accepts a range
//! with holes and registers only the mappings in it, and a hole must neither be claimed as
//! watched (memory mapped there later would not be) nor accepted at all. That is two
//! system calls. A cache *lease* (a miss) makes them only for memory the monitor does not
//! already vouch for:
//!
//! - **The verified set.** After a registration and its hole check succeed, the range
//!   joins the *verified* set, under the lock held across both system calls. A range
//!   leaves it, under the same lock, when the applier takes up any event that touches it
//!   (*before* that event's invalidation runs), and when it is unregistered (idle
//!   unwatching, `unwatch`). A lease of a verified range makes no system call at all.
//! - **Why that is never stale.** Memory that was mapped and registered stays registered
//!   until it is unmapped, moved or unregistered by us, and the first two come with an
//!   event (UNMAP, REMAP; a madvise sends REMOVE and is treated the same way). So if a
//!   range is in the set when a lease looks, either it is still the mapped, registered
//!   memory that was checked, or an event covering the change exists whose application
//!   has not yet reached the set, and so has not yet run its invalidation either. The
//!   cache inserts an entry's subscription *before* it takes the lease, so that
//!   invalidation, which runs after the look, reaches the new entry: a miss that took a
//!   lease on changed memory yields an entry that is invalidated, never a stale hit (and
//!   the gate makes every lookup that starts after the unmapping call returned wait for
//!   that invalidation). An earlier version skipped the registration of "registered"
//!   memory and broke exactly there: its set was not emptied before the invalidation ran.
//!   `watch` inserts no subscription first, so it always registers.
//! - **A hole.** A hole inside a verified range can only appear through an unmap, which
//!   is an event (above). A hole in memory not verified is found by the check that follows
//!   the registration that would verify it: the lease, and the miss, fail with
//!   `Error::Watch` (not found).
//! - **Unmapped between lookup and registration.** If the memory was registered, the
//!   unmap's event invalidates the entry (its subscription came first); if it was not, the
//!   check after the registration finds the hole and the miss fails, or, if new memory
//!   was mapped there meanwhile, that memory is what gets registered and checked.
//!
//! At stop every mapping of the process is unregistered, one by one (registrations move
//! and grow with mremap, which no set here could follow).

use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mmu_notifier::{Event, Range, Subscriptions};

use crate::coverage::CoverageMap;
use crate::error::Error;
use crate::gate::{Gate, Pass};
use crate::queue::Queue;
use crate::ranges::RangeSet;
use crate::sys::{self, feature, InFlight, Uffd};
use crate::{applier, fork, reader};

/// How the monitor is set up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MonitorConfig {
    /// Ask for FORK events (needs `CAP_SYS_PTRACE`). Each fork then blocks until the
    /// monitor's reader has received the child's descriptor, which it closes at once. Off
    /// by default: without it a child simply inherits no registration, which is cheaper.
    /// (The reader never allocates, so a fork that holds the allocator's locks while it
    /// waits cannot deadlock with it; the constructor returns only once the reader is past
    /// its start-up allocations.)
    pub fork_events: bool,
    /// Keep polling (without sleeping) for this long after the last event before the
    /// monitor thread sleeps again. A sleeping thread on an idle core takes tens of
    /// microseconds to wake on some machines (virtual CPUs especially): this trades CPU
    /// time for unmap latency during bursts. `Duration::MAX` never sleeps (a dedicated
    /// core). Default zero: always sleep.
    pub busy_poll: Duration,
}

impl MonitorConfig {
    /// This configuration with another [`busy_poll`](Self::busy_poll) period.
    pub fn with_busy_poll(mut self, period: Duration) -> Self {
        self.busy_poll = period;
        self
    }

    /// This configuration with FORK events on or off.
    pub fn with_fork_events(mut self, on: bool) -> Self {
        self.fork_events = on;
        self
    }
}

/// What this kernel lets the monitor watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Anonymous private memory (always).
    pub anonymous: bool,
    /// shmem: memfd and shared anonymous mappings (`WP_HUGETLBFS_SHMEM`, Linux 5.19).
    pub shmem: bool,
    /// Any other memory type, regular file mappings included (`WP_ASYNC`, Linux 6.7).
    pub any_memory: bool,
    /// FORK events are enabled on this monitor.
    pub fork_events: bool,
}

/// Counters of what the monitor has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MonitorStats {
    /// Busy periods (one `poll` wake-up, one or more reads).
    pub batches: u64,
    /// UNMAP events.
    pub unmaps: u64,
    /// REMOVE events (madvise).
    pub removes: u64,
    /// REMAP events (mremap moves).
    pub remaps: u64,
    /// FORK events (each child descriptor closed).
    pub forks: u64,
    /// Page-fault messages: never expected (nothing is write-protected); each one was
    /// answered by removing protection from the page, so the faulting thread went on.
    pub unexpected_faults: u64,
    /// Messages of an event type this code does not know.
    pub unknown: u64,
    /// Invalidations delivered to the subscriptions.
    pub invalidations: u64,
    /// UFFDIO_REGISTER system calls made by `watch`.
    pub watch_registrations: u64,
    /// Invalidations that arrived while the hand-over queue was full and were merged into
    /// one covering range (more was invalidated than needed; nothing was missed).
    pub merged: u64,
    /// Reads that failed because this process had no descriptor slot for a forked child's
    /// context (EMFILE/ENFILE): the reader backed off and read the event again later.
    pub read_backoffs: u64,
    /// Ranges unregistered because the last cache entry that needed them went.
    pub unwatched: u64,
    /// Cache misses on memory already registered and checked, with no event on it since:
    /// they made no system call (see "Registering" in [`Monitor`]'s module).
    pub verified_leases: u64,
}

/// The counters behind [`MonitorStats`] (atomics: the reader bumps them without locks).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) batches: AtomicU64,
    pub(crate) unmaps: AtomicU64,
    pub(crate) removes: AtomicU64,
    pub(crate) remaps: AtomicU64,
    pub(crate) forks: AtomicU64,
    pub(crate) unexpected_faults: AtomicU64,
    pub(crate) unknown: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) watch_registrations: AtomicU64,
    pub(crate) merged: AtomicU64,
    pub(crate) read_backoffs: AtomicU64,
    pub(crate) unwatched: AtomicU64,
    pub(crate) verified_leases: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// What must stay registered (see "Watch leases" in the module docs).
#[derive(Default)]
struct Leases {
    /// How many leases (cache entries) need each address.
    counts: CoverageMap,
    /// Watched with `Monitor::watch`: kept until `unwatch`.
    explicit: RangeSet,
    /// Ranges whose last lease ended, not unregistered yet (see "Watch leases").
    idle: Vec<(u64, u64)>,
    /// Known to be mapped and registered with this descriptor (see "Registering"): a
    /// lease inside it makes no system call.
    verified: RangeSet,
}

/// Idle ranges that trigger unregistering them all.
const IDLE_BATCH: usize = 32;

/// Keeps a range watched while it lives (see "Watch leases" in the module docs).
pub(crate) struct WatchLease {
    shared: Arc<Shared>,
    start: u64,
    end: u64,
}

impl Drop for WatchLease {
    fn drop(&mut self) {
        self.shared.end_lease(self.start, self.end);
    }
}

/// The state shared by the monitor handle, its thread and the caches built on it.
pub(crate) struct Shared {
    pub(crate) subs: Subscriptions,
    pub(crate) gate: Gate,
    /// Reader to applier (see `queue`).
    pub(crate) queue: Queue,
    /// Every batch up to this number has been counted in `stats` (reader only).
    pub(crate) counted: AtomicU64,
    /// The descriptor; `None` once the monitor stopped. Cloned out for a system call, so a
    /// close never races with a `watch` that still uses the number.
    pub(crate) uffd: parking_lot::RwLock<Option<Arc<Uffd>>>,
    /// What must stay registered: held across the register and unregister system calls,
    /// so a range whose last lease ends cannot be unregistered under a new lease.
    leases: parking_lot::Mutex<Leases>,
    pub(crate) stats: Counters,
    fork_generation: u64,
    pub(crate) page: u64,
    caps: Capabilities,
    pub(crate) busy_poll: Duration,
    /// Set by `Drop`, a failed read or a panicking callback: the applier then runs the
    /// stop sequence (see `applier`).
    pub(crate) stopping: AtomicBool,
    /// Set by the applier once every subscription is released and everything ever
    /// registered is unregistered: the reader then reads what is left and exits.
    pub(crate) released: AtomicBool,
    /// The errno of the read that failed, if one did (the reader cannot format it: that
    /// would allocate).
    pub(crate) read_errno: AtomicI32,
    /// Fault injection: the errno the next read fails with (0: none).
    #[cfg(feature = "fault-injection")]
    pub(crate) inject_read_errno: AtomicI32,
    /// Fault injection: the stop sequence finds `/proc/self/maps` unreadable.
    #[cfg(feature = "fault-injection")]
    pub(crate) inject_no_proc_maps: AtomicBool,
    /// The monitor threads' ids (callbacks run there), for refusing to wait for the gate
    /// on them.
    monitor_threads: [std::sync::OnceLock<std::thread::ThreadId>; 2],
    /// One thread reads at a time (see `reader`).
    pub(crate) reading: std::sync::Mutex<()>,
    /// The applying role (see `applier`).
    pub(crate) applying: AtomicBool,
    pub(crate) stop_reason: parking_lot::Mutex<Option<String>>,
    /// Wakes the reader from `poll` (stop).
    pub(crate) wake: sys::EventFd,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("capabilities", &self.caps)
            .field("stopped", &self.gate.stopped())
            .finish_non_exhaustive()
    }
}

/// Watches this process's own memory and delivers invalidations to the interval
/// subscriptions of [`subscriptions`](Monitor::subscriptions). Dropping it stops the
/// thread (joining it) and releases every subscription.
///
/// ```no_run
/// use mmu_uffd::Monitor;
/// let monitor = Monitor::new()?;           // fails clearly where userfaultfd is unavailable
/// let buf = vec![0u8; 1 << 20];
/// monitor.watch(buf.as_ptr(), buf.len())?; // unmaps/madvise of it now invalidate
/// # Ok::<(), mmu_uffd::Error>(())
/// ```
#[derive(Debug)]
pub struct Monitor {
    shared: Arc<Shared>,
    /// The two monitor threads.
    threads: Option<(JoinHandle<()>, JoinHandle<()>)>,
}

impl Monitor {
    /// Starts a monitor with the default configuration.
    pub fn new() -> Result<Monitor, Error> {
        Self::with_config(MonitorConfig::default())
    }

    /// Starts a monitor. Fails with [`Error::Unavailable`] (saying why) where userfaultfd
    /// cannot be used, and [`Error::MissingFeature`] on kernels without write-protect mode
    /// or the events it needs.
    pub fn with_config(config: MonitorConfig) -> Result<Monitor, Error> {
        let offered = Uffd::probe_features()?;
        let mut wanted = feature::PAGEFAULT_FLAG_WP
            | feature::EVENT_UNMAP
            | feature::EVENT_REMOVE
            | feature::EVENT_REMAP;
        for bit in [
            feature::PAGEFAULT_FLAG_WP,
            feature::EVENT_UNMAP,
            feature::EVENT_REMOVE,
            feature::EVENT_REMAP,
        ] {
            if offered & bit == 0 {
                return Err(Error::MissingFeature {
                    feature: feature::name(bit),
                });
            }
        }
        if config.fork_events {
            if offered & feature::EVENT_FORK == 0 {
                return Err(Error::MissingFeature {
                    feature: feature::name(feature::EVENT_FORK),
                });
            }
            wanted |= feature::EVENT_FORK;
        }
        wanted |= offered & (feature::WP_HUGETLBFS_SHMEM | feature::WP_ASYNC);
        let uffd = Arc::new(Uffd::open(wanted)?);
        let caps = Capabilities {
            anonymous: true,
            shmem: wanted & feature::WP_HUGETLBFS_SHMEM != 0,
            any_memory: wanted & feature::WP_ASYNC != 0,
            fork_events: config.fork_events,
        };
        let shared = Arc::new(Shared {
            subs: Subscriptions::new(),
            gate: Gate::new(),
            uffd: parking_lot::RwLock::new(Some(uffd.clone())),
            leases: parking_lot::Mutex::new(Leases::default()),
            stats: Counters::default(),
            fork_generation: fork::generation(),
            page: sys::page_size(),
            caps,
            busy_poll: config.busy_poll,
            stopping: AtomicBool::new(false),
            released: AtomicBool::new(false),
            read_errno: AtomicI32::new(0),
            #[cfg(feature = "fault-injection")]
            inject_read_errno: AtomicI32::new(0),
            #[cfg(feature = "fault-injection")]
            inject_no_proc_maps: AtomicBool::new(false),
            queue: Queue::new(),
            counted: AtomicU64::new(0),
            monitor_threads: [std::sync::OnceLock::new(), std::sync::OnceLock::new()],
            reading: std::sync::Mutex::new(()),
            applying: AtomicBool::new(false),
            stop_reason: parking_lot::Mutex::new(None),
            wake: sys::EventFd::new().map_err(Error::Thread)?,
        });
        // Everything the threads need is allocated here: a thread that reads must not
        // allocate once it runs (see `reader`).
        let mut workers = Vec::with_capacity(2);
        for i in 0..2 {
            workers.push(applier::Worker {
                waiter: reader::Waiter::new(uffd.raw(), shared.wake.raw())
                    .map_err(Error::Thread)?,
                taken: crate::queue::Taken::new(),
                polls: i == 0,
            });
        }
        // A thread's start-up allocates (the runtime's thread bookkeeping, glibc's
        // per-thread arena). With FORK events a fork must not find it there: glibc's fork
        // holds every malloc lock until the kernel returns, which it does only once a
        // monitor thread has read the FORK event. So return only once both are past them.
        let mut threads = Vec::with_capacity(2);
        let mut failure = None;
        for (i, w) in workers.into_iter().enumerate() {
            let started = Arc::new(std::sync::Barrier::new(2));
            let spawned = {
                let (shared, uffd, started) = (shared.clone(), uffd.clone(), started.clone());
                std::thread::Builder::new()
                    .name(format!("mmu-uffd-monitor-{i}"))
                    .spawn(move || {
                        sys::block_all_signals();
                        // See "Scheduling" in the module docs.
                        sys::request_short_slice();
                        started.wait();
                        applier::run(&shared, &uffd, w);
                    })
            };
            match spawned {
                Ok(t) => {
                    let _ = shared.monitor_threads[i].set(t.thread().id());
                    threads.push((t, started));
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        for (_, started) in &threads {
            started.wait();
        }
        let mut threads: Vec<JoinHandle<()>> = threads.into_iter().map(|(t, _)| t).collect();
        if let Some(e) = failure {
            // Stop the thread we started (it releases the subscriptions).
            shared.request_stop();
            for t in threads {
                let _ = t.join();
            }
            return Err(Error::Thread(e));
        }
        let b = threads.pop().expect("two threads");
        let a = threads.pop().expect("two threads");
        Ok(Monitor {
            shared,
            threads: Some((a, b)),
        })
    }

    /// Starts watching `[ptr, ptr + len)` (widened to whole pages): from now on its
    /// unmaps, madvise and moves invalidate the subscriptions that overlap them. Memory
    /// already registered is registered again (idempotent). The registration lasts until the memory is
    /// unmapped (new memory mapped at the same address is not watched until `watch` is
    /// called for it) or until [`unwatch`](Self::unwatch).
    pub fn watch(&self, ptr: *const u8, len: usize) -> Result<(), Error> {
        self.shared.watch(ptr as u64, len as u64).map(|_| ())
    }

    /// Stops watching `[ptr, ptr + len)`: unregisters it, then, because its changes will
    /// no longer be seen, invalidates it (`Clear`) on the calling thread, so no translation
    /// survives that a later, unseen change could make stale. Parts that a cache entry
    /// still covers stay watched until its last entry goes (the `Clear` invalidates those
    /// entries, so that happens at the cache's next purge).
    pub fn unwatch(&self, ptr: *const u8, len: usize) -> Result<(), Error> {
        self.shared.unwatch(ptr as u64, len as u64)
    }

    /// The address space whose interval subscriptions the monitor invalidates: insert
    /// [`IntervalSubscriber`](mmu_notifier::IntervalSubscriber)s here for watched memory.
    pub fn subscriptions(&self) -> &Subscriptions {
        &self.shared.subs
    }

    /// What this monitor can watch.
    pub fn capabilities(&self) -> Capabilities {
        self.shared.caps
    }

    /// Fault injection, for testing what depends on the monitor: the next read of the
    /// descriptor (when the next event arrives) fails with `errno`, as a read the kernel
    /// refuses would. The monitor then stops as it does for a real failure: every
    /// subscription is released, and lookups fail with [`Error::Stopped`] whose reason
    /// names the error. Never call it in a program that uses the registrations.
    #[cfg(feature = "fault-injection")]
    pub fn inject_read_error(&self, errno: i32) {
        self.shared.inject_read_errno.store(errno, Relaxed);
    }

    /// Fault injection: when the monitor stops, it finds `/proc/self/maps` unreadable (as
    /// in a sandbox without `/proc`), so it unregisters what its own bookkeeping knows to
    /// be registered instead of every mapping.
    #[cfg(feature = "fault-injection")]
    pub fn inject_proc_maps_unreadable(&self) {
        self.shared.inject_no_proc_maps.store(true, Relaxed);
    }

    /// Counters, including every event of the calls that returned before this one (it
    /// waits, microseconds, for the reader to count them). `invalidations` is counted when
    /// applied: call [`sync`](Self::sync) first to include those. It does not wait for the
    /// applier, so it can be read while an invalidation callback holds the monitor.
    pub fn stats(&self) -> MonitorStats {
        self.shared.wait_counted();
        self.shared.stats()
    }

    /// Waits until every event of the calls that returned before this one has been applied
    /// to the subscriptions: unmaps, moves and madvise made by this thread, or by any
    /// thread this one has synchronized with, *and* an unmap by any thread that has freed
    /// an address but whose event is still on its way to the monitor (the kernel frees the
    /// address first). After `sync` returns, no subscription still holds a translation
    /// that such a call made stale.
    ///
    /// Costs one system call when nothing is in flight; waits (microseconds, while the
    /// monitor reads and applies) otherwise. Fails if the monitor has stopped, or with
    /// [`Error::OnMonitorThread`] when called from an invalidation callback that would wait
    /// for itself.
    ///
    /// ```no_run
    /// # let monitor = mmu_uffd::Monitor::new()?;
    /// # let (ptr, len) = (std::ptr::null_mut::<libc::c_void>(), 4096);
    /// // SAFETY: (example) unmaps memory this program mapped and no longer uses.
    /// unsafe { libc::munmap(ptr, len) };
    /// monitor.sync()?; // every subscription over [ptr, ptr + len) has been invalidated
    /// # Ok::<(), mmu_uffd::Error>(())
    /// ```
    pub fn sync(&self) -> Result<(), Error> {
        self.shared.sync()
    }

    /// Like [`sync`](Self::sync) without waiting: `Ok(true)` if every such event has been
    /// applied at this moment, `Ok(false)` if one is still in flight or being applied.
    pub fn try_sync(&self) -> Result<bool, Error> {
        self.shared.try_sync()
    }

    /// Whether the monitor is still running, and if not, why it stopped.
    pub fn state(&self) -> MonitorState {
        if !self.shared.gate.stopped() {
            return MonitorState::Running;
        }
        match self.shared.stop_reason.lock().clone() {
            None => MonitorState::Stopped,
            Some(why) => MonitorState::Failed(why),
        }
    }

    /// Stops the monitor (the same as dropping it).
    pub fn shutdown(self) {}

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// Whether a [`Monitor`] is running (see [`Monitor::state`]). Once stopped, every
/// registration made through it reads as invalid and every lookup fails with
/// [`Error::Stopped`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MonitorState {
    /// Applying events.
    Running,
    /// Stopped on request (the monitor is being dropped).
    Stopped,
    /// Stopped by a failure: a subscriber's callback panicked, or reading the descriptor
    /// failed. The message says which.
    Failed(String),
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.shared.request_stop();
        if let Some((a, b)) = self.threads.take() {
            // Dropped from an invalidation callback, on a monitor thread: that thread runs
            // the stop once the callback returns, and the other exits after it; joining
            // either would wait for ourselves.
            let me = std::thread::current().id();
            if a.thread().id() != me && b.thread().id() != me {
                let _ = a.join();
                let _ = b.join();
            }
        }
    }
}

impl Shared {
    /// Asks the monitor threads to run the stop sequence (see `applier`).
    pub(crate) fn request_stop(&self) {
        // Release: pairs with the threads' Acquire loads of `stopping`; `poke` makes the
        // thread that holds the applying role see it when it gives the role up.
        self.stopping.store(true, Release);
        self.queue.poke();
        self.wake.signal();
    }

    /// Whether the calling thread is one of the monitor's (in a callback).
    fn on_monitor_thread(&self) -> bool {
        let me = std::thread::current().id();
        self.monitor_threads.iter().any(|t| t.get() == Some(&me))
    }

    /// Fails if the monitor cannot vouch for the memory any more.
    pub(crate) fn check_alive(&self) -> Result<(), Error> {
        if fork::current() != self.fork_generation {
            return Err(Error::Forked);
        }
        if self.gate.stopped() {
            return Err(self.stopped_error());
        }
        Ok(())
    }

    pub(crate) fn stopped_error(&self) -> Error {
        Error::Stopped {
            why: self.stop_reason.lock().clone(),
        }
    }

    /// Passes the event gate (see `gate`): waits while events are being applied.
    #[inline]
    pub(crate) fn pass_gate(&self) -> Result<(), Error> {
        if fork::current() != self.fork_generation {
            return Err(Error::Forked);
        }
        let pass = match self.gate.try_pass() {
            Some(p) => p,
            None => {
                if self.on_monitor_thread() {
                    return Err(Error::OnMonitorThread);
                }
                self.gate.pass()
            }
        };
        match pass {
            Pass::Open => Ok(()),
            Pass::Stopped => Err(self.stopped_error()),
        }
    }

    /// Waits until the kernel has no event of this descriptor in flight (see
    /// [`sys::Uffd::in_flight`]), then passes the gate.
    ///
    /// # Why this closes the address-reuse window
    ///
    /// An unmapping thread raises the kernel's in-flight count *before* it frees the
    /// address, and lowers it only after the monitor has read its event (when it resumes).
    /// A thread that maps new memory at the freed address does so after the free (both
    /// hold the address space's lock), so its later probe either sees the count raised and
    /// waits, or sees it lowered, which happened after the monitor's read and so after the
    /// gate's `begin`; passing the gate then waits for that batch to be applied.
    ///
    /// Orderings: the unmapper lowers the count with a plain atomic decrement, after it
    /// took the wait-queue lock that the monitor's read released, so the decrement is
    /// ordered after the gate's `begin` on every architecture Linux runs on (the lock's
    /// acquire orders it; release is cumulative). On our side, the Acquire fence after the
    /// probe orders the gate's load after the kernel's read of the count (a load-load
    /// barrier on weakly ordered CPUs, nothing on x86).
    pub(crate) fn sync(&self) -> Result<(), Error> {
        self.wait_quiet()?;
        self.pass_gate()
    }

    /// See [`Monitor::try_sync`].
    pub(crate) fn try_sync(&self) -> Result<bool, Error> {
        self.check_alive()?;
        if self.probe()? == InFlight::Changing {
            return Ok(false);
        }
        std::sync::atomic::fence(Acquire);
        match self.gate.try_pass() {
            None => Ok(false),
            Some(Pass::Open) => Ok(true),
            Some(Pass::Stopped) => Err(self.stopped_error()),
        }
    }

    fn probe(&self) -> Result<InFlight, Error> {
        // Held across the system call: the descriptor cannot be closed (and its number
        // reused) under the probe.
        let uffd = self.uffd.read();
        let uffd = uffd.as_ref().ok_or_else(|| self.stopped_error())?;
        uffd.in_flight().map_err(|e| Error::Stopped {
            why: Some(format!(
                "probing userfaultfd for events in flight failed: {e}"
            )),
        })
    }

    /// Waits until the reader has counted every event of calls that returned before this
    /// one (it never waits for the applier). Gives up if the monitor stops.
    fn wait_counted(&self) {
        if self.wait_quiet().is_err() {
            return;
        }
        let target = self.gate.begun();
        let mut round = 0u32;
        // Acquire: pairs with the reader's Release store after counting.
        while self.counted.load(Acquire) < target && !self.gate.stopped() {
            round += 1;
            if round < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Waits while an event is in flight (see [`sync`](Self::sync)).
    pub(crate) fn wait_quiet(&self) -> Result<(), Error> {
        self.check_alive()?;
        let mut round = 0u32;
        while self.probe()? == InFlight::Changing {
            if self.on_monitor_thread() {
                return Err(Error::OnMonitorThread);
            }
            // The event's round trip is tens of microseconds: yield a few times, then
            // sleep in growing steps (at most 1 ms), checking that the monitor still runs.
            round += 1;
            if round < 8 {
                std::thread::yield_now();
            } else {
                let us = 5u64 << (round - 8).min(8);
                std::thread::sleep(Duration::from_micros(us.min(1000)));
            }
            if self.gate.stopped() {
                return Err(self.stopped_error());
            }
        }
        std::sync::atomic::fence(Acquire);
        Ok(())
    }

    /// `[start, start + len)` widened to whole pages.
    pub(crate) fn page_range(&self, start: u64, len: u64) -> Result<(u64, u64), Error> {
        let bad = |reason| Error::InvalidRange { start, len, reason };
        if len == 0 {
            return Err(bad("the length is zero"));
        }
        let end = start
            .checked_add(len)
            .and_then(|e| e.checked_add(self.page - 1))
            .ok_or(bad("the range overflows the address space"))?;
        Ok((start & !(self.page - 1), end & !(self.page - 1)))
    }

    /// Registers `[s, e)` (page-aligned) with the kernel, checks it for holes, and
    /// records it as verified (see "Registering" in the module docs). Callers hold
    /// `leases`, which they pass in.
    fn register(&self, leases: &mut Leases, s: u64, e: u64) -> Result<(), Error> {
        // Always register: the call is idempotent for memory already registered, and a
        // "watched" set consulted instead cannot know about an unmap whose event the kernel
        // has not queued, or the monitor not read, yet: it would claim new memory mapped at
        // that address meanwhile. About 0.7 us per miss.
        // The read side is held across the system call: stop cannot unregister everything
        // and close the descriptor in between.
        let uffd = self.uffd.read();
        let uffd = uffd.as_ref().ok_or_else(|| self.stopped_error())?;
        uffd.register_wp(s, e - s).map_err(|source| Error::Watch {
            start: s,
            end: e,
            source,
        })?;
        bump(&self.stats.watch_registrations);
        // (A range refused for a hole below leaves its mapped parts registered:
        // unregistering them could undo a lease's registration. Stop undoes them.)
        // UFFDIO_REGISTER accepts a range with holes and registers only the mappings in
        // it. A hole must neither be claimed as watched (memory mapped there later would
        // not be) nor be accepted at all (the caller asked for all of it). msync(MS_ASYNC)
        // is a no-op that walks the mappings and fails with ENOMEM at a hole; checking
        // after registering means a hole made later comes with an UNMAP event.
        sys::check_mapped(s, e - s).map_err(|source| Error::Watch {
            start: s,
            end: e,
            source,
        })?;
        // Both system calls were made with `leases` held: an event's `forget` of this
        // range either came before the registration (and the check saw the memory as it
        // is now) or comes after this.
        leases.verified.add(s, e);
        Ok(())
    }

    /// Registers `[s, e)` unless it is verified already: for a cache lease only, whose
    /// entry's subscription was inserted before (see "Registering" in the module docs).
    fn register_unless_verified(&self, leases: &mut Leases, s: u64, e: u64) -> Result<(), Error> {
        // The same question as "no part of it is outside the set", answered with one
        // lookup and no allocation (the set merges touching ranges): a range is skipped
        // only if all of it is verified, as before.
        if leases.verified.covers(s, e) {
            bump(&self.stats.verified_leases);
            return Ok(());
        }
        self.register(leases, s, e)
    }

    /// The applier is about to apply events over `ranges`: they are no longer vouched for (see "Registering" in the module docs). Called *before* the event's
    /// invalidation runs.
    pub(crate) fn forget(&self, ranges: impl Iterator<Item = (u64, u64)>) {
        let mut leases = self.leases.lock();
        for (start, end) in ranges {
            leases.verified.remove(start, end);
        }
    }

    /// See [`Monitor::watch`]: an explicit watch, kept until `unwatch` or unmap.
    pub(crate) fn watch(&self, start: u64, len: u64) -> Result<(u64, u64), Error> {
        let (s, e) = self.page_range(start, len)?;
        self.check_alive()?;
        let mut leases = self.leases.lock();
        self.register(&mut leases, s, e)?;
        leases.explicit.add(s, e);
        Ok((s, e))
    }

    /// Watches `[start, start + len)` for as long as the returned lease lives (see
    /// "Watch leases" in the module docs).
    pub(crate) fn lease(self: &Arc<Self>, start: u64, len: u64) -> Result<WatchLease, Error> {
        let (s, e) = self.page_range(start, len)?;
        self.check_alive()?;
        let mut leases = self.leases.lock();
        self.register_unless_verified(&mut leases, s, e)?;
        leases.counts.acquire(s, e);
        Ok(WatchLease {
            shared: self.clone(),
            start: s,
            end: e,
        })
    }

    /// A lease ends: what no lease and no explicit watch needs any more is unwatched,
    /// lazily (see "Watch leases" in the module docs).
    fn end_lease(&self, s: u64, e: u64) {
        let mut leases = self.leases.lock();
        let mut freed = Vec::new();
        leases.counts.release(s, e, &mut freed);
        leases.idle.extend(freed);
        if leases.idle.len() >= IDLE_BATCH {
            self.unwatch_idle_locked(&mut leases);
        }
    }

    /// Unregisters every idle range that no lease and no explicit watch covers now.
    pub(crate) fn unwatch_idle(&self) {
        let mut leases = self.leases.lock();
        if !leases.idle.is_empty() {
            self.unwatch_idle_locked(&mut leases);
        }
    }

    fn unwatch_idle_locked(&self, leases: &mut Leases) {
        let idle = std::mem::take(&mut leases.idle);
        let uffd = self.uffd.read();
        let Some(uffd) = uffd.as_ref() else {
            return; // stopped: everything was unregistered
        };
        for (a, b) in idle {
            for (x, y) in leases.counts.uncovered(a, b) {
                for (x, y) in leases.explicit.uncovered(x, y) {
                    // Fails only for memory this descriptor does not hold (never
                    // registered, or another monitor's): nothing to undo then. An unmapped
                    // range is fine.
                    // Not vouched for any more, whatever the outcome.
                    leases.verified.remove(x, y);
                    if uffd.unregister(x, y - x).is_ok() {
                        bump(&self.stats.unwatched);
                    }
                }
            }
        }
    }

    fn unwatch(&self, start: u64, len: u64) -> Result<(), Error> {
        let (s, e) = self.page_range(start, len)?;
        self.check_alive()?;
        {
            let mut leases = self.leases.lock();
            leases.explicit.remove(s, e);
            let uffd = self.uffd.read();
            let uffd = uffd.as_ref().ok_or_else(|| self.stopped_error())?;
            // Parts a cache entry still leases stay registered: unregistering them would
            // let a change go unseen while the entry is still valid (a stale hit). They
            // are unwatched when their last lease ends.
            for (x, y) in leases.counts.uncovered(s, e) {
                // Before the system call: a failed unregister may have done part of it.
                leases.verified.remove(x, y);
                uffd.unregister(x, y - x).map_err(|source| Error::Watch {
                    start: x,
                    end: y,
                    source,
                })?;
            }
        }
        self.invalidate(s, e, Event::Clear);
        Ok(())
    }

    /// The applier saw `[from, from + len)` move to `to`: explicit watches move along
    /// (the kernel moved the registration; stop finds it among the mappings).
    pub(crate) fn moved(&self, from: u64, to: u64, len: u64) {
        let end = from.saturating_add(len);
        let mut leases = self.leases.lock();
        let inside: Vec<(u64, u64)> = leases
            .explicit
            .iter()
            .filter(|&(s, e)| s < end && e > from)
            .map(|(s, e)| (s.max(from), e.min(end)))
            .collect();
        for (s, e) in inside {
            leases.explicit.remove(s, e);
            leases.explicit.add(s - from + to, e - from + to);
        }
    }

    /// What this monitor's bookkeeping knows to be registered: leased, idle and explicitly
    /// watched ranges (the stop sequence's fallback where `/proc/self/maps` is unreadable;
    /// it misses what moved or grew with mremap).
    pub(crate) fn known_registered(&self) -> Vec<(u64, u64)> {
        let leases = self.leases.lock();
        let mut all = leases.counts.segments();
        all.extend(leases.idle.iter().copied());
        all.extend(leases.explicit.iter());
        all
    }

    pub(crate) fn subscriptions(&self) -> &Subscriptions {
        &self.subs
    }

    /// Invalidates `[start, end)` on the calling thread (an empty range is skipped).
    pub(crate) fn invalidate(&self, start: u64, end: u64, event: Event) {
        if let Ok(range) = Range::new(start, end, event) {
            bump(&self.stats.invalidations);
            drop(self.subs.invalidate_range_start(range));
        }
    }

    fn stats(&self) -> MonitorStats {
        let c = &self.stats;
        let l = |a: &AtomicU64| a.load(Relaxed);
        MonitorStats {
            batches: l(&c.batches),
            unmaps: l(&c.unmaps),
            removes: l(&c.removes),
            remaps: l(&c.remaps),
            forks: l(&c.forks),
            unexpected_faults: l(&c.unexpected_faults),
            unknown: l(&c.unknown),
            invalidations: l(&c.invalidations),
            watch_registrations: l(&c.watch_registrations),
            merged: l(&c.merged),
            read_backoffs: l(&c.read_backoffs),
            unwatched: l(&c.unwatched),
            verified_leases: l(&c.verified_leases),
        }
    }
}
