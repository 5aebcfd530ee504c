//! HMM mirror (Linux's dmirror).
//!
//! A device (a GPU, a NIC) that walks its *own* page table, filled on device faults with
//! copies of the primary's translations. Like Linux's `lib/test_hmm.c`, it mirrors the
//! whole address space with **one** interval subscription, and offers the device-side
//! operations of the dmirror ioctls: [`read`](HmmMirror::read), [`write`](HmmMirror::write),
//! [`snapshot`](HmmMirror::snapshot), [`migrate_to_device`](HmmMirror::migrate_to_device)
//! and [`exclusive`](HmmMirror::exclusive).
//!
//! # The protocol
//!
//! The device page table (page → frame, writable) lives inside the subscription, behind
//! its *user lock*, which the library owns: the library takes it (try-takes it in a
//! non-blockable range) and advances the subscription's sequence before it calls
//! [`invalidate`](IntervalSubscriber::invalidate), so the callback runs with the table in
//! hand and cannot forget the sequence.
//!
//! - **Invalidation** (a primary thread, before it changes anything in the range): drops
//!   every device entry in the range. The one exception is the device's *own* migration
//!   (event `Migrate` carrying this device's [`OwnerToken`]): the device is moving those
//!   pages itself and fixes its table up afterwards (below), so the callback leaves the
//!   table alone. Nothing in the callback ever waits for anything but the user lock, so it
//!   never has to answer `WouldBlock` itself: in a non-blockable range the library answers
//!   for it when the try-lock fails.
//! - **Device fault** (the collision-retry loop, `dmirror_range_fault`):
//!   1. `s = read_begin()`: the subscription's sequence (waits while an invalidation of
//!      this subscription is in flight);
//!   2. `snapshot(range, Fault | FaultWrite)` of the primary, *without* the user lock: it
//!      takes the mmap lock, may fault pages in and may itself invalidate (a COW break
//!      calls this very subscription, which takes the user lock);
//!   3. take the user lock; if `read_retry(s)` (an invalidation ran its callback since 1),
//!      or the range overlaps the fence of a migration by this device, drop the snapshot,
//!      count a retry and start again, until the fault timeout
//!      ([`SecondaryMmu::set_fault_timeout`]; Linux's `HMM_RANGE_DEFAULT_TIMEOUT` is 1 s)
//!      gives [`SecondaryError::Timeout`];
//!   4. else report each install to the checker and install it, then unlock.
//! - **Device access** (`read`/`write`): with the user lock held, through an entry (a
//!   write only through a writable one); a missing entry means: unlock, fault, try again.
//!   Holding the lock across the access is what makes it safe: an invalidation of the page
//!   must take the lock before the primary may change or free the page.
//! - **Own migration** (`migrate_to_device`, serialised with `exclusive` by a device-side
//!   lock): (a) `s = read_begin()`, take the user lock, retry if `read_retry(s)`; then
//!   put up a *fence* over the range (fills of it retry while it is up, as Linux's
//!   migration entries make `hmm_range_fault` wait) and replace the entry of every page
//!   in it by a *marker* remembering the translation it had (the device stops using it);
//!   (b) `migrate_range(.., owner)`, whose `Migrate` invalidation the callback ignores,
//!   so the markers survive it, while any *other* invalidation of a page drops its marker
//!   like any entry; (c) under the user lock, each surviving marker becomes a translation
//!   to the page's new frame (or its old one if it did not move), and the fence comes
//!   down.
//! - **Release** (the process exits): the `Release` invalidation drops everything and marks
//!   the mirror gone; every later operation answers [`SecondaryError::Gone`].
//!
//! # Why each install is safe
//!
//! A fill (step 4) installs a frame that is stale only if the primary changed the page's
//! entry after the snapshot read it, or before without the snapshot seeing it. Every such
//! change happens inside an invalidation covering the page, whose callback takes the user
//! lock and moves the sequence. If that callback ran before step 3 took the lock, either
//! it ran after step 1 (the sequence moved: retry) or before, and then step 1 waited until
//! its invalidation ended, after which the snapshot sees the change. If it runs after step
//! 4, it drops the new entry. The own-migration callback moves the sequence too (the
//! library does it for every callback), so a fill that gathered a frame before the fence
//! retries even though the callback ignores the event.
//!
//! The fix-up (c) installs without a sequence check: a marker that survives proves that
//! no invalidation but the device's own migration ran its callback on the page since (a);
//! and thanks to (a)'s `read_begin`/`read_retry`, none that ran it before (a) was still in
//! flight then. So the primary's entry is what the migration left there, and no
//! invalidation window is open over the page (a window opens only after the callbacks
//! ran); one that starts later drops the new entry. The fence keeps fills out meanwhile:
//! the markers alone would not (another invalidation may drop some of them, and a fill
//! would then install a frame the migration is about to free).
//!
//! [`exclusive`](HmmMirror::exclusive) records its entry the same way a fill does,
//! except that what it checks under the user lock, after a `read_begin` taken once the
//! primary granted the page, is the primary's entry itself (still device-exclusive, same
//! frame): the grant is its own invalidation, so a sequence taken before it would always
//! be stale.

