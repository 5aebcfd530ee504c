//! libfabric's memory-monitor import, backed by an mmu-uffd [`Monitor`].
//!
//! libfabric's registration cache (`mr_cache`) asks a *memory monitor* whether a cached
//! registration still names the pages it was made for. An application can replace the
//! built-in monitors with its own through the import interface of `rdma/fi_ext.h`:
//! [`mmu_uffd_fi_import`] opens libfabric's `mr_cache` object and imports a
//! `struct fid_mem_monitor` whose operations are implemented here.
//!
//! # What libfabric's cache does, and what each operation does here
//!
//! libfabric's cache, for each registration: registers the memory with the provider,
//! then calls `subscribe(addr, len)`; on every later hit it calls `valid(addr, len)` under
//! its `mm_lock`; when the monitor calls back `notify(addr, len)` it takes
//! `mm_list_rwlock` (read) and then `mm_lock`, and removes every cached entry overlapping
//! the range (in every cache that uses the monitor). In 1.x it never calls `unsubscribe`;
//! in 2.1 and later it calls it from inside `notify`, for each entry it removed, and when
//! it evicts an entry.
//!
//! - `start`/`stop`: start (or stop) delivering `notify`. `start` records the
//!   `import_ops` libfabric filled in (and fails if there is no `notify` in them); nothing
//!   is ever delivered before the first `start`
//!   or after a `stop` (libfabric 1.17 crashes on a `notify` that comes before it is
//!   initialized). `stop` forgets every subscription (no cache is left to notify) and never
//!   waits.
//! - `subscribe(addr, len)`: watches the page-aligned range with the monitor (the
//!   registration system call, idempotent) and counts one subscription for it: an interval
//!   subscription on [`Monitor::subscriptions`], shared by every `subscribe` of the same
//!   page range until that range is invalidated.
//! - `valid(addr, len)`: passes the monitor's gate ([`Monitor::sync`]: waits until no
//!   event is in flight and every event read has been applied, microseconds), then answers
//!   `true` only if a live subscription of exactly that page range exists *and* no
//!   invalidation overlapping it is waiting for its `notify` to be delivered (see below).
//! - Invalidation: the interval subscription's callback (on the monitor's applier
//!   thread) marks the subscription dead and queues the invalidated part (page-aligned)
//!   for the *notifier thread*; nothing else. The range stays *pending* until libfabric's
//!   `notify` for it has returned; then the dead subscription is dropped.
//! - `unsubscribe(addr, len)`: drops one count of the live subscription of that page
//!   range (the subscription goes with the last). An `unsubscribe` with no live
//!   subscription (already invalidated, or never made) is ignored, so it may arrive inside
//!   `notify`, late, twice, or never.
//!
//! # Why `valid` is sound without waiting for `notify`
//!
//! `valid` never depends on libfabric having processed a notification. Once an unmap,
//! move or madvise of subscribed memory has returned (or merely freed the address, for an
//! unmap on another thread), `Monitor::sync` in `valid` waits until the monitor has run the
//! invalidation callback, which marked the range pending before it returned. From then on
//! `valid` answers `false` for every range overlapping it until libfabric's `notify` has
//! removed every entry overlapping it from every cache; a `subscribe` of the same pages
//! made meanwhile (a new entry, registered after the change) creates a new subscription
//! but does not make the old entries valid: the pending range still answers `false` until
//! `notify` removed them too. Page granularity is enough: an entry touches every page of
//! its page-aligned range, so every page-aligned part of that range overlaps the entry.
//!
//! # Threads, locks, and why nothing deadlocks with libfabric's locks
//!
//! The monitor's **reader** thread reads the kernel's events; it never runs our code or
//! libfabric's, so the threads the kernel blocks until their event is read (an unmapping
//! thread, possibly holding libfabric's `mm_lock`) are always released. The **applier**
//! runs the invalidation callbacks; `valid` waits for it (the gate). The callback only
//! takes the notifier queue's lock, which nobody holds while waiting for anything.
//!
//! `notify` must not be called on the applier: libfabric's `notify` takes `mm_lock`, and a
//! thread inside `valid` holds `mm_lock` while it waits for the applier. Calling `notify`
//! from the callback would deadlock exactly when a cache lookup races with an unmap of
//! cached memory. So a dedicated **notifier** thread, fed by the callback through an
//! unbounded queue (pushing never blocks), calls `notify`. It holds none of our locks
//! while it is inside `notify`, so `unsubscribe` (and even `subscribe` or `valid`) called
//! by libfabric from inside `notify` cannot wait for it.
//!
//! The lock order is: libfabric's `mm_list_rwlock` → `mm_lock` → our subscription table →
//! the notifier queue; and the applier only ever takes the queue. No lock of ours is held
//! while calling into libfabric, the applier never takes a libfabric lock, and
//! `valid` takes the table only after `sync`, so there is no cycle.
//!
//! # The window libfabric leaves, and the address-reuse window
//!
//! libfabric registers a region *before* it subscribes it, and the subscription only
//! sees events that happen after it. Memory unmapped (or madvised, or moved) between the
//! provider's registration and `subscribe` is not caught by this protocol: if it was not
//! yet watched, the kernel reports nothing to anyone; if it was watched, the event was
//! applied to the subscriptions that existed then, and the new subscription starts alive.
//! (`subscribe` deliberately does not wait for events still being applied: one that is
//! applied after the subscription exists invalidates it too, which costs a spurious miss
//! when the event was older than the registration, and catches the window when it was
//! not.)
//! `valid` then answers `true` for a registration of pages that are gone. This happens
//! only when the application unmaps a buffer while it is being registered (a race in the
//! application itself); libfabric's own monitors have the same window (they look up the
//! cache's entries under `mm_lock`, which registration does not hold). Once `subscribe`
//! has returned, every event over the range is seen.
//!
//! The kernel frees an unmapped address before the monitor reads the UNMAP event. A thread
//! that maps new memory at that address while another thread's `munmap` has not returned
//! is still covered: `valid` begins with [`Monitor::sync`], which waits while any event
//! is in flight.
//!
//! # Costs and limits
//!
//! - `valid` costs one system call (the in-flight probe), the gate, and a table lookup:
//!   about half a microsecond per hit on a small virtual machine.
//! - After an invalidation, a new registration of the same pages misses until the
//!   notifier thread has delivered the old range's `notify` (it needs `mm_lock`, so this
//!   takes as long as the cache holds it): the pending range cannot tell the new entry
//!   from old entries in other caches.
//! - Watched memory stays watched until it is unmapped (`unsubscribe` does not unwatch:
//!   other subscriptions may need the same pages); an madvise of it waits for the monitor.
//! - In 1.x, where `unsubscribe` never comes, a subscription lives until its memory is
//!   invalidated or libfabric stops the monitor: the table holds at most one subscription
//!   per distinct page range registered and still mapped.
//! - After `fork`, the child's monitor refuses (`valid` is false, `subscribe` fails): the
//!   monitor's threads exist only in the parent.
//! - Memory the monitor cannot watch (file mappings on kernels without `WP_ASYNC`,
//!   `VM_IO`) makes `subscribe` fail; libfabric then does not cache the region.
//!
//! # Loading it into an unmodified program
//!
//! With `MMU_UFFD_FI_IMPORT=1` in the environment, a constructor of this library imports
//! the monitor when the library is loaded (for example with `LD_PRELOAD`), if libfabric is
//! already loaded in the process (linked into the program); otherwise it does nothing. It
//! never panics, does nothing in set-user-id programs, and runs once, at load (a forked
//! child does not run constructors again; an `exec`ed program does, with its own
//! environment).

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use mmu_notifier::{IntervalContext, IntervalSubscriber, IntervalSubscription, Range, WouldBlock};
use mmu_uffd::Monitor;

