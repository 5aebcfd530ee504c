//! The coherence checker: watches the primary and the secondaries of one address space
//! and counts every way a secondary can disagree with the primary.
//!
//! # What is checked, and where
//! The primary tells the checker about each invalidation it makes (an *invalidation
//! window*: from the moment `invalidate_range_start` has returned to just before
//! `invalidate_range_end` is called) and about each TLB flush. Secondaries report every
//! translation they install and make every access through one via the checker. From these
//! the checker finds three kinds of violation:
//!
//! - **stale translation**:
//!   - a *shadowing* secondary (one with `invalidate_range_start`/`end` or an interval
//!     subscription) still holds a translation into the range when the window opens, or
//!     installs one, or accesses through one, while a window covers the address;
//!   - a *shared-table* secondary (a TLB over the primary's own tables, which registers
//!     only `arch_invalidate_secondary_tlbs`) still holds a translation the primary no
//!     longer has right after a flush of its range;
//!   - any secondary installs a translation the primary does not have (another frame, or
//!     writable where the primary's entry is read-only; a shared-table one is excused
//!     inside a window, where the flush will check it) or reads through one outside a
//!     window;
//! - **use-after-free**: an access through a translation whose frame has been freed since
//!   (its generation changed); the access is not performed;
//! - **lost write**: a write through a translation the primary no longer maps at that
//!   address, or maps read-only (after a COW break or a fork the primary will never see
//!   it, or it corrupts the other copy).
//!
//! Install and access checks read the primary's entry under its page-table lock, so a
//! secondary must call them with its own lock held (the one its invalidation callbacks
//! take) and the lock order is *secondary lock, then page-table lock*. The primary never
//! calls a notifier callback with a page-table lock held, so the order is never reversed.
//!
//! Each violation names the operation (the primary operation whose window or flush it
//! broke, else `install` / `read` / `write`), the address, the secondary and the seed the
//! run was started with.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use mmu_notifier::Range;
use parking_lot::{Mutex, RwLock};

use crate::addr::VirtAddr;
use crate::frame::FrameRef;
use crate::mm::AddressSpace;
use crate::op::SimOp;
use crate::pagetable::PteKind;

/// How a secondary relates to the primary's page tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SecondaryKind {
    /// Keeps its own copy of translations and drops them in `invalidate_range_start` (or
    /// an interval subscription's `invalidate`): nothing may be held or installed in the
    /// range while a window is open.
    Shadow,
    /// Walks the primary's own tables and caches the result in a TLB flushed by
    /// `arch_invalidate_secondary_tlbs`: may use a translation until the flush.
    SharedTables,
}

/// A secondary MMU as the checker sees it.
pub trait CheckedSecondary: Send + Sync {
    /// Its name in violation reports.
    fn name(&self) -> &str;
    /// How it relates to the primary's tables.
    fn kind(&self) -> SecondaryKind {
        SecondaryKind::Shadow
    }
    /// Every translation it holds for a page in `[start, end)`: (page address, frame as
    /// seen when installed).
    fn translations_in(&self, start: u64, end: u64) -> Vec<(u64, FrameRef)>;
}

/// The kind of a [`Violation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ViolationKind {
    /// A translation held, installed or used where it may not be.
    StaleTranslation,
    /// An access through a translation whose frame was freed.
    UseAfterFree,
    /// A write the primary will not see (or that lands in a copy it must not).
    LostWrite,
}

/// One incoherence found by the [`Checker`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// What went wrong.
    pub kind: ViolationKind,
    /// The primary operation whose invalidation was broken, or the secondary's own
    /// operation ([`SimOp::Install`], [`SimOp::Read`], [`SimOp::Write`]).
    pub op: SimOp,
    /// The page address.
    pub addr: u64,
    /// The secondary's name.
    pub secondary: String,
    /// The seed of the run.
    pub seed: u64,
    /// Specifics.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} by secondary `{}` at {:#x} during {} (seed {}): {}",
            self.kind, self.secondary, self.addr, self.op, self.seed, self.detail
        )
    }
}

struct Window {
    id: u64,
    start: u64,
    end: u64,
    op: SimOp,
}

/// Most violations kept in full; the rest are only counted.
const KEPT: usize = 1000;

/// The coherence checker of one address space; attach it with
/// [`AddressSpace::attach_checker`] and register each secondary with
/// [`add_secondary`](Self::add_secondary).
///
/// ```
/// use std::sync::Arc;
/// use mmu_sim::{AddressSpace, Checker, FrameAllocator, Prot};
///
/// let mm = AddressSpace::new(Arc::new(FrameAllocator::new(64)));
/// let checker = Checker::new(42);
/// mm.attach_checker(checker.clone()).unwrap();
/// let a = mm.mmap_anon(4096, Prot::READ_WRITE)?;
/// mm.write(a, 1)?;
/// mm.munmap(a, 4096)?;
/// assert!(checker.violations().is_empty());
/// # Ok::<(), mmu_sim::SimError>(())
/// ```
pub struct Checker {
    seed: u64,
    secondaries: RwLock<Vec<Weak<dyn CheckedSecondary>>>,
    windows: Mutex<Vec<Window>>,
    next_window: AtomicU64,
    violations: Mutex<Vec<Violation>>,
    total: AtomicU64,
    checks: AtomicU64,
}