//! # Exclusive access
//!
//! [`exclusive`](HmmMirror::exclusive) makes pages device-exclusive in the primary
//! (`make_device_exclusive`) and records *atomic* entries for them, which the next CPU
//! access revokes through an `Exclusive` invalidation without owner. The checker counts a
//! device access as coherent only through a *present* primary entry, so the mirror never
//! reads or writes through an atomic entry: a `read` or `write` of such a page faults it
//! back first (which revokes it), as a CPU access would.
//!
//! # Memory orderings
//!
//! The device table is only touched under the user lock; the counters are statistics
//! (`Relaxed`); the timeout is a configuration value no other data depends on
//! (`Relaxed`). The only cross-thread ordering the protocol needs is the library's:
//! `read_begin` loads the sequence with `Acquire` against the `Release` of the
//! invalidation that set it, and `read_retry` is evaluated under the user lock.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::BitOr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use mmu_notifier::{
    Event, Install, IntervalContext, IntervalError, IntervalSubscriber, IntervalSubscription,
    OwnerToken, Range, WouldBlock,
};
use mmu_sim::{
    AddressSpace, CheckedSecondary, FrameRef, PageState, PteKind, SecondaryKind, SimError,
    SnapshotMode, PAGE_SIZE, TASK_SIZE,
};
use parking_lot::Mutex;

use crate::{
    device_access, report_install, Counters, FaultRetry, FaultTimeout, SecondaryError,
    SecondaryMmu, SecondaryStats,
};

const P: u64 = PAGE_SIZE;

/// Per-page access flags reported by [`HmmMirror::snapshot`], with the values of Linux's
/// `HMM_DMIRROR_PROT_*`.
///
/// A mapped page is exactly one of [`READ`](Self::READ) or [`WRITE`](Self::WRITE) (the
/// latter implies read access, as in Linux), with [`ZERO`](Self::ZERO) added for the
/// shared zero page; [`NONE`](Self::NONE) is a readable mapping with nothing present;
/// [`ERROR`](Self::ERROR) is no mapping, or one that forbids reading (`PROT_NONE`).
///
/// ```
/// use mmu_secondary::hmm::MirrorProt;
/// let p = MirrorProt::ZERO | MirrorProt::READ;
/// assert!(p.contains(MirrorProt::READ));
/// assert_eq!(p.bits(), 0x11);
/// assert_eq!(format!("{p:?}"), "MirrorProt(READ | ZERO)");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MirrorProt(u8);

impl MirrorProt {
    /// Mapped, nothing present (`HMM_DMIRROR_PROT_NONE`).
    pub const NONE: Self = Self(0x00);
    /// Present, read-only (`HMM_DMIRROR_PROT_READ`).
    pub const READ: Self = Self(0x01);
    /// Present, writable (`HMM_DMIRROR_PROT_WRITE`).
    pub const WRITE: Self = Self(0x02);
    /// The shared zero page (`HMM_DMIRROR_PROT_ZERO`).
    pub const ZERO: Self = Self(0x10);
    /// Not mapped, or not readable (`HMM_DMIRROR_PROT_ERROR`).
    pub const ERROR: Self = Self(0xff);