use crate::error::{errno_of, ffi_call, ffi_call_or, FfiError};

/// `struct fid` of `rdma/fabric.h`.
#[repr(C)]
pub(crate) struct Fid {
    /// `FI_CLASS_*`.
    pub fclass: usize,
    /// The owner's context (filled by libfabric on import).
    pub context: *mut c_void,
    /// The object's operations (filled by libfabric on import).
    pub ops: *mut FiOps,
}

/// `struct fi_ops` of `rdma/fabric.h`.
#[repr(C)]
pub(crate) struct FiOps {
    /// Size of this structure.
    pub size: usize,
    /// `fi_close`.
    pub close: Option<unsafe extern "C" fn(*mut Fid) -> c_int>,
    /// `fi_bind`, also `fi_import_fid`.
    pub bind: Option<unsafe extern "C" fn(*mut Fid, *mut Fid, u64) -> c_int>,
    /// `fi_control`.
    pub control: Option<unsafe extern "C" fn(*mut Fid, c_int, *mut c_void) -> c_int>,
    /// `fi_open_ops`.
    pub ops_open: Option<
        unsafe extern "C" fn(*mut Fid, *const c_char, u64, *mut *mut c_void, *mut c_void) -> c_int,
    >,
    /// `fi_tostr`.
    pub tostr: Option<unsafe extern "C" fn(*const Fid, *mut c_char, usize) -> c_int>,
    /// `fi_set_ops`.
    pub ops_set: Option<
        unsafe extern "C" fn(*mut Fid, *const c_char, u64, *mut c_void, *mut c_void) -> c_int,
    >,
}