impl fmt::Debug for Checker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checker")
            .field("seed", &self.seed)
            .field("violations", &self.violation_count())
            .finish()
    }
}

impl Checker {
    /// A checker whose reports carry `seed`.
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self {
            seed,
            secondaries: RwLock::new(Vec::new()),
            windows: Mutex::new(Vec::new()),
            next_window: AtomicU64::new(0),
            violations: Mutex::new(Vec::new()),
            total: AtomicU64::new(0),
            checks: AtomicU64::new(0),
        })
    }

    /// The seed reports carry.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Watches a secondary (held weakly: dropping it stops the checks).
    pub fn add_secondary(&self, s: Weak<dyn CheckedSecondary>) {
        self.secondaries.write().push(s);
    }

    /// The violations found so far (the first thousand; see
    /// [`violation_count`](Self::violation_count)).
    pub fn violations(&self) -> Vec<Violation> {
        self.violations.lock().clone()
    }

    /// How many violations were found.
    pub fn violation_count(&self) -> u64 {
        self.total.load(Relaxed)
    }

    /// How many checks ran (windows opened, flushes, installs and accesses checked).
    pub fn checks(&self) -> u64 {
        self.checks.load(Relaxed)
    }

    fn report(&self, kind: ViolationKind, op: SimOp, addr: u64, secondary: &str, detail: String) {
        self.total.fetch_add(1, Relaxed);
        let v = Violation {
            kind,
            op,
            addr,
            secondary: secondary.to_owned(),
            seed: self.seed,
            detail,
        };
        tracing::debug!(%v, "coherence violation");
        let mut kept = self.violations.lock();
        if kept.len() < KEPT {
            kept.push(v);
        }
    }

    fn each_secondary(&self, mut f: impl FnMut(&dyn CheckedSecondary)) {
        let list: Vec<Arc<dyn CheckedSecondary>> = self
            .secondaries
            .read()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for s in list {
            f(&*s);
        }
    }

    /// The operation of an open window covering `addr`, if any.
    fn window_at(&self, addr: u64) -> Option<SimOp> {
        self.windows
            .lock()
            .iter()
            .find(|w| w.start <= addr && addr < w.end)
            .map(|w| w.op)
    }

    // ----- primary side ---------------------------------------------------------------

    /// `invalidate_range_start(range)` for `op` has returned: shadowing secondaries must
    /// hold nothing in the range from now until [`closing`](Self::closing).
    pub(crate) fn opened(&self, range: &Range, op: SimOp) -> u64 {
        self.checks.fetch_add(1, Relaxed);
        self.each_secondary(|s| {
            if s.kind() != SecondaryKind::Shadow {
                return;
            }
            for (addr, f) in s.translations_in(range.start(), range.end()) {
                self.report(
                    ViolationKind::StaleTranslation,
                    op,
                    addr,
                    s.name(),
                    format!(
                        "still maps frame {:?} after invalidate_range_start({:#x}..{:#x}, {:?}) \
                         returned",
                        f.pfn,
                        range.start(),
                        range.end(),
                        range.event()
                    ),
                );
            }
        });
        let id = self.next_window.fetch_add(1, Relaxed);
        self.windows.lock().push(Window {
            id,
            start: range.start(),
            end: range.end(),
            op,
        });
        id
    }

    /// The window `id` closes (`invalidate_range_end` is about to be called).
    pub(crate) fn closing(&self, id: u64) {
        let mut w = self.windows.lock();
        if let Some(i) = w.iter().position(|w| w.id == id) {
            w.swap_remove(i);
        }
    }

    /// The primary flushed `[start, end)`: shared-table secondaries must no longer hold a
    /// translation there that the primary does not have.
    pub(crate) fn flushed(&self, mm: &AddressSpace, start: u64, end: u64, op: SimOp) {
        self.checks.fetch_add(1, Relaxed);
        self.each_secondary(|s| {
            if s.kind() != SecondaryKind::SharedTables {
                return;
            }
            for (addr, f) in s.translations_in(start, end) {
                let pte = mm.pte(addr);
                if pte.pfn() != Some(f.pfn) || !mm.frames().is_current(f) {
                    self.report(
                        ViolationKind::StaleTranslation,
                        op,
                        addr,
                        s.name(),
                        format!(
                            "still caches frame {:?} after the TLB flush of {start:#x}..{end:#x} \
                             (primary entry now {pte:?})",
                            f.pfn
                        ),
                    );
                }
            }
        });
    }

    // ----- secondary side -------------------------------------------------------------

    /// `secondary` is installing a translation of `addr` to `frame` (writable or not).
    /// Call it with the secondary's lock held, just before making the translation
    /// visible. Returns whether it was coherent.
    pub fn check_install(
        &self,
        mm: &AddressSpace,
        secondary: &dyn CheckedSecondary,
        addr: impl Into<VirtAddr>,
        frame: FrameRef,
        writable: bool,
    ) -> bool {
        self.checks.fetch_add(1, Relaxed);
        let addr = addr.into().page_down().get();
        match (secondary.kind(), self.window_at(addr)) {
            (SecondaryKind::Shadow, Some(op)) => {
                self.report(
                    ViolationKind::StaleTranslation,
                    op,
                    addr,
                    secondary.name(),
                    format!("installed frame {:?} inside the invalidation", frame.pfn),
                );
                return false;
            }
            // A shared-table TLB may insert what its walk saw just before the primary
            // cleared it: the flush that follows (inside this window) drops it, and
            // `flushed` checks that it did.
            (SecondaryKind::SharedTables, Some(_)) => return true,
            _ => {}
        }
        let pte = mm.pte(addr);
        let ok = pte.pfn() == Some(frame.pfn)
            && mm.frames().is_current(frame)
            && (!writable || pte.writable());
        if !ok {
            self.report(
                ViolationKind::StaleTranslation,
                SimOp::Install,
                addr,
                secondary.name(),
                format!(
                    "installed frame {:?}{} but the primary has {pte:?} (generation now {})",
                    frame.pfn,
                    if writable { " writable" } else { "" },
                    mm.frames().generation(frame.pfn)
                ),
            );
        }
        ok
    }

    /// `secondary` reads the page at `addr` through its translation to `frame`. Returns
    /// the data (0 when the access was a use-after-free and was not performed).
    pub fn read(
        &self,
        mm: &AddressSpace,
        secondary: &dyn CheckedSecondary,
        addr: impl Into<VirtAddr>,
        frame: FrameRef,
    ) -> u64 {
        self.access(mm, secondary, addr.into(), frame, None)
    }

    /// `secondary` writes `value` to the page at `addr` through its translation to
    /// `frame`. Returns whether the write was coherent (a use-after-free is not
    /// performed).
    pub fn write(
        &self,
        mm: &AddressSpace,
        secondary: &dyn CheckedSecondary,
        addr: impl Into<VirtAddr>,
        frame: FrameRef,
        value: u64,
    ) -> bool {
        let before = self.violation_count();
        self.access(mm, secondary, addr.into(), frame, Some(value));
        self.violation_count() == before
    }

    fn access(
        &self,
        mm: &AddressSpace,
        s: &dyn CheckedSecondary,
        addr: VirtAddr,
        frame: FrameRef,
        write: Option<u64>,
    ) -> u64 {
        self.checks.fetch_add(1, Relaxed);
        let addr = addr.page_down().get();
        let what = if write.is_some() {
            SimOp::Write
        } else {
            SimOp::Read
        };
        mm.with_pte_locked(addr, |pte| {
            // Look the windows up with the page-table lock held: the primary opens a
            // window before it changes an entry under this lock, so an entry seen changed
            // here is always seen with its window.
            let window = self.window_at(addr);
            if s.kind() == SecondaryKind::Shadow {
                if let Some(op) = window {
                    self.report(
                        ViolationKind::StaleTranslation,
                        op,
                        addr,
                        s.name(),
                        format!(
                            "{what} through frame {:?} inside the invalidation",
                            frame.pfn
                        ),
                    );
                }
            }
            let frames = mm.frames();
            if !frames.is_current(frame) {
                self.report(
                    ViolationKind::UseAfterFree,
                    window.unwrap_or(what),
                    addr,
                    s.name(),
                    format!(
                        "{what} through frame {:?} generation {} (now {})",
                        frame.pfn,
                        frame.generation,
                        frames.generation(frame.pfn)
                    ),
                );
                return 0;
            }
            let maps = matches!(pte.kind(), PteKind::Present(p) if p == frame.pfn);
            // A shared-table TLB may use an entry the primary already cleared until the
            // flush, which comes inside the window.
            let excused = s.kind() == SecondaryKind::SharedTables && window.is_some();
            match write {
                Some(value) => {
                    let coherent = maps && pte.writable();
                    if !excused && !coherent {
                        self.report(
                            ViolationKind::LostWrite,
                            window.unwrap_or(SimOp::Write),
                            addr,
                            s.name(),
                            format!(
                                "write through frame {:?} but the primary has {pte:?}",
                                frame.pfn
                            ),
                        );
                    }
                    frames.write(frame.pfn, value);
                    value
                }
                None => {
                    if !excused && !maps {
                        self.report(
                            ViolationKind::StaleTranslation,
                            SimOp::Read,
                            addr,
                            s.name(),
                            format!(
                                "read through frame {:?} but the primary has {pte:?}",
                                frame.pfn
                            ),
                        );
                    }
                    frames.read(frame.pfn)
                }
            }
        })
    }
}