    /// The raw value, as Linux's test reads it.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    fn of(state: PageState) -> Self {
        match state {
            PageState::None => Self::NONE,
            PageState::Zero(_) => Self::ZERO | Self::READ,
            PageState::Present { writable: true, .. } => Self::WRITE,
            PageState::Present {
                writable: false, ..
            } => Self::READ,
        }
    }
}

impl BitOr for MirrorProt {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Debug for MirrorProt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Self::ERROR {
            return write!(f, "MirrorProt(ERROR)");
        }
        if *self == Self::NONE {
            return write!(f, "MirrorProt(NONE)");
        }
        let names = [
            (Self::READ, "READ"),
            (Self::WRITE, "WRITE"),
            (Self::ZERO, "ZERO"),
        ];
        let set: Vec<&str> = names
            .iter()
            .filter(|(p, _)| self.contains(*p))
            .map(|&(_, n)| n)
            .collect();
        let known = names.iter().fold(0, |acc, (p, _)| acc | p.0);
        write!(f, "MirrorProt({}", set.join(" | "))?;
        if self.0 & !known != 0 {
            write!(f, " | {:#x}", self.0 & !known)?;
        }
        write!(f, ")")
    }
}

/// One entry of the device page table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    /// A translation the device uses, installed by a fill (or a migration fix-up).
    Mapped { frame: FrameRef, writable: bool },
    /// Exclusive access granted by the primary (its entry is device-exclusive). Held as a
    /// translation (dropped by invalidations), never accessed through (see module docs).
    Atomic { frame: FrameRef },
    /// A page of this device's migration in progress: not a translation. Remembers the
    /// translation the page had, to restore it if the page does not move; an
    /// invalidation of the page (other than the migration's own) drops it like any entry.
    Migrating { prev: Option<(FrameRef, bool)> },
}

/// Counters shared by the mirror and its table (the callback sees only the table).
#[derive(Debug, Default)]
struct Shared {
    counters: Counters,
    ignored_migrations: AtomicU64,
}

/// The device page table: the subscriber state behind the user lock.
struct DeviceTable {
    owner: OwnerToken,
    pages: BTreeMap<u64, Entry>,
    /// The range of this device's migration in progress: fills of it retry.
    fence: Option<(u64, u64)>,
    /// The address space released the mirror (process exit): nothing is installed again.
    released: bool,
    shared: Arc<Shared>,
}

impl DeviceTable {
    /// Whether `[start, end)` overlaps this device's migration in progress.
    fn fenced(&self, start: u64, end: u64) -> bool {
        self.fence.is_some_and(|(s, e)| start < e && s < end)
    }

    /// Takes the fence down and forgets the migration's markers still in `[start, end)`.
    fn unfence(&mut self, start: u64, end: u64) {
        self.fence = None;
        let marked: Vec<u64> = self
            .pages
            .range(start..end)
            .filter(|(_, e)| matches!(e, Entry::Migrating { .. }))
            .map(|(&a, _)| a)
            .collect();
        for a in marked {
            self.pages.remove(&a);
        }
    }

    /// Drops every entry of the pages overlapping `[start, end)`.
    fn drop_range(&mut self, start: u64, end: u64) {
        crate::take_pages(&mut self.pages, start, end);
    }
}

impl IntervalSubscriber for DeviceTable {
    fn invalidate(
        &mut self,
        range: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.shared.counters.invalidation();
        // Our own migration: the device moves these pages itself and fixes its table up
        // when `migrate_range` returns (its markers must survive this call).
        if range.event() == Event::Migrate && range.owner() == Some(self.owner) {
            self.shared.ignored_migrations.fetch_add(1, Relaxed);
            return Ok(());
        }
        if range.event() == Event::Release {
            self.released = true;
        }
        // Blockable or not, nothing here waits: the user lock is already held.
        self.drop_range(range.start(), range.end());
        Ok(())
    }
}