/// `struct fi_ops_mem_monitor` of `rdma/fi_ext.h`: what the imported monitor does.
#[repr(C)]
pub(crate) struct FiOpsMemMonitor {
    /// Size of this structure.
    pub size: usize,
    /// Start delivering notifications.
    pub start: Option<unsafe extern "C" fn(*mut FidMemMonitor) -> c_int>,
    /// Stop delivering notifications.
    pub stop: Option<unsafe extern "C" fn(*mut FidMemMonitor)>,
    /// Watch a range.
    pub subscribe: Option<unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize) -> c_int>,
    /// Stop watching a range.
    pub unsubscribe: Option<unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize)>,
    /// Whether a range is unchanged since it was subscribed.
    pub valid: Option<unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize) -> bool>,
}

/// `struct fi_ops_mem_notify` of `rdma/fi_ext.h`: libfabric's side of the monitor.
#[repr(C)]
pub(crate) struct FiOpsMemNotify {
    /// Size of this structure.
    pub size: usize,
    /// A range changed: drop every cached registration overlapping it.
    pub notify: Option<unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize)>,
}

/// `struct fid_mem_monitor` of `rdma/fi_ext.h`.
#[repr(C)]
pub(crate) struct FidMemMonitor {
    /// The object header (`fclass` = `FI_CLASS_MEM_MONITOR`).
    pub fid: Fid,
    /// Our operations.
    pub export_ops: *mut FiOpsMemMonitor,
    /// libfabric's operations (filled by libfabric on import).
    pub import_ops: *mut FiOpsMemNotify,
}

/// `FI_CLASS_MEM_MONITOR` (its position in the `FI_CLASS_*` enum of `rdma/fabric.h`,
/// checked by the C layout test).
pub(crate) const FI_CLASS_MEM_MONITOR: usize = 23;
/// `FI_VERSION(1, 13)`: the first version with the monitor import.
const FI_VERSION_1_13: u32 = (1 << 16) | 13;

/// The monitor's object: libfabric keeps a pointer to it forever, so it is static.
struct FidCell(std::cell::UnsafeCell<FidMemMonitor>);

// SAFETY: the fields we write (`fclass`, `export_ops`) are written once, under `IMPORT`
// before any other thread can see the object; libfabric writes the rest during the import,
// under its own lock, and we read `import_ops` only in `start`, which libfabric calls after
// the import (ordered by libfabric's locks), and publish it through an atomic.
unsafe impl Sync for FidCell {}

static FID: FidCell = FidCell(std::cell::UnsafeCell::new(FidMemMonitor {
    fid: Fid {
        fclass: FI_CLASS_MEM_MONITOR,
        context: std::ptr::null_mut(),
        ops: std::ptr::null_mut(),
    },
    export_ops: std::ptr::null_mut(),
    import_ops: std::ptr::null_mut(),
}));

