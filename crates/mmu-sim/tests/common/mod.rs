//! What mmu-sim's tests share: a recording secondary (every notifier call it hears, in
//! order, with what the primary's entries and frames looked like at each start and each
//! TLB flush), and a small random generator.
//!
//! [`Rig`] is an address space with the recorders registered: a list subscriber
//! ([`Shadow`]: start/end, release and the aging calls) and, unless asked otherwise, a
//! secondary TLB ([`Tlb`]), both logging into one [`Log`], in the order the calls came.
//! [`Mirror`] (an interval subscriber) and [`Blocker`] (a list subscriber that refuses
//! non-blockable ranges) log there too. Pages given to [`Rig::watch`] are snapshotted;
//! each start then records what had already changed in its range ([`StartCheck`]), and
//! each flush what the entries had become and which frames were already freed
//! ([`FlushCheck`]).
// Each test file uses its own part of this.
#![allow(dead_code)]

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Weak};

use mmu_notifier::{
    Event, IntervalContext, IntervalSubscriber, ListRegistration, ListSubscriber, OwnerToken,
    Range, SecondaryTlb, WouldBlock,
};
use mmu_sim::{AddressSpace, FrameAllocator, MapKind, OomReap, Pfn, Prot, Pte, PteKind, PAGE_SIZE};

/// One page.
pub const P: u64 = PAGE_SIZE;

// ----- what the subscribers record ----------------------------------------------------

/// An invalidation range as a subscriber received it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inv {
    pub event: Event,
    pub start: u64,
    pub end: u64,
    pub blockable: bool,
    pub owner: Option<OwnerToken>,
}

impl Inv {
    pub fn of(r: &Range) -> Self {
        Inv {
            event: r.event(),
            start: r.start(),
            end: r.end(),
            blockable: r.blockable(),
            owner: r.owner(),
        }
    }
    pub fn non_blockable(self) -> Self {
        Inv {
            blockable: false,
            ..self
        }
    }
    pub fn owned_by(self, owner: u64) -> Self {
        Inv {
            owner: Some(OwnerToken(owner)),
            ..self
        }
    }
}