/// An HMM mirror (Linux's dmirror): a device page table mirroring an address space through
/// one interval subscription, filled on device faults with the collision-retry protocol.
/// See the [module docs](self) for the protocol.
///
/// Attach the address space's [`Checker`](mmu_sim::Checker) (if any) *before* creating
/// the mirror: the mirror registers itself with it.
///
/// ```
/// use std::sync::Arc;
/// use mmu_notifier::OwnerToken;
/// use mmu_secondary::hmm::{HmmMirror, MirrorProt};
/// use mmu_sim::{AddressSpace, Checker, CheckedSecondary, FrameAllocator, Prot, PAGE_SIZE};
///
/// let mm = AddressSpace::new(Arc::new(FrameAllocator::new(64)));
/// let checker = Checker::new(1);
/// mm.attach_checker(checker.clone()).unwrap();
/// let dev = HmmMirror::new(&mm, OwnerToken(1))?;
///
/// let a = mm.mmap_anon(4 * PAGE_SIZE, Prot::READ_WRITE)?;
/// mm.write(a, 7)?;
/// assert_eq!(dev.read(a, 2)?, [7, 0]); // one device fault, then reads through the mirror
/// dev.write(a + PAGE_SIZE, &[9])?; // the CPU sees the device's write
/// assert_eq!(mm.read(a + PAGE_SIZE)?, 9);
/// assert_eq!(dev.snapshot(a, 3)?, [MirrorProt::WRITE, MirrorProt::WRITE, MirrorProt::NONE]);
///
/// mm.munmap(a, 4 * PAGE_SIZE)?; // the invalidation drops the device's entries first
/// assert!(dev.translations_in(a, a + 4 * PAGE_SIZE).is_empty());
/// assert_eq!(checker.violation_count(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct HmmMirror {
    /// Weak: see the crate docs (a secondary never keeps its address space alive).
    mm: Weak<AddressSpace>,
    sub: IntervalSubscription<DeviceTable>,
    owner: OwnerToken,
    start: u64,
    end: u64,
    name: String,
    /// How long a fault may keep retrying.
    timeout: FaultTimeout,
    /// Completed device faults (range faults), as dmirror's `faults` counter.
    faults: AtomicU64,
    shared: Arc<Shared>,
    /// Serialises the device's own primary operations (migration, exclusive access), so
    /// that only one fence is up at a time. Never taken by a callback or under the user
    /// lock; held across calls that take the mmap lock and the user lock.
    dev_ops: Mutex<()>,
}

impl fmt::Debug for HmmMirror {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HmmMirror")
            .field("name", &self.name)
            .field("range", &format_args!("{:#x}..{:#x}", self.start, self.end))
            .field("stats", &self.stats())
            .finish()
    }
}

impl HmmMirror {
    /// A mirror of the whole address space `[0, TASK_SIZE)` for the device named by
    /// `owner` (the token it passes to its migrations), as `dmirror` subscribes over the
    /// whole space. Fails if the address space has been released.
    pub fn new(mm: &Arc<AddressSpace>, owner: OwnerToken) -> Result<Arc<Self>, IntervalError> {
        Self::with_range(mm, owner, 0, TASK_SIZE)
    }

    /// A mirror of `[start, start + length)` only. Fails for an empty or overflowing
    /// range, or a released address space.
    pub fn with_range(
        mm: &Arc<AddressSpace>,
        owner: OwnerToken,
        start: u64,
        length: u64,
    ) -> Result<Arc<Self>, IntervalError> {
        let shared = Arc::new(Shared::default());
        let table = DeviceTable {
            owner,
            pages: BTreeMap::new(),
            fence: None,
            released: false,
            shared: shared.clone(),
        };
        let sub = mm
            .notifier()
            .insert_interval(start..start + length, table)?;
        // insert_interval checked that `start + length - 1` fits.
        let end = start + (length - 1) + 1;
        let mirror = Arc::new(Self {
            mm: Arc::downgrade(mm),
            sub,
            owner,
            start,
            end,
            name: format!("hmm mirror {}", owner.0),
            timeout: FaultTimeout::default(),
            faults: AtomicU64::new(0),
            shared,
            dev_ops: Mutex::new(()),
        });
        if let Some(c) = mm.checker() {
            let weak: Weak<dyn CheckedSecondary> = Arc::downgrade(&mirror) as _;
            c.add_secondary(weak);
        }
        Ok(mirror)
    }

