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
//!
//! A translation has a size ([`Translation`]: an address and a [`PageOrder`]): a window
//! that overlaps any of it makes it stale, and the primary's entry must be at least as
//! large and map its first frame at its address (a huge entry's frames follow its first).
//! Today every translation is one page (the default of
//! [`CheckedSecondary::translations`]); the sizes are checked so that larger ones need no
//! change here.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use mmu_notifier::Range;
use parking_lot::{Mutex, RwLock};

use crate::addr::VirtAddr;
use crate::frame::FrameRef;
use crate::mm::AddressSpace;
use crate::op::SimOp;
use crate::pagetable::{PageOrder, Pte, PAGE_SIZE};

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
    /// Every translation it holds that overlaps `[start, end)`, with its size. The
    /// checker asks this one; by default it is [`translations_in`](Self::translations_in)
    /// with each translation one page. A secondary that maps larger entries overrides it.
    fn translations(&self, start: u64, end: u64) -> Vec<Translation> {
        self.translations_in(start, end)
            .into_iter()
            .map(Translation::from)
            .collect()
    }
}

/// One translation a secondary holds: `PAGE_SIZE << order` bytes from `addr` (aligned to
/// that size) to the frames from `frame` on, as seen when it was installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The first address translated.
    pub addr: u64,
    /// The size (0: one page; 9: 2 MiB).
    pub order: PageOrder,
    /// The first frame.
    pub frame: FrameRef,
}

impl Translation {
    /// A translation of the one page at `addr` (rounded down to its page).
    pub fn page(addr: u64, frame: FrameRef) -> Self {
        Translation {
            addr: PageOrder::BASE.align_down(addr),
            order: PageOrder::BASE,
            frame,
        }
    }

    /// The end of what it translates.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.order.size())
    }
}

impl From<(u64, FrameRef)> for Translation {
    fn from((addr, frame): (u64, FrameRef)) -> Self {
        Translation::page(addr, frame)
    }
}