/// A blockable range without owner.
pub fn inv(event: Event, start: u64, end: u64) -> Inv {
    Inv {
        event,
        start,
        end,
        blockable: true,
        owner: None,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// List subscriber `release`.
    Release,
    /// List subscriber `invalidate_range_start`.
    Start(Inv),
    /// List subscriber `invalidate_range_end`.
    End(Inv),
    /// `arch_invalidate_secondary_tlbs(start, end)`.
    Flush(u64, u64),
    /// The blocking subscriber answered `WouldBlock`.
    Refused(Inv),
    /// Interval subscriber `invalidate`.
    Interval(Inv),
    ClearFlushYoung(u64, u64),
    ClearYoung(u64, u64),
    TestYoung(u64),
}

/// A watched page as it was when the test started watching it.
pub struct Watched {
    pub addr: u64,
    pub pte: Pte,
    /// The frame the entry held: number, references, generation.
    pub frame: Option<(Pfn, u32, u64)>,
}

/// What a start (list or interval) found for each watched page in its range: `None` if
/// the page was untouched, else what had already changed.
#[derive(Debug)]
pub struct StartCheck {
    pub inv: Inv,
    pub pages: Vec<(u64, Option<String>)>,
}

impl StartCheck {
    /// Exactly `n` watched pages were in the range and none had changed yet.
    #[track_caller]
    pub fn assert_untouched(&self, n: usize) {
        assert_eq!(
            self.pages.len(),
            n,
            "watched pages inside {:?}: {:?}",
            self.inv,
            self.pages
        );
        let changed: Vec<_> = self.pages.iter().filter(|(_, p)| p.is_some()).collect();
        assert!(
            changed.is_empty(),
            "changed before {:?} start returned: {changed:?}",
            self.inv
        );
    }
}

/// What `arch_invalidate_secondary_tlbs` found for each watched page in its range.
#[derive(Debug)]
pub struct FlushCheck {
    pub start: u64,
    pub end: u64,
    pub ptes: Vec<(u64, Pte)>,
    /// Watched pages whose frame was already freed when the flush came.
    pub freed: Vec<u64>,
}

impl FlushCheck {
    /// Exactly `n` watched pages were in the flushed range, each entry satisfies `ok`
    /// (`what` names it), and no frame was freed before the flush.
    #[track_caller]
    pub fn assert_all(&self, n: usize, what: &str, ok: impl Fn(Pte) -> bool) {
        assert_eq!(
            self.ptes.len(),
            n,
            "watched pages inside flush {:#x}..{:#x}: {:?}",
            self.start,
            self.end,
            self.ptes
        );
        let bad: Vec<_> = self.ptes.iter().filter(|(_, p)| !ok(*p)).collect();
        assert!(
            bad.is_empty(),
            "at the flush of {:#x}..{:#x} these entries are not {what} yet: {bad:?}",
            self.start,
            self.end
        );
        assert!(
            self.freed.is_empty(),
            "frames freed before the secondary TLB flush: {:x?}",
            self.freed
        );
    }
}

/// Everything the subscribers recorded since the last [`Rig::take`].
#[derive(Debug, Default)]
pub struct Log {
    pub calls: Vec<Call>,
    pub starts: Vec<StartCheck>,
    pub flushes: Vec<FlushCheck>,
}

/// The state the subscribers share (one log, one set of watched pages).
pub struct Shared {
    pub mm: Weak<AddressSpace>,
    pub watched: Mutex<Vec<Watched>>,
    pub log: Mutex<Log>,
    /// What `clear_flush_young` / `clear_young` / `test_young` answer.
    pub young: AtomicBool,
    /// Run one OOM-reaper pass from inside the next start, and keep its result.
    pub reap_in_start: AtomicBool,
    pub reaped_in_start: Mutex<Option<OomReap>>,
}

pub fn same_entry(a: Pte, b: Pte) -> bool {
    a.kind() == b.kind()
        && a.writable() == b.writable()
        && a.dirty() == b.dirty()
        && a.soft_dirty() == b.soft_dirty()
        && a.lazyfree() == b.lazyfree()
}

impl Shared {
    pub fn push(&self, c: Call) {
        self.log.lock().unwrap().calls.push(c);
    }

    /// Checks every watched page inside `r` against its snapshot.
    pub fn check_start(&self, r: &Range) {
        let inv = Inv::of(r);
        let Some(mm) = self.mm.upgrade() else {
            return;
        };
        let pages = self
            .watched
            .lock()
            .unwrap()
            .iter()
            .filter(|w| r.overlaps(w.addr, w.addr + P))
            .map(|w| {
                let now = mm.pte(w.addr);
                let problem = if !same_entry(now, w.pte) {
                    Some(format!("entry {:?} became {now:?}", w.pte))
                } else if let Some((pfn, refs, generation)) = w.frame {
                    let (r2, g2) = (mm.frames().refs(pfn), mm.frames().generation(pfn));
                    if g2 != generation || r2 == 0 {
                        Some(format!("frame {pfn:?} freed"))
                    } else if r2 != refs {
                        Some(format!("frame {pfn:?} references {refs} -> {r2}"))
                    } else {
                        None
                    }
                } else {
                    None
                };
                (w.addr, problem)
            })
            .collect();
        self.log
            .lock()
            .unwrap()
            .starts
            .push(StartCheck { inv, pages });
    }

    pub fn check_flush(&self, start: u64, end: u64) {
        let Some(mm) = self.mm.upgrade() else {
            return;
        };
        let mut ptes = Vec::new();
        let mut freed = Vec::new();
        for w in self.watched.lock().unwrap().iter() {
            if w.addr < start || w.addr >= end {
                continue;
            }
            ptes.push((w.addr, mm.pte(w.addr)));
            if let Some((pfn, _, generation)) = w.frame {
                if mm.frames().generation(pfn) != generation || mm.frames().refs(pfn) == 0 {
                    freed.push(w.addr);
                }
            }
        }
        self.log.lock().unwrap().flushes.push(FlushCheck {
            start,
            end,
            ptes,
            freed,
        });
    }
}

/// A shadowing secondary: start/end, release and the aging calls.
pub struct Shadow(pub Arc<Shared>);

impl ListSubscriber for Shadow {
    fn release(&self) {
        self.0.push(Call::Release);
    }
    fn invalidate_range_start(&self, r: &Range) -> Result<(), WouldBlock> {
        self.0.push(Call::Start(Inv::of(r)));
        self.0.check_start(r);
        if self.0.reap_in_start.swap(false, SeqCst) {
            if let Some(mm) = self.0.mm.upgrade() {
                *self.0.reaped_in_start.lock().unwrap() = Some(mm.oom_reap());
            }
        }
        Ok(())
    }
    fn invalidate_range_end(&self, r: &Range) {
        self.0.push(Call::End(Inv::of(r)));
    }
    fn clear_flush_young(&self, start: u64, end: u64) -> bool {
        self.0.push(Call::ClearFlushYoung(start, end));
        self.0.young.load(SeqCst)
    }
    fn clear_young(&self, start: u64, end: u64) -> bool {
        self.0.push(Call::ClearYoung(start, end));
        self.0.young.load(SeqCst)
    }
    fn test_young(&self, addr: u64) -> bool {
        self.0.push(Call::TestYoung(addr));
        self.0.young.load(SeqCst)
    }
}

/// A secondary TLB over the primary's own tables: only the TLB op.
pub struct Tlb(pub Arc<Shared>);

impl SecondaryTlb for Tlb {
    fn arch_invalidate_secondary_tlbs(&self, start: u64, end: u64) {
        self.0.push(Call::Flush(start, end));
        self.0.check_flush(start, end);
    }
}

/// A secondary that cannot proceed without sleeping in non-blockable ranges overlapping
/// `[start, end)`, for its next `refusals` such ranges. Start only (a start that can fail
/// must not come with an end).
pub struct Blocker {
    pub shared: Arc<Shared>,
    pub start: u64,
    pub end: u64,
    pub refusals: AtomicUsize,
}

impl ListSubscriber for Blocker {
    fn invalidate_range_start(&self, r: &Range) -> Result<(), WouldBlock> {
        if !r.blockable()
            && r.overlaps(self.start, self.end)
            && self
                .refusals
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            self.shared.push(Call::Refused(Inv::of(r)));
            return Err(WouldBlock);
        }
        Ok(())
    }
}

