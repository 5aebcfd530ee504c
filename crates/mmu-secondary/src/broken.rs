//! Deliberately broken secondaries, to show that the coherence checker catches each bug it
//! exists for (`mmn torture --broken NAME` attaches one; a run must then fail).
//!
//! - [`Broken::NeverTearsDown`]: an interval mirror whose `invalidate` does nothing, so it
//!   keeps translations into ranges the primary is changing or freeing.
//! - [`Broken::IgnoresRetry`]: an interval mirror whose fill never calls `read_retry`, so
//!   a translation faulted before an invalidation is installed after it.
//! - [`Broken::InstallsDuringInvalidation`]: a list subscriber that drops its
//!   translations in `invalidate_range_start` and then eagerly refills them from the
//!   primary's table before returning, so it holds translations while the primary changes
//!   the range.
//! - [`Broken::NeverFlushes`]: a TLB over the primary's tables whose
//!   `arch_invalidate_secondary_tlbs` does nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::{Arc, Weak};

use mmu_notifier::{
    Install, IntervalContext, IntervalSubscriber, IntervalSubscription, ListRegistration,
    ListSubscriber, Range, RetryPolicy, SecondaryTlb, WouldBlock,
};
use mmu_sim::{AddressSpace, CheckedSecondary, FrameRef, SecondaryKind, PAGE_SIZE};
use parking_lot::Mutex;

use crate::{
    device_access, report_install, Counters, FaultTimeout, SecondaryError, SecondaryMmu,
    SecondaryStats,
};

/// Which bug a [`BrokenSecondary`] has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Broken {
    /// Never drops a translation on invalidation.
    NeverTearsDown,
    /// Installs without checking `read_retry`.
    IgnoresRetry,
    /// Refills translations from inside `invalidate_range_start`.
    InstallsDuringInvalidation,
    /// A shared-table TLB that never flushes.
    NeverFlushes,
}

impl Broken {
    /// Every variant.
    pub const ALL: [Broken; 4] = [
        Broken::NeverTearsDown,
        Broken::IgnoresRetry,
        Broken::InstallsDuringInvalidation,
        Broken::NeverFlushes,
    ];

    /// The command-line name (`never-tears-down`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Broken::NeverTearsDown => "never-tears-down",
            Broken::IgnoresRetry => "ignores-retry",
            Broken::InstallsDuringInvalidation => "installs-during-invalidation",
            Broken::NeverFlushes => "never-flushes",
        }
    }

    /// The variant with this command-line name.
    pub fn from_name(name: &str) -> Option<Broken> {
        Broken::ALL.into_iter().find(|b| b.name() == name)
    }
}

type Table = BTreeMap<u64, (FrameRef, bool)>;

struct MirrorState {
    table: Table,
    tears_down: bool,
    /// The secondary's counters (invalidations are counted here, bug or not).
    counters: Arc<Counters>,
}

impl IntervalSubscriber for MirrorState {
    fn invalidate(
        &mut self,
        r: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.counters.invalidation();
        if self.tears_down {
            crate::take_pages(&mut self.table, r.start(), r.end());
        }
        Ok(())
    }
}

/// The list-subscriber and TLB variants' shared state.
struct ListState {
    table: Mutex<Table>,
    flushes: AtomicU64,
}

enum Body {
    Mirror(IntervalSubscription<MirrorState>),
    List(Arc<ListPart>, Option<ListRegistration>),
}

struct ListPart {
    mm: Weak<AddressSpace>,
    state: ListState,
    counters: Counters,
}

/// Registered as a list subscriber (start/end), except `NeverFlushes`, a secondary TLB.
impl ListSubscriber for ListPart {
    fn invalidate_range_start(&self, r: &Range) -> Result<(), WouldBlock> {
        self.counters.invalidation();
        let mut t = self.state.table.lock();
        let held = crate::take_pages(&mut t, r.start(), r.end());
        // The bug: refill from the primary's table, which has not changed yet.
        if let Some(mm) = self.mm.upgrade() {
            for a in held.into_keys() {
                if let Some(pfn) = mm.pte(a).pfn() {
                    t.insert(a, (mm.frames().frame_ref(pfn), false));
                }
            }
        }
        Ok(())
    }
}

impl SecondaryTlb for ListPart {
    fn arch_invalidate_secondary_tlbs(&self, _: u64, _: u64) {
        // The bug: nothing is dropped.
        self.counters.invalidation();
        self.state.flushes.fetch_add(1, Release);
    }
}

/// A secondary with one deliberate bug (see the module docs).
pub struct BrokenSecondary {
    kind: Broken,
    mm: Weak<AddressSpace>,
    body: Body,
    counters: Arc<Counters>,
    timeout: FaultTimeout,
}

impl std::fmt::Debug for BrokenSecondary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokenSecondary")
            .field("kind", &self.kind)
            .finish()
    }
}