/// Our operations (libfabric only reads them; `static mut`-free through a cell).
struct OpsCell(std::cell::UnsafeCell<FiOpsMemMonitor>);

// SAFETY: never written after initialization; libfabric only reads it.
unsafe impl Sync for OpsCell {}

static EXPORT_OPS: OpsCell = OpsCell(std::cell::UnsafeCell::new(FiOpsMemMonitor {
    size: std::mem::size_of::<FiOpsMemMonitor>(),
    start: Some(op_start),
    stop: Some(op_stop),
    subscribe: Some(op_subscribe),
    unsubscribe: Some(op_unsubscribe),
    valid: Some(op_valid),
}));

/// How the process-wide monitor was handed out (imports and the test export exclude each
/// other: one `struct fid_mem_monitor`, one owner of its `import_ops`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    Nobody,
    Libfabric,
    Test,
}

/// Serializes imports; remembers who owns the monitor object.
static IMPORT: Mutex<Owner> = Mutex::new(Owner::Nobody);

/// The monitor and everything the operations share.
struct State {
    monitor: Monitor,
    table: Mutex<Table>,
    queue: Arc<NotifyQueue>,
}

/// Live and dead subscriptions.
#[derive(Default)]
struct Table {
    /// Live subscriptions by page range `(start, end)`.
    live: BTreeMap<(u64, u64), Live>,
    /// Invalidated subscriptions by id, dropped once their `notify` was delivered.
    dead: BTreeMap<u64, IntervalSubscription<Watcher>>,
}

struct Live {
    id: u64,
    count: u64,
    alive: Arc<AtomicBool>,
    sub: IntervalSubscription<Watcher>,
}

/// The interval subscriber of one subscribed page range.
struct Watcher {
    id: u64,
    start: u64,
    end: u64,
    alive: Arc<AtomicBool>,
    queue: Arc<NotifyQueue>,
}

/// Subscriptions are only ever dropped, which never waits (removal may happen inside
/// libfabric's `notify`, or at `stop`).
impl IntervalSubscriber for Watcher {
    fn invalidate(
        &mut self,
        range: &Range,
        _ctx: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        let start = range.start().max(self.start) & !(page_size() - 1);
        let end = align_up(range.end().min(self.end));
        // Only the first invalidation is notified: libfabric's `notify` of it removes every
        // entry this subscription was made for (each touches every page of the range).
        if start < end && self.alive.swap(false, Ordering::AcqRel) {
            self.queue.push(Pending {
                start,
                end,
                id: self.id,
                key: (self.start, self.end),
            });
        }
        Ok(())
    }
}

/// An invalidated range waiting for (or in) its `notify`.
#[derive(Clone, Copy)]
struct Pending {
    start: u64,
    end: u64,
    /// The subscription it killed (dropped once `notify` returned).
    id: u64,
    /// That subscription's page range.
    key: (u64, u64),
}

/// Applier → notifier thread. Pushing never blocks on anything but this short lock.
#[derive(Default)]
struct NotifyQueue {
    inner: Mutex<QueueInner>,
    cv: Condvar,
}

#[derive(Default)]
struct QueueInner {
    /// Not yet handed to libfabric, oldest first.
    todo: std::collections::VecDeque<(u64, Pending)>,
    /// Every pending range (queued or being notified), by sequence number.
    pending: BTreeMap<u64, Pending>,
    next: u64,
}

impl NotifyQueue {
    fn push(&self, p: Pending) {
        let mut q = lock(&self.inner);
        let seq = q.next;
        q.next += 1;
        q.pending.insert(seq, p);
        q.todo.push_back((seq, p));
        drop(q);
        self.cv.notify_one();
    }

    /// Whether a pending range overlaps `[start, end)`.
    fn overlaps(&self, start: u64, end: u64) -> bool {
        lock(&self.inner)
            .pending
            .values()
            .any(|p| p.start < end && start < p.end)
    }
}