    /// The device's owner token.
    pub fn owner(&self) -> OwnerToken {
        self.owner
    }

    /// The mirrored range `[start, end)`.
    pub fn range(&self) -> (u64, u64) {
        (self.start, self.end)
    }

    /// The address space mirrored, while it exists (the mirror holds it weakly: see the
    /// [crate docs](crate#how-a-secondary-holds-its-address-space)).
    pub fn address_space(&self) -> Option<Arc<AddressSpace>> {
        self.mm.upgrade()
    }

    /// Device faults completed (each fills a whole range), like dmirror's `faults`.
    pub fn faults(&self) -> u64 {
        self.faults.load(Relaxed)
    }

    /// `Migrate` invalidations of this device's own migrations that the mirror ignored.
    pub fn ignored_migrations(&self) -> u64 {
        self.shared.ignored_migrations.load(Relaxed)
    }

    /// Pages of `[start, start + npages)` the device holds exclusive access to (granted by
    /// [`exclusive`](Self::exclusive) and not revoked since). Linux's
    /// `HMM_DMIRROR_CHECK_EXCLUSIVE` fails when this is not zero.
    pub fn exclusive_pages(&self, start: u64, npages: u64) -> Result<usize, SecondaryError> {
        let (s, e) = self.span(start, npages)?;
        let dt = self.sub.lock();
        Ok(dt
            .pages
            .range(s..e)
            .filter(|(_, e)| matches!(e, Entry::Atomic { .. }))
            .count())
    }

    // ----- the dmirror ioctls -------------------------------------------------------

    /// Device read of `npages` pages from `start` (page aligned): the data word of each,
    /// read through the device's own translations, faulting the missing ones in first
    /// (`HMM_DMIRROR_READ`).
    pub fn read(&self, start: u64, npages: u64) -> Result<Vec<u64>, SecondaryError> {
        let (s, e) = self.span(start, npages)?;
        let mm = self.alive()?;
        let mut retry = self.start_fault();
        // Capacity for what is typical, not what the caller claims.
        let mut out = Vec::with_capacity(npages.min(4096) as usize);
        let mut first = true;
        loop {
            {
                let dt = self.sub.lock();
                if dt.released {
                    return Err(SecondaryError::Gone);
                }
                // With the user lock held no invalidation can drop an entry (and let the
                // primary change or free its page) until we are done with it.
                while (out.len() as u64) < npages {
                    let a = s + out.len() as u64 * P;
                    let Some(&Entry::Mapped { frame, .. }) = dt.pages.get(&a) else {
                        break;
                    };
                    out.push(device_access(&mm, self, a, frame, None));
                    self.shared.counters.access();
                }
            }
            if out.len() as u64 == npages {
                return Ok(out);
            }
            // Entries faulted in were dropped again before we could use them.
            if !first {
                retry.check()?;
            }
            first = false;
            self.fault_range(&mm, s + out.len() as u64 * P, e, false, &mut retry)?;
        }
    }

    /// Device write of `data` (one word per page) to the pages from `start` (page
    /// aligned), through writable translations, faulting them in for writing first
    /// (`HMM_DMIRROR_WRITE`). Pages before the one that failed have been written.
    pub fn write(&self, start: u64, data: &[u64]) -> Result<(), SecondaryError> {
        let npages = data.len() as u64;
        let (s, e) = self.span(start, npages)?;
        let mm = self.alive()?;
        let mut retry = self.start_fault();
        let mut done = 0usize;
        let mut first = true;
        loop {
            {
                let dt = self.sub.lock();
                if dt.released {
                    return Err(SecondaryError::Gone);
                }
                // As in `read`: the lock keeps each entry valid while it is used.
                while done < data.len() {
                    let a = s + done as u64 * P;
                    let Some(&Entry::Mapped {
                        frame,
                        writable: true,
                    }) = dt.pages.get(&a)
                    else {
                        break;
                    };
                    device_access(&mm, self, a, frame, Some(data[done]));
                    self.shared.counters.access();
                    done += 1;
                }
            }
            if done == data.len() {
                return Ok(());
            }
            if !first {
                retry.check()?;
            }
            first = false;
            self.fault_range(&mm, s + done as u64 * P, e, true, &mut retry)?;
        }
    }