impl BrokenSecondary {
    /// Attaches a broken secondary of `kind` to `mm` (to its checker too, if attached),
    /// mirroring `[start, start + len)`.
    pub fn new(
        mm: &Arc<AddressSpace>,
        kind: Broken,
        start: u64,
        len: u64,
    ) -> Result<Arc<Self>, SecondaryError> {
        let counters = Arc::new(Counters::default());
        let body = match kind {
            Broken::NeverTearsDown | Broken::IgnoresRetry => {
                let state = MirrorState {
                    table: Table::new(),
                    tears_down: kind != Broken::NeverTearsDown,
                    counters: counters.clone(),
                };
                let sub = mm
                    .notifier()
                    .insert_interval(start..start + len, state)
                    .map_err(|_| SecondaryError::Gone)?;
                Body::Mirror(sub)
            }
            Broken::InstallsDuringInvalidation | Broken::NeverFlushes => {
                let part = Arc::new(ListPart {
                    mm: Arc::downgrade(mm),
                    state: ListState {
                        table: Mutex::new(Table::new()),
                        flushes: AtomicU64::new(0),
                    },
                    counters: Counters::default(),
                });
                let reg = match kind {
                    Broken::NeverFlushes => mm.notifier().register_tlb(part.clone()),
                    _ => mm.notifier().register(part.clone()),
                }
                .map_err(|_| SecondaryError::Gone)?;
                Body::List(part, Some(reg))
            }
        };
        let s = Arc::new(BrokenSecondary {
            kind,
            mm: Arc::downgrade(mm),
            body,
            counters,
            timeout: FaultTimeout::default(),
        });
        if let Some(c) = mm.checker() {
            let weak: Weak<dyn CheckedSecondary> = Arc::downgrade(&s) as _;
            c.add_secondary(weak);
        }
        Ok(s)
    }

    /// The bug it has.
    pub fn kind(&self) -> Broken {
        self.kind
    }
}

impl CheckedSecondary for BrokenSecondary {
    fn name(&self) -> &str {
        self.kind.name()
    }
    fn kind(&self) -> SecondaryKind {
        match self.kind {
            Broken::NeverFlushes => SecondaryKind::SharedTables,
            _ => SecondaryKind::Shadow,
        }
    }
    fn translations_in(&self, start: u64, end: u64) -> Vec<(u64, FrameRef)> {
        let collect = |t: &Table| -> Vec<(u64, FrameRef)> {
            t.range(start & !(PAGE_SIZE - 1)..end)
                .map(|(&a, &(f, _))| (a, f))
                .collect()
        };
        match &self.body {
            Body::Mirror(sub) => collect(&sub.lock().table),
            Body::List(part, _) => collect(&part.state.table.lock()),
        }
    }
}

impl SecondaryMmu for BrokenSecondary {
    fn fault(&self, addr: u64, write: bool) -> Result<(), SecondaryError> {
        let mm = self.mm.upgrade().ok_or(SecondaryError::Gone)?;
        let addr = addr & !(PAGE_SIZE - 1);
        let mut retry = self.timeout.start(Some(&self.counters));
        let install = |table: &mut Table, frame: FrameRef| {
            report_install(&mm, self, addr, frame, write);
            table.insert(addr, (frame, write));
            self.counters.fill();
        };
        match &self.body {
            Body::Mirror(sub) if self.kind == Broken::IgnoresRetry => {
                // The bug: one attempt of the fill without its `read_retry`, so a frame
                // read before an invalidation is installed after it.
                let _seq = sub.read_begin();
                let frame = mm.fault(addr, write)?;
                // The race window the bug loses.
                crate::sched::point();
                install(&mut sub.lock().table, frame);
                Ok(())
            }
            Body::Mirror(sub) => sub.fill(
                &mut retry,
                || Ok(mm.fault(addr, write)?),
                |g, frame| {
                    install(&mut g.table, frame);
                    Ok(Install::Done(()))
                },
            ),
            // A sequence of its own (the flush count): the bare loop.
            Body::List(part, _) => mmu_notifier::interval::retry(&mut retry, |retry| {
                let flushes = part.state.flushes.load(Acquire);
                let frame = mm.fault(addr, write)?;
                retry.window();
                let mut t = part.state.table.lock();
                if part.state.flushes.load(Acquire) != flushes {
                    return Ok(None);
                }
                if self.kind == Broken::InstallsDuringInvalidation {
                    report_install(&mm, self, addr, frame, write);
                }
                t.insert(addr, (frame, write));
                self.counters.fill();
                Ok(Some(()))
            }),
        }
    }

    fn access(&self, addr: u64, write: Option<u64>) -> Result<u64, SecondaryError> {
        let mm = self.mm.upgrade().ok_or(SecondaryError::Gone)?;
        let addr = addr & !(PAGE_SIZE - 1);
        for _ in 0..2 {
            let hit = |t: &Table| t.get(&addr).copied().filter(|&(_, w)| w || write.is_none());
            let done = match &self.body {
                Body::Mirror(sub) => {
                    let g = sub.lock();
                    hit(&g.table).map(|(f, _)| device_access(&mm, self, addr, f, write))
                }
                Body::List(part, _) => {
                    let t = part.state.table.lock();
                    hit(&t).map(|(f, _)| device_access(&mm, self, addr, f, write))
                }
            };
            if let Some(v) = done {
                self.counters.access();
                return Ok(v);
            }
            self.fault(addr, write.is_some())?;
        }
        Err(SecondaryError::Timeout)
    }

    fn stats(&self) -> SecondaryStats {
        let mut s = self.counters.snapshot();
        if let Body::List(part, _) = &self.body {
            s.invalidations = part.counters.snapshot().invalidations;
        }
        s
    }

    fn timeout_setting(&self) -> &FaultTimeout {
        &self.timeout
    }
}

impl Drop for BrokenSecondary {
    fn drop(&mut self) {
        if let Body::List(_, reg) = &mut self.body {
            drop(reg.take());
        }
    }
}