/// Where `start` put libfabric's `struct fi_ops_mem_notify` and the monitor object; null
/// while stopped.
static NOTIFY_OPS: AtomicPtr<FiOpsMemNotify> = AtomicPtr::new(std::ptr::null_mut());
static NOTIFY_MONITOR: AtomicPtr<FidMemMonitor> = AtomicPtr::new(std::ptr::null_mut());
/// Ids of subscriptions.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Counters for tests: notifications delivered, skipped (stopped).
static NOTIFIED: AtomicU64 = AtomicU64::new(0);

static STATE: OnceLock<Result<State, String>> = OnceLock::new();

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    })
}

fn align_up(x: u64) -> u64 {
    x.checked_add(page_size() - 1)
        .map_or(!(page_size() - 1), |v| v & !(page_size() - 1))
}

/// The page range of `[addr, addr + len)`, or `None` if empty or overflowing.
fn page_range(addr: *const c_void, len: usize) -> Option<(u64, u64)> {
    let start = addr as u64;
    let end = start.checked_add(len as u64)?;
    if len == 0 || end > u64::MAX - page_size() {
        return None;
    }
    Some((start & !(page_size() - 1), align_up(end)))
}

fn state() -> Result<&'static State, &'static str> {
    STATE
        .get_or_init(|| {
            let monitor = Monitor::new().map_err(|e| e.to_string())?;
            let queue = Arc::new(NotifyQueue::default());
            let q = queue.clone();
            std::thread::Builder::new()
                .name("mmu-uffd-fi-notify".into())
                .spawn(move || notifier(&q))
                .map_err(|e| format!("cannot start the notifier thread: {e}"))?;
            Ok(State {
                monitor,
                table: Mutex::new(Table::default()),
                queue,
            })
        })
        .as_ref()
        .map_err(|e| e.as_str())
}