    /// What the device would see of `npages` pages from `start` without faulting
    /// anything (`HMM_DMIRROR_SNAPSHOT`): per-page [`MirrorProt`] flags, taken with the
    /// collision-retry protocol so that no invalidation ran while they were gathered.
    pub fn snapshot(&self, start: u64, npages: u64) -> Result<Vec<MirrorProt>, SecondaryError> {
        let (s, e) = self.span(start, npages)?;
        let mm = self.alive()?;
        let gather = || {
            // Gathered without the user lock (the mmap lock is taken inside).
            let vmas = mm.vmas();
            let mut out = Vec::with_capacity(npages.min(4096) as usize);
            for a in (s..e).step_by(P as usize) {
                let readable = vmas
                    .iter()
                    .find(|v| v.start <= a && a < v.end)
                    .map(|v| v.prot.read);
                out.push(match readable {
                    // As hmm_range_fault without fault flags: a hole or an unreadable
                    // mapping is an error for that page, not for the whole call.
                    None | Some(false) => MirrorProt::ERROR,
                    Some(true) => match mm.snapshot(a, a + P, SnapshotMode::Peek) {
                        Ok(states) => states
                            .first()
                            .map_or(MirrorProt::ERROR, |&st| MirrorProt::of(st)),
                        // Unmapped since the layout was read: that munmap moves our
                        // sequence, and the fill's check retries.
                        Err(_) => MirrorProt::ERROR,
                    },
                });
            }
            Ok(out)
        };
        self.sub.fill(&mut self.start_fault(), gather, |dt, out| {
            if dt.released {
                return Err(SecondaryError::Gone);
            }
            Ok(Install::Done(out))
        })
    }

    /// Migrates the movable pages of `npages` pages from `start` for the device
    /// (`HMM_DMIRROR_MIGRATE_TO_DEV`): one `Migrate` invalidation carrying this device's
    /// token, which the mirror itself ignores; it then maps every page of the range it
    /// had mapped, or that moved, at the page's current frame. Returns how many pages
    /// moved. The whole range must be mapped.
    pub fn migrate_to_device(&self, start: u64, npages: u64) -> Result<usize, SecondaryError> {
        let (s, e) = self.span(start, npages)?;
        if s == e {
            return Ok(0);
        }
        let mm = self.alive()?;
        let mut retry = self.start_fault();
        let _ops = self.dev_ops.lock();
        // (a) Fence the range and mark its pages, once no invalidation that already ran
        // our callback is still in flight (`read_begin` waits for those; `read_retry`
        // catches one that ran it since): a marker that survives to (c) then proves that
        // no invalidation but our own migration touched its page. Nothing to gather.
        self.sub.fill(
            &mut retry.holding_lock(),
            || Ok(()),
            |dt, ()| {
                if dt.released {
                    return Err(SecondaryError::Gone);
                }
                dt.fence = Some((s, e));
                for a in (s..e).step_by(P as usize) {
                    let prev = match dt.pages.get(&a) {
                        Some(&Entry::Mapped { frame, writable }) => Some((frame, writable)),
                        _ => None,
                    };
                    dt.pages.insert(a, Entry::Migrating { prev });
                }
                Ok(Install::Done(()))
            },
        )?;
        // (b) The migration; our callback ignores its Migrate, so the markers stay. No
        // user lock held: the callback takes it.
        let moved = match mm.migrate_range(s, e, self.owner) {
            Ok(moved) => moved,
            Err(err) => {
                // Some pages may have moved before the failure: forget the markers, and
                // with them the old translations, rather than guess.
                self.sub.lock().unfence(s, e);
                return Err(self.primary_error(err));
            }
        };
        // (c) Fix-up, under the user lock: a surviving marker means nothing but our own
        // migration touched the page since (a) (module docs).
        let new_frames: HashMap<u64, FrameRef> = moved.iter().copied().collect();
        let mut dt = self.sub.lock();
        for a in (s..e).step_by(P as usize) {
            let Some(&Entry::Migrating { prev }) = dt.pages.get(&a) else {
                continue; // dropped by another invalidation: the device faults it later
            };
            dt.pages.remove(&a);
            let install = match new_frames.get(&a) {
                // The migration kept the entry's permission; read it back (page-table
                // lock under the user lock: the checker's lock order).
                Some(&frame) => {
                    let pte = mm.pte(a);
                    (pte.pfn() == Some(frame.pfn)).then(|| (frame, pte.writable()))
                }
                None => prev,
            };
            if let Some((frame, writable)) = install {
                report_install(&mm, self, a, frame, writable);
                dt.pages.insert(a, Entry::Mapped { frame, writable });
                self.shared.counters.fill();
            }
        }
        dt.fence = None;
        Ok(moved.len())
    }