/// An interval subscriber (the only kind that hears exit's `Unmap`).
pub struct Mirror(pub Arc<Shared>);

impl IntervalSubscriber for Mirror {
    fn invalidate(
        &mut self,
        r: &Range,
        _: &mut IntervalContext<'_, Self>,
    ) -> Result<(), WouldBlock> {
        self.0.push(Call::Interval(Inv::of(r)));
        self.0.check_start(r);
        Ok(())
    }
}

/// An address space with a [`Shadow`] and a [`Tlb`] registered, in that order.
pub struct Rig {
    pub mm: Arc<AddressSpace>,
    pub s: Arc<Shared>,
    pub regs: Vec<ListRegistration>,
}

impl Rig {
    pub fn new() -> Self {
        Self::build(true)
    }

    /// An address space with only the [`Shadow`] registered (no TLB: its log holds no
    /// flushes).
    pub fn list_only() -> Self {
        Self::build(false)
    }

    fn build(tlb: bool) -> Self {
        let mm = AddressSpace::new(Arc::new(FrameAllocator::new(4096)));
        let s = Arc::new(Shared {
            mm: Arc::downgrade(&mm),
            watched: Mutex::new(Vec::new()),
            log: Mutex::new(Log::default()),
            young: AtomicBool::new(false),
            reap_in_start: AtomicBool::new(false),
            reaped_in_start: Mutex::new(None),
        });
        let mut regs = vec![mm.notifier().register(Arc::new(Shadow(s.clone()))).unwrap()];
        if tlb {
            regs.push(
                mm.notifier()
                    .register_tlb(Arc::new(Tlb(s.clone())))
                    .unwrap(),
            );
        }
        Rig { mm, s, regs }
    }