/// The notifier thread: delivers libfabric's `notify` for each invalidated range, then
/// forgets the range and drops the subscription it killed. Never holds a lock of ours
/// while inside `notify`.
fn notifier(queue: &NotifyQueue) {
    block_signals();
    loop {
        let (seq, p) = {
            let mut q = lock(&queue.inner);
            loop {
                if let Some(item) = q.todo.pop_front() {
                    break item;
                }
                q = queue.cv.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let ops = NOTIFY_OPS.load(Ordering::Acquire);
        let monitor = NOTIFY_MONITOR.load(Ordering::Acquire);
        if !ops.is_null() && !monitor.is_null() {
            // SAFETY: `start` checked that `ops` points to libfabric's `fi_ops_mem_notify`
            // (static in libfabric, never freed) and that it is large enough to hold
            // `notify`.
            if let Some(notify) = unsafe { (*ops).notify } {
                let len = (p.end - p.start) as usize;
                // A panic cannot come out of C; the closure only calls the C function.
                let _ = catch_unwind(AssertUnwindSafe(|| {
                    // SAFETY: libfabric's notify, with the monitor object it was imported
                    // with and a range of this process's address space.
                    unsafe { notify(monitor, p.start as *const c_void, len) }
                }));
                NOTIFIED.fetch_add(1, Ordering::Relaxed);
            }
        }
        lock(&queue.inner).pending.remove(&seq);
        if let Ok(st) = state() {
            let mut table = lock(&st.table);
            let dead = match table.dead.remove(&p.id) {
                Some(sub) => Some(sub),
                None => match table.live.get(&p.key) {
                    Some(live) if live.id == p.id => table.live.remove(&p.key).map(|l| l.sub),
                    _ => None,
                },
            };
            drop(table);
            drop(dead); // outside the table lock (dropping never waits anyway)
        }
    }
}

fn block_signals() {
    // SAFETY: a zeroed sigset is valid input to sigfillset; pthread_sigmask only changes
    // this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Runs `f`, turning a panic into `fallback` (nothing unwinds into C).
fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

unsafe extern "C" fn op_start(monitor: *mut FidMemMonitor) -> c_int {
    guard(-libc::EIO, || {
        if monitor.is_null() {
            return -libc::EINVAL;
        }
        if state().is_err() {
            return -libc::ENOSYS;
        }
        // SAFETY: libfabric passes the object it imported; it filled `import_ops` during
        // the import, before calling `start`.
        let ops = unsafe { (*monitor).import_ops };
        let usable = !ops.is_null()
            // SAFETY: `ops` points to libfabric's `fi_ops_mem_notify`.
            && unsafe { (*ops).size } >= std::mem::size_of::<FiOpsMemNotify>();
        if !usable {
            // Without `notify` old entries could never be removed, and `valid` would have
            // to refuse forever: refuse to start instead.
            return -libc::EINVAL;
        }
        NOTIFY_MONITOR.store(monitor, Ordering::Release);
        NOTIFY_OPS.store(ops, Ordering::Release);
        0
    })
}

unsafe extern "C" fn op_stop(_monitor: *mut FidMemMonitor) {
    guard((), || {
        NOTIFY_OPS.store(std::ptr::null_mut(), Ordering::Release);
        if let Ok(st) = state() {
            // No cache is left: forget every subscription (dropped outside the lock).
            let live = std::mem::take(&mut lock(&st.table).live);
            drop(live);
        }
    })
}

unsafe extern "C" fn op_subscribe(
    _monitor: *mut FidMemMonitor,
    addr: *const c_void,
    len: usize,
) -> c_int {
    guard(-libc::EIO, || {
        let Some((start, end)) = page_range(addr, len) else {
            return -libc::EINVAL;
        };
        let st = match state() {
            Ok(st) => st,
            Err(_) => return -libc::ENOSYS,
        };
        if let Err(e) = st.monitor.watch(start as *const u8, (end - start) as usize) {
            return -errno_of(&e);
        }
        // The address may be reused: an unmap of the memory that was here before, returned
        // before this call, may have been read but not yet applied. Applied after the
        // insert below, it would invalidate the new subscription at once (libfabric then
        // finds a fresh registration invalid). Wait until it has been applied, as the
        // cache's lookups do. From a monitor thread (a notify path) there is nothing to
        // wait for that this thread is not itself applying.
        match st.monitor.sync() {
            Ok(()) | Err(mmu_uffd::Error::OnMonitorThread) => {}
            Err(e) => return -errno_of(&e),
        }
        let mut table = lock(&st.table);
        if let Some(live) = table.live.get_mut(&(start, end)) {
            if live.alive.load(Ordering::Acquire) {
                live.count += 1;
                return 0;
            }
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let alive = Arc::new(AtomicBool::new(true));
        let watcher = Watcher {
            id,
            start,
            end,
            alive: alive.clone(),
            queue: st.queue.clone(),
        };
        let sub = match st
            .monitor
            .subscriptions()
            .insert_interval(start..end, watcher)
        {
            Ok(sub) => sub,
            Err(_) => return -libc::ENOMEM,
        };
        // Wait until the subscription is in the tree (it may be deferred while an
        // invalidation runs): every event applied after this sees it.
        let _ = sub.read_begin();
        let new = Live {
            id,
            count: 1,
            alive,
            sub,
        };
        if let Some(old) = table.live.insert((start, end), new) {
            // The old one was invalidated: it stays until its notify was delivered.
            table.dead.insert(old.id, old.sub);
        }
        0
    })
}

unsafe extern "C" fn op_unsubscribe(_monitor: *mut FidMemMonitor, addr: *const c_void, len: usize) {
    guard((), || {
        let (Some((start, end)), Ok(st)) = (page_range(addr, len), state()) else {
            return;
        };
        let mut table = lock(&st.table);
        let gone = match table.live.get_mut(&(start, end)) {
            Some(live) if live.alive.load(Ordering::Acquire) => {
                live.count -= 1;
                live.count == 0
            }
            _ => false,
        };
        if gone {
            let live = table.live.remove(&(start, end));
            drop(table);
            drop(live);
        }
    })
}

unsafe extern "C" fn op_valid(
    _monitor: *mut FidMemMonitor,
    addr: *const c_void,
    len: usize,
) -> bool {
    guard(false, || {
        let (Some((start, end)), Ok(st)) = (page_range(addr, len), state()) else {
            return false;
        };
        if st.monitor.sync().is_err() {
            return false;
        }
        let alive = match lock(&st.table).live.get(&(start, end)) {
            Some(live) => live.alive.load(Ordering::Acquire),
            None => false,
        };
        alive && !st.queue.overlaps(start, end)
    })
}

/// The process-wide monitor object with our operations filled in.
fn monitor_object() -> *mut FidMemMonitor {
    let m = FID.0.get();
    // SAFETY: called under `IMPORT`, before the object is handed to anyone (later calls
    // write the same values).
    unsafe {
        (*m).fid.fclass = FI_CLASS_MEM_MONITOR;
        (*m).export_ops = EXPORT_OPS.0.get();
    }
    m
}

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl call
    // on this thread; copied at once.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: see above.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

type FiOpen = unsafe extern "C" fn(
    u32,
    *const c_char,
    *mut c_void,
    usize,
    u64,
    *mut *mut Fid,
    *mut c_void,
) -> c_int;

/// The import, with the dlopen flags to use (`RTLD_NOLOAD` from the constructor).
fn import(dl_flags: c_int) -> Result<c_int, FfiError> {
    if std::env::var_os("FI_MR_CACHE_MONITOR").is_some() {
        return Err(FfiError::new(
            libc::EPERM,
            "FI_MR_CACHE_MONITOR is set, and libfabric uses that monitor instead of an \
             imported one: the mmu-uffd monitor was not imported (unset FI_MR_CACHE_MONITOR \
             to use it)",
        ));
    }
    let mut owner = lock(&IMPORT);
    if *owner == Owner::Test {
        return Err(FfiError::new(
            libc::EBUSY,
            "the monitor object was handed to mmu_uffd_fi_monitor_new (a test)",
        ));
    }
    // SAFETY: a constant NUL-terminated name; the handle is never closed (libfabric keeps
    // pointers to our code, and we to its).
    let lib = unsafe { libc::dlopen(c"libfabric.so.1".as_ptr(), dl_flags) };
    if lib.is_null() {
        return Err(FfiError::new(
            libc::ENOENT,
            format_args!(
                "libfabric is not available ({}): the monitor was not imported",
                dl_error()
            ),
        ));
    }
    // SAFETY: a valid handle and a constant name.
    let sym = unsafe { libc::dlsym(lib, c"fi_open".as_ptr()) };
    if sym.is_null() {
        return Err(FfiError::new(
            libc::ENOENT,
            format_args!(
                "this libfabric has no fi_open ({}): the monitor was not imported",
                dl_error()
            ),
        ));
    }
    // SAFETY: `fi_open` has this signature in every libfabric that has it (1.13 and later
    // for the "mr_cache" name).
    let fi_open: FiOpen = unsafe { std::mem::transmute::<*mut c_void, FiOpen>(sym) };
    state().map_err(|e| {
        FfiError::new(
            libc::ENOSYS,
            format_args!("cannot start the memory monitor for libfabric: {e}"),
        )
    })?;
    let mut cache: *mut Fid = std::ptr::null_mut();
    // SAFETY: libfabric's fi_open with a constant name, no attributes, and a valid out
    // pointer.
    let ret = unsafe {
        fi_open(
            FI_VERSION_1_13,
            c"mr_cache".as_ptr(),
            std::ptr::null_mut(),
            0,
            0,
            &mut cache,
            std::ptr::null_mut(),
        )
    };
    if ret != 0 || cache.is_null() {
        return Err(FfiError::new(
            if ret < 0 { -ret } else { libc::EIO },
            format_args!(
                "libfabric's fi_open(\"mr_cache\") failed ({ret}): this libfabric cannot import \
                 a memory monitor"
            ),
        ));
    }
    // SAFETY: `cache` is the object fi_open returned: `ops` is null or points to its
    // operations.
    let (bind, close) = unsafe {
        match (*cache).ops {
            ops if ops.is_null() => (None, None),
            ops => ((*ops).bind, (*ops).close),
        }
    };
    let monitor = monitor_object();
    let ret = match bind {
        // SAFETY: fi_import_fid(cache, &monitor.fid, 0); the monitor object is static.
        Some(bind) => unsafe { bind(cache, monitor.cast::<Fid>(), 0) },
        None => -libc::ENOSYS,
    };
    if let Some(close) = close {
        // SAFETY: fi_close of the object fi_open returned, once.
        unsafe { close(cache) };
    }
    if ret != 0 {
        return Err(FfiError::new(
            -ret,
            format_args!(
                "libfabric refused the imported monitor ({ret}{})",
                if ret == -libc::EBUSY {
                    ": a monitor was already imported"
                } else {
                    ""
                }
            ),
        ));
    }
    *owner = Owner::Libfabric;
    Ok(0)
}

/// Imports the mmu-uffd memory monitor into libfabric's registration cache
/// (`fi_import` of a `struct fid_mem_monitor` into libfabric's `mr_cache`); call it
/// after `fi_getinfo` and before opening domains. `libfabric.so.1` is loaded at run time:
/// this library does not link it. Returns 0, or a negative error: libfabric's own code
/// when it refuses (`-FI_EBUSY` when a monitor was already imported), `-ENOENT` when
/// libfabric cannot be loaded, `-EPERM` when the environment variable
/// `FI_MR_CACHE_MONITOR` is set (libfabric would ignore an imported monitor), `-ENOSYS`
/// when userfaultfd is unavailable. With `MMU_UFFD_FI_IMPORT=1` in the environment the
/// library does this itself when it is loaded, if the program links libfabric.
#[no_mangle]
pub extern "C" fn mmu_uffd_fi_import() -> c_int {
    ffi_call(|| import(libc::RTLD_NOW))
}

/// For tests that play libfabric's part (`struct fid_mem_monitor **out`): stores the
/// process-wide monitor object, its `export_ops` filled in; the caller sets `import_ops`
/// and calls `start`. Returns 0, `-EINVAL` for a null `out`, `-EBUSY` once the monitor was
/// imported into libfabric, `-ENOSYS` when userfaultfd is unavailable.
///
/// cbindgen:ignore
///
/// # Safety
/// `out` must be null or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_fi_monitor_new(out: *mut *mut c_void) -> c_int {
    ffi_call(|| {
        if out.is_null() {
            return Err(FfiError::null("out"));
        }
        let mut owner = lock(&IMPORT);
        if *owner == Owner::Libfabric {
            return Err(FfiError::new(
                libc::EBUSY,
                "the monitor was imported into libfabric",
            ));
        }
        state().map_err(|e| {
            FfiError::new(
                libc::ENOSYS,
                format_args!("cannot start the memory monitor: {e}"),
            )
        })?;
        *owner = Owner::Test;
        // SAFETY: `out` is valid for writing (caller's contract).
        unsafe { *out = monitor_object().cast::<c_void>() };
        Ok(0)
    })
}

/// For tests: how many `notify` calls were delivered so far; stores in `*pending` (if not
/// null) how many invalidated ranges still wait for theirs.
///
/// cbindgen:ignore
///
/// # Safety
/// `pending` must be null or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn mmu_uffd_fi_notified(pending: *mut u64) -> u64 {
    ffi_call_or(0, || {
        if !pending.is_null() {
            let n = state().map_or(0, |st| lock(&st.queue.inner).pending.len() as u64);
            // SAFETY: valid for writing (caller's contract).
            unsafe { *pending = n };
        }
        Ok(NOTIFIED.load(Ordering::Relaxed))
    })
}

/// The load-time import (see "Loading it into an unmodified program").
extern "C" fn constructor() {
    // Never unwinds: a panic is caught; failures are reported by `import` on stderr.
    let _ = catch_unwind(|| {
        // SAFETY: getauxval has no preconditions.
        if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
            return;
        }
        if std::env::var_os("MMU_UFFD_FI_IMPORT").is_some_and(|v| v == "1") {
            match import(libc::RTLD_NOW | libc::RTLD_NOLOAD) {
                // Not linked into this program: nothing to do.
                Err(e) if e.errno == libc::ENOENT => {}
                Err(e) => eprintln!("mmu-uffd: MMU_UFFD_FI_IMPORT=1: {}", e.message),
                Ok(_) => {}
            }
        }
    });
}

/// Runs [`constructor`] when the library is loaded.
#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = constructor;