    /// Takes exclusive (atomic) access to `npages` pages from `start` for the device
    /// (`HMM_DMIRROR_EXCLUSIVE`): each is faulted in for writing and made
    /// device-exclusive in the primary (an `Exclusive` invalidation with this device's
    /// token, which drops the device's ordinary entry), then recorded as an atomic entry.
    /// The next CPU access to a page revokes it. Returns the pages granted.
    pub fn exclusive(&self, start: u64, npages: u64) -> Result<usize, SecondaryError> {
        let (s, e) = self.span(start, npages)?;
        let mm = self.alive()?;
        let mut retry = self.start_fault();
        let mut retry = retry.holding_lock();
        let _ops = self.dev_ops.lock();
        let mut granted = 0;
        for a in (s..e).step_by(P as usize) {
            mmu_notifier::interval::retry(&mut retry, |retry| {
                // Without the user lock: it takes the mmap lock and invalidates.
                let frame = mm
                    .make_exclusive(a, self.owner)
                    .map_err(|err| self.primary_error(err))?;
                // `read_begin` (in the fill) waits until no invalidation of ours is in
                // flight, so none that already ran our callback has its window open while
                // we record the entry. Nothing to gather: the grant came first (it is an
                // invalidation of its own, so a sequence read before it would be stale).
                self.sub.try_fill(
                    retry,
                    || Ok(()),
                    |dt, ()| {
                        if dt.released {
                            return Err(SecondaryError::Gone);
                        }
                        // The CPU may have taken the page back already (its restore ran our
                        // callback before `read_begin`): then the entry is present again. If
                        // it is still exclusive, a later restore must take the user lock first.
                        let still = mm.pte(a).kind() == PteKind::Exclusive(frame.pfn)
                            && mm.frames().is_current(frame);
                        if !still {
                            return Ok(Install::Retry);
                        }
                        dt.pages.insert(a, Entry::Atomic { frame });
                        self.shared.counters.fill();
                        Ok(Install::Done(()))
                    },
                )
            })?;
            granted += 1;
        }
        Ok(granted)
    }

    // ----- the fault path -----------------------------------------------------------

    /// The collision-retry loop over `[start, end)` (`dmirror_range_fault`), under the
    /// fault's `retry` policy.
    fn fault_range(
        &self,
        mm: &AddressSpace,
        start: u64,
        end: u64,
        write: bool,
        retry: &mut FaultRetry<'_>,
    ) -> Result<(), SecondaryError> {
        let mode = if write {
            SnapshotMode::FaultWrite
        } else {
            SnapshotMode::Fault
        };
        // 1. The fill samples the sequence before looking at the primary: a change the
        //    snapshot misses is announced to our callback after this, which moves it.
        // 2. Gather without the user lock: the snapshot takes the mmap lock, may sleep
        //    and may invalidate (a COW break calls our own callback).
        let gather = || {
            mm.snapshot(start, end, mode)
                .map_err(|err| self.primary_error(err))
        };
        // 3. Decide under the user lock, which every callback takes too (the fill has
        //    checked `read_retry`).
        self.sub.fill(retry, gather, |dt, pages| {
            if dt.released {
                return Err(SecondaryError::Gone);
            }
            if dt.fenced(start, end) {
                return Ok(Install::Retry);
            }
            // 4. Install. The checker looks at the primary's entry under its page-table
            //    lock, taken inside our user lock (the documented order).
            for (i, state) in pages.into_iter().enumerate() {
                let a = start + i as u64 * P;
                let (frame, writable) = match state {
                    PageState::Zero(frame) => (frame, false),
                    PageState::Present { frame, writable } => (frame, writable),
                    PageState::None => continue,
                };
                report_install(mm, self, a, frame, writable);
                dt.pages.insert(a, Entry::Mapped { frame, writable });
                self.shared.counters.fill();
            }
            self.faults.fetch_add(1, Relaxed);
            Ok(Install::Done(()))
        })
    }