    /// Registers a [`Blocker`] over `[start, end)` (after the other two).
    pub fn add_blocker(&mut self, start: u64, end: u64, refusals: usize) {
        let b = Arc::new(Blocker {
            shared: self.s.clone(),
            start,
            end,
            refusals: AtomicUsize::new(refusals),
        });
        self.regs.push(self.mm.notifier().register(b).unwrap());
    }

    /// Watches exactly these pages from now on, as they are now.
    pub fn watch(&self, addrs: impl IntoIterator<Item = u64>) {
        let frames = self.mm.frames();
        *self.s.watched.lock().unwrap() = addrs
            .into_iter()
            .map(|addr| {
                let pte = self.mm.pte(addr);
                Watched {
                    addr,
                    pte,
                    frame: pte
                        .frame()
                        .map(|p| (p, frames.refs(p), frames.generation(p))),
                }
            })
            .collect();
    }

    /// Takes the log.
    pub fn take(&self) -> Log {
        std::mem::take(&mut *self.s.log.lock().unwrap())
    }

    /// Maps anonymous private memory at exactly `addr`.
    pub fn map_at(&self, addr: u64, len: u64, prot: Prot) -> u64 {
        assert_eq!(
            self.mm
                .mmap(len, prot, MapKind::AnonPrivate, Some(addr))
                .unwrap(),
            addr
        );
        addr
    }

    /// Writes each of the `n` pages from `start` with its own address.
    pub fn fill(&self, start: u64, n: u64) {
        for i in 0..n {
            self.mm.write(start + i * P, start + i * P).unwrap();
        }
    }

    pub fn pfn(&self, addr: u64) -> Pfn {
        self.mm.pte(addr).pfn().expect("present")
    }
}

pub fn pages(start: u64, n: u64) -> impl Iterator<Item = u64> {
    (0..n).map(move |i| start + i * P)
}

pub fn is_busy(p: Pte) -> bool {
    matches!(p.kind(), PteKind::Busy(_))
}

pub fn read_only(p: Pte) -> bool {
    p.present() && !p.writable()
}

impl fmt::Display for Call {
    /// One line per call, as a log reads: `start Unmap 0x1000..0x3000 blockable`,
    /// `end Unmap 0x1000..0x3000`, `release`, ...
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let blockable = |i: &Inv| {
            if i.blockable {
                "blockable"
            } else {
                "non-blockable"
            }
        };
        match self {
            Call::Release => write!(f, "release"),
            Call::Start(i) => write!(
                f,
                "start {:?} {:#x}..{:#x} {}",
                i.event,
                i.start,
                i.end,
                blockable(i)
            ),
            Call::End(i) => write!(f, "end {:?} {:#x}..{:#x}", i.event, i.start, i.end),
            Call::Flush(s, e) => write!(f, "flush {s:#x}..{e:#x}"),
            Call::Refused(i) => write!(f, "refused {:?} {:#x}..{:#x}", i.event, i.start, i.end),
            Call::Interval(i) => write!(
                f,
                "interval {:?} {:#x}..{:#x} {}",
                i.event,
                i.start,
                i.end,
                blockable(i)
            ),
            Call::ClearFlushYoung(s, e) => write!(f, "clear_flush_young {s:#x}..{e:#x}"),
            Call::ClearYoung(s, e) => write!(f, "clear_young {s:#x}..{e:#x}"),
            Call::TestYoung(a) => write!(f, "test_young {a:#x}"),
        }
    }
}

impl Log {
    /// The calls, one line each (see [`Call`]'s `Display`).
    pub fn lines(&self) -> Vec<String> {
        self.calls.iter().map(Call::to_string).collect()
    }

    /// Every watched page that some start found already changed, with what changed.
    pub fn start_problems(&self) -> Vec<String> {
        self.starts
            .iter()
            .flat_map(|s| {
                s.pages
                    .iter()
                    .filter_map(|(a, p)| p.as_ref().map(|p| format!("{a:#x}: {p}")))
            })
            .collect()
    }

    /// The interval subscriber's calls, as (event, start, end).
    pub fn intervals(&self) -> Vec<(Event, u64, u64)> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::Interval(i) => Some((i.event, i.start, i.end)),
                _ => None,
            })
            .collect()
    }
}

/// xorshift64: a seeded stream of test inputs (the seed must not be 0).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}