/// Whether the primary's entry `pte` (the one mapping `t.addr`) maps what `t` does: it is
/// present, at least as large (a translation larger than the primary's entry covers
/// memory the entry does not map), and has `t`'s first frame at `t.addr` (a huge entry's
/// frames follow its first).
fn primary_maps(pte: Pte, t: &Translation) -> bool {
    let Some(first) = pte.pfn() else {
        return false;
    };
    if t.order > pte.order() {
        return false;
    }
    let offset = (t.addr - pte.order().align_down(t.addr)) / PAGE_SIZE;
    u64::from(first.0) + offset == u64::from(t.frame.pfn.0)
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
        self.window_over(addr, addr + 1)
    }

    /// The operation of an open window overlapping `[start, end)`, if any.
    fn window_over(&self, start: u64, end: u64) -> Option<SimOp> {
        self.windows
            .lock()
            .iter()
            .find(|w| w.start < end && start < w.end)
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
            for t in s.translations(range.start(), range.end()) {
                self.report(
                    ViolationKind::StaleTranslation,
                    op,
                    t.addr,
                    s.name(),
                    format!(
                        "still maps frame {:?} after invalidate_range_start({:#x}..{:#x}, {:?}) \
                         returned",
                        t.frame.pfn,
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
            for t in s.translations(start, end) {
                let pte = mm.pte(t.addr);
                if !primary_maps(pte, &t) || !mm.frames().is_current(t.frame) {
                    self.report(
                        ViolationKind::StaleTranslation,
                        op,
                        t.addr,
                        s.name(),
                        format!(
                            "still caches frame {:?} after the TLB flush of {start:#x}..{end:#x} \
                             (primary entry now {pte:?})",
                            t.frame.pfn
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
        let t = Translation::page(addr.into().get(), frame);
        self.check_install_translation(mm, secondary, t, writable)
    }

    /// [`check_install`](Self::check_install) of a translation of any size: no window
    /// may overlap any of it (for a shadowing secondary), and the primary's entry at its
    /// address must map it whole, at least as large.
    pub fn check_install_translation(
        &self,
        mm: &AddressSpace,
        secondary: &dyn CheckedSecondary,
        t: Translation,
        writable: bool,
    ) -> bool {
        self.checks.fetch_add(1, Relaxed);
        let (addr, frame) = (t.addr, t.frame);
        match (secondary.kind(), self.window_over(t.addr, t.end())) {
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
        let ok =
            primary_maps(pte, &t) && mm.frames().is_current(frame) && (!writable || pte.writable());
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
            let maps = primary_maps(pte, &Translation::page(addr, frame));
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mmu_notifier::Event;

    use super::*;
    use crate::frame::{FrameAllocator, Pfn};

    fn frame(pfn: u32) -> FrameRef {
        FrameRef {
            pfn: Pfn(pfn),
            generation: 0,
        }
    }

    fn huge(addr: u64, pfn: u32) -> Translation {
        Translation {
            addr,
            order: PageOrder::PMD,
            frame: frame(pfn),
        }
    }

    #[test]
    fn a_translation_matches_the_primary_entry_by_frame_and_size() {
        let base = 0x4000_0000;
        let small = Pte::new(Pfn(7), true);
        let big = Pte::new(Pfn(512), true).with_order(PageOrder::PMD);
        assert!(primary_maps(small, &Translation::page(base, frame(7))));
        assert!(!primary_maps(small, &Translation::page(base, frame(8))));
        assert!(!primary_maps(
            Pte::default(),
            &Translation::page(base, frame(0))
        ));
        // Pages of a 2 MiB entry: its frames follow the first.
        assert!(primary_maps(big, &Translation::page(base, frame(512))));
        assert!(primary_maps(
            big,
            &Translation::page(base + 0x3000, frame(515))
        ));
        assert!(!primary_maps(
            big,
            &Translation::page(base + 0x3000, frame(512))
        ));
        // A 2 MiB translation needs a 2 MiB entry.
        assert!(primary_maps(big, &huge(base, 512)));
        assert!(!primary_maps(small, &huge(base, 7)));
        assert_eq!(huge(base, 512).end(), base + 0x20_0000);
        assert_eq!(
            Translation::from((base + 0x123, frame(7))),
            Translation::page(base, frame(7))
        );
    }

    struct Nothing;
    impl CheckedSecondary for Nothing {
        fn name(&self) -> &str {
            "nothing"
        }
        fn translations_in(&self, _: u64, _: u64) -> Vec<(u64, FrameRef)> {
            Vec::new()
        }
    }

    #[test]
    fn installing_2mib_over_an_open_window_on_one_of_its_pages_is_caught() {
        let mm = AddressSpace::new(Arc::new(FrameAllocator::new(16)));
        let checker = Checker::new(3);
        let base = 0x4000_0000;
        let page = base + 0x1f_f000; // the last page of the 2 MiB
        let range = Range::new(page, page + PAGE_SIZE, Event::Clear).unwrap();
        let id = checker.opened(&range, SimOp::Reclaim);
        // One page at `base`: outside the window, refused only because the primary maps
        // nothing there (an install, not the window's reclaim).
        assert!(!checker.check_install(&mm, &Nothing, base, frame(1), false));
        // The 2 MiB from `base` overlaps the window: refused for the reclaim.
        assert!(!checker.check_install_translation(&mm, &Nothing, huge(base, 1), false));
        let ops: Vec<(ViolationKind, SimOp, u64)> = checker
            .violations()
            .iter()
            .map(|v| (v.kind, v.op, v.addr))
            .collect();
        assert_eq!(
            ops,
            [
                (ViolationKind::StaleTranslation, SimOp::Install, base),
                (ViolationKind::StaleTranslation, SimOp::Reclaim, base)
            ]
        );
        checker.closing(id);
    }
}