    /// The retry policy of an operation starting now (the crate's fill policy).
    fn start_fault(&self) -> FaultRetry<'_> {
        self.timeout.start(Some(&self.shared.counters))
    }

    /// The address space, for one operation: [`Gone`](SecondaryError::Gone) once it has
    /// exited or been dropped.
    fn alive(&self) -> Result<Arc<AddressSpace>, SecondaryError> {
        match self.mm.upgrade() {
            Some(mm) if !mm.has_exited() => Ok(mm),
            _ => Err(SecondaryError::Gone),
        }
    }

    fn primary_error(&self, err: SimError) -> SecondaryError {
        if self.alive().is_err() {
            SecondaryError::Gone
        } else {
            SecondaryError::Primary(err)
        }
    }

    /// Checks `npages` pages from `start`: page aligned, inside the mirror. Returns the
    /// byte range.
    fn span(&self, start: u64, npages: u64) -> Result<(u64, u64), SecondaryError> {
        if start % P != 0 {
            return Err(SecondaryError::Primary(SimError::InvalidArgument(
                "address not page aligned",
            )));
        }
        let end = npages
            .checked_mul(P)
            .and_then(|len| start.checked_add(len))
            .ok_or(SecondaryError::OutOfRange(start))?;
        if start < self.start {
            return Err(SecondaryError::OutOfRange(start));
        }
        if end > self.end {
            return Err(SecondaryError::OutOfRange(start.max(self.end)));
        }
        Ok((start, end))
    }

    /// One page's access for [`SecondaryMmu::access`].
    fn access_page(&self, addr: u64, write: Option<u64>) -> Result<u64, SecondaryError> {
        let page = addr & !(P - 1);
        match write {
            Some(v) => self.write(page, &[v]).map(|()| v),
            None => self.read(page, 1).map(|v| v[0]),
        }
    }
}

impl CheckedSecondary for HmmMirror {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> SecondaryKind {
        SecondaryKind::Shadow
    }

    fn translations_in(&self, start: u64, end: u64) -> Vec<(u64, FrameRef)> {
        let start = start & !(P - 1);
        if end <= start {
            return Vec::new();
        }
        let dt = self.sub.lock();
        dt.pages
            .range(start..end)
            .filter_map(|(&a, e)| match *e {
                Entry::Mapped { frame, .. } | Entry::Atomic { frame } => Some((a, frame)),
                Entry::Migrating { .. } => None,
            })
            .collect()
    }
}

impl SecondaryMmu for HmmMirror {
    fn migrate_to_device(&self, start: u64, npages: u64) -> Result<usize, SecondaryError> {
        HmmMirror::migrate_to_device(self, start, npages)
    }

    fn fault(&self, addr: u64, write: bool) -> Result<(), SecondaryError> {
        let page = addr & !(P - 1);
        let (s, e) = self.span(page, 1)?;
        let mm = self.alive()?;
        self.fault_range(&mm, s, e, write, &mut self.start_fault())
    }

    fn access(&self, addr: u64, write: Option<u64>) -> Result<u64, SecondaryError> {
        self.access_page(addr, write)
    }

    fn stats(&self) -> SecondaryStats {
        self.shared.counters.snapshot()
    }

    fn timeout_setting(&self) -> &FaultTimeout {
        &self.timeout
    }
}
